//! What `holdclear bench` needs from RabbitMQ besides the worker's own
//! code: the broker's limit (a bare consumer that only acknowledges), the
//! depth and consumers of a queue, and emptying a queue between runs.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::Connection;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueuePurgeOptions};
use lapin::types::FieldTable;

use super::BrokerError;
use super::topology::{close_channel, declare_passive};

/// Acknowledge with `multiple` after this many deliveries (or when the
/// last expected one arrived); well below any sensible prefetch.
const ACK_EVERY: u64 = 64;

/// Messages ready in a queue and consumers attached to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueCounts {
    /// Messages ready for delivery (not counting unacknowledged ones).
    pub ready: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// The queue's counts, from a passive declare on a channel of its own
/// (a missing queue closes that channel, not the caller's).
pub async fn queue_counts(conn: &Connection, queue: &str) -> Result<QueueCounts, BrokerError> {
    let channel = conn.create_channel().await?;
    let q = declare_passive(&channel, queue).await?;
    let counts = QueueCounts {
        ready: q.message_count(),
        consumers: q.consumer_count(),
    };
    close_channel(&channel, "bench done").await;
    Ok(counts)
}

/// Removes every ready message of `queue`; returns how many there were.
pub async fn purge(conn: &Connection, queue: &str) -> Result<u32, BrokerError> {
    let channel = conn.create_channel().await?;
    let n = channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    close_channel(&channel, "bench done").await;
    Ok(n)
}

/// The most this broker hands one consumer here: consumes `queue` with
/// `prefetch`, does nothing with a delivery but acknowledge it (with
/// `multiple`, every [`ACK_EVERY`]), and returns the time from the
/// subscription to the acknowledgement of the `expected`-th delivery.
/// `progress` is told the count now and then. Gives up after `timeout`
/// without a delivery.
pub async fn drain_ack_only(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    expected: u64,
    timeout: Duration,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Duration, DrainError> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "holdclear-bench-ack-only".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut received = 0u64;
    let mut unacked = 0u64;
    while received < expected {
        let next = tokio::time::timeout(timeout, consumer.next())
            .await
            .map_err(|_| DrainError::Stalled { received })?;
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(BrokerError::from(e).into()),
            None => return Err(DrainError::Stalled { received }),
        };
        received += 1;
        unacked += 1;
        if unacked >= ACK_EVERY || received == expected {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .map_err(BrokerError::from)?;
            unacked = 0;
            progress(received);
        }
    }
    let elapsed = started.elapsed();
    close_channel(&channel, "bench done").await;
    Ok(elapsed)
}

/// Why the ack-only drain did not finish.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// No delivery came for the whole timeout.
    #[error("the broker stopped delivering after {received} messages")]
    Stalled {
        /// Deliveries received before it stalled.
        received: u64,
    },
}

impl From<lapin::Error> for DrainError {
    fn from(e: lapin::Error) -> Self {
        Self::Broker(e.into())
    }
}
