//! The outbox: the events the engine emits, as CloudEvents envelopes, and
//! the relay that publishes committed ones to `holdclear.events`.
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

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{Broker, BrokerError, Connection, OutgoingMessage, Publisher};
use crate::config::{RetrySettings, Topology};
use crate::domain::{AccountType, EscalationLevel, EscalationReason, OrderId};
use crate::retry::{self, Reconnect};
use crate::store::{OutboxFailure, OutboxRow, Store, StoreError};

/// CloudEvents `source` of every emitted event.
pub const SOURCE: &str = "/holdclear";
/// AMQP `content_type` of every emitted event (structured mode).
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// Namespace of envelope ids (UUID v5).
const ENVELOPE_NAMESPACE: Uuid = Uuid::from_u128(0x2f8e_51c0_7a4d_4b69_8c3e_0d1a_5b6f_e902);

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

/// An event the engine emits (the `data` fields besides the ids; see
/// `contracts/events.md`).
#[derive(Clone, Debug, PartialEq)]
pub enum OutboundEvent {
    /// `order.smart_account_assigned`: the assignment call was accepted.
    SmartAccountAssigned {
        /// The account's domain.
        smart_account_domain: String,
        /// Customer or holding account.
        account_type: AccountType,
        /// The Virtual Account.
        virtual_account_name: String,
        /// The rule that chose it.
        rule: String,
        /// The server's assignment id.
        assignment_id: String,
        /// Assignment calls made, the accepted one included.
        attempts: u32,
    },
    /// `order.hold_released`: the order shows the hold released.
    HoldReleased {
        /// When, as the order says.
        released_at: DateTime<Utc>,
        /// From `heldAt` to `releasedAt`.
        held_seconds: i64,
        /// The assigned (or activated) account's domain.
        smart_account_domain: Option<String>,
        /// The rule that decided the case.
        rule: Option<String>,
        /// Codes of other holds still on the order.
        other_holds: Vec<String>,
    },
    /// `order.hold_escalated`: a person must act.
    HoldEscalated {
        /// Why.
        reason: EscalationReason,
        /// How urgent.
        level: EscalationLevel,
        /// From `heldAt` to now.
        held_seconds: i64,
        /// What exactly happened.
        detail: String,
        /// Which `HOLD_PERSISTS` threshold (index), `None` for a terminal escalation.
        threshold: Option<u32>,
    },
}

impl OutboundEvent {
    /// The routing key on the events exchange.
    pub fn routing_key(&self) -> &'static str {
        match self {
            Self::SmartAccountAssigned { .. } => "order.smart_account_assigned",
            Self::HoldReleased { .. } => "order.hold_released",
            Self::HoldEscalated { .. } => "order.hold_escalated",
        }
    }

    /// The transition this event marks, unique within one case generation:
    /// the input of the envelope id.
    pub fn transition(&self) -> String {
        match self {
            Self::SmartAccountAssigned { .. } => "assigned".into(),
            Self::HoldReleased { .. } => "released".into(),
            Self::HoldEscalated {
                threshold: Some(n), ..
            } => format!("hold_persists/{n}"),
            Self::HoldEscalated {
                threshold: None, ..
            } => "escalated".into(),
        }
    }

    fn fields(&self) -> Value {
        match self {
            Self::SmartAccountAssigned {
                smart_account_domain,
                account_type,
                virtual_account_name,
                rule,
                assignment_id,
                attempts,
            } => json!({
                "smartAccountDomain": smart_account_domain,
                "accountType": account_type.as_str(),
                "virtualAccountName": virtual_account_name,
                "rule": rule,
                "assignmentId": assignment_id,
                "attempts": attempts,
            }),
            Self::HoldReleased {
                released_at,
                held_seconds,
                smart_account_domain,
                rule,
                other_holds,
            } => json!({
                "releasedAt": rfc3339(*released_at),
                "heldSeconds": held_seconds,
                "smartAccountDomain": smart_account_domain,
                "rule": rule,
                "otherHolds": other_holds,
            }),
            Self::HoldEscalated {
                reason,
                level,
                held_seconds,
                detail,
                ..
            } => json!({
                "reason": reason.as_str(),
                "level": level.as_str(),
                "heldSeconds": held_seconds,
                "action": reason.action(),
                "detail": detail,
            }),
        }
    }

    /// The CloudEvents envelope of this event for one case.
    pub fn envelope(
        &self,
        case_id: Uuid,
        generation: u32,
        order: &OrderId,
        time: DateTime<Utc>,
    ) -> Envelope {
        let id = envelope_id(case_id, generation, &self.transition());
        let mut data = Map::new();
        data.insert(
            "salesOrderNumber".into(),
            order
                .sales_order_number
                .as_ref()
                .map_or(Value::Null, |s| Value::String(s.to_string())),
        );
        if let Some(web) = &order.web_order_id {
            data.insert("webOrderId".into(), Value::String(web.to_string()));
        }
        data.insert("caseId".into(), Value::String(case_id.to_string()));
        if let Value::Object(fields) = self.fields() {
            data.extend(fields);
        }
        let subject = match (&order.sales_order_number, &order.web_order_id) {
            (Some(so), _) => so.to_string(),
            (None, Some(web)) => web.to_string(),
            (None, None) => order.key(),
        };
        let routing_key = self.routing_key();
        Envelope {
            id,
            routing_key,
            body: json!({
                "specversion": "1.0",
                "type": format!("holdclear.{routing_key}.v1"),
                "source": SOURCE,
                "id": id.to_string(),
                "time": rfc3339(time),
                "datacontenttype": "application/json",
                "subject": subject,
                "data": data,
            }),
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The envelope id of one transition of one case generation (UUID v5).
pub fn envelope_id(case_id: Uuid, generation: u32, transition: &str) -> Uuid {
    Uuid::new_v5(
        &ENVELOPE_NAMESPACE,
        format!("{case_id}/{generation}/{transition}").as_bytes(),
    )
}

/// One event ready for the outbox table.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// The CloudEvents id.
    pub id: Uuid,
    /// Routing key on the events exchange.
    pub routing_key: &'static str,
    /// The CloudEvents JSON envelope.
    pub body: Value,
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
                other => {
                    let error = match other {
                        Some(Err(e)) => {
                            lost |= e.is_channel_lost();
                            e.to_string()
                        }
                        _ => format!(
                            "no confirm within {}",
                            humantime::format_duration(self.settings.confirm_timeout)
                        ),
                    };
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
                    failed.push(OutboxFailure {
                        id: row.id,
                        error,
                        retry_in,
                    });
                }
            }
        }
        batch.settle(&sent, &failed).await?;
        Ok(Round::Worked { lost })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{SalesOrderNumber, WebOrderId};

    fn order(so: Option<&str>, web: Option<&str>) -> OrderId {
        OrderId::new(
            so.map(|s| SalesOrderNumber::parse(s).unwrap()),
            web.map(|w| WebOrderId::parse(w).unwrap()),
        )
        .unwrap()
    }

    fn time() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn envelopes_follow_the_contract() {
        let case_id = Uuid::from_u128(7);
        let ev = OutboundEvent::HoldEscalated {
            reason: EscalationReason::NoRuleMatched,
            level: EscalationLevel::Critical,
            held_seconds: 60,
            detail: "no default rule matches the order".into(),
            threshold: None,
        };
        let env = ev.envelope(
            case_id,
            0,
            &order(Some("104233871"), Some("98765432")),
            time(),
        );
        assert_eq!(env.routing_key, "order.hold_escalated");
        let b = &env.body;
        assert_eq!(b["specversion"], "1.0");
        assert_eq!(b["type"], "holdclear.order.hold_escalated.v1");
        assert_eq!(b["source"], "/holdclear");
        assert_eq!(b["id"], env.id.to_string());
        assert_eq!(b["time"], "2026-11-23T10:00:00.000Z");
        assert_eq!(b["datacontenttype"], "application/json");
        assert_eq!(b["subject"], "104233871");
        let d = &b["data"];
        assert_eq!(d["salesOrderNumber"], "104233871");
        assert_eq!(d["webOrderId"], "98765432");
        assert_eq!(d["caseId"], case_id.to_string());
        assert_eq!(d["reason"], "NO_RULE_MATCHED");
        assert_eq!(d["level"], "critical");
        assert_eq!(d["heldSeconds"], 60);
        assert_eq!(d["action"], EscalationReason::NoRuleMatched.action());
    }

    #[test]
    fn envelope_ids_are_stable_per_transition_and_generation() {
        let case_id = Uuid::from_u128(9);
        let released = OutboundEvent::HoldReleased {
            released_at: time(),
            held_seconds: 5,
            smart_account_domain: Some("acme.com".into()),
            rule: Some("r".into()),
            other_holds: vec![],
        };
        let o = order(None, Some("55"));
        let a = released.envelope(case_id, 0, &o, time());
        let b = released.envelope(case_id, 0, &o, time() + chrono::Duration::hours(1));
        let c = released.envelope(case_id, 1, &o, time());
        assert_eq!(a.id, b.id, "same transition, same id");
        assert_ne!(a.id, c.id, "a re-run gets new ids");
        assert_eq!(a.body["data"]["salesOrderNumber"], Value::Null);
        assert_eq!(a.body["subject"], "55");
        let persists = |n| OutboundEvent::HoldEscalated {
            reason: EscalationReason::HoldPersists,
            level: EscalationLevel::Warning,
            held_seconds: 1,
            detail: String::new(),
            threshold: Some(n),
        };
        assert_ne!(
            persists(0).envelope(case_id, 0, &o, time()).id,
            persists(1).envelope(case_id, 0, &o, time()).id
        );
    }
}
