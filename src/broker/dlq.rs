//! Operators' view of the dead-letter queue: browse, replay, purge.
//!
//! Browsing takes messages with `basic.get` *without* acknowledging them and
//! then closes the channel, which hands every one of them back to the queue:
//! nothing is consumed. Replay and purge read at most the messages that were
//! in the queue when they started, settle the chosen ones (replay: only after
//! the republish is confirmed) and hand the rest back the same way.
//!
//! Two kinds of dead letters are in the queue: those holdclear moved there
//! (with the `x-holdclear-*` headers of the event contract) and those
//! RabbitMQ moved there itself when the held-order queue's delivery limit
//! tripped (with its `x-death` headers and none of holdclear's). The second
//! kind reads as [`DELIVERY_LIMIT`], its origin and time taken from
//! `x-death`. Handing browsed messages back counts as a return on RabbitMQ
//! 4.x; [`super::topology`] declares the queue so that no number of returns
//! drops a message.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use super::error::{During, Operation};
use super::topology::{close_channel, declare_passive};
use super::{BrokerError, PublishError, Publisher};
use crate::domain::HeldOrderEvent;

/// Header: the dead-letter reason code.
pub const ERROR_CODE: &str = "x-holdclear-error-code";
/// Header: one line, which field and what was wrong.
pub const ERROR_DETAIL: &str = "x-holdclear-error-detail";
/// Header: when the message was dead-lettered (RFC 3339).
pub const FAILED_AT: &str = "x-holdclear-failed-at";
/// Header: the exchange the message was first published to.
pub const ORIGINAL_EXCHANGE: &str = "x-holdclear-original-exchange";
/// Header: the routing key the message was first published with.
pub const ORIGINAL_ROUTING_KEY: &str = "x-holdclear-original-routing-key";
/// Header: how many times the message was replayed from the DLQ.
pub const REPLAYED: &str = "x-holdclear-replayed";

/// The code of a message RabbitMQ dead-lettered because it was delivered
/// more often than the held-order queue's delivery limit allows.
pub const DELIVERY_LIMIT: &str = "DELIVERY_LIMIT";

/// Header RabbitMQ adds when it dead-letters a message (an array, newest first).
const X_DEATH: &str = "x-death";

/// The headers dead-lettering adds (holdclear's and RabbitMQ's), and the
/// broker's delivery counts: a replay removes them, so the message starts
/// afresh where it came from.
pub(crate) const DEAD_LETTER_HEADERS: [&str; 13] = [
    ERROR_CODE,
    ERROR_DETAIL,
    FAILED_AT,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    X_DEATH,
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
];

/// One message of the dead-letter queue, as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Position in the queue when it was read (0 = head).
    pub position: usize,
    /// AMQP `message_id` (the event id for well-formed envelopes).
    pub message_id: Option<String>,
    /// `x-holdclear-error-code`, or [`DELIVERY_LIMIT`] (another reason of
    /// RabbitMQ's in capitals) for a message the broker dead-lettered.
    pub error_code: Option<String>,
    /// `x-holdclear-error-detail`, or what RabbitMQ did.
    pub error_detail: Option<String>,
    /// `x-holdclear-failed-at`, or the time of the newest `x-death` entry.
    pub failed_at: Option<DateTime<Utc>>,
    /// Where it came from (`x-holdclear-original-exchange`, or `x-death`).
    pub original_exchange: Option<String>,
    /// Its original routing key.
    pub original_routing_key: Option<String>,
    /// The order number, if the body shows one.
    pub order_number: Option<String>,
    /// `x-holdclear-replayed` (0 when never replayed).
    pub replayed: u32,
    /// Body size in bytes.
    pub body_bytes: usize,
}

/// Which messages a replay or purge takes.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Only these message ids (empty: any).
    pub message_ids: Vec<String>,
    /// Only these error codes (empty: any).
    pub error_codes: Vec<String>,
    /// Only messages dead-lettered before this time.
    pub failed_before: Option<DateTime<Utc>>,
}

impl Selection {
    /// True when `letter` is selected.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let id_ok = self.message_ids.is_empty()
            || letter
                .message_id
                .as_ref()
                .is_some_and(|id| self.message_ids.contains(id));
        let code_ok = self.error_codes.is_empty()
            || letter
                .error_code
                .as_ref()
                .is_some_and(|c| self.error_codes.iter().any(|w| w.eq_ignore_ascii_case(c)));
        let age_ok = match self.failed_before {
            None => true,
            Some(limit) => letter.failed_at.is_some_and(|t| t < limit),
        };
        id_ok && code_ok && age_ok
    }
}

/// How a replay runs.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// The one exchange messages are republished to: the configured orders
    /// exchange unless the operator names another. A message whose recorded
    /// origin is a different exchange is not replayed (the headers of a
    /// message are not trusted to pick where it goes).
    pub exchange: String,
    /// Replay at most this many messages.
    pub limit: usize,
    /// Messages republished per second, at most.
    pub per_second: f64,
    /// Say what would be replayed; publish and settle nothing.
    pub dry_run: bool,
}

/// Why a selected message was not replayed; it stays in the DLQ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotReplayed {
    /// Neither holdclear's headers nor `x-death` say where it came from.
    NoOrigin,
    /// It came from another exchange than the one replayed to.
    OtherExchange {
        /// Its recorded origin.
        from: String,
        /// The exchange of this replay.
        to: String,
    },
    /// The broker did not take the republished message (nacked, returned).
    Refused(String),
}

impl std::fmt::Display for NotReplayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoOrigin => f.write_str(
                "no x-holdclear-original-exchange/-routing-key header and no x-death header",
            ),
            Self::OtherExchange { from, to } => {
                write!(f, "it came from exchange '{from}', not '{to}'")
            }
            Self::Refused(why) => f.write_str(why),
        }
    }
}

impl Serialize for NotReplayed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Messages looked at.
    pub examined: usize,
    /// Messages republished (or, in a dry run, that would be).
    pub replayed: Vec<DeadLetter>,
    /// Selected messages that could not be republished, with the reason; they stay in the DLQ.
    pub failed: Vec<(DeadLetter, NotReplayed)>,
}

/// Reads up to `limit` messages without consuming any of them.
pub async fn browse(
    conn: &Connection,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, BrokerError> {
    let channel = conn.create_channel().await?;
    let depth = queue_depth(&channel, queue).await?;
    let mut letters = Vec::new();
    for position in 0..depth.min(limit) {
        let Some(msg) = get(&channel, queue).await? else {
            break;
        };
        letters.push(read(position, &msg.delivery.properties, &msg.delivery.data));
    }
    // Closing the channel returns every unacknowledged message to the queue.
    close_channel(&channel, "browsed").await;
    Ok(letters)
}

/// Republishes the selected messages (at most `options.limit`, at most
/// `options.per_second` a second) to `options.exchange` with their original
/// routing key, the dead-letter headers removed and `x-holdclear-replayed`
/// incremented. Each one leaves the DLQ only after its republish is
/// confirmed. A dry run settles nothing and publishes nothing.
pub async fn replay(
    conn: &Connection,
    queue: &str,
    selection: &Selection,
    options: &ReplayOptions,
) -> Result<ReplayReport, BrokerError> {
    let channel = conn.create_channel().await?;
    let publisher = Publisher::open(conn).await?;
    let depth = queue_depth(&channel, queue).await?;
    let pause = Duration::from_secs_f64(1.0 / options.per_second.max(0.001));
    let mut report = ReplayReport::default();
    let mut next_slot = tokio::time::Instant::now();
    for position in 0..depth {
        if report.replayed.len() >= options.limit {
            break;
        }
        let Some(msg) = get(&channel, queue).await? else {
            break;
        };
        report.examined += 1;
        let delivery = msg.delivery;
        let letter = read(position, &delivery.properties, &delivery.data);
        if !selection.matches(&letter) {
            continue;
        }
        let (Some(from), Some(routing_key)) = (
            letter.original_exchange.clone(),
            letter.original_routing_key.clone(),
        ) else {
            report.failed.push((letter, NotReplayed::NoOrigin));
            continue;
        };
        if from != options.exchange {
            let to = options.exchange.clone();
            report
                .failed
                .push((letter, NotReplayed::OtherExchange { from, to }));
            continue;
        }
        if options.dry_run {
            report.replayed.push(letter);
            continue;
        }
        tokio::time::sleep_until(next_slot).await;
        next_slot = tokio::time::Instant::now() + pause;
        let properties = replay_properties(&delivery.properties, letter.replayed + 1);
        match publisher
            .publish_raw(&options.exchange, &routing_key, &delivery.data, properties)
            .await
        {
            Ok(()) => {
                channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                    .await
                    .during(|| Operation::Settle {
                        queue: queue.to_owned(),
                    })?;
                report.replayed.push(letter);
            }
            Err(PublishError::Broker(e)) => {
                return Err(e.during(Operation::Publish {
                    exchange: options.exchange.clone(),
                }));
            }
            Err(e) => report
                .failed
                .push((letter, NotReplayed::Refused(e.to_string()))),
        }
    }
    close_channel(&channel, "replayed").await;
    publisher.close("replayed").await;
    Ok(report)
}

/// Removes the selected messages and returns them; a dry run returns them
/// and removes nothing.
pub async fn purge(
    conn: &Connection,
    queue: &str,
    selection: &Selection,
    dry_run: bool,
) -> Result<Vec<DeadLetter>, BrokerError> {
    let channel = conn.create_channel().await?;
    let depth = queue_depth(&channel, queue).await?;
    let mut purged = Vec::new();
    for position in 0..depth {
        let Some(msg) = get(&channel, queue).await? else {
            break;
        };
        let letter = read(position, &msg.delivery.properties, &msg.delivery.data);
        if selection.matches(&letter) {
            if !dry_run {
                channel
                    .basic_ack(msg.delivery.delivery_tag, BasicAckOptions::default())
                    .await
                    .during(|| Operation::Settle {
                        queue: queue.to_owned(),
                    })?;
            }
            purged.push(letter);
        }
    }
    close_channel(&channel, "purged").await;
    Ok(purged)
}

/// Takes the next message of `queue` without acknowledging it.
async fn get(
    channel: &Channel,
    queue: &str,
) -> Result<Option<lapin::message::BasicGetMessage>, BrokerError> {
    channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .during(|| Operation::Read {
            queue: queue.to_owned(),
        })
}

/// How many messages wait in `queue` (a passive declaration: no permission
/// needed); a missing queue is an error that says so.
pub async fn depth(conn: &Connection, queue: &str) -> Result<usize, BrokerError> {
    let channel = conn.create_channel().await?;
    let depth = queue_depth(&channel, queue).await?;
    close_channel(&channel, "looked").await;
    Ok(depth)
}

async fn queue_depth(channel: &Channel, queue: &str) -> Result<usize, BrokerError> {
    let q = declare_passive(channel, queue).await.map_err(|e| {
        e.during(Operation::Inspect {
            queue: queue.to_owned(),
        })
    })?;
    Ok(q.message_count() as usize)
}

fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn header_count(headers: Option<&FieldTable>, name: &str) -> u32 {
    let Some(value) = headers.and_then(|h| h.inner().get(name)) else {
        return 0;
    };
    let n = match value {
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongString(s) => s.to_string().parse().unwrap_or(0),
        _ => 0,
    };
    u32::try_from(n).unwrap_or(0)
}

fn read(position: usize, props: &BasicProperties, body: &[u8]) -> DeadLetter {
    let headers = props.headers().as_ref();
    let mut letter = DeadLetter {
        position,
        message_id: props.message_id().as_ref().map(ToString::to_string),
        error_code: header_text(headers, ERROR_CODE),
        error_detail: header_text(headers, ERROR_DETAIL),
        failed_at: header_text(headers, FAILED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc)),
        original_exchange: header_text(headers, ORIGINAL_EXCHANGE),
        original_routing_key: header_text(headers, ORIGINAL_ROUTING_KEY),
        order_number: HeldOrderEvent::peek_order_number(body),
        replayed: header_count(headers, REPLAYED),
        body_bytes: body.len(),
    };
    // Dead-lettered by RabbitMQ itself, not by holdclear: read x-death.
    if letter.error_code.is_none()
        && let Some(death) = newest_death(headers)
    {
        letter.error_code = Some(match death.reason.as_str() {
            "delivery_limit" => DELIVERY_LIMIT.to_owned(),
            other => other.to_ascii_uppercase(),
        });
        letter.error_detail = Some(match death.reason.as_str() {
            "delivery_limit" => format!(
                "RabbitMQ dead-lettered it from queue '{}': delivered more often than its delivery limit allows",
                death.queue
            ),
            other => format!(
                "RabbitMQ dead-lettered it from queue '{}' (reason {other})",
                death.queue
            ),
        });
        letter.failed_at = letter.failed_at.or(death.time);
        letter.original_exchange = letter.original_exchange.or(death.exchange);
        letter.original_routing_key = letter.original_routing_key.or(death.routing_key);
    }
    letter
}

/// One entry of RabbitMQ's `x-death` header.
struct Death {
    reason: String,
    queue: String,
    exchange: Option<String>,
    routing_key: Option<String>,
    time: Option<DateTime<Utc>>,
}

/// The newest `x-death` entry (RabbitMQ keeps them newest first).
fn newest_death(headers: Option<&FieldTable>) -> Option<Death> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get(X_DEATH)? else {
        return None;
    };
    let AMQPValue::FieldTable(entry) = deaths.as_slice().first()? else {
        return None;
    };
    let text = |name: &str| header_text(Some(entry), name);
    let routing_key = match entry.inner().get("routing-keys") {
        Some(AMQPValue::FieldArray(keys)) => keys.as_slice().iter().find_map(|k| match k {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }),
        _ => None,
    };
    let time = match entry.inner().get("time") {
        Some(AMQPValue::Timestamp(t)) => i64::try_from(*t)
            .ok()
            .and_then(|t| DateTime::from_timestamp(t, 0)),
        _ => None,
    };
    Some(Death {
        reason: text("reason")?,
        queue: text("queue").unwrap_or_default(),
        exchange: text("exchange"),
        routing_key,
        time,
    })
}

/// The original properties, without the dead-letter headers and with the
/// replay count set.
fn replay_properties(props: &BasicProperties, replayed: u32) -> BasicProperties {
    let mut headers: BTreeMap<ShortString, AMQPValue> = props
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    for name in DEAD_LETTER_HEADERS {
        headers.remove(name);
    }
    headers.insert(
        ShortString::from(REPLAYED),
        AMQPValue::LongLongInt(i64::from(replayed)),
    );
    props.clone().with_headers(FieldTable::from(headers))
}
