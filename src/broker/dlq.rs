//! The dead-letter queue's names and headers, and its depth.
//!
//! The queue is the broker-side landing place: `holdclear run` ingests it
//! into PostgreSQL ([`super::dlq_ingest`]), where operators browse, group and
//! replay dead letters ([`super::replay`]). Two kinds of dead letters land
//! in it: those holdclear moved there (with the `x-holdclear-*` headers of
//! the event contract) and those RabbitMQ moved there itself when the
//! held-order queue's delivery limit tripped (with its `x-death` headers and
//! none of holdclear's).

use lapin::{Channel, Connection};

use super::BrokerError;
use super::error::Operation;
use super::topology::{close_channel, declare_passive};

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
