//! Sending stored dead letters back: one message at a time, with confirms
//! and `mandatory`, its properties as they were received minus the
//! dead-letter headers (holdclear's and RabbitMQ's `x-death`),
//! `x-holdclear-replayed` counted up. An exchange that does not exist fails
//! that message with a clear reason (the broker closes only the channel)
//! and the next one goes on; a refusal of the user stops the operation.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::Connection;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::Value;

use super::dlq::{DEAD_LETTER_HEADERS, REPLAYED};
use super::dlq_ingest::properties_from_raw;
use super::{Broker, BrokerError, Operation, PublishError, Publisher};

/// Why one message could not be sent; the operation goes on.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The exchange does not exist (or may not be used).
    #[error("exchange {0:?} does not exist: {1}")]
    NoExchange(String, String),
    /// The broker returned, nacked or did not confirm it.
    #[error("{0}")]
    Refused(String),
    /// The connection is gone: the operation stops (and can be resumed).
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// A connection and a confirm channel for replaying.
pub struct Replayer {
    conn: Connection,
    publisher: Publisher,
    confirm_timeout: Duration,
}

impl Replayer {
    /// Connects as `holdclear-dlq replay`.
    pub async fn open(broker: &Broker, confirm_timeout: Duration) -> Result<Self, BrokerError> {
        let conn = broker.connect("replay").await?;
        let publisher = Publisher::open(&conn).await?;
        Ok(Self {
            conn,
            publisher,
            confirm_timeout,
        })
    }

    /// Sends one stored message to `exchange` with `routing_key` and waits
    /// for the broker's confirm.
    pub async fn send(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        raw_properties: &Value,
    ) -> Result<(), SendError> {
        let props = properties_from_raw(raw_properties);
        let mut headers: BTreeMap<ShortString, AMQPValue> = props
            .headers()
            .as_ref()
            .map(|h| h.inner().clone())
            .unwrap_or_default();
        let replayed = match headers.get(REPLAYED) {
            Some(AMQPValue::LongLongInt(n)) => *n,
            Some(AMQPValue::LongInt(n)) => i64::from(*n),
            _ => 0,
        };
        for name in DEAD_LETTER_HEADERS {
            headers.remove(name);
        }
        headers.insert(
            ShortString::from(REPLAYED),
            AMQPValue::LongLongInt(replayed + 1),
        );
        let props = props.with_headers(FieldTable::from(headers));
        let sent = self
            .publisher
            .publish_raw(exchange, routing_key, body, props);
        match tokio::time::timeout(self.confirm_timeout, sent).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(PublishError::Broker(e))) => {
                let e = e.during(Operation::Publish {
                    exchange: exchange.to_owned(),
                });
                // A missing exchange closes only the channel: that message
                // fails, the next goes on a new channel.
                if e.reply_code() == Some(404) && self.conn.status().connected() {
                    self.publisher = Publisher::open(&self.conn).await?;
                    return Err(SendError::NoExchange(exchange.to_owned(), e.to_string()));
                }
                Err(SendError::Broker(e))
            }
            Ok(Err(e)) => Err(SendError::Refused(e.to_string())),
            Err(_) => Err(SendError::Refused(
                PublishError::TimedOut(self.confirm_timeout).to_string(),
            )),
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.publisher.channel().close(200, "replayed".into()).await;
        let _ = self.conn.close(200, "replayed".into()).await;
    }
}
