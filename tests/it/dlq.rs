//! `holdclear dlq …` run as an operator runs it, against the real broker.

use holdclear::broker::{Broker, Publisher, declare_topology};
use holdclear::config::SecretUrl;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::Value;

use crate::support::{amqp_url, bin, config_file, topology, unique};

struct Fixture {
    prefix: String,
    conn: Connection,
    channel: Channel,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Self {
        let prefix = unique("dlq");
        let dir = tempfile::tempdir().unwrap();
        let config = config_file(dir.path(), &prefix);
        let broker = Broker::new(
            SecretUrl::parse("amqp", &amqp_url()).unwrap(),
            prefix.clone(),
        );
        let conn = broker.connect("test").await.unwrap();
        let publisher = Publisher::open(&conn).await.unwrap();
        declare_topology(publisher.channel(), &topology(&prefix), 20)
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        Self {
            prefix,
            conn,
            channel,
            config,
            _dir: dir,
        }
    }

    async fn dead_letter(&self, id: &str, code: &str, failed_at: &str, body: &[u8]) {
        let t = topology(&self.prefix);
        let mut headers = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        headers.insert(ShortString::from("x-holdclear-error-code"), text(code));
        headers.insert(
            ShortString::from("x-holdclear-error-detail"),
            text("data.holdReason is required"),
        );
        headers.insert(ShortString::from("x-holdclear-failed-at"), text(failed_at));
        headers.insert(
            ShortString::from("x-holdclear-original-exchange"),
            text(&t.orders_exchange),
        );
        headers.insert(
            ShortString::from("x-holdclear-original-routing-key"),
            text(&t.held_routing_key),
        );
        headers.insert(ShortString::from("x-upstream-trace"), text("abc"));
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(id))
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

    /// Waits until `queue` holds `expected` ready messages (returns of
    /// unacknowledged messages are asynchronous in quorum queues).
    async fn wait_depth(&self, queue: &str, expected: u32) {
        crate::support::wait_for(
            std::time::Duration::from_secs(10),
            &format!("{queue} to hold {expected}"),
            || async { (self.ready(queue).await == expected).then_some(()) },
        )
        .await;
    }

    async fn ready(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    fn dlq(&self, args: &[&str]) -> (i32, String, String) {
        let out = bin()
            .arg("--config")
            .arg(&self.config)
            .arg("dlq")
            .args(args)
            .env("HOLDCLEAR_AMQP_URL", amqp_url())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn cleanup(self) {
        let t = topology(&self.prefix);
        for q in [&t.held_queue, &t.dead_letter_queue] {
            self.channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
        for e in [
            &t.orders_exchange,
            &t.dead_letter_exchange,
            &t.events_exchange,
        ] {
            self.channel
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .unwrap();
        }
        self.conn.close(200, "done".into()).await.ok();
    }
}

fn held_body(order: &str) -> Vec<u8> {
    format!(r#"{{"specversion":"1.0","type":"commerce.order.held.v1","id":"e-{order}","source":"/t","data":{{"salesOrderNumber":"{order}"}}}}"#).into_bytes()
}

#[tokio::test]
async fn list_replay_and_purge_as_an_operator_would() {
    let f = Fixture::new().await;
    let t = topology(&f.prefix);
    let now = chrono::Utc::now().to_rfc3339();
    f.dead_letter("m1", "INVALID_EVENT", &now, &held_body("1001"))
        .await;
    f.dead_letter("m2", "MALFORMED_JSON", &now, b"{not json")
        .await;
    f.dead_letter(
        "m3",
        "INVALID_EVENT",
        "2020-01-01T00:00:00Z",
        &held_body("1003"),
    )
    .await;
    f.dead_letter("m4", "MALFORMED_JSON", &now, b"[[[").await;

    // Looking twice shows the same messages in the same order, and consumes nothing.
    for _ in 0..2 {
        let (code, out, err) = f.dlq(&["list", "--json"]);
        assert_eq!(code, 0, "{err}");
        let list: Vec<Value> = serde_json::from_str(&out).unwrap();
        let ids: Vec<&str> = list
            .iter()
            .map(|l| l["message_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["m1", "m2", "m3", "m4"]);
        assert_eq!(list[0]["error_code"], "INVALID_EVENT");
        assert_eq!(list[0]["order_number"], "1001");
        assert_eq!(list[0]["replayed"], 0);
        assert_eq!(list[1]["order_number"], Value::Null);
    }
    f.wait_depth(&t.dead_letter_queue, 4).await;
    let (code, out, _) = f.dlq(&["list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("MALFORMED_JSON") && out.contains("4 message(s)"),
        "{out}"
    );

    // A dry run changes nothing.
    let (code, out, _) = f.dlq(&["replay", "--all", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(out.contains("4 of 4 message(s) would be replayed"), "{out}");
    f.wait_depth(&t.dead_letter_queue, 4).await;
    f.wait_depth(&t.held_queue, 0).await;

    // Replay by code: exactly those two go back to the original exchange and routing key.
    let (code, out, err) = f.dlq(&["replay", "--code", "MALFORMED_JSON", "--rate", "1000"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 of 4 message(s) replayed"), "{out}");
    f.wait_depth(&t.dead_letter_queue, 2).await;
    f.wait_depth(&t.held_queue, 2).await;
    let got = f
        .channel
        .basic_get(
            t.held_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "m2"
    );
    assert_eq!(got.delivery.data, b"{not json");
    let headers = got.delivery.properties.headers().as_ref().unwrap().inner();
    assert_eq!(
        headers.get("x-holdclear-replayed"),
        Some(&AMQPValue::LongLongInt(1))
    );
    assert!(!headers.contains_key("x-holdclear-error-code"));
    assert!(
        headers.contains_key("x-upstream-trace"),
        "the message's own headers stay"
    );

    // Replay by id.
    let (code, out, _) = f.dlq(&["replay", "--id", "m3", "--json"]);
    assert_eq!(code, 0);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["replayed"][0]["message_id"], "m3");
    f.wait_depth(&t.dead_letter_queue, 1).await;

    // Replay needs a choice; purge needs a confirmation.
    assert_eq!(f.dlq(&["replay"]).0, 64);
    assert_eq!(f.dlq(&["purge"]).0, 64);

    f.dead_letter("m5", "INVALID_EVENT", "2020-01-01T00:00:00Z", b"{}")
        .await;
    let (code, out, _) = f.dlq(&["purge", "--yes", "--older-than", "1h"]);
    assert_eq!(code, 0);
    assert!(out.contains("1 message(s) purged"), "{out}");
    let (_, out, _) = f.dlq(&["list", "--json"]);
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["message_id"], "m1");
    let (code, out, _) = f.dlq(&["purge", "--yes"]);
    assert_eq!(code, 0);
    assert!(out.contains("1 message(s) purged"), "{out}");
    f.wait_depth(&t.dead_letter_queue, 0).await;
    f.cleanup().await;
}
