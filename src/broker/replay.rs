//! Sending stored dead letters back: one message at a time, with confirms
//! and `mandatory`, its properties as they were received minus the
//! dead-letter headers, `x-holdclear-replayed` counted up. An exchange that
//! does not exist fails that message with a clear reason (checked on a
//! channel of its own, which the broker closes) and the next one goes on.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use lapin::options::ExchangeDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ExchangeKind};
use serde_json::Value;

use super::dlq::{
    ERROR_CODE, ERROR_DETAIL, FAILED_AT, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY, REPLAYED,
};
use super::dlq_ingest::properties_from_raw;
use super::{Broker, BrokerError, PublishError, Publisher};

/// Why one message could not be sent; the operation goes on.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The exchange does not exist (or may not be used).
    #[error("exchange {0:?} does not exist or cannot be used: {1}")]
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
    exchanges: HashMap<String, Result<(), String>>,
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
            exchanges: HashMap::new(),
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
        if !self.exchanges.contains_key(exchange) {
            let checked = self.check_exchange(exchange).await?;
            self.exchanges.insert(exchange.to_owned(), checked);
        }
        if let Some(Err(reason)) = self.exchanges.get(exchange) {
            return Err(SendError::NoExchange(exchange.to_owned(), reason.clone()));
        }
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
        for name in [
            ERROR_CODE,
            ERROR_DETAIL,
            FAILED_AT,
            ORIGINAL_EXCHANGE,
            ORIGINAL_ROUTING_KEY,
        ] {
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
            Ok(Err(PublishError::Broker(e))) => Err(SendError::Broker(e)),
            Ok(Err(e)) => Err(SendError::Refused(e.to_string())),
            Err(_) => Err(SendError::Refused(
                PublishError::TimedOut(self.confirm_timeout).to_string(),
            )),
        }
    }

    async fn check_exchange(&self, exchange: &str) -> Result<Result<(), String>, BrokerError> {
        if exchange.is_empty() {
            return Ok(Ok(()));
        }
        let channel = self.conn.create_channel().await?;
        let declared = channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(()) => {
                let _ = channel.close(200, "checked".into()).await;
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(BrokerError::from(e).to_string())),
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.publisher.channel().close(200, "replayed".into()).await;
        let _ = self.conn.close(200, "replayed".into()).await;
    }
}
