//! Consuming the dead-letter queue so that every dead letter is kept in
//! PostgreSQL: each delivery becomes a [`DeadLetterMessage`] (body whole,
//! properties and headers as JSON), is handed to a recorder, and is acked
//! only once the recorder says it is stored. The recorder holds the
//! delivery while the database is down; nothing is acked before.

use std::future::Future;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::dlq::{ERROR_CODE, ERROR_DETAIL, FAILED_AT, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY};
use super::{Broker, BrokerError, declare_topology};
use crate::config::Topology;
use crate::domain::DeadLetterMessage;
use crate::domain::dead_letter::{DELIVERY_LIMIT, UNKNOWN};
use crate::retry::Reconnect;

/// Role of the ingester's connection (appended to the broker name).
pub const ROLE: &str = "dead letters";

/// Consumes the dead-letter queue, reconnecting by itself.
pub struct DeadLetterIngest {
    broker: Broker,
    topology: Topology,
    delivery_limit: u32,
    prefetch: u16,
}

impl DeadLetterIngest {
    /// An ingester of `topology.dead_letter_queue`.
    pub fn new(broker: Broker, topology: Topology, delivery_limit: u32, prefetch: u16) -> Self {
        Self {
            broker,
            topology,
            delivery_limit,
            prefetch: prefetch.max(1),
        }
    }

    /// Hands every delivery to `record` and acks it when `record` returns
    /// true; `record` returning false (it was stopped before the message
    /// was stored) leaves it unacked: the broker delivers it again. Runs
    /// until `stop` fires; a lost connection is rebuilt with backoff.
    pub async fn run<F, Fut>(self, mut record: F, stop: CancellationToken)
    where
        F: FnMut(DeadLetterMessage) -> Fut,
        Fut: Future<Output = bool>,
    {
        let mut delays = Reconnect::default();
        let queue = self.topology.dead_letter_queue.clone();
        loop {
            let Ok(conn) = self.broker.connect_until(ROLE, &stop).await else {
                return;
            };
            let reason = match self.consume(&conn, &mut record, &stop, &mut delays).await {
                Ok(()) => {
                    let _ = conn.close(200, "holdclear shutting down".into()).await;
                    tracing::info!(%queue, "Stopped ingesting dead letters.");
                    return;
                }
                Err(e) => e,
            };
            let delay = delays.next_delay();
            tracing::warn!(%queue, error = %reason, retry_in_ms = delay.as_millis() as u64,
                "Lost the dead-letter consumer; reconnecting.");
            if conn.status().connected() {
                let _ = conn.close(200, "holdclear reconnecting".into()).await;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn consume<F, Fut>(
        &self,
        conn: &Connection,
        record: &mut F,
        stop: &CancellationToken,
        delays: &mut Reconnect,
    ) -> Result<(), String>
    where
        F: FnMut(DeadLetterMessage) -> Fut,
        Fut: Future<Output = bool>,
    {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| BrokerError::from(e).to_string())?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| BrokerError::from(e).to_string())?;
        declare_topology(&self.broker, conn, &self.topology, self.delivery_limit)
            .await
            .map_err(|e| e.to_string())?;
        let mut consumer = channel
            .basic_consume(
                self.topology.dead_letter_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::from(e).to_string())?;
        delays.reset();
        tracing::info!(queue = %self.topology.dead_letter_queue, "Ingesting dead letters.");
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(BrokerError::from(e).to_string()),
                None => return Err("the broker cancelled the consumer".into()),
            };
            let message = read(
                &delivery.properties,
                &delivery.data,
                delivery.exchange.as_str(),
                delivery.routing_key.as_str(),
            );
            if !record(message).await {
                return Ok(());
            }
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await
                .map_err(|e| BrokerError::from(e).to_string())?;
        }
    }
}

/// A delivery of the dead-letter queue as the store keeps it. A message
/// the worker dead-lettered carries its reason in `x-holdclear-*`; one the
/// broker dead-lettered (`x-death`, e.g. the delivery limit) is
/// `DELIVERY_LIMIT`, its origin read from `x-death`.
pub fn read(
    props: &BasicProperties,
    body: &[u8],
    exchange: &str,
    routing_key: &str,
) -> DeadLetterMessage {
    let headers = props.headers().as_ref();
    let text = |name: &str| header_text(headers, name);
    let mut code = text(ERROR_CODE);
    let mut detail = text(ERROR_DETAIL).unwrap_or_default();
    let mut origin_exchange = text(ORIGINAL_EXCHANGE);
    let mut origin_routing_key = text(ORIGINAL_ROUTING_KEY);
    let mut failed_at = text(FAILED_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| t.with_timezone(&Utc));
    if code.is_none() {
        if let Some(death) = first_death(headers) {
            let field = |k: &str| match death.inner().get(k) {
                Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
                _ => None,
            };
            code = Some(DELIVERY_LIMIT.to_owned());
            origin_exchange = field("exchange");
            origin_routing_key = match death.inner().get("routing-keys") {
                Some(AMQPValue::FieldArray(keys)) => keys.as_slice().iter().find_map(|k| match k {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    AMQPValue::ShortString(s) => Some(s.to_string()),
                    _ => None,
                }),
                _ => None,
            };
            if let Some(AMQPValue::Timestamp(t)) = death.inner().get("time") {
                failed_at = DateTime::from_timestamp(i64::try_from(*t).unwrap_or(0), 0);
            }
            detail = format!(
                "the broker dead-lettered it from queue {} ({})",
                field("queue").unwrap_or_else(|| "?".into()),
                field("reason").unwrap_or_else(|| "no reason".into())
            );
        } else {
            code = Some(UNKNOWN.to_owned());
            detail =
                format!("no reason header (published to {exchange:?} with key {routing_key:?})");
        }
    }
    let mut properties = serde_json::to_value(props.clone().with_headers(FieldTable::default()))
        .map(readable_properties)
        .unwrap_or(Value::Null);
    if let Value::Object(m) = &mut properties {
        m.remove("headers");
    }
    DeadLetterMessage {
        body: body.to_vec(),
        message_id: props.message_id().as_ref().map(ToString::to_string),
        properties,
        headers: headers.map_or(Value::Object(Map::new()), table_json),
        raw_properties: serde_json::to_value(props).unwrap_or(Value::Null),
        code: code.unwrap_or_else(|| UNKNOWN.to_owned()),
        detail,
        origin_exchange,
        origin_routing_key,
        failed_at,
    }
}

/// The properties back from [`DeadLetterMessage::raw_properties`].
pub fn properties_from_raw(raw: &Value) -> BasicProperties {
    serde_json::from_value(raw.clone()).unwrap_or_default()
}

fn first_death(headers: Option<&FieldTable>) -> Option<&FieldTable> {
    match headers?.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().find_map(|d| match d {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}

fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// lapin's serialisation of the properties, with the `Some`/`None`
/// wrappers and short strings read as plain JSON.
fn readable_properties(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, readable_properties(v)))
                .collect(),
        ),
        other => other,
    }
}

fn table_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.to_string(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::DecimalValue(d) => json!({"scale": d.scale, "value": d.value}),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => json!(text),
            Err(_) => json!({"hex": hex::encode(s.as_bytes())}),
        },
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::Timestamp(t) => DateTime::from_timestamp(i64::try_from(*t).unwrap_or(0), 0)
            .map_or(json!(t), |t| json!(t.to_rfc3339())),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::ByteArray(b) => json!({"hex": hex::encode(b.as_slice())}),
        AMQPValue::Void => Value::Null,
    }
}
