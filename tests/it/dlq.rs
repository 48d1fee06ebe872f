//! `holdclear dlq …` run as an operator runs it, against the real broker.

use holdclear::broker::{Broker, Publisher, declare_topology};
use holdclear::config::SecretUrl;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
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
        Self::with_delivery_limit(20).await
    }

    /// The test's topology, its held queue declared with `delivery_limit`.
    async fn with_delivery_limit(delivery_limit: u32) -> Self {
        let prefix = unique("dlq");
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
            conn,
            channel,
            config,
            _dir: dir,
        }
    }

    async fn dead_letter(&self, id: &str, code: &str, failed_at: &str, body: &[u8]) {
        let t = topology(&self.prefix);
        self.dead_letter_from(&t.orders_exchange, id, code, failed_at, body)
            .await;
    }

    /// A dead letter whose headers say it came from `exchange`.
    async fn dead_letter_from(
        &self,
        exchange: &str,
        id: &str,
        code: &str,
        failed_at: &str,
        body: &[u8],
    ) {
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
            text(exchange),
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
        dlq_command(&self.config, &amqp_url(), args)
    }

    async fn cleanup(self) {
        let t = topology(&self.prefix);
        holdclear::broker::delete_topology(&self.conn, &t)
            .await
            .unwrap();
        self.conn.close(200, "done".into()).await.ok();
    }
}

/// Runs `holdclear --config CONFIG dlq ARGS` against `url`, without
/// `RUST_LOG`: (exit code, stdout, stderr).
pub(crate) fn dlq_command(
    config: &std::path::Path,
    url: &str,
    args: &[&str],
) -> (i32, String, String) {
    let out = bin()
        .arg("--config")
        .arg(config)
        .arg("dlq")
        .args(args)
        .env("HOLDCLEAR_AMQP_URL", url)
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
    let (code, out, _) = f.dlq(&["purge", "--yes", "--all"]);
    assert_eq!(code, 0);
    assert!(out.contains("1 message(s) purged"), "{out}");
    f.wait_depth(&t.dead_letter_queue, 0).await;
    f.cleanup().await;
}

/// A purge without a filter needs `--all` besides `--yes`, and a dry run
/// says what would go without deleting anything.
#[tokio::test]
async fn purging_everything_must_be_asked_for_and_can_be_tried_first() {
    let f = Fixture::new().await;
    let t = topology(&f.prefix);
    let now = chrono::Utc::now().to_rfc3339();
    f.dead_letter("p1", "INVALID_EVENT", &now, &held_body("2001"))
        .await;
    f.dead_letter("p2", "MALFORMED_JSON", &now, b"{").await;

    let (code, out, err) = f.dlq(&["purge", "--yes"]);
    assert_eq!(code, 64, "{out}{err}");
    assert!(err.contains("--all"), "{err}");
    f.wait_depth(&t.dead_letter_queue, 2).await;

    let (code, out, err) = f.dlq(&["purge", "--yes", "--all", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 message(s) would be purged"), "{out}");
    f.wait_depth(&t.dead_letter_queue, 2).await;

    // A filter is a choice: it needs no --all.
    let (code, out, err) = f.dlq(&["purge", "--yes", "--code", "MALFORMED_JSON"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 message(s) purged"), "{out}");
    let (code, out, err) = f.dlq(&["purge", "--yes", "--all"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 message(s) purged"), "{out}");
    f.wait_depth(&t.dead_letter_queue, 0).await;
    f.cleanup().await;
}

/// Replay publishes to the configured orders exchange only: a dead letter
/// whose header names another exchange stays, until the operator names that
/// exchange with `--to-exchange`.
#[tokio::test]
async fn replay_goes_to_the_orders_exchange_unless_another_is_named() {
    let f = Fixture::new().await;
    let t = topology(&f.prefix);
    let other = format!("{}.other", f.prefix);
    f.channel
        .exchange_declare(
            other.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
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
    let now = chrono::Utc::now().to_rfc3339();
    f.dead_letter("r1", "INVALID_EVENT", &now, &held_body("3001"))
        .await;
    f.dead_letter_from(&other, "r2", "INVALID_EVENT", &now, &held_body("3002"))
        .await;

    let (code, out, err) = f.dlq(&["replay", "--all", "--rate", "1000"]);
    assert_eq!(code, 1, "one message is refused: {out}{err}");
    assert!(
        out.contains("1 of 2 message(s) replayed; 1 failed"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "not replayed: r2 (it came from exchange '{other}'"
        )),
        "{out}"
    );
    assert!(out.contains(&format!("--to-exchange {other}")), "{out}");
    f.wait_depth(&t.held_queue, 1).await;
    f.wait_depth(&t.dead_letter_queue, 1).await;

    let (code, out, err) = f.dlq(&["replay", "--all", "--to-exchange", &other]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 of 1 message(s) replayed"), "{out}");
    f.wait_depth(&t.held_queue, 2).await;
    f.wait_depth(&t.dead_letter_queue, 0).await;
    f.channel
        .exchange_delete(other.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    f.cleanup().await;
}

/// A message RabbitMQ itself dead-letters when the held queue's delivery
/// limit trips carries `x-death` headers and none of holdclear's: `dlq list`
/// shows it as DELIVERY_LIMIT with its origin, and replay takes it back
/// there, without the broker's dead-letter headers.
#[tokio::test]
async fn messages_over_the_delivery_limit_are_listed_and_replayed() {
    use lapin::options::BasicRejectOptions;
    let f = Fixture::with_delivery_limit(1).await;
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
        let msg = crate::support::wait_for(
            std::time::Duration::from_secs(10),
            "the held message",
            || async {
                f.channel
                    .basic_get(
                        t.held_queue.as_str().into(),
                        BasicGetOptions { no_ack: false },
                    )
                    .await
                    .unwrap()
            },
        )
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

    let (code, out, err) = f.dlq(&["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 1, "{out}");
    assert_eq!(list[0]["message_id"], "dl-1");
    assert_eq!(list[0]["error_code"], "DELIVERY_LIMIT", "{out}");
    assert_eq!(list[0]["original_exchange"], t.orders_exchange.as_str());
    assert_eq!(list[0]["original_routing_key"], t.held_routing_key.as_str());
    assert_eq!(list[0]["order_number"], "4001");
    assert!(list[0]["failed_at"].is_string(), "{out}");
    let (code, out, _) = f.dlq(&["list"]);
    assert_eq!(code, 0);
    assert!(out.contains("DELIVERY_LIMIT"), "{out}");

    let (code, out, err) = f.dlq(&["replay", "--code", "DELIVERY_LIMIT"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 of 1 message(s) replayed"), "{out}");
    f.wait_depth(&t.dead_letter_queue, 0).await;
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

#[test]
fn an_unreachable_broker_is_named_with_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &unique("dlq-unreachable"));
    let (code, _, err) = dlq_command(&config, "amqp://guest:guest@127.0.0.1:1/%2f", &["list"]);
    assert_eq!(code, 1);
    let line = one_error_line(&err);
    assert!(
        line.contains("Cannot connect to RabbitMQ at 127.0.0.1:1")
            && line.contains("is it running")
            && line.contains("HOLDCLEAR_AMQP_URL"),
        "{line}"
    );
}

#[test]
fn refused_credentials_name_the_user_not_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &unique("dlq-login"));
    let mut url = url::Url::parse(&amqp_url()).unwrap();
    url.set_password(Some("not-the-password-42")).unwrap();
    let (code, _, err) = dlq_command(&config, url.as_str(), &["list"]);
    assert_eq!(code, 1);
    let line = one_error_line(&err);
    assert!(
        line.contains(&format!("refused the login of user '{}'", url.username()))
            && line.contains("HOLDCLEAR_AMQP_URL"),
        "{line}"
    );
    assert!(!line.contains("not-the-password-42"), "{line}");
}

#[test]
fn a_missing_queue_asks_whether_the_topology_was_declared() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("dlq-missing");
    let config = config_file(dir.path(), &prefix);
    let (code, _, err) = dlq_command(&config, &amqp_url(), &["list"]);
    assert_eq!(code, 1);
    let line = one_error_line(&err);
    let queue = topology(&prefix).dead_letter_queue;
    assert!(
        line.contains(&format!("Cannot find queue '{queue}': it does not exist"))
            && line.contains("has `holdclear run` declared the topology?"),
        "{line}"
    );
}

/// A user who may read the DLQ but not publish upstream: replay fails with
/// one line naming the user, the permission, the exchange and where to look.
#[tokio::test]
async fn a_refused_replay_names_user_permission_and_exchange() {
    let mut scratch = crate::deploy::Scratch::new();
    let prefix = unique("dlq-refused");
    let t = topology(&prefix);
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &prefix);
    // The topology and one dead letter, as the tests' admin user.
    let admin = scratch.admin().await;
    let admin_broker = Broker::new(
        SecretUrl::parse("amqp", &scratch.admin_url()).unwrap(),
        prefix.clone(),
    );
    declare_topology(&admin_broker, &admin, &t, 20)
        .await
        .unwrap();
    let publisher = Publisher::open(&admin).await.unwrap();
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("x-holdclear-error-code", "INVALID_EVENT"),
        ("x-holdclear-original-exchange", t.orders_exchange.as_str()),
        ("x-holdclear-original-routing-key", "order.held"),
    ] {
        headers.insert(
            ShortString::from(k),
            AMQPValue::LongString(LongString::from(v)),
        );
    }
    publisher
        .channel()
        .basic_publish(
            t.dead_letter_exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
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
