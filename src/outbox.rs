//! The outbox relay: publishes committed events to `holdclear.events`.
//! The events and their CloudEvents envelopes are the domain's
//! ([`crate::domain::OutboundEvent`], [`crate::domain::Envelope`]).
//!
//! Events are written in the same transaction as the state change that
//! implies them ([`crate::store::Store::commit_steps`]). The [`Relay`] takes
//! unsent rows in id order under `FOR UPDATE SKIP LOCKED` (several relays
//! may run), publishes them with publisher confirms and `mandatory`, and
//! marks the confirmed ones sent in the same transaction. A nack, a return
//! (no queue bound for the routing key) or a lost connection leaves the row
//! unsent, with `attempts`, `last_error` and a backoff before the next try.
//! Publishing is at least once; the envelope id is stable per transition,
//! so a consumer can drop duplicates.
//!
//! An event no queue is bound for is not returned when the events exchange
//! has its alternate exchange (the policy `holdclear-events`, see
//! [`crate::broker::topology`]): the broker keeps it in
//! `<events exchange>.unrouted` and the row is sent. The relay
//! reports that queue's length as `holdclear_events_unrouted` (and a WARN
//! when it grows), so that an operator binds the missing queue.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, Connection, OutgoingMessage, Publisher};
use crate::config::{RetrySettings, Topology};
use crate::domain::CONTENT_TYPE;
use crate::retry::{self, Reconnect};
use crate::store::{OutboxFailure, OutboxRow, Store, StoreError};

/// What went wrong in the relay (logged; the relay itself never gives up).
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// RabbitMQ failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// An event body could not be serialised (a bug).
    #[error("cannot serialise an event: {0}")]
    Serialise(#[from] serde_json::Error),
}

/// The relay's bounds and pacing.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// Rows published per confirm window.
    pub batch: usize,
    /// Look for rows written by other workers this often.
    pub idle_poll: Duration,
    /// Longest wait for a window's confirms; past it the channel counts as lost.
    pub confirm_timeout: Duration,
    /// Backoff of a row that failed to publish (its `max_elapsed` is unused:
    /// an event is never dropped).
    pub retry: RetrySettings,
    /// How often to read the length of the unrouted-events queue.
    pub unrouted_check: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch: 100,
            idle_poll: Duration::from_secs(1),
            confirm_timeout: Duration::from_secs(30),
            retry: RetrySettings {
                initial: Duration::from_millis(200),
                max_interval: Duration::from_secs(30),
                max_elapsed: Duration::MAX,
                multiplier: 2.0,
                randomization: 0.2,
            },
            unrouted_check: Duration::from_secs(30),
        }
    }
}

/// Failed attempts after which a row's failure is logged as an ERROR (an
/// operator must bind a queue or fix the exchange).
const ERROR_AFTER_ATTEMPTS: i32 = 10;

/// Publishes committed events to the events exchange.
pub struct Relay {
    store: Store,
    broker: Broker,
    topology: Topology,
    wake: Arc<Notify>,
    settings: RelaySettings,
}

/// What one publishing round did.
enum Round {
    /// Nothing was due.
    Idle,
    /// Rows were published or failed; `lost` when the channel must be reopened.
    Worked { lost: bool },
}

impl Relay {
    /// A relay publishing to `topology.events_exchange`; `wake` is notified
    /// by the engine after commits that wrote events.
    pub fn new(store: Store, broker: Broker, topology: Topology, wake: Arc<Notify>) -> Self {
        Self {
            store,
            broker,
            topology,
            wake,
            settings: RelaySettings::default(),
        }
    }

    /// Replaces the default bounds and pacing.
    pub fn with_settings(mut self, settings: RelaySettings) -> Self {
        self.settings = settings;
        self
    }

    /// Publishes until `cancel` fires; reconnects by itself.
    pub async fn run(self, cancel: CancellationToken) {
        let mut reconnect = Reconnect::default();
        'connect: while !cancel.is_cancelled() {
            let conn = match self.broker.connect_until("outbox", &cancel).await {
                Ok(conn) => conn,
                Err(_) => break,
            };
            tracing::info!(exchange = %self.topology.events_exchange, "Outbox relay connected.");
            let mut unrouted = Unrouted::default();
            loop {
                let publisher = match Publisher::open(&conn).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot open a publishing channel; reconnecting.");
                        crate::broker::close(&conn).await;
                        if !pause(&cancel, reconnect.next_delay()).await {
                            break 'connect;
                        }
                        continue 'connect;
                    }
                };
                // Publish until the channel is lost.
                loop {
                    if cancel.is_cancelled() {
                        crate::broker::close(&conn).await;
                        break 'connect;
                    }
                    unrouted.check(&conn, &self.topology, &self.settings).await;
                    match self.round(&publisher).await {
                        Ok(Round::Worked { lost: false }) => reconnect.reset(),
                        Ok(Round::Worked { lost: true }) => {
                            // Closed now, not when the next one opens: a
                            // channel whose confirms are late must not stay
                            // open through the pause with its messages.
                            publisher.close("holdclear outbox: channel given up").await;
                            break;
                        }
                        Ok(Round::Idle) => {
                            reconnect.reset();
                            self.idle(&cancel).await;
                        }
                        Err(e) => {
                            let delay = reconnect.next_delay();
                            tracing::warn!(
                                error = %e,
                                retry_in_ms = delay.as_millis() as u64,
                                "Outbox relay round failed; retrying."
                            );
                            if !pause(&cancel, delay).await {
                                crate::broker::close(&conn).await;
                                break 'connect;
                            }
                        }
                    }
                }
                // The channel is gone; the connection may be too.
                if !pause(&cancel, reconnect.next_delay()).await {
                    crate::broker::close(&conn).await;
                    break 'connect;
                }
            }
        }
        tracing::info!("Outbox relay stopped.");
    }

    /// Waits for a wake-up, the next due row or the idle poll.
    async fn idle(&self, cancel: &CancellationToken) {
        let mut wait = self.settings.idle_poll;
        if let Ok(Some(due)) = self.store.outbox_next_due().await {
            let until = (due - Utc::now()).to_std().unwrap_or_default();
            wait = wait.min(until.max(Duration::from_millis(5)));
        }
        tokio::select! {
            () = cancel.cancelled() => {}
            () = self.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }

    /// Takes one window of due rows, publishes it and settles each row.
    async fn round(&self, publisher: &Publisher) -> Result<Round, OutboxError> {
        let batch = self.store.outbox_take(self.settings.batch).await?;
        if batch.rows().is_empty() {
            batch.settle(&[], &[]).await?;
            return Ok(Round::Idle);
        }
        let mut messages = Vec::with_capacity(batch.rows().len());
        for row in batch.rows() {
            messages.push(message(row)?);
        }
        // No confirms in time: every row counts as failed and the channel as lost.
        let results = tokio::time::timeout(
            self.settings.confirm_timeout,
            publisher.publish_all(&self.topology.events_exchange, &messages),
        )
        .await
        .unwrap_or_default();
        let mut sent = Vec::new();
        let mut failed = Vec::new();
        let mut lost = results.len() != batch.rows().len();
        for (i, row) in batch.rows().iter().enumerate() {
            match results.get(i) {
                Some(Ok(())) => {
                    sent.push(row.id);
                    metrics::counter!(
                        "holdclear_events_published_total",
                        "routing_key" => row.routing_key.clone()
                    )
                    .increment(1);
                    tracing::debug!(
                        case = %row.case_id,
                        envelope = %row.envelope_id,
                        routing_key = %row.routing_key,
                        "Event published."
                    );
                }
                Some(Err(e)) => {
                    lost |= e.is_channel_lost();
                    failed.push(self.not_published(row, e.to_string()));
                }
                None => {
                    let error = format!(
                        "no confirm within {}",
                        humantime::format_duration(self.settings.confirm_timeout)
                    );
                    failed.push(self.not_published(row, error));
                }
            }
        }
        batch.settle(&sent, &failed).await?;
        Ok(Round::Worked { lost })
    }

    /// A row that was not published: logged (ERROR once it has failed
    /// [`ERROR_AFTER_ATTEMPTS`] times), counted, and due again after the
    /// durable retry delay of its attempts.
    fn not_published(&self, row: &OutboxRow, error: String) -> OutboxFailure {
        let attempts = row.attempts.saturating_add(1);
        let retry_in = retry::durable_delay(
            &self.settings.retry,
            u32::try_from(attempts).unwrap_or(u32::MAX),
        );
        metrics::counter!("holdclear_outbox_publish_failures_total").increment(1);
        if attempts == ERROR_AFTER_ATTEMPTS {
            tracing::error!(
                case = %row.case_id,
                envelope = %row.envelope_id,
                routing_key = %row.routing_key,
                exchange = %self.topology.events_exchange,
                attempts,
                error = %error,
                "Event cannot be published; check the events exchange, and bind a queue for this routing key or give the exchange its alternate exchange (policy holdclear-events, docs/deployment.md)."
            );
        } else {
            tracing::warn!(
                case = %row.case_id,
                envelope = %row.envelope_id,
                routing_key = %row.routing_key,
                attempts,
                retry_in_ms = retry_in.as_millis() as u64,
                error = %error,
                "Event not published; it stays in the outbox."
            );
        }
        OutboxFailure {
            id: row.id,
            error,
            retry_in,
        }
    }
}

/// The length of the unrouted-events queue, read now and then.
#[derive(Default)]
struct Unrouted {
    checked: Option<tokio::time::Instant>,
    last: Option<u32>,
}

impl Unrouted {
    /// Reads the queue's length when `settings.unrouted_check` has passed;
    /// sets the gauge and warns when it grew. A missing queue (an events
    /// exchange without its alternate exchange) is not an error.
    async fn check(&mut self, conn: &Connection, topology: &Topology, settings: &RelaySettings) {
        if self
            .checked
            .is_some_and(|t| t.elapsed() < settings.unrouted_check)
        {
            return;
        }
        self.checked = Some(tokio::time::Instant::now());
        let queue = topology.unrouted_queue();
        match crate::broker::ready_messages(conn, &queue).await {
            Ok(Some(n)) => {
                metrics::gauge!("holdclear_events_unrouted").set(f64::from(n));
                if n > self.last.unwrap_or(0) {
                    tracing::warn!(
                        %queue,
                        messages = n,
                        exchange = %topology.events_exchange,
                        "Events no queue is bound for are kept by the broker; bind a queue for their routing keys, then move or purge them."
                    );
                }
                self.last = Some(n);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(%queue, error = %e, "Cannot read the unrouted-events queue."),
        }
    }
}

/// Sleeps unless cancelled; `false` when cancelled.
async fn pause(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

fn message(row: &OutboxRow) -> Result<OutgoingMessage, OutboxError> {
    let timestamp = row
        .body
        .get("time")
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp())
        .unwrap_or_else(|| row.created_at.timestamp());
    Ok(OutgoingMessage {
        routing_key: row.routing_key.clone(),
        message_id: row.envelope_id.to_string(),
        content_type: CONTENT_TYPE.to_owned(),
        body: serde_json::to_vec(&row.body)?,
        timestamp: u64::try_from(timestamp).ok(),
        headers: Vec::new(),
    })
}
