//! The exchanges, queues and bindings of the event contract.

use lapin::Channel;
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::BrokerError;
use crate::config::Topology;

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn quorum_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    for (k, v) in extra {
        args.insert(ShortString::from(*k), v.clone());
    }
    args
}

/// The arguments of the held-order queue: quorum, dead-lettering to the DLX,
/// and a delivery limit against poison loops.
pub fn held_queue_arguments(topology: &Topology, delivery_limit: u32) -> FieldTable {
    quorum_args(&[
        (
            "x-dead-letter-exchange",
            AMQPValue::LongString(LongString::from(topology.dead_letter_exchange.as_str())),
        ),
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(i64::from(delivery_limit)),
        ),
    ])
}

/// Declares every exchange, queue and binding of the contract. Idempotent:
/// existing ones with the same arguments are accepted as they are.
pub async fn declare_topology(
    channel: &Channel,
    topology: &Topology,
    delivery_limit: u32,
) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            topology.orders_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            topology.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            topology.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            topology.held_queue.as_str().into(),
            durable,
            held_queue_arguments(topology, delivery_limit),
        )
        .await?;
    channel
        .queue_bind(
            topology.held_queue.as_str().into(),
            topology.orders_exchange.as_str().into(),
            topology.held_routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            topology.dead_letter_queue.as_str().into(),
            durable,
            quorum_args(&[]),
        )
        .await?;
    channel
        .queue_bind(
            topology.dead_letter_queue.as_str().into(),
            topology.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Deletes every exchange and queue of `topology` (the demo's and the
/// benchmark's own, when they finish). Missing ones are fine.
pub async fn delete_topology(
    conn: &lapin::Connection,
    topology: &Topology,
) -> Result<(), BrokerError> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    for queue in [&topology.held_queue, &topology.dead_letter_queue] {
        // A failed delete closes the channel, so each gets its own.
        let channel = conn.create_channel().await?;
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [
        &topology.orders_exchange,
        &topology.dead_letter_exchange,
        &topology.events_exchange,
    ] {
        let channel = conn.create_channel().await?;
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    Ok(())
}

/// A queue's state (message and consumer counts) from a passive declare; a
/// missing queue fails and closes `channel`.
pub(crate) async fn declare_passive(
    channel: &Channel,
    queue: &str,
) -> Result<lapin::Queue, BrokerError> {
    Ok(channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?)
}

/// How long a channel's close may take before it is left to the
/// connection's close (which also returns its unacknowledged messages).
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes a channel (returning its unacknowledged messages to their queue),
/// bounded by [`CLOSE_TIMEOUT`]: a close-ok that never comes must not hang a
/// command. A failed close is only logged: what the caller did is settled
/// by then, and the connection's close ends the channel anyway.
pub(crate) async fn close_channel(channel: &Channel, reason: &str) {
    match tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, reason.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(reason, error = %e, "Channel close failed; the connection's close ends it.");
        }
        Err(_) => {
            tracing::debug!(
                reason,
                "No close-ok for the channel in time; the connection's close ends it."
            );
        }
    }
}
