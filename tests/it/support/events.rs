//! Reading what the worker emits: a queue bound to the test's events
//! exchange, and the contract's checks of one event.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use holdclear::config::Topology;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde_json::Value;

use super::{amqp_url, unique};

/// One message as it arrived on the test's queue.
#[derive(Clone, Debug)]
pub struct Received {
    /// Its routing key.
    pub routing_key: String,
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// AMQP `content_type`.
    pub content_type: Option<String>,
    /// AMQP delivery mode (2 = persistent).
    pub delivery_mode: Option<u8>,
    /// AMQP timestamp.
    pub timestamp: Option<u64>,
    /// The body, parsed.
    pub body: Value,
}

impl Received {
    /// `data.<field>`.
    pub fn data(&self, field: &str) -> &Value {
        &self.body["data"][field]
    }

    /// `data.salesOrderNumber` as a string, or "".
    pub fn order(&self) -> &str {
        self.data("salesOrderNumber").as_str().unwrap_or_default()
    }
}

/// An exclusive queue bound with `#` to the test's events exchange.
pub struct EventQueue {
    conn: Connection,
    _channel: Channel,
    consumer: Consumer,
    /// Everything received so far, in order.
    pub seen: Vec<Received>,
}

impl EventQueue {
    /// Declares the events exchange (as the worker does) and binds a fresh
    /// exclusive queue to it.
    pub async fn bind(topology: &Topology) -> Self {
        let name = unique("events-watch");
        let conn = Connection::connect(
            &amqp_url(),
            ConnectionProperties::default().with_connection_name(name.clone().into()),
        )
        .await
        .expect("connect to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .exchange_declare(
                topology.events_exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the events exchange");
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the watch queue");
        channel
            .queue_bind(
                name.as_str().into(),
                topology.events_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the watch queue");
        let consumer = channel
            .basic_consume(
                name.as_str().into(),
                name.as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        Self {
            conn,
            _channel: channel,
            consumer,
            seen: Vec::new(),
        }
    }

    /// The next message, or `None` after `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Received> {
        let delivery = tokio::time::timeout(wait, self.consumer.next())
            .await
            .ok()??
            .expect("delivery");
        let p = &delivery.properties;
        let received = Received {
            routing_key: delivery.routing_key.as_str().to_owned(),
            message_id: p.message_id().as_ref().map(|s| s.as_str().to_owned()),
            content_type: p.content_type().as_ref().map(|s| s.as_str().to_owned()),
            delivery_mode: *p.delivery_mode(),
            timestamp: *p.timestamp(),
            body: serde_json::from_slice(&delivery.data).expect("event body is JSON"),
        };
        self.seen.push(received.clone());
        Some(received)
    }

    /// Receives until `done(seen)` holds; panics naming `what` at the deadline.
    pub async fn until(
        &mut self,
        deadline: Duration,
        what: &str,
        done: impl Fn(&[Received]) -> bool,
    ) -> &[Received] {
        let start = Instant::now();
        while !done(&self.seen) {
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() || self.next(left).await.is_none() {
                panic!(
                    "timed out after {deadline:?} waiting for {what}; received: {:#?}",
                    self.seen
                        .iter()
                        .map(|r| (&r.routing_key, r.order(), r.data("reason")))
                        .collect::<Vec<_>>()
                );
            }
        }
        &self.seen
    }

    /// Nothing more arrives within `quiet`.
    pub async fn assert_quiet(&mut self, quiet: Duration) {
        if let Some(extra) = self.next(quiet).await {
            panic!("unexpected event: {extra:#?}");
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// The events of one order, in arrival order.
pub fn of_order<'a>(seen: &'a [Received], order: &str) -> Vec<&'a Received> {
    seen.iter().filter(|r| r.order() == order).collect()
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok())
}

/// Checks one emitted event against `contracts/events.md` and the
/// CloudEvents envelope schema; panics with the event on a mismatch.
pub fn assert_contract(ev: &Received) {
    let b = &ev.body;
    let ctx = || format!("{ev:#?}");
    assert_eq!(b["specversion"], "1.0", "{}", ctx());
    assert_eq!(
        b["type"].as_str(),
        Some(format!("holdclear.{}.v1", ev.routing_key).as_str()),
        "{}",
        ctx()
    );
    assert_eq!(b["source"], "/holdclear", "{}", ctx());
    let id = b["id"].as_str().expect("id is a string");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{}", ctx());
    assert_eq!(
        ev.message_id.as_deref(),
        Some(id),
        "message_id = id: {}",
        ctx()
    );
    assert_eq!(
        ev.content_type.as_deref(),
        Some("application/cloudevents+json"),
        "{}",
        ctx()
    );
    assert_eq!(ev.delivery_mode, Some(2), "persistent: {}", ctx());
    assert!(ev.timestamp.is_some(), "{}", ctx());
    assert!(is_rfc3339(&b["time"]), "{}", ctx());
    assert_eq!(b["datacontenttype"], "application/json", "{}", ctx());
    assert!(
        b["subject"].as_str().is_some_and(|s| !s.is_empty()),
        "{}",
        ctx()
    );
    let d = &b["data"];
    assert!(d.is_object(), "{}", ctx());
    assert!(
        d["salesOrderNumber"].is_string() || d["salesOrderNumber"].is_null(),
        "{}",
        ctx()
    );
    assert!(
        d.get("webOrderId").is_none_or(Value::is_string),
        "{}",
        ctx()
    );
    assert!(
        d["caseId"]
            .as_str()
            .is_some_and(|c| uuid::Uuid::parse_str(c).is_ok()),
        "{}",
        ctx()
    );
    let string = |f: &str| assert!(d[f].is_string(), "data.{f} must be a string: {}", ctx());
    match ev.routing_key.as_str() {
        "order.smart_account_assigned" => {
            for f in [
                "smartAccountDomain",
                "accountType",
                "virtualAccountName",
                "rule",
                "assignmentId",
            ] {
                string(f);
            }
            assert!(
                matches!(d["accountType"].as_str(), Some("CUSTOMER" | "HOLDING")),
                "{}",
                ctx()
            );
            assert!(d["attempts"].as_u64().is_some_and(|n| n >= 1), "{}", ctx());
        }
        "order.hold_released" => {
            assert!(is_rfc3339(&d["releasedAt"]), "{}", ctx());
            assert!(
                d["heldSeconds"].as_i64().is_some_and(|n| n >= 0),
                "{}",
                ctx()
            );
            string("smartAccountDomain");
            // null when no rule decided: the hold was released before
            // holdclear assigned anything.
            assert!(d["rule"].is_string() || d["rule"].is_null(), "{}", ctx());
            assert!(
                d["otherHolds"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(Value::is_string)),
                "{}",
                ctx()
            );
        }
        "order.hold_escalated" => {
            let reason = d["reason"].as_str().unwrap_or_default();
            assert!(
                holdclear::domain::EscalationReason::parse(reason).is_some(),
                "{}",
                ctx()
            );
            assert!(
                matches!(d["level"].as_str(), Some("warning" | "critical")),
                "{}",
                ctx()
            );
            assert!(
                d["heldSeconds"].as_i64().is_some_and(|n| n >= 0),
                "{}",
                ctx()
            );
            string("action");
            string("detail");
        }
        other => panic!("unknown routing key {other}: {}", ctx()),
    }
}
