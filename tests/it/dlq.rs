//! Dead letters kept in PostgreSQL: the ingester (every message stored
//! once, counted when seen again, held while the database is down) and
//! `holdclear dlq …` run as an operator runs it, against the real broker
//! and a database per test.

use holdclear::broker::dlq_ingest::DeadLetterIngest;
use holdclear::broker::{Broker, Publisher, declare_topology};
use holdclear::config::SecretUrl;
use holdclear::domain::DeadLetterMessage;
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
    delivery_limit: u32,
    database_url: String,
    conn: Connection,
    channel: Channel,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(pool: &PgPool) -> Self {
        Self::with_delivery_limit(pool, 20).await
    }

    /// The test's topology, its held queue declared with `delivery_limit`.
    async fn with_delivery_limit(pool: &PgPool, delivery_limit: u32) -> Self {
        let prefix = unique("dlq");
        let database_url = database_url(pool).await;
        let dir = tempfile::tempdir().unwrap();
        let config = config_file(dir.path(), &prefix);
        let broker = Broker::new(
            SecretUrl::parse("amqp", &amqp_url()).unwrap(),
            prefix.clone(),
        );
        let conn = broker.connect("test").await.unwrap();
        declare_topology(&broker, &conn, &topology(&prefix), delivery_limit)
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        Self {
            prefix,
            delivery_limit,
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

    /// A broker dead letter whose `x-death` names `exchange` and `routing_key`.
    async fn broker_dead_letter_from(
        &self,
        id: &str,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
    ) {
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        let mut death = FieldTable::default();
        death.insert("queue".into(), text("somewhere"));
        death.insert("reason".into(), text("delivery_limit"));
        death.insert("exchange".into(), text(exchange));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![text(routing_key)].into()),
        );
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        self.publish_dlx(id, headers, body).await;
    }

    /// `dlq list --json` with `args`.
    fn list(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["list", "--json"];
        all.extend_from_slice(args);
        let (code, out, err) = self.dlq(&all);
        assert_eq!(code, 0, "{out}{err}");
        serde_json::from_str(&out).unwrap()
    }

    /// The id of the dead letter with this message id.
    async fn id_of(&self, pool: &PgPool, message_id: &str) -> i64 {
        sqlx::query_scalar("SELECT id FROM dead_letters WHERE message_id = $1")
            .bind(message_id)
            .fetch_one(pool)
            .await
            .unwrap()
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
            self.delivery_limit,
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
        dlq_command(&self.config, &amqp_url(), &self.database_url, args)
    }

    async fn cleanup(self) {
        let t = topology(&self.prefix);
        holdclear::broker::delete_topology(&self.conn, &t)
            .await
            .unwrap();
        self.conn.close(200, "done".into()).await.ok();
    }
}

/// Runs `holdclear --config CONFIG dlq ARGS` against the broker at `url`
/// and the database at `database_url`, without `RUST_LOG`, as user
/// `tester`: (exit code, stdout, stderr).
pub(crate) fn dlq_command(
    config: &std::path::Path,
    url: &str,
    database_url: &str,
    args: &[&str],
) -> (i32, String, String) {
    let out = bin()
        .arg("--config")
        .arg(config)
        .arg("dlq")
        .args(args)
        .env("HOLDCLEAR_AMQP_URL", url)
        .env("HOLDCLEAR_DATABASE_URL", database_url)
        .env("USER", "tester")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    let (code, out, _) = f.dlq(&["queue"]);
    assert_eq!(code, 0);
    assert!(out.contains("1 message(s) wait in"), "{out}");

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

/// Publishes the messages, runs an ingester until `n` are stored, stops it.
async fn ingest_all(f: &Fixture, pool: &PgPool, n: i64) {
    let (stop, task) = f.ingester(Store::from_pool(pool.clone()));
    wait_for(DEADLINE, "the dead letters stored", || async {
        (count(pool, "SELECT count(*) FROM dead_letters").await == n).then_some(())
    })
    .await;
    stop.cancel();
    task.await.unwrap();
}

#[sqlx::test]
async fn dlq_cli_lists_shows_groups_claims_notes_archives_and_purges(pool: PgPool) {
    let f = Fixture::new(&pool).await;
    let t = topology(&f.prefix);
    let now = chrono::Utc::now().to_rfc3339();
    let bad = |v: &str| format!("data.salesOrderNumber: \"{v}\" is not a sales order number");
    f.dead_letter_with("m1", "INVALID_EVENT", &bad("x1"), &now, &held_body("1001"))
        .await;
    f.dead_letter_with("m2", "INVALID_EVENT", &bad("x2"), &now, &held_body("1002"))
        .await;
    f.dead_letter("m3", "MALFORMED_JSON", &now, &[0xff, 0xfe, 0x00])
        .await;
    f.broker_dead_letter("m4", &held_body("1004")).await;
    ingest_all(&f, &pool, 4).await;

    // Looking twice shows the same, and the queue is not touched.
    let first = f.list(&[]);
    assert_eq!(first.len(), 4);
    assert_eq!(f.list(&[]), first);
    f.wait_depth(&t.dead_letter_queue, 0).await;
    let (code, out, _) = f.dlq(&["list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("MALFORMED_JSON") && out.contains("4 dead letter(s)"),
        "{out}"
    );

    // Filters.
    assert_eq!(f.list(&["--code", "invalid_event"]).len(), 2);
    let by_order = f.list(&["--order", "1004"]);
    assert_eq!(by_order.len(), 1);
    assert_eq!(by_order[0]["code"], "DELIVERY_LIMIT");
    assert_eq!(by_order[0]["origin_exchange"], t.orders_exchange.as_str());
    assert_eq!(f.list(&["--text", "\"x2\""]).len(), 1);
    assert_eq!(f.list(&["--limit", "1", "--offset", "1"]).len(), 1);
    assert_eq!(f.list(&["--since", "1h"]).len(), 4);
    assert_eq!(f.list(&["--until", "1h"]).len(), 0);

    // Groups: both INVALID_EVENTs are one group, growing (seen this hour only).
    let (code, out, _) = f.dlq(&["groups", "--json"]);
    assert_eq!(code, 0);
    let groups: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(groups.len(), 3, "{groups:?}");
    assert_eq!(groups[0]["code"], "INVALID_EVENT");
    assert_eq!(groups[0]["count"], 2);
    assert_eq!(groups[0]["growing"], true);
    assert_eq!(
        groups[0]["signature"],
        "data.salesOrderNumber: \"…\" is not a sales order number"
    );
    let group = groups[0]["group"].as_str().unwrap().to_owned();
    assert_eq!(f.list(&["--group", &group]).len(), 2);
    let (_, out, _) = f.dlq(&["groups"]);
    assert!(out.contains("growing"), "{out}");

    // Show: headers, properties, pretty body; non-UTF-8 as hex.
    let m1 = f.id_of(&pool, "m1").await;
    let m3 = f.id_of(&pool, "m3").await;
    let (code, out, _) = f.dlq(&["show", &m1.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("x-upstream-trace"), "{out}");
    assert!(out.contains("application/cloudevents+json"), "{out}");
    assert!(out.contains("\"salesOrderNumber\": \"1001\""), "{out}");
    let (_, out, _) = f.dlq(&["show", &m3.to_string()]);
    assert!(out.contains("not UTF-8") && out.contains("fffe00"), "{out}");
    assert_eq!(f.dlq(&["show", "999999"]).0, 64);

    // Claim a group, note one, archive one.
    let (code, out, _) = f.dlq(&["claim", "--group", &group, "--operator", "alice"]);
    assert_eq!(code, 0);
    assert!(out.contains("2 dead letter(s) claimed by alice"), "{out}");
    assert_eq!(f.list(&["--group", &group])[0]["claimed_by"], "alice");
    let (code, _, _) = f.dlq(&[
        "note",
        &m1.to_string(),
        "--text",
        "asked upstream",
        "--ticket",
        "INC-1",
    ]);
    assert_eq!(code, 0);
    let (_, out, _) = f.dlq(&["show", &m1.to_string(), "--json"]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["notes"][0]["ticket"], "INC-1");
    assert_eq!(shown["notes"][0]["operator"], "tester");
    assert_eq!(shown["sightings"].as_array().unwrap().len(), 1);
    let (code, out, _) = f.dlq(&["archive", &m3.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("1 dead letter(s) archived"), "{out}");
    assert_eq!(f.list(&[]).len(), 3);
    let all = f.list(&["--archived"]);
    assert_eq!(all.len(), 4);
    assert!(all.iter().any(|l| l["archived_at"].is_string()), "{all:?}");

    // Purge: needs a choice; a dry run deletes nothing.
    let (code, _, err) = f.dlq(&["purge"]);
    assert_eq!(code, 64);
    assert!(err.contains("--all"), "{err}");
    let (_, out, _) = f.dlq(&["purge", "--archived-before", "1h"]);
    assert!(out.contains("0 dead letter(s) purged"), "{out}");
    let soon = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    let (_, out, _) = f.dlq(&["purge", "--archived-before", &soon, "--dry-run"]);
    assert!(out.contains("1 dead letter(s) would be purged"), "{out}");
    assert_eq!(count(&pool, "SELECT count(*) FROM dead_letters").await, 4);
    let (_, out, _) = f.dlq(&["purge", "--archived-before", &soon]);
    assert!(out.contains("1 dead letter(s) purged"), "{out}");
    let (_, out, _) = f.dlq(&["purge", "--all", "--dry-run"]);
    assert!(out.contains("3 dead letter(s) would be purged"), "{out}");
    let (_, out, _) = f.dlq(&["purge", &m1.to_string()]);
    assert!(out.contains("1 dead letter(s) purged"), "{out}");
    let (_, out, _) = f.dlq(&["purge", "--all"]);
    assert!(out.contains("2 dead letter(s) purged"), "{out}");
    assert_eq!(count(&pool, "SELECT count(*) FROM dead_letters").await, 0);
    f.cleanup().await;
}

#[sqlx::test]
async fn dlq_replay_refuses_unchanged_causes_runs_once_and_is_resumable(pool: PgPool) {
    let f = Fixture::new(&pool).await;
    let t = topology(&f.prefix);
    let now = chrono::Utc::now().to_rfc3339();
    for i in 0..5 {
        f.broker_dead_letter(&format!("d{i}"), &held_body(&format!("200{i}")))
            .await;
    }
    f.dead_letter("bad", "MALFORMED_JSON", &now, b"{not json")
        .await;
    // One from another exchange (bound to the held queue), one from an
    // exchange that does not exist.
    let other = format!("{}.other", f.prefix);
    f.channel
        .exchange_declare(
            other.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    f.channel
        .queue_bind(
            t.held_queue.as_str().into(),
            other.as_str().into(),
            t.held_routing_key.as_str().into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    f.broker_dead_letter_from("elsewhere", &other, &t.held_routing_key, &held_body("3000"))
        .await;
    let missing = format!("{}.missing", f.prefix);
    f.broker_dead_letter_from("nowhere", &missing, &t.held_routing_key, &held_body("3001"))
        .await;
    ingest_all(&f, &pool, 8).await;

    // Needs a choice; a malformed body is refused unless forced.
    assert_eq!(f.dlq(&["replay"]).0, 64);
    let (code, out, _) = f.dlq(&["replay", "--code", "MALFORMED_JSON"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refused") && out.contains("Nothing to replay"),
        "{out}"
    );
    let (code, out, _) = f.dlq(&["replay", "--code", "DELIVERY_LIMIT", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(out.contains("7 dead letter(s) would be replayed"), "{out}");
    assert!(out.contains("2000") && out.contains("2004"), "{out}");
    f.wait_depth(&t.held_queue, 0).await;

    // Interrupted half-way (SIGINT), then resumed: each message sent once.
    let child = bin()
        .arg("--config")
        .arg(&f.config)
        .args([
            "dlq",
            "replay",
            "--code",
            "DELIVERY_LIMIT",
            "--rate",
            "1",
            "--batch",
            "2",
        ])
        .env("HOLDCLEAR_AMQP_URL", amqp_url())
        .env("HOLDCLEAR_DATABASE_URL", &f.database_url)
        .env("USER", "tester")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(DEADLINE, "some messages sent", || async {
        (count(
            &pool,
            "SELECT count(*) FROM operation_items WHERE sent_at IS NOT NULL",
        )
        .await
            >= 2)
            .then_some(())
    })
    .await;
    // While it runs, a second run of the same operation is refused: two
    // would send every remaining message twice.
    let running: uuid::Uuid = sqlx::query_scalar("SELECT id FROM operations")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (code, out, err) = f.dlq(&["replay", "--resume", &running.to_string()]);
    assert_eq!(code, 64, "{out}{err}");
    assert!(err.contains("being run by another process"), "{out}{err}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let done = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&done.stdout).into_owned();
    assert_eq!(done.status.code(), Some(1), "{out}");
    assert!(out.contains("interrupted"), "{out}");
    let (op, status): (uuid::Uuid, String) = sqlx::query_as("SELECT id, status FROM operations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "interrupted");
    assert!(
        count(
            &pool,
            "SELECT count(*) FROM operation_items WHERE sent_at IS NULL AND error IS NULL"
        )
        .await
            > 0
    );

    let (code, out, _) = f.dlq(&["replay", "--resume", &op.to_string()]);
    // The dead letter from another exchange cannot be sent without --to-exchange.
    assert_eq!(code, 1, "{out}");
    let (_, out, _) = f.dlq(&["operation", &op.to_string(), "--json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["operation"]["status"], "done");
    assert_eq!(report["operation"]["operator"], "tester");
    assert_eq!(report["summary"]["sent"], 5);
    assert_eq!(report["summary"]["send_failed"], 2);
    let failed = report["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["order"] == "3000")
        .unwrap();
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains(&format!("it came from exchange '{other}'")),
        "{failed}"
    );
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains(&format!("--to-exchange {other}")),
        "{failed}"
    );
    f.wait_depth(&t.held_queue, 5).await;

    // Named with --to-exchange, it goes back there; a missing exchange
    // fails that message with a clear reason and the next one goes on.
    let elsewhere = f.id_of(&pool, "elsewhere").await;
    let nowhere = f.id_of(&pool, "nowhere").await;
    let (code, out, _) = f.dlq(&["replay", &nowhere.to_string(), "--to-exchange", &missing]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not exist"), "{out}");
    let (code, out, err) = f.dlq(&[
        "replay",
        &nowhere.to_string(),
        &elsewhere.to_string(),
        "--to-exchange",
        &other,
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("sent 1;") && out.contains("could not be sent 1"),
        "{out}"
    );
    f.wait_depth(&t.held_queue, 6).await;
    f.channel
        .exchange_delete(other.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let (code, out, _) = f.dlq(&["operations"]);
    assert_eq!(code, 0);
    assert!(out.contains("done") && out.contains("tester"), "{out}");
    f.cleanup().await;
}

#[sqlx::test]
async fn dlq_operation_report_tells_cases_failures_and_pending(pool: PgPool) {
    let f = Fixture::new(&pool).await;
    let t = topology(&f.prefix);
    // A queue that parks what is routed with `parked`: nobody consumes it.
    let parked = format!("{}.parked", f.prefix);
    f.channel
        .queue_declare(
            parked.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    f.channel
        .queue_bind(
            parked.as_str().into(),
            t.orders_exchange.as_str().into(),
            "parked".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let good = serde_json::to_vec(&crate::support::broker::held_event("evt-good", "4001")).unwrap();
    f.broker_dead_letter("good", &good).await;
    f.dead_letter(
        "bad",
        "MALFORMED_JSON",
        &chrono::Utc::now().to_rfc3339(),
        b"{not json",
    )
    .await;
    f.broker_dead_letter_from("park", &t.orders_exchange, "parked", &held_body("4003"))
        .await;

    // A worker that ingests dead letters and takes held orders.
    let worker = crate::support::worker::start(crate::support::settings(
        &f.database_url,
        &f.prefix,
        &[("HOLDCLEAR_DLQ_INGEST", "true")],
    ))
    .await;
    wait_for(DEADLINE, "three dead letters", || async {
        (count(&pool, "SELECT count(*) FROM dead_letters").await == 3).then_some(())
    })
    .await;
    let (code, out, err) = f.dlq(&[
        "replay",
        "--all",
        "--force",
        "--operator",
        "bob",
        "--rate",
        "100",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sent 3"), "{out}");
    let op: uuid::Uuid = sqlx::query_scalar("SELECT id FROM operations")
        .fetch_one(&pool)
        .await
        .unwrap();
    let report = wait_for(DEADLINE, "a case and a failure again", || async {
        let (_, out, _) = f.dlq(&["operation", &op.to_string(), "--json"]);
        let r: Value = serde_json::from_str(&out).unwrap();
        (r["summary"]["became_cases"] == 1 && r["summary"]["failed_again"] == 1).then_some(r)
    })
    .await;
    assert_eq!(report["summary"]["pending"], 1);
    assert_eq!(report["operation"]["operator"], "bob");
    let by_order = |o: &str| {
        report["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["order"] == o)
            .unwrap()["outcome"]
            .clone()
    };
    assert_eq!(by_order("4001"), "became a case");
    assert_eq!(by_order("4003"), "pending");
    assert!(
        report["items"][0]["case_id"].is_string()
            || report["items"][1]["case_id"].is_string()
            || report["items"][2]["case_id"].is_string()
    );
    let (_, out, _) = f.dlq(&["operation", &op.to_string()]);
    assert!(
        out.contains("became a case") && out.contains("failed again") && out.contains("pending"),
        "{out}"
    );
    // The malformed one is one dead letter seen twice.
    let bad = f.id_of(&pool, "bad").await;
    let seen: i32 = sqlx::query_scalar("SELECT seen_count FROM dead_letters WHERE id = $1")
        .bind(bad)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(seen, 2);

    // /metrics: dead letters by code, and the oldest one nobody handled.
    let (status, body) = crate::support::worker::http_get(worker.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("holdclear_dead_letters{code=\"MALFORMED_JSON\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("holdclear_dead_letters{code=\"DELIVERY_LIMIT\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("holdclear_dead_letter_oldest_unhandled_seconds"),
        "{body}"
    );
    // And by group: each group with its own count.
    let groups: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT group_key, min(code), count(*) FROM dead_letters GROUP BY group_key",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!groups.is_empty());
    for (group, code, n) in groups {
        let line = format!("holdclear_dead_letter_group{{code=\"{code}\",group=\"{group}\"}} {n}");
        assert!(body.lines().any(|l| l == line), "{line} in:\n{body}");
    }
    worker.shutdown().await.unwrap();
    f.channel
        .queue_delete(parked.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    f.cleanup().await;
}

/// A message RabbitMQ itself dead-letters when the held queue's delivery
/// limit trips carries `x-death` headers and none of holdclear's: it is
/// stored as DELIVERY_LIMIT with its origin, and replay takes it back
/// there, without the broker's dead-letter headers.
#[sqlx::test]
async fn dlq_messages_over_the_delivery_limit_are_stored_and_replayed(pool: PgPool) {
    use lapin::options::BasicRejectOptions;
    let f = Fixture::with_delivery_limit(&pool, 1).await;
    let t = topology(&f.prefix);
    let props = BasicProperties::default()
        .with_message_id(ShortString::from("dl-1"))
        .with_delivery_mode(2);
    f.channel
        .basic_publish(
            t.orders_exchange.as_str().into(),
            t.held_routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &held_body("4001"),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // Two deliveries handed back: the second is over the limit of one.
    for _ in 0..2 {
        let msg = wait_for(DEADLINE, "the held message", || async {
            f.channel
                .basic_get(
                    t.held_queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .unwrap()
        })
        .await;
        f.channel
            .basic_reject(
                msg.delivery.delivery_tag,
                BasicRejectOptions { requeue: true },
            )
            .await
            .unwrap();
    }
    f.wait_depth(&t.dead_letter_queue, 1).await;
    f.wait_depth(&t.held_queue, 0).await;
    ingest_all(&f, &pool, 1).await;

    let list = f.list(&[]);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["message_id"], "dl-1");
    assert_eq!(list[0]["code"], "DELIVERY_LIMIT");
    assert_eq!(list[0]["origin_exchange"], t.orders_exchange.as_str());
    assert_eq!(list[0]["origin_routing_key"], t.held_routing_key.as_str());
    assert_eq!(list[0]["sales_order_number"], "4001");

    let (code, out, err) = f.dlq(&["replay", "--code", "DELIVERY_LIMIT"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sent 1;"), "{out}");
    f.wait_depth(&t.held_queue, 1).await;
    let got = f
        .channel
        .basic_get(
            t.held_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.delivery.data, held_body("4001"));
    let headers = got
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let names: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
    assert!(
        names.iter().all(|n| !n.starts_with("x-death")
            && !n.starts_with("x-first-death")
            && !n.starts_with("x-last-death")),
        "the broker's dead-letter headers are removed: {names:?}"
    );
    assert_eq!(
        headers.inner().get("x-holdclear-replayed"),
        Some(&AMQPValue::LongLongInt(1))
    );
    f.cleanup().await;
}

// ---- errors a person can read ------------------------------------------------

/// stderr of a failed command: exactly one line, `error: …`, no log lines.
fn one_error_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(!lines[0].contains('{'), "no JSON log line: {stderr}");
    lines[0]
}

/// One stored dead letter from `topology`'s orders exchange (a replay
/// then has something to send).
async fn one_stored(pool: &PgPool, prefix: &str) {
    let t = topology(prefix);
    Store::from_pool(pool.clone())
        .record_dead_letter(&DeadLetterMessage {
            body: b"{}".to_vec(),
            message_id: Some("one".into()),
            properties: serde_json::json!({}),
            headers: serde_json::json!({}),
            raw_properties: serde_json::to_value(BasicProperties::default()).unwrap(),
            code: "DELIVERY_LIMIT".into(),
            detail: String::new(),
            origin_exchange: Some(t.orders_exchange.clone()),
            origin_routing_key: Some(t.held_routing_key.clone()),
            failed_at: None,
        })
        .await
        .unwrap();
}

#[sqlx::test]
async fn dlq_an_unreachable_broker_is_named_with_what_to_check(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("dlq-unreachable");
    let config = config_file(dir.path(), &prefix);
    one_stored(&pool, &prefix).await;
    let (code, _, err) = dlq_command(
        &config,
        "amqp://guest:guest@127.0.0.1:1/%2f",
        &database_url(&pool).await,
        &["replay", "--all"],
    );
    assert_eq!(code, 1);
    let line = one_error_line(&err);
    assert!(
        line.contains("Cannot connect to RabbitMQ at 127.0.0.1:1")
            && line.contains("is it running")
            && line.contains("HOLDCLEAR_AMQP_URL"),
        "{line}"
    );
}

#[sqlx::test]
async fn dlq_refused_credentials_name_the_user_not_the_password(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("dlq-login");
    let config = config_file(dir.path(), &prefix);
    one_stored(&pool, &prefix).await;
    let mut url = url::Url::parse(&amqp_url()).unwrap();
    url.set_password(Some("not-the-password-42")).unwrap();
    let (code, _, err) = dlq_command(
        &config,
        url.as_str(),
        &database_url(&pool).await,
        &["replay", "--all"],
    );
    assert_eq!(code, 1);
    let line = one_error_line(&err);
    assert!(
        line.contains(&format!("refused the login of user '{}'", url.username()))
            && line.contains("HOLDCLEAR_AMQP_URL"),
        "{line}"
    );
    assert!(!line.contains("not-the-password-42"), "{line}");
}

/// A user who may not publish upstream: replay stops with one line naming
/// the user, the permission, the exchange and where to look; the operation
/// is interrupted, not lost.
#[sqlx::test]
async fn dlq_a_refused_replay_names_user_permission_and_exchange(pool: PgPool) {
    let mut scratch = crate::deploy::Scratch::new();
    let prefix = unique("dlq-refused");
    let t = topology(&prefix);
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &prefix);
    let admin = scratch.admin().await;
    let admin_broker = Broker::new(
        SecretUrl::parse("amqp", &scratch.admin_url()).unwrap(),
        prefix.clone(),
    );
    declare_topology(&admin_broker, &admin, &t, 20)
        .await
        .unwrap();
    let _ = Publisher::open(&admin).await.unwrap();
    one_stored(&pool, &prefix).await;
    let user = scratch.user("hc-dlq-reader");
    let password = unique("pw");
    crate::deploy::rabbitmqctl(&["add_user", &user, &password]);
    let dlq_only = format!("^{}$", regex_escape(&t.dead_letter_queue));
    crate::deploy::rabbitmqctl(&[
        "set_permissions",
        "-p",
        &scratch.vhost,
        &user,
        "^$",
        "^$",
        &dlq_only,
    ]);

    let (code, _, err) = dlq_command(
        &config,
        &scratch.url(&user, &password),
        &database_url(&pool).await,
        &["replay", "--all"],
    );
    assert_eq!(code, 1, "{err}");
    let line = one_error_line(&err);
    assert!(
        line.contains(&format!(
            "RabbitMQ refused user '{user}' write access to exchange '{}'",
            t.orders_exchange
        )) && line.contains("docs/deployment.md"),
        "{line}"
    );
    assert_eq!(
        line.matches("ACCESS").count(),
        0,
        "no raw reply repeated: {line}"
    );
    let status: String = sqlx::query_scalar("SELECT status FROM operations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "interrupted");
    holdclear::broker::close(&admin).await;
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

#[test]
fn dlq_a_missing_queue_asks_whether_the_topology_was_declared() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("dlq-missing");
    let config = config_file(dir.path(), &prefix);
    let (code, _, err) = dlq_command(
        &config,
        &amqp_url(),
        "postgres://postgres@127.0.0.1:1/unused",
        &["queue"],
    );
    assert_eq!(code, 1);
    let line = one_error_line(&err);
    let queue = topology(&prefix).dead_letter_queue;
    assert!(
        line.contains(&format!("Cannot find queue '{queue}': it does not exist"))
            && line.contains("has `holdclear run` declared the topology?"),
        "{line}"
    );
}
