//! Publishing with publisher confirms and `mandatory`.
//!
//! A message counts as published only when the broker acked it and did not
//! return it as unroutable. Callers publish a window of messages and then
//! learn the outcome of each, so confirms are pipelined, never one round
//! trip per message.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use super::BrokerError;

/// A message to publish (persistent, with a `message_id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Routing key on the exchange.
    pub routing_key: String,
    /// AMQP `message_id` (the CloudEvents envelope id).
    pub message_id: String,
    /// AMQP `content_type`.
    pub content_type: String,
    /// The body.
    pub body: Vec<u8>,
    /// AMQP timestamp, seconds since the epoch.
    pub timestamp: Option<u64>,
    /// Extra string headers.
    pub headers: Vec<(String, String)>,
}

/// Why one message was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker negatively acknowledged the message.
    #[error("the broker nacked the message")]
    Nacked,
    /// The message could not be routed (`mandatory`): e.g. the exchange has no binding for it.
    #[error("the broker returned the message as unroutable: {0}")]
    Returned(String),
    /// The channel or connection failed before the confirm arrived.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// No confirm within the deadline (`HOLDCLEAR_AMQP_CONFIRM_TIMEOUT`):
    /// the outcome is unknown; the caller publishes again.
    #[error("the broker did not confirm the message within {}", humantime::format_duration(*.0))]
    TimedOut(std::time::Duration),
}

impl PublishError {
    /// True when the channel is gone and the publisher must be recreated.
    pub fn is_channel_lost(&self) -> bool {
        matches!(self, Self::Broker(_))
    }
}

/// A channel in confirm mode.
#[derive(Clone, Debug)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a channel on `conn` and puts it in confirm mode.
    pub async fn open(conn: &Connection) -> Result<Self, BrokerError> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    /// The channel, for declaring topology on it.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// True while the channel can publish.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Closes the channel, bounded (see [`super::topology::close_channel`]):
    /// for a publisher given up on, e.g. after its confirms did not come in
    /// time, before another is opened. Confirms still outstanding are lost
    /// with it; the caller has already counted those messages as failed.
    pub async fn close(&self, reason: &str) {
        super::topology::close_channel(&self.channel, reason).await;
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, exchange: &str, msg: &OutgoingMessage) -> Result<(), PublishError> {
        let mut results = self.publish_all(exchange, std::slice::from_ref(msg)).await;
        results.pop().unwrap_or(Err(PublishError::Nacked))
    }

    /// Publishes every message, then waits for each confirm: the outcome of
    /// message *i* is result *i*.
    pub async fn publish_all(
        &self,
        exchange: &str,
        msgs: &[OutgoingMessage],
    ) -> Vec<Result<(), PublishError>> {
        let mut pending = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    msg.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &msg.body,
                    properties(msg),
                )
                .await;
            pending.push(confirm);
        }
        let mut results = Vec::with_capacity(msgs.len());
        for confirm in pending {
            results.push(match confirm {
                Err(e) => Err(PublishError::Broker(e.into())),
                Ok(confirm) => match confirm.await {
                    Err(e) => Err(PublishError::Broker(e.into())),
                    Ok(c) => settle(c),
                },
            });
        }
        results
    }

    /// Publishes with the given properties kept as they are (used to move a
    /// message between queues without changing it), waiting for the confirm.
    pub(crate) async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .map_err(|e| PublishError::Broker(e.into()))?;
        settle(confirm.await.map_err(|e| PublishError::Broker(e.into()))?)
    }
}

fn settle(c: Confirmation) -> Result<(), PublishError> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(PublishError::Returned(returned.reply_text.to_string()))
        }
        Confirmation::Nack(None) => Err(PublishError::Nacked),
        Confirmation::NotRequested => Ok(()),
    }
}

fn properties(msg: &OutgoingMessage) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from(msg.content_type.as_str()))
        .with_message_id(ShortString::from(msg.message_id.as_str()));
    if let Some(ts) = msg.timestamp {
        props = props.with_timestamp(ts);
    }
    if !msg.headers.is_empty() {
        let mut headers = FieldTable::default();
        for (k, v) in &msg.headers {
            headers.insert(
                ShortString::from(k.as_str()),
                AMQPValue::LongString(LongString::from(v.as_str())),
            );
        }
        props = props.with_headers(headers);
    }
    props
}
