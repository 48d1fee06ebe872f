//! Dead letters kept in PostgreSQL: the ingester (every message stored
//! once, counted when seen again, held while the database is down) and
//! `holdclear dlq …` run as an operator runs it, against the real broker
//! and a database per test.

use holdclear::broker::dlq_ingest::DeadLetterIngest;
use holdclear::broker::{Broker, Publisher, declare_topology};
use holdclear::config::SecretUrl;
use holdclear::store::Store;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::support::{amqp_url, bin, config_file, database_url, topology, unique, wait_for};

const DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

struct Fixture {
    prefix: String,
    database_url: String,
    conn: Connection,
    channel: Channel,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(pool: &PgPool) -> Self {
        let prefix = unique("dlq");
        let database_url = database_url(pool).await;
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
            database_url,
            conn,
            channel,
            config,
            _dir: dir,
        }
    }

    async fn dead_letter(&self, id: &str, code: &str, failed_at: &str, body: &[u8]) {
        self.dead_letter_with(id, code, "data.holdReason is required", failed_at, body)
            .await;
    }

    async fn dead_letter_with(
        &self,
        id: &str,
        code: &str,
        detail: &str,
        failed_at: &str,
        body: &[u8],
    ) {
        let t = topology(&self.prefix);
        let mut headers = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        headers.insert(ShortString::from("x-holdclear-error-code"), text(code));
        headers.insert(ShortString::from("x-holdclear-error-detail"), text(detail));
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
        self.publish_dlx(id, headers, body).await;
    }

    /// A message the broker dead-lettered by itself: `x-death`, no `x-holdclear-*`.
    async fn broker_dead_letter(&self, id: &str, body: &[u8]) {
        let t = topology(&self.prefix);
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        let mut death = FieldTable::default();
        death.insert("queue".into(), text(&t.held_queue));
        death.insert("reason".into(), text("delivery_limit"));
        death.insert("exchange".into(), text(&t.orders_exchange));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![text(&t.held_routing_key)].into()),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        self.publish_dlx(id, headers, body).await;
    }

    async fn publish_dlx(&self, id: &str, headers: FieldTable, body: &[u8]) {
        let t = topology(&self.prefix);
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

    /// Runs an ingester in this process until the token is cancelled.
    fn ingester(&self, store: Store) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let stop = CancellationToken::new();
        let ingest = DeadLetterIngest::new(
            Broker::new(
                SecretUrl::parse("amqp", &amqp_url()).unwrap(),
                self.prefix.clone(),
            ),
            topology(&self.prefix),
            20,
            8,
        );
        let task = tokio::spawn(holdclear::intake::dead_letters::ingest(
            store,
            ingest,
            stop.clone(),
        ));
        (stop, task)
    }

    fn dlq(&self, args: &[&str]) -> (i32, String, String) {
        let out = bin()
            .arg("--config")
            .arg(&self.config)
            .arg("dlq")
            .args(args)
            .env("HOLDCLEAR_AMQP_URL", amqp_url())
            .env("HOLDCLEAR_DATABASE_URL", &self.database_url)
            .env("USER", "tester")
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

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn dlq_ingest_stores_every_dead_letter_whole_and_once(pool: PgPool) {
    let f = Fixture::new(&pool).await;
    let t = topology(&f.prefix);
    let now = chrono::Utc::now().to_rfc3339();
    f.dead_letter("m1", "INVALID_EVENT", &now, &held_body("1001"))
        .await;
    f.broker_dead_letter("m2", &held_body("1002")).await;
    let binary = [0xff_u8, 0xfe, 0x00, b'{', 0x80];
    f.dead_letter("m3", "MALFORMED_JSON", &now, &binary).await;
    let big = vec![b'x'; 256 * 1024];
    f.dead_letter("m4", "PAYLOAD_TOO_LARGE", &now, &big).await;

    let (stop, task) = f.ingester(Store::from_pool(pool.clone()));
    wait_for(DEADLINE, "four dead letters stored", || async {
        (count(&pool, "SELECT count(*) FROM dead_letters").await == 4).then_some(())
    })
    .await;
    f.wait_depth(&t.dead_letter_queue, 0).await;

    let row = |id: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, String, Option<String>, Option<String>, Option<String>, Vec<u8>, Value, i32)>(
                "SELECT code, detail, origin_exchange, origin_routing_key, sales_order_number, body, headers, seen_count
                 FROM dead_letters WHERE message_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let m1 = row("m1").await;
    assert_eq!(m1.0, "INVALID_EVENT");
    assert_eq!(m1.1, "data.holdReason is required");
    assert_eq!(m1.2.as_deref(), Some(t.orders_exchange.as_str()));
    assert_eq!(m1.4.as_deref(), Some("1001"));
    assert_eq!(m1.6["x-upstream-trace"], "abc");
    assert_eq!(m1.7, 1);
    let m2 = row("m2").await;
    assert_eq!(m2.0, "DELIVERY_LIMIT");
    assert_eq!(m2.2.as_deref(), Some(t.orders_exchange.as_str()));
    assert_eq!(m2.3.as_deref(), Some(t.held_routing_key.as_str()));
    assert!(m2.1.contains("delivery_limit"), "{}", m2.1);
    assert_eq!(row("m3").await.5, binary);
    assert_eq!(row("m4").await.5.len(), 256 * 1024);

    // The same message dead-lettered again (after a replay): one row, seen twice.
    let later = (chrono::Utc::now() + chrono::Duration::seconds(5)).to_rfc3339();
    f.dead_letter("m1", "INVALID_EVENT", &later, &held_body("1001"))
        .await;
    wait_for(DEADLINE, "m1 seen twice", || async {
        (row("m1").await.7 == 2).then_some(())
    })
    .await;
    assert_eq!(count(&pool, "SELECT count(*) FROM dead_letters").await, 4);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM dead_letter_sightings s JOIN dead_letters d ON d.id = s.dead_letter_id WHERE d.message_id = 'm1'").await,
        2
    );
    stop.cancel();
    task.await.unwrap();
    f.cleanup().await;
}

#[sqlx::test]
async fn dlq_two_ingesters_store_each_message_once(pool: PgPool) {
    let f = Fixture::new(&pool).await;
    let t = topology(&f.prefix);
    let a = f.ingester(Store::from_pool(pool.clone()));
    let b = f.ingester(Store::from_pool(pool.clone()));
    for round in 0..2 {
        let at = (chrono::Utc::now() + chrono::Duration::seconds(round)).to_rfc3339();
        for i in 0..40 {
            f.dead_letter(
                &format!("m{i}"),
                "INVALID_EVENT",
                &at,
                &held_body(&format!("{i}")),
            )
            .await;
        }
    }
    wait_for(DEADLINE, "every message seen twice", || async {
        (count(
            &pool,
            "SELECT coalesce(sum(seen_count), 0)::bigint FROM dead_letters",
        )
        .await
            == 80)
            .then_some(())
    })
    .await;
    f.wait_depth(&t.dead_letter_queue, 0).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM dead_letters").await, 40);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM dead_letter_sightings").await,
        80
    );
    for (stop, task) in [a, b] {
        stop.cancel();
        task.await.unwrap();
    }
    f.cleanup().await;
}

#[sqlx::test]
async fn dlq_ingest_holds_messages_while_the_database_is_down(pool: PgPool) {
    let f = Fixture::new(&pool).await;
    let t = topology(&f.prefix);
    // A database nothing answers for: every write fails.
    let down = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_millis(200))
        .connect_lazy("postgres://postgres@127.0.0.1:9/nothing")
        .unwrap();
    let (stop, task) = f.ingester(Store::from_pool(down));
    f.dead_letter(
        "m1",
        "INVALID_EVENT",
        &chrono::Utc::now().to_rfc3339(),
        b"{}",
    )
    .await;
    // The message is taken but never acked: stopping hands it back.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    stop.cancel();
    task.await.unwrap();
    f.wait_depth(&t.dead_letter_queue, 1).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM dead_letters").await, 0);

    // With the database back, it is stored and only then leaves the queue.
    let (stop, task) = f.ingester(Store::from_pool(pool.clone()));
    wait_for(DEADLINE, "the held message stored", || async {
        (count(&pool, "SELECT count(*) FROM dead_letters").await == 1).then_some(())
    })
    .await;
    f.wait_depth(&t.dead_letter_queue, 0).await;
    stop.cancel();
    task.await.unwrap();
    f.cleanup().await;
}
#[sqlx::test]
async fn list_replay_and_purge_as_an_operator_would(pool: PgPool) {
    let f = Fixture::new(&pool).await;
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
