//! RabbitMQ for tests: the test's own topology (deleted when dropped),
//! publishing held-order events and raw messages, reading a queue, and the
//! connections of a worker.
#![allow(dead_code)]

use std::process::Command;

use holdclear::broker::{Broker, OutgoingMessage, Publisher, declare_topology};
use holdclear::config::{SecretUrl, Topology};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};

use super::{amqp_url, topology};

/// The `x-delivery-limit` tests declare the held queue with (the default).
pub const DELIVERY_LIMIT: u32 = 20;

/// A held-order event for `order` with envelope id `id`, as in the contract.
pub fn held_event(id: &str, order: &str) -> Value {
    json!({
        "specversion": "1.0", "type": "commerce.order.held.v1", "source": "/commerce/orders",
        "id": id, "time": "2026-11-23T09:12:44Z", "datacontenttype": "application/json",
        "data": {
            "salesOrderNumber": order, "webOrderId": format!("W{order}"),
            "purchaseOrderNumber": "PO-ACME-0042", "holdReason": "NO_SMART_ACCOUNT",
            "heldAt": "2026-11-23T09:10:00Z", "orderType": "STANDARD",
            "partner": {"id": "P-100", "name": "Globex Networks"},
            "endCustomer": {"name": "Acme Corp", "email": "it-admin@acme.com", "country": "US"},
            "smartAccount": null,
            "lines": [{"lineNumber": "1.1", "sku": "C9300-48P-E", "productFamily": "C9300"}]
        }
    })
}

/// A message as the upstream publishes it: the envelope id as `message_id`.
pub fn message(event: &Value) -> OutgoingMessage {
    OutgoingMessage {
        routing_key: "order.held".into(),
        message_id: event["id"].as_str().unwrap_or("no-id").to_owned(),
        content_type: "application/cloudevents+json".into(),
        body: serde_json::to_vec(event).unwrap(),
        timestamp: Some(1_795_000_000),
        headers: vec![],
    }
}

/// A message read back from a queue.
#[derive(Debug)]
pub struct Got {
    /// The body.
    pub body: Vec<u8>,
    /// Its properties (headers included).
    pub properties: BasicProperties,
}

impl Got {
    /// A string header, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        let headers = self.properties.headers().as_ref()?;
        let value = headers.inner().get(name)?;
        match value {
            lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
            lapin::types::AMQPValue::ShortString(s) => Some(s.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    /// The AMQP `message_id`.
    pub fn message_id(&self) -> Option<String> {
        self.properties.message_id().as_ref().map(|m| m.to_string())
    }
}

/// The test's view of RabbitMQ: its topology (declared; deleted on drop).
pub struct Rabbit {
    /// The test's topology.
    pub topology: Topology,
    prefix: String,
    conn: Connection,
    channel: Channel,
    publisher: Publisher,
}

impl Rabbit {
    /// Connects and declares the topology of `prefix` (as the worker will).
    pub async fn new(prefix: &str) -> Self {
        let topology = topology(prefix);
        let broker = Broker::new(
            SecretUrl::parse("amqp", &amqp_url()).unwrap(),
            format!("test {prefix}"),
        );
        let conn = broker.connect("test").await.unwrap();
        declare_topology(&broker, &conn, &topology, DELIVERY_LIMIT)
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let publisher = Publisher::open(&conn).await.unwrap();
        Self {
            topology,
            prefix: prefix.to_owned(),
            conn,
            channel,
            publisher,
        }
    }

    /// A new connection, channel and publisher: after the broker restarted,
    /// the old ones went down with it. The topology is durable; it stays.
    pub async fn reconnect(&mut self) {
        let broker = Broker::new(
            SecretUrl::parse("amqp", &amqp_url()).unwrap(),
            format!("test {}", self.prefix),
        );
        let conn = broker.connect("test").await.unwrap();
        self.channel = conn.create_channel().await.unwrap();
        self.publisher = Publisher::open(&conn).await.unwrap();
        self.conn = conn;
    }

    /// Publishes messages to the orders exchange, all confirmed.
    pub async fn publish(&self, msgs: &[OutgoingMessage]) {
        for chunk in msgs.chunks(500) {
            let results = self
                .publisher
                .publish_all(&self.topology.orders_exchange, chunk)
                .await;
            for r in results {
                r.unwrap();
            }
        }
    }

    /// Publishes held-order events (see [`message`]).
    pub async fn publish_events(&self, events: &[Value]) {
        let msgs: Vec<_> = events.iter().map(message).collect();
        self.publish(&msgs).await;
    }

    /// Publishes `body` to the dead-letter exchange as the worker
    /// dead-letters a message: `x-holdclear-error-code` `code`, its detail,
    /// and the orders exchange and held routing key as its origin.
    pub async fn dead_letter(&self, message_id: &str, code: &str, detail: &str, body: &[u8]) {
        use lapin::options::BasicPublishOptions;
        use lapin::types::{AMQPValue, LongString, ShortString};
        let t = &self.topology;
        let mut headers = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        for (k, v) in [
            ("x-holdclear-error-code", code),
            ("x-holdclear-error-detail", detail),
            ("x-holdclear-failed-at", "2026-12-01T10:00:00Z"),
            ("x-holdclear-original-exchange", t.orders_exchange.as_str()),
            (
                "x-holdclear-original-routing-key",
                t.held_routing_key.as_str(),
            ),
        ] {
            headers.insert(ShortString::from(k), text(v));
        }
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(message_id))
            .with_content_type(ShortString::from("application/cloudevents+json"))
            .with_delivery_mode(2)
            .with_headers(headers);
        self.channel
            .basic_publish(
                t.dead_letter_exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Ready messages in `queue` (unacknowledged ones not counted).
    pub async fn depth(&self, queue: &str) -> u32 {
        self.declare_passive(queue).await.message_count()
    }

    /// Consumers on `queue`.
    pub async fn consumers(&self, queue: &str) -> u32 {
        self.declare_passive(queue).await.consumer_count()
    }

    async fn declare_passive(&self, queue: &str) -> lapin::Queue {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
    }

    /// Takes (and acks) the next message of `queue`.
    pub async fn get(&self, queue: &str) -> Option<Got> {
        let msg = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()?;
        let d = msg.delivery;
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
        Some(Got {
            body: d.data,
            properties: d.properties,
        })
    }

    /// Replaces the held queue with a classic one (arguments the worker's
    /// declaration conflicts with), or removes it.
    pub async fn break_held_queue(&self, replace: bool) {
        let queue = self.topology.held_queue.as_str();
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        if replace {
            self.channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
    }

    /// Takes every message of `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Got> {
        let mut all = Vec::new();
        while let Some(m) = self.get(queue).await {
            all.push(m);
        }
        all
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let topology = self.topology.clone();
        // Async cleanup from Drop: a thread with its own runtime, so that it
        // also runs when the test panicked.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Bounded: a broker that does not answer must not hang the test.
            rt.block_on(async {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    delete_topology(&topology),
                )
                .await;
            });
        });
        let _ = cleanup.join();
    }
}

async fn delete_topology(topology: &Topology) {
    let Ok(conn) = Connection::connect(&amqp_url(), Default::default()).await else {
        return;
    };
    let _ = holdclear::broker::delete_topology(&conn, topology).await;
    holdclear::broker::close(&conn).await;
}

/// The RabbitMQ pids of the connections whose client-given name contains
/// `needle` (via `rabbitmqctl`).
pub fn connections_named(needle: &str) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split('\t').next().map(str::to_owned))
        .collect()
}

/// Closes one connection by its RabbitMQ pid (only this test's worker).
pub fn close_connection(pid: &str) {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "close_connection", pid, "closed by a test"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
