//! Intake: a delivery becomes a validated event and a case, or a dead letter.
//!
//! Deliveries are taken in batches (up to `intake_batch`, or whatever came
//! within `intake_linger` of the first). Each body is decoded once. A body
//! that is not a valid held-order event is dead-lettered with its reason
//! (confirmed by the broker); the valid ones are written in one transaction
//! ([`Store::record_held`]). Only then is the batch acknowledged, with one
//! `multiple` ack per channel where possible.
//!
//! A failure outside the message never dead-letters it: while the database
//! is unreachable the batch is kept and its commit retried with backoff
//! (readiness reports the database down), and nothing is acked or requeued
//! until it commits.
//!
//! The next batch is decoded while earlier ones are written (as many
//! transactions at once as the prefetch fills batches, at most
//! [`MAX_IN_FLIGHT`]; concurrent writes of one order
//! are resolved by the store). Acks go strictly in delivery order, batch
//! after batch, which is what makes acks with `multiple` safe.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesOrdered;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::{Delivery, acknowledge, dead_letter};
use crate::config::AmqpSettings;
use crate::domain::{DeadLetterCode, DecodeError, HeldOrderEvent};
use crate::ops::health::Health;
use crate::retry::Reconnect;
use crate::store::{Probe, Recorded, Store};

/// The bounds of intake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntakeSettings {
    /// Deliveries per batch (and per transaction), at most.
    pub batch: usize,
    /// How long to wait for a batch to fill after its first delivery.
    pub linger: Duration,
    /// Largest accepted body, in bytes.
    pub max_payload_bytes: usize,
    /// Batches written at once, at most (each is one transaction).
    pub in_flight: usize,
    /// Longest wait for the broker's confirm of a dead letter.
    pub confirm_timeout: Duration,
}

impl From<&AmqpSettings> for IntakeSettings {
    /// Writes as many batches at once as the prefetch can fill (prefetch /
    /// batch), between 1 and [`MAX_IN_FLIGHT`]: a full batch more in flight
    /// than the broker hands out would only wait.
    fn from(amqp: &AmqpSettings) -> Self {
        let batch = amqp.intake_batch.max(1);
        Self {
            batch,
            linger: amqp.intake_linger,
            max_payload_bytes: amqp.max_payload_bytes,
            in_flight: (usize::from(amqp.prefetch) / batch).clamp(1, MAX_IN_FLIGHT),
            confirm_timeout: amqp.confirm_timeout,
        }
    }
}

/// Turns deliveries into cases or dead letters.
pub struct Intake {
    store: Store,
    settings: IntakeSettings,
    health: Arc<Health>,
    cases_opened: Arc<Notify>,
}

/// Batches being written at once, at most, whatever the prefetch.
pub const MAX_IN_FLIGHT: usize = 8;

/// A batch after writing: which of its deliveries are settled (committed
/// or dead-lettered), ready to be acknowledged.
struct Written {
    batch: Vec<Delivery>,
    settled: Vec<bool>,
    tally: Tally,
    span: tracing::Span,
}

/// Collects deliveries into batches. Deliveries stay in the buffer between
/// calls, so a call dropped half-way (in a `select!`) loses nothing.
struct Buffer {
    limit: usize,
    linger: Duration,
    batch: Vec<Delivery>,
    /// When the batch being collected is due, counted from its first delivery.
    due: Option<tokio::time::Instant>,
}

impl Buffer {
    fn new(settings: IntakeSettings) -> Self {
        let limit = settings.batch.max(1);
        Self {
            limit,
            linger: settings.linger,
            batch: Vec::with_capacity(limit),
            due: None,
        }
    }

    /// The next batch: full, or due, or the last one once `deliveries` is
    /// closed; `None` when it is closed and nothing is left.
    async fn fill(&mut self, deliveries: &mut mpsc::Receiver<Delivery>) -> Option<Vec<Delivery>> {
        loop {
            let room = self.limit - self.batch.len();
            if room == 0 {
                break;
            }
            let received = match self.due {
                None => deliveries.recv_many(&mut self.batch, room).await,
                Some(due) => tokio::select! {
                    () = tokio::time::sleep_until(due) => break,
                    n = deliveries.recv_many(&mut self.batch, room) => n,
                },
            };
            if received == 0 {
                break;
            }
            self.due
                .get_or_insert_with(|| tokio::time::Instant::now() + self.linger);
        }
        if self.batch.is_empty() {
            return None;
        }
        self.due = None;
        let next = Vec::with_capacity(self.limit);
        Some(std::mem::replace(&mut self.batch, next))
    }
}

/// Outcomes of one batch, counted for metrics.
#[derive(Debug, Default)]
struct Tally {
    accepted: u64,
    held_again: u64,
    duplicate: u64,
    dead_lettered: u64,
}

impl Intake {
    /// Intake writing to `store`, reporting the database to `health`, and
    /// calling `cases_opened.notify_one()` after every commit that opened
    /// at least one case (the case engine waits on it).
    pub fn new(
        store: Store,
        settings: IntakeSettings,
        health: Arc<Health>,
        cases_opened: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            settings,
            health,
            cases_opened,
        }
    }

    /// Takes deliveries until `deliveries` is closed and drained, handling
    /// each batch to the end (commit, then ack). The next batch is decoded
    /// while earlier ones are written (up to `settings.in_flight` at once);
    /// acks go strictly in delivery order. `abort` (the shutdown deadline)
    /// gives up on batches that cannot be committed: they are left
    /// unacknowledged for the broker to deliver again.
    pub async fn run(self, mut deliveries: mpsc::Receiver<Delivery>, abort: CancellationToken) {
        let this = &self;
        let mut buffer = Buffer::new(self.settings);
        let mut in_flight = FuturesOrdered::new();
        let mut open = true;
        while open || !in_flight.is_empty() {
            tokio::select! {
                biased;
                Some(written) = in_flight.next() => this.acknowledge(written).await,
                filled = buffer.fill(&mut deliveries), if open && in_flight.len() < this.settings.in_flight.max(1) => {
                    match filled {
                        Some(batch) => in_flight.push_back(this.write(batch, &abort)),
                        None => open = false,
                    }
                }
                () = abort.cancelled(), if open => open = false,
                else => break,
            }
        }
    }

    /// Decodes a batch, then dead-letters the refused deliveries and
    /// records the events (both at once), each retried until done or `abort`.
    async fn write(&self, batch: Vec<Delivery>, abort: &CancellationToken) -> Written {
        let span = tracing::info_span!("intake_batch", size = batch.len());
        async {
            metrics::histogram!("holdclear_intake_batch_size").record(batch.len() as f64);
            let failed_at = Utc::now();
            let mut events = Vec::with_capacity(batch.len());
            let mut event_at = Vec::with_capacity(batch.len());
            let mut refused = Vec::new();
            for (i, d) in batch.iter().enumerate() {
                match self.decode(d.body()) {
                    Ok(e) => {
                        events.push(e);
                        event_at.push(i);
                    }
                    Err(e) => refused.push((i, e)),
                }
            }
            let (dead_lettered, recorded) = tokio::join!(
                self.dead_letter_all(&batch, &refused, failed_at, abort),
                self.commit(&events, abort),
            );
            let mut settled = vec![false; batch.len()];
            let mut tally = Tally::default();
            for i in dead_lettered {
                settled[i] = true;
                tally.dead_lettered += 1;
            }
            if let Some(recorded) = recorded {
                for ((event, &at), outcome) in events.iter().zip(&event_at).zip(&recorded) {
                    settled[at] = true;
                    tally.count(outcome);
                    tracing::debug!(
                        event_id = %event.id,
                        order = %event.data.order,
                        outcome = ?outcome,
                        redelivered = batch[at].redelivered(),
                        "Held order recorded."
                    );
                }
            }
            Written {
                batch,
                settled,
                tally,
                span: tracing::Span::current(),
            }
        }
        .instrument(span)
        .await
    }

    /// Acknowledges a written batch (only its settled deliveries), wakes the
    /// case engine if cases were opened, and counts the outcomes.
    async fn acknowledge(&self, written: Written) {
        let Written {
            batch,
            settled,
            tally,
            span,
        } = written;
        let pairs: Vec<(&Delivery, bool)> = batch.iter().zip(settled).collect();
        let acks = acknowledge(&pairs).instrument(span.clone()).await;
        let _entered = span.enter();
        if tally.accepted > 0 {
            self.cases_opened.notify_one();
        }
        if acks.lost > 0 {
            tracing::warn!(
                deliveries = acks.lost,
                "Their channel closed before the ack; the broker will deliver them again and the inbox will recognise them."
            );
        }
        tally.record();
        tracing::debug!(
            accepted = tally.accepted,
            held_again = tally.held_again,
            duplicate = tally.duplicate,
            dead_lettered = tally.dead_lettered,
            acked = acks.acked,
            ack_frames = acks.frames,
            "Batch settled."
        );
    }

    /// Decodes a body once and checks that the event can be stored.
    fn decode(&self, body: &[u8]) -> Result<HeldOrderEvent, DecodeError> {
        let event = HeldOrderEvent::decode(body, self.settings.max_payload_bytes)?;
        storable(body, &event)?;
        Ok(event)
    }

    /// Dead-letters the refused deliveries, concurrently, each confirmed;
    /// returns the positions of those the broker took. A refusal or nack by
    /// the broker is retried with backoff; a delivery whose channel is gone
    /// is left (it comes again), and so is everything once `abort` fires.
    async fn dead_letter_all(
        &self,
        batch: &[Delivery],
        refused: &[(usize, DecodeError)],
        failed_at: DateTime<Utc>,
        abort: &CancellationToken,
    ) -> Vec<usize> {
        let mut done = Vec::with_capacity(refused.len());
        let mut pending: Vec<&(usize, DecodeError)> = refused.iter().collect();
        let mut delays = Reconnect::default();
        while !pending.is_empty() {
            let results = join_all(pending.iter().map(|(i, err)| {
                dead_letter(
                    &batch[*i],
                    err.code,
                    &err.detail,
                    failed_at,
                    self.settings.confirm_timeout,
                )
            }))
            .await;
            let mut retry = Vec::new();
            for (item, result) in pending.into_iter().zip(results) {
                let (i, err) = item;
                let d = &batch[*i];
                match result {
                    Ok(()) => {
                        done.push(*i);
                        metrics::counter!("holdclear_dead_letters_total", "code" => err.code.as_str())
                            .increment(1);
                        let order = HeldOrderEvent::peek_order_number(d.body());
                        tracing::warn!(
                            code = %err.code,
                            detail = %err.detail,
                            message_id = d.message_id().unwrap_or(""),
                            order = order.as_deref().unwrap_or(""),
                            bytes = d.body().len(),
                            "Message dead-lettered: it is not a valid held-order event."
                        );
                    }
                    Err(e) if e.is_channel_lost() => {
                        tracing::debug!(
                            message_id = d.message_id().unwrap_or(""),
                            error = %e,
                            "Cannot dead-letter: the channel is gone; the broker will deliver it again."
                        );
                    }
                    Err(e) => {
                        tracing::warn!(
                            code = %err.code,
                            message_id = d.message_id().unwrap_or(""),
                            error = %e,
                            "The broker did not take the dead letter; retrying."
                        );
                        retry.push(item);
                    }
                }
            }
            pending = retry;
            if !pending.is_empty() {
                tokio::select! {
                    () = abort.cancelled() => break,
                    () = tokio::time::sleep(delays.next_delay()) => {}
                }
            }
        }
        done
    }

    /// Writes the events, retrying with backoff until it commits; `None`
    /// when `abort` fired first.
    async fn commit(
        &self,
        events: &[HeldOrderEvent],
        abort: &CancellationToken,
    ) -> Option<Vec<Recorded>> {
        if events.is_empty() {
            return Some(Vec::new());
        }
        let mut delays = Reconnect::default();
        loop {
            match self.store.record_held(events).await {
                Ok(recorded) => {
                    self.health.set_database(true);
                    return Some(recorded);
                }
                Err(e) => {
                    let delay = delays.next_delay();
                    // A database that fails its readiness probe is down,
                    // whatever the error said; a busy one (no pooled
                    // connection free in time) is not.
                    if self.database_down().await {
                        self.health.set_database(false);
                        tracing::warn!(
                            error = %e,
                            events = events.len(),
                            retry_in_ms = delay.as_millis() as u64,
                            "Cannot record held orders: the database is unreachable; keeping the batch and retrying."
                        );
                    } else if e.is_transient() {
                        tracing::warn!(
                            error = %e,
                            events = events.len(),
                            retry_in_ms = delay.as_millis() as u64,
                            "Cannot record held orders now (a timeout or a lost session); keeping the batch and retrying."
                        );
                    } else {
                        tracing::error!(
                            error = %e,
                            events = events.len(),
                            retry_in_ms = delay.as_millis() as u64,
                            "Cannot record held orders; keeping the batch and retrying."
                        );
                    }
                    tokio::select! {
                        () = abort.cancelled() => {
                            tracing::warn!(
                                events = events.len(),
                                "Shutdown deadline reached before the batch committed; leaving it to the broker."
                            );
                            return None;
                        }
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

impl Intake {
    /// The readiness probe of the store, bounded: down or unmigrated (not
    /// merely busy).
    async fn database_down(&self) -> bool {
        matches!(
            self.store.probe(Duration::from_secs(2)).await,
            Probe::Down | Probe::Unmigrated
        )
    }
}

impl Tally {
    fn count(&mut self, outcome: &Recorded) {
        match outcome {
            Recorded::Opened { .. } => self.accepted += 1,
            Recorded::HeldAgain { .. } => self.held_again += 1,
            Recorded::Duplicate => self.duplicate += 1,
        }
    }

    fn record(&self) {
        for (outcome, n) in [
            ("accepted", self.accepted),
            ("held_again", self.held_again),
            ("duplicate", self.duplicate),
            ("dead_lettered", self.dead_lettered),
        ] {
            if n > 0 {
                metrics::counter!("holdclear_events_consumed_total", "outcome" => outcome)
                    .increment(n);
            }
        }
    }
}

/// PostgreSQL cannot store the NUL character in text or `jsonb`; an event
/// carrying one (JSON `\u0000`) is the message's fault, not the database's,
/// and is refused as `INVALID_EVENT` rather than failing its whole batch.
fn storable(body: &[u8], event: &HeldOrderEvent) -> Result<(), DecodeError> {
    // Fast path: no escape in the body, no NUL in the event.
    if !body.windows(6).any(|w| w == br"\u0000") {
        return Ok(());
    }
    let value = serde_json::to_value(event).map_err(|e| DecodeError {
        code: DeadLetterCode::InvalidEvent,
        detail: format!("the event cannot be stored: {e}"),
    })?;
    match nul_path(&value, String::new()) {
        None => Ok(()),
        Some(path) => Err(DecodeError {
            code: DeadLetterCode::InvalidEvent,
            detail: format!("{path} contains the NUL character (\\u0000), which cannot be stored"),
        }),
    }
}

/// The path of the first string holding a NUL character, if any.
fn nul_path(value: &Value, path: String) -> Option<String> {
    match value {
        Value::String(s) => s.contains('\0').then_some(path),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_path(v, format!("{path}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let at = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            nul_path(v, at)
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_in_flight_follow_the_prefetch() {
        use std::collections::HashMap;
        let intake = |prefetch: &str, batch: &str| {
            let env: HashMap<String, String> = [
                ("HOLDCLEAR_AMQP_PREFETCH", prefetch),
                ("HOLDCLEAR_INTAKE_BATCH", batch),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            let settings = crate::config::Settings::from_sources(None, &env).unwrap();
            IntakeSettings::from(&settings.amqp).in_flight
        };
        assert_eq!(intake("1024", "256"), 4, "the defaults");
        assert_eq!(intake("2048", "256"), 8);
        assert_eq!(intake("65535", "256"), MAX_IN_FLIGHT, "bounded");
        assert_eq!(intake("100", "256"), 1, "at least one");
        assert_eq!(intake("1000", "300"), 3);
    }

    fn body(source: &str, po: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "specversion": "1.0", "type": "commerce.order.held.v1", "source": source,
            "id": "e-1", "data": {"salesOrderNumber": "1", "holdReason": "NO_SMART_ACCOUNT",
            "purchaseOrderNumber": po, "ignored": "x\u{0}y"}}))
        .unwrap()
    }

    #[test]
    fn nul_characters_are_refused_where_they_would_be_stored() {
        let cases = [
            ("/commerce", "PO-1", None),
            ("/com\u{0}merce", "PO-1", Some("source")),
            ("/commerce", "PO\u{0}1", Some("data.purchaseOrderNumber")),
            // A literal backslash-u text is not a NUL.
            ("/commerce", "PO\\u0000", None),
        ];
        for (source, po, want) in cases {
            let b = body(source, po);
            let event = HeldOrderEvent::decode(&b, 1 << 20).unwrap();
            let got = storable(&b, &event);
            match want {
                None => assert!(got.is_ok(), "{source:?} {po:?}: {got:?}"),
                Some(path) => {
                    let err = got.unwrap_err();
                    assert_eq!(err.code, DeadLetterCode::InvalidEvent);
                    assert!(err.detail.starts_with(path), "{err:?}");
                }
            }
        }
    }
}
