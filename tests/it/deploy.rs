//! `deploy/rabbitmq/definitions.json` against the real RabbitMQ.
//!
//! The file is imported into a scratch virtual host (its vhost and user names
//! rewritten to unique ones, since `rabbitmqctl import_definitions` of 3.10
//! imports a whole file, not into a chosen vhost). Then, as the file's
//! `holdclear` user with the documented development password:
//! - the worker's topology declaration (the contract's names and arguments)
//!   is accepted, twice, with `x-delivery-limit` of any integer type, and a
//!   different limit is refused with PRECONDITION_FAILED, so the file and
//!   the worker really must agree;
//! - the user's permissions allow everything the worker does and refuse
//!   what it must not do (other queues and exchanges, publishing upstream);
//! - the delivery-limit policy applies to the held-order queue, the
//!   bindings route, and a KEDA user with empty permissions can read the
//!   queue length.
//!
//! The scratch vhost and users are deleted by a guard, even when a check fails.

use std::process::Command;
use std::time::Duration;

use holdclear::config::Topology;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use serde_json::{Value, json};

use crate::support::{amqp_url, repo_path, unique, wait_for};

/// The password whose hash `definitions.json` carries (docs/deployment.md).
const DEV_PASSWORD: &str = "holdclear-dev";
/// `x-delivery-limit` of the contract and `HOLDCLEAR_DELIVERY_LIMIT`'s default.
const DELIVERY_LIMIT: u32 = 20;
const ACCESS_REFUSED: u16 = 403;
const PRECONDITION_FAILED: u16 = 406;

/// Declares the worker's topology exactly as the event contract states it.
///
/// Stands in for the worker's own declaration: once `holdclear::broker`
/// exposes it, this body becomes a call to it.
async fn declare_topology(ch: &Channel, t: &Topology, delivery_limit: u32) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let none = FieldTable::default;
    ch.exchange_declare(
        name(&t.orders_exchange),
        ExchangeKind::Topic,
        durable,
        none(),
    )
    .await?;
    ch.exchange_declare(
        name(&t.dead_letter_exchange),
        ExchangeKind::Fanout,
        durable,
        none(),
    )
    .await?;
    ch.exchange_declare(
        name(&t.events_exchange),
        ExchangeKind::Topic,
        durable,
        none(),
    )
    .await?;
    declare_held_queue(ch, t, AMQPValue::LongUInt(delivery_limit)).await?;
    ch.queue_bind(
        name(&t.held_queue),
        name(&t.orders_exchange),
        name(&t.held_routing_key),
        QueueBindOptions::default(),
        none(),
    )
    .await?;
    let mut dlq_args = FieldTable::default();
    dlq_args.insert("x-queue-type".into(), long_string("quorum"));
    ch.queue_declare(
        name(&t.dead_letter_queue),
        QueueDeclareOptions::durable(),
        dlq_args,
    )
    .await?;
    ch.queue_bind(
        name(&t.dead_letter_queue),
        name(&t.dead_letter_exchange),
        name(""),
        QueueBindOptions::default(),
        none(),
    )
    .await
}

/// The held-order quorum queue with the contract's arguments.
async fn declare_held_queue(
    ch: &Channel,
    t: &Topology,
    delivery_limit: AMQPValue,
) -> lapin::Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args.insert(
        "x-dead-letter-exchange".into(),
        long_string(&t.dead_letter_exchange),
    );
    args.insert("x-delivery-limit".into(), delivery_limit);
    ch.queue_declare(name(&t.held_queue), QueueDeclareOptions::durable(), args)
        .await?;
    Ok(())
}

fn name(s: &str) -> ShortString {
    s.into()
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// The AMQP reply code of a refused operation (403, 406, ...), if it was one.
fn reply_code<T>(result: &lapin::Result<T>) -> Option<u16> {
    match result.as_ref().err()?.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Runs `rabbitmqctl -q ARGS` and returns its standard output; panics on failure.
pub(crate) fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch vhost and users on the shared broker; dropped means deleted.
pub(crate) struct Scratch {
    pub(crate) vhost: String,
    users: Vec<String>,
}

impl Scratch {
    pub(crate) fn new() -> Self {
        Self {
            vhost: unique("hc-deploy"),
            users: Vec::new(),
        }
    }

    /// A user name that [`Drop`] deletes.
    pub(crate) fn user(&mut self, prefix: &str) -> String {
        let user = unique(prefix);
        self.users.push(user.clone());
        user
    }

    /// The AMQP URL of `user` on the scratch vhost.
    pub(crate) fn url(&self, user: &str, password: &str) -> String {
        let mut url = url::Url::parse(&amqp_url()).expect("HOLDCLEAR_TEST_AMQP_URL is a URL");
        url.set_username(user).unwrap();
        url.set_password(Some(password)).unwrap();
        url.set_path(&format!("/{}", self.vhost));
        url.to_string()
    }

    pub(crate) async fn connect(&self, user: &str, password: &str) -> Connection {
        Connection::connect(&self.url(user, password), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("{user} cannot connect to vhost {}: {e}", self.vhost))
    }

    /// The URL of the tests' broker user on the scratch vhost.
    pub(crate) fn admin_url(&self) -> String {
        let admin = url::Url::parse(&amqp_url()).unwrap();
        self.url(admin.username(), admin.password().unwrap_or("guest"))
    }

    /// The tests' broker user (guest by default) with every permission on
    /// the scratch vhost, which is created if the test has not imported one.
    pub(crate) async fn admin(&self) -> Connection {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "add_vhost", &self.vhost])
            .output();
        let admin = url::Url::parse(&amqp_url()).unwrap();
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &self.vhost,
            admin.username(),
            ".*",
            ".*",
            ".*",
        ]);
        self.connect(admin.username(), admin.password().unwrap_or("guest"))
            .await
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort, quietly: the vhost may not exist if the test failed early.
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.vhost])
            .output();
        for user in &self.users {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "delete_user", user])
                .output();
        }
    }
}

/// `definitions.json` with every vhost renamed to `vhost` and the user
/// `holdclear` renamed to `user`; everything else as committed.
fn scratch_definitions(vhost: &str, user: &str) -> Value {
    let text = std::fs::read_to_string(repo_path("deploy/rabbitmq/definitions.json")).unwrap();
    let mut defs: Value = serde_json::from_str(&text).expect("definitions.json is JSON");
    defs["vhosts"] = json!([{ "name": vhost }]);
    for section in ["permissions", "policies", "exchanges", "queues", "bindings"] {
        for item in defs[section].as_array_mut().into_iter().flatten() {
            item["vhost"] = json!(vhost);
        }
    }
    let users = defs["users"].as_array_mut().expect("users");
    assert_eq!(
        users.len(),
        1,
        "definitions.json defines the holdclear user only"
    );
    assert_eq!(users[0]["name"], "holdclear");
    users[0]["name"] = json!(user);
    for p in defs["permissions"].as_array_mut().expect("permissions") {
        assert_eq!(p["user"], "holdclear");
        p["user"] = json!(user);
    }
    defs
}

/// Imports the scratch copy and waits until the (asynchronous) import is visible.
async fn import(scratch: &Scratch, user: &str) {
    use std::io::Write;
    // Through standard input: a file would have to be readable by the
    // broker's own (rabbitmq) user, which reads it on 3.10.
    let mut child = Command::new("rabbitmqctl")
        .args(["-q", "import_definitions", "--format", "json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("rabbitmqctl runs");
    let defs = scratch_definitions(&scratch.vhost, user).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(defs.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "import_definitions: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let vhost = scratch.vhost.clone();
    wait_for(Duration::from_secs(30), "the imported definitions", || {
        let vhost = vhost.clone();
        async move {
            let out = Command::new("rabbitmqctl")
                .args([
                    "-q",
                    "list_bindings",
                    "-p",
                    &vhost,
                    "source_name",
                    "destination_name",
                ])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout);
            (text.contains("holdclear.order-held.dlq") && text.contains("commerce.orders"))
                .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn definitions_accept_the_workers_topology_and_nothing_more() {
    let mut scratch = Scratch::new();
    let user = scratch.user("hc-deploy-worker");
    import(&scratch, &user).await;
    let topology = Topology::default();

    // The committed hash is the documented password's, and the declaration
    // of the worker is accepted, also when repeated (a restart).
    let conn = scratch.connect(&user, DEV_PASSWORD).await;
    let ch = conn.create_channel().await.unwrap();
    for _ in 0..2 {
        declare_topology(&ch, &topology, DELIVERY_LIMIT)
            .await
            .expect("the worker's declaration is accepted on the imported definitions");
    }

    // RabbitMQ compares integer arguments by value, whatever integer type
    // the client encodes them with; a different value is refused.
    for limit in [
        AMQPValue::ShortInt(20),
        AMQPValue::LongInt(20),
        AMQPValue::LongLongInt(20),
        AMQPValue::ShortShortUInt(20),
    ] {
        let ch = conn.create_channel().await.unwrap();
        let shown = format!("{limit:?}");
        let r = declare_held_queue(&ch, &topology, limit).await;
        assert!(r.is_ok(), "x-delivery-limit {shown}: {r:?}");
    }
    let ch = conn.create_channel().await.unwrap();
    let r = declare_held_queue(&ch, &topology, AMQPValue::LongUInt(DELIVERY_LIMIT - 10)).await;
    assert_eq!(
        reply_code(&r),
        Some(PRECONDITION_FAILED),
        "another delivery limit: {r:?}"
    );

    // Least privilege: no other queue or exchange, no binding from exchanges
    // it does not own, no publishing to the upstream exchange.
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            name("other.queue"),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await;
    assert_eq!(
        reply_code(&r),
        Some(ACCESS_REFUSED),
        "declaring other.queue: {r:?}"
    );
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .exchange_declare(
            name("other.exchange"),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_eq!(
        reply_code(&r),
        Some(ACCESS_REFUSED),
        "declaring other.exchange: {r:?}"
    );
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_bind(
            name(&topology.held_queue),
            name("amq.topic"),
            name("#"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_eq!(
        reply_code(&r),
        Some(ACCESS_REFUSED),
        "binding to amq.topic: {r:?}"
    );
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let r = async {
        ch.basic_publish(
            name(&topology.orders_exchange),
            name(&topology.held_routing_key),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await?
        .await
    }
    .await;
    assert_eq!(
        reply_code(&r),
        Some(ACCESS_REFUSED),
        "publishing to commerce.orders: {r:?}"
    );

    // What the worker does publish, it may: a dead letter reaches the DLQ
    // through holdclear.dlx, and it can read it back (`holdclear dlq`).
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            name(&topology.dead_letter_exchange),
            name(""),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"dead letter",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(confirm, Confirmation::Ack(None)), "{confirm:?}");
    let got = ch
        .basic_get(
            name(&topology.dead_letter_queue),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the dead letter is in the DLQ");
    assert_eq!(got.delivery.data, b"dead letter");

    // The policy applies to the held-order queue (and only to it).
    let queues = rabbitmqctl(&["list_queues", "-p", &scratch.vhost, "name", "policy"]);
    let policy_of = |q: &str| {
        queues.lines().find_map(|l| {
            l.split_once('\t')
                .filter(|(n, _)| *n == q)
                .map(|(_, p)| p.trim().to_owned())
        })
    };
    assert_eq!(
        policy_of(&topology.held_queue).as_deref(),
        Some("holdclear-order-held"),
        "{queues}"
    );
    assert_eq!(
        policy_of(&topology.dead_letter_queue).as_deref(),
        Some(""),
        "{queues}"
    );

    // An upstream publisher's order.held reaches the held-order queue (as
    // the tests' broker user, guest by default, given the scratch vhost).
    let admin = url::Url::parse(&amqp_url()).unwrap();
    let admin_password = admin.password().unwrap_or("guest").to_owned();
    rabbitmqctl(&[
        "set_permissions",
        "-p",
        &scratch.vhost,
        admin.username(),
        ".*",
        ".*",
        ".*",
    ]);
    let upstream = scratch.connect(admin.username(), &admin_password).await;
    let up = upstream.create_channel().await.unwrap();
    up.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = up
        .basic_publish(
            name(&topology.orders_exchange),
            name(&topology.held_routing_key),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"held",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(confirm, Confirmation::Ack(None)),
        "order.held is routed: {confirm:?}"
    );

    // KEDA's user needs no permissions at all to read the queue length
    // (a passive declare), and can do nothing else.
    let keda = scratch.user("hc-deploy-keda");
    let keda_password = unique("pw");
    rabbitmqctl(&["add_user", &keda, &keda_password]);
    rabbitmqctl(&["set_permissions", "-p", &scratch.vhost, &keda, "", "", ""]);
    let keda_conn = scratch.connect(&keda, &keda_password).await;
    let kc = keda_conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = kc
        .queue_declare(name(&topology.held_queue), passive, FieldTable::default())
        .await
        .expect("a passive declare needs no permissions");
    assert_eq!(q.message_count(), 1, "the order.held published above");
    let kc = keda_conn.create_channel().await.unwrap();
    let r = declare_held_queue(&kc, &topology, AMQPValue::LongUInt(DELIVERY_LIMIT)).await;
    assert_eq!(
        reply_code(&r),
        Some(ACCESS_REFUSED),
        "KEDA's user declaring: {r:?}"
    );

    for c in [conn, upstream, keda_conn] {
        let _ = c.close(200, "done".into()).await;
    }
}

/// The rules files shipped for Compose and Kubernetes pass `holdclear rules check`.
#[test]
fn shipped_rules_files_are_valid() {
    for file in ["deploy/config/rules.toml", "deploy/k8s/rules.toml"] {
        let out = crate::support::bin()
            .args(["rules", "check"])
            .arg(repo_path(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Settings whose worst case (prefetch × payload limit) does not fit the
/// memory budget are refused at start, naming the settings: exit 64 before
/// anything connects.
#[test]
fn prefetch_times_payload_limit_must_fit_the_memory_budget() {
    let out = crate::support::bin()
        .arg("migrate")
        .env("HOLDCLEAR_AMQP_PREFETCH", "4096")
        .env("HOLDCLEAR_MAX_PAYLOAD_BYTES", "262144")
        .env_remove("HOLDCLEAR_MEMORY_BUDGET")
        // Nothing listens there: only the settings can make this exit 64.
        .env(
            "HOLDCLEAR_DATABASE_URL",
            "postgres://postgres@127.0.0.1:9/none",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for named in [
        "HOLDCLEAR_MEMORY_BUDGET",
        "HOLDCLEAR_AMQP_PREFETCH",
        "HOLDCLEAR_MAX_PAYLOAD_BYTES",
        "1 GiB",
    ] {
        assert!(stderr.contains(named), "{named} in: {stderr}");
    }

    // The same settings with a budget that holds them pass the check (and
    // the command gets as far as the database, which is not there).
    let out = crate::support::bin()
        .arg("migrate")
        .env("HOLDCLEAR_AMQP_PREFETCH", "4096")
        .env("HOLDCLEAR_MEMORY_BUDGET", "1GiB")
        .env(
            "HOLDCLEAR_DATABASE_URL",
            "postgres://postgres@127.0.0.1:9/none",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}
