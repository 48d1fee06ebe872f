//! RabbitMQ: the only module that knows lapin.
//!
//! - [`bench`]: the benchmark's broker limit (an ack-only consumer), queue counts, purge.
//! - [`connection`]: connecting, with a named connection and a reconnect loop.
//! - [`error`]: broker failures explained for a person: what failed, why, what to do.
//! - [`topology`]: the exchanges and queues of the event contract, declared idempotently,
//!   so that no RabbitMQ version drops a message on its own; older ones kept and reported.
//! - [`server`]: which RabbitMQ the broker is (its `connection.start` properties).
//! - [`dlq_ingest`]: consuming the dead-letter queue into the store, ack after commit.
//! - [`dlq`]: the dead-letter headers and the queue's depth.
//! - [`replay`]: sending stored dead letters back, one confirmed message at a time.
//! - [`publisher`]: publishing with confirms and `mandatory`, one message or a window of them.
//! - [`subscription`]: a private queue on an exchange, to watch events as fulfilment would.
//! - [`consumer`]: consuming the held-order queue, reconnecting by itself; acks in runs.
//! - [`dead_letter`]: moving a refused delivery to the dead-letter exchange with the reason headers.

pub mod bench;
pub mod connection;
pub mod consumer;
pub mod dead_letter;
pub mod dlq;
pub mod dlq_ingest;
pub mod error;
pub mod publisher;
pub mod replay;
pub mod server;
pub mod subscription;
pub mod topology;

pub use connection::Broker;
/// An open connection to RabbitMQ, as [`Broker::connect`] returns it.
pub type Connection = lapin::Connection;
pub use consumer::{Acknowledged, Closing, Consumer, ConsumerSettings, Delivery, acknowledge};
pub use dead_letter::dead_letter;
pub use error::{BrokerError, Endpoint, Operation};
pub use publisher::{OutgoingMessage, PublishError, Publisher};
pub use server::ServerVersion;
pub use subscription::{Received, Subscription, close};
pub use topology::{
    Declared, Outdated, declare_topology, declare_topology_for, delete_topology, ready_messages,
};
