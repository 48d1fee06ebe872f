//! RabbitMQ: the only module that knows lapin.
//!
//! - [`bench`]: the benchmark's broker limit (an ack-only consumer), queue counts, purge.
//! - [`connection`]: connecting, with a named connection and a reconnect loop.
//! - [`topology`]: the exchanges and queues of the event contract, declared idempotently.
//! - [`dlq`]: operators' view of the dead-letter queue: browse, replay, purge.
//! - [`publisher`]: publishing with confirms and `mandatory`, one message or a window of them.
//! - [`subscription`]: a private queue on an exchange, to watch events as fulfilment would.
//! - [`consumer`]: consuming the held-order queue, reconnecting by itself; acks in runs.
//! - [`dead_letter`]: moving a refused delivery to the dead-letter exchange with the reason headers.

pub mod bench;
pub mod connection;
pub mod consumer;
pub mod dead_letter;
pub mod dlq;
pub mod publisher;
pub mod subscription;
pub mod topology;

pub use connection::Broker;
/// An open connection to RabbitMQ, as [`Broker::connect`] returns it.
pub type Connection = lapin::Connection;
pub use consumer::{Acknowledged, Closing, Consumer, ConsumerSettings, Delivery, acknowledge};
pub use dead_letter::dead_letter;
pub use publisher::{OutgoingMessage, PublishError, Publisher};
pub use subscription::{Received, Subscription, close};
pub use topology::{declare_topology, delete_topology};

/// What went wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The connection or channel failed, or the broker refused an operation.
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    /// Shutdown was requested while waiting for the broker.
    #[error("cancelled while connecting to RabbitMQ")]
    Cancelled,
    /// The TLS handshake of an `amqps://` connection failed: the server's
    /// certificate is not trusted or does not name the URL's host.
    #[error("RabbitMQ: TLS failed ({source}); trusted: {trusted}")]
    Tls {
        /// lapin's error, with rustls's reason.
        source: lapin::Error,
        /// Which roots were trusted.
        trusted: String,
    },
}
