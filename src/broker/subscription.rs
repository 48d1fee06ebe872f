//! Listening to an exchange through a private queue: what the demo and the
//! benchmark use to see the worker's events as fulfilment would.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, Consumer};

use super::BrokerError;

/// One message received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// Its routing key.
    pub routing_key: String,
    /// Its AMQP `message_id`.
    pub message_id: Option<String>,
    /// Its body.
    pub body: Vec<u8>,
}

/// An exclusive, server-named queue bound to an exchange; gone with its connection.
pub struct Subscription {
    consumer: Consumer,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    /// Binds a private queue to `exchange` with `binding` (e.g. `#`) and starts consuming.
    pub async fn open(
        conn: &Connection,
        exchange: &str,
        binding: &str,
    ) -> Result<Self, BrokerError> {
        let channel = conn.create_channel().await?;
        channel.basic_qos(1000, BasicQosOptions::default()).await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self { consumer })
    }

    /// The next message (acknowledged on receipt); `None` when the channel closed.
    pub async fn next(&mut self) -> Option<Result<Received, BrokerError>> {
        let delivery = match self.consumer.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e.into())),
        };
        if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
            return Some(Err(e.into()));
        }
        Some(Ok(Received {
            routing_key: delivery.routing_key.to_string(),
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string),
            body: delivery.data,
        }))
    }
}

/// Closes a connection politely, ignoring a connection that is already
/// gone, and giving up after 5 s (a close-ok that never comes must not hang
/// the process; the socket goes with the connection when it is dropped).
pub async fn close(conn: &Connection) {
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        conn.close(200, "bye".into()),
    )
    .await;
}
