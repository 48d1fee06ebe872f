//! `deploy/rabbitmq/definitions.json` against the real RabbitMQ.
//!
//! The file is imported into a scratch virtual host (its vhost and user names
//! rewritten to unique ones, since `rabbitmqctl import_definitions` of 3.10
//! imports a whole file, not into a chosen vhost; the password hashes stay,
//! so the documented development passwords are checked too). Then:
//! - as the file's `holdclear` user, the worker's own topology declaration
//!   is accepted, twice, with nothing reported outdated, and a different
//!   delivery limit is refused with PRECONDITION_FAILED, so the file and the
//!   worker really must agree;
//! - its permissions allow everything the worker does and refuse what it
//!   must not do (other queues and exchanges, publishing upstream); the
//!   policies apply where they should; a KEDA user with empty permissions
//!   can read the queue length;
//! - `holdclear run` runs as `holdclear`, and every `holdclear dlq` command
//!   as `holdclear-operator` (replay, which publishes upstream, is refused
//!   to the worker's user with one clear line).
//!
//! The scratch vhost and users are deleted by a guard, even when a check fails.

use std::process::Command;
use std::time::Duration;

use holdclear::broker::{Broker, declare_topology};
use holdclear::config::{SecretUrl, Topology};
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

/// The password whose hash `definitions.json` carries for `holdclear`.
const DEV_PASSWORD: &str = "holdclear-dev";
/// The password whose hash it carries for `holdclear-operator`.
const OPERATOR_DEV_PASSWORD: &str = "holdclear-operator-dev";
/// `x-delivery-limit` of the contract and `HOLDCLEAR_DELIVERY_LIMIT`'s default.
const DELIVERY_LIMIT: u32 = 20;
const ACCESS_REFUSED: u16 = 403;
const PRECONDITION_FAILED: u16 = 406;

/// The held-order queue with the worker's arguments, the delivery limit
/// encoded as `delivery_limit` (whatever integer type).
async fn declare_held_queue(
    ch: &Channel,
    t: &Topology,
    delivery_limit: AMQPValue,
) -> lapin::Result<()> {
    let mut args = holdclear::broker::topology::held_queue_arguments(t, DELIVERY_LIMIT);
    args.insert("x-delivery-limit".into(), delivery_limit);
    ch.queue_declare(name(&t.held_queue), QueueDeclareOptions::durable(), args)
        .await?;
    Ok(())
}

fn name(s: &str) -> ShortString {
    s.into()
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

/// The scratch names of the file's two users.
struct Users {
    worker: String,
    operator: String,
}

impl Users {
    fn new(scratch: &mut Scratch) -> Self {
        Self {
            worker: scratch.user("hc-deploy-worker"),
            operator: scratch.user("hc-deploy-operator"),
        }
    }

    fn rename(&self, user: &Value) -> String {
        match user.as_str() {
            Some("holdclear") => self.worker.clone(),
            Some("holdclear-operator") => self.operator.clone(),
            other => panic!("definitions.json names an unexpected user {other:?}"),
        }
    }
}

/// `definitions.json` with every vhost renamed to `vhost` and its users
/// renamed as `users` says; everything else as committed.
fn scratch_definitions(vhost: &str, users: &Users) -> Value {
    let text = std::fs::read_to_string(repo_path("deploy/rabbitmq/definitions.json")).unwrap();
    let mut defs: Value = serde_json::from_str(&text).expect("definitions.json is JSON");
    defs["vhosts"] = json!([{ "name": vhost }]);
    for section in ["permissions", "policies", "exchanges", "queues", "bindings"] {
        for item in defs[section].as_array_mut().into_iter().flatten() {
            item["vhost"] = json!(vhost);
        }
    }
    let names: Vec<&str> = defs["users"]
        .as_array()
        .expect("users")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["holdclear", "holdclear-operator"],
        "definitions.json defines the worker's and the operator's user"
    );
    for u in defs["users"].as_array_mut().unwrap() {
        u["name"] = json!(users.rename(&u["name"]));
    }
    for p in defs["permissions"].as_array_mut().expect("permissions") {
        p["user"] = json!(users.rename(&p["user"]));
    }
    defs
}

/// Imports the scratch copy and waits until the (asynchronous) import is visible.
async fn import(scratch: &Scratch, users: &Users) {
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
    let defs = scratch_definitions(&scratch.vhost, users).to_string();
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
            (text.contains("holdclear.order-held") && text.contains("commerce.orders"))
                .then_some(())
        }
    })
    .await;
}

/// The worker's declaration (`holdclear::broker::declare_topology`) as the
/// file's `holdclear` user.
async fn declare_as_worker(
    scratch: &Scratch,
    users: &Users,
    delivery_limit: u32,
) -> Result<holdclear::broker::Declared, holdclear::broker::BrokerError> {
    let url = SecretUrl::parse("amqp", &scratch.url(&users.worker, DEV_PASSWORD)).unwrap();
    let broker = Broker::new(url, "hc-deploy declare");
    let conn = broker.connect("test").await?;
    let declared = declare_topology(&broker, &conn, &Topology::default(), delivery_limit).await;
    holdclear::broker::close(&conn).await;
    declared
}

/// `rabbitmqctl list_<what> -p VHOST name policy` as (name, policy) pairs.
fn policies(vhost: &str, what: &str) -> Vec<(String, String)> {
    rabbitmqctl(&[&format!("list_{what}"), "-p", vhost, "name", "policy"])
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, p)| (n.to_owned(), p.trim().to_owned()))
        .collect()
}

#[tokio::test]
async fn definitions_accept_the_workers_topology_and_nothing_more() {
    let mut scratch = Scratch::new();
    let users = Users::new(&mut scratch);
    import(&scratch, &users).await;
    let topology = Topology::default();

    // The committed hash is the documented password's, and the worker's own
    // declaration is accepted as it is, also when repeated (a restart).
    for _ in 0..2 {
        let declared = declare_as_worker(&scratch, &users, DELIVERY_LIMIT)
            .await
            .expect("the worker's declaration is accepted on the imported definitions");
        assert!(declared.outdated.is_empty(), "{declared:?}");
    }
    // A different delivery limit is refused: the file and the worker agree.
    let err = declare_as_worker(&scratch, &users, DELIVERY_LIMIT - 10)
        .await
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(PRECONDITION_FAILED), "{err}");
    let user = users.worker.as_str();
    let conn = scratch.connect(user, DEV_PASSWORD).await;

    // RabbitMQ compares integer arguments by value, whatever integer type
    // the client encodes them with.
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

    // An event no queue is bound for: the policy's alternate exchange takes
    // it to holdclear.events.unrouted, where it is kept (not returned).
    let confirm = ch
        .basic_publish(
            name(&topology.events_exchange),
            name("order.nobody_listens"),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"unrouted event",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(confirm, Confirmation::Ack(None)), "{confirm:?}");
    let got = wait_for(Duration::from_secs(10), "the kept event", || async {
        ch.basic_get(
            name(&topology.unrouted_queue()),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    })
    .await;
    assert_eq!(got.delivery.data, b"unrouted event");

    // The policies apply to the held-order queue and the events exchange,
    // and to nothing else (no delivery limit on the queues that keep messages).
    let queues = policies(&scratch.vhost, "queues");
    let policy_of = |all: &[(String, String)], n: &str| {
        all.iter()
            .find(|(name, _)| name == n)
            .map(|(_, p)| p.clone())
    };
    assert_eq!(
        policy_of(&queues, &topology.held_queue).as_deref(),
        Some("holdclear-order-held"),
        "{queues:?}"
    );
    for q in [&topology.dead_letter_queue, &topology.unrouted_queue()] {
        assert_eq!(policy_of(&queues, q).as_deref(), Some(""), "{queues:?}");
    }
    let exchanges = policies(&scratch.vhost, "exchanges");
    assert_eq!(
        policy_of(&exchanges, &topology.events_exchange).as_deref(),
        Some("holdclear-events"),
        "{exchanges:?}"
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

/// `holdclear run` as the file's worker user, against the scratch vhost
/// with the default names; logs in `log`.
struct Worker {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Worker {
    fn spawn(url: &str, database_url: &str, dir: &std::path::Path) -> Self {
        let log = dir.join("worker.log");
        let child = crate::support::bin()
            .arg("run")
            .env_remove("HOLDCLEAR_CONFIG")
            .env("HOLDCLEAR_AMQP_URL", url)
            .env("HOLDCLEAR_DATABASE_URL", database_url)
            .env("HOLDCLEAR_HTTP_ADDR", "127.0.0.1:0")
            .env("HOLDCLEAR_LOG_FORMAT", "json")
            .env("HOLDCLEAR_RULES", repo_path("deploy/config/rules.toml"))
            .env("HOLDCLEAR_COMMERCE_BASE_URL", "http://127.0.0.1:9")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("holdclear run starts");
        Self { child, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (bounded).
    async fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        wait_for(Duration::from_secs(30), "holdclear run to exit", || {
            let status = self.child.try_wait().unwrap();
            async move { status }
        })
        .await
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Ready messages and consumers of a queue of the scratch vhost.
async fn queue_state(admin: &Connection, queue: &str) -> Option<(u32, u32)> {
    let ch = admin.create_channel().await.ok()?;
    let q = ch
        .queue_declare(
            name(queue),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = ch.close(200, "looked".into()).await;
    Some((q.message_count(), q.consumer_count()))
}

/// The shipped definitions are enough to operate holdclear: the worker runs
/// as `holdclear` (and keeps the DLQ's messages in PostgreSQL), and replay
/// of dead letters runs as `holdclear-operator`. Replay publishes to `commerce.orders`, which the
/// worker's user may not: as that user it fails with one line saying so.
#[sqlx::test]
async fn the_worker_and_every_dlq_command_run_as_the_shipped_users(pool: sqlx::PgPool) {
    let mut scratch = Scratch::new();
    let users = Users::new(&mut scratch);
    import(&scratch, &users).await;
    let t = Topology::default();
    let dir = tempfile::tempdir().unwrap();
    let worker_url = scratch.url(&users.worker, DEV_PASSWORD);
    let operator_url = scratch.url(&users.operator, OPERATOR_DEV_PASSWORD);
    let database_url = crate::support::database_url(&pool).await;
    let worker = Worker::spawn(&worker_url, &database_url, dir.path());
    let admin = scratch.admin().await;
    wait_for(Duration::from_secs(60), "the worker to consume", || async {
        (queue_state(&admin, &t.held_queue).await?.1 == 1).then_some(())
    })
    .await;

    // Upstream publishes a held order the worker cannot take.
    let up = admin.create_channel().await.unwrap();
    up.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let body = br#"{"specversion":"1.0","type":"commerce.order.held.v1","id":"ship-1","source":"/t","data":{"salesOrderNumber":"8100001"}}"#;
    up.basic_publish(
        name(&t.orders_exchange),
        name(&t.held_routing_key),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        body,
        BasicProperties::default().with_message_id("ship-1".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let dlq_depth = |n: u32| {
        let admin = &admin;
        let queue = t.dead_letter_queue.clone();
        async move {
            wait_for(
                Duration::from_secs(30),
                &format!("{n} in the DLQ"),
                || async { (queue_state(admin, &queue).await?.0 == n).then_some(()) },
            )
            .await
        }
    };
    // The worker keeps the dead letter in PostgreSQL and empties the queue.
    let stored = |seen: i32| {
        let pool = pool.clone();
        async move {
            wait_for(
                Duration::from_secs(30),
                &format!("the dead letter stored, seen {seen} time(s)"),
                || async {
                    let n: Option<i32> = sqlx::query_scalar(
                        "SELECT seen_count FROM dead_letters WHERE message_id = 'ship-1'",
                    )
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
                    (n == Some(seen)).then_some(())
                },
            )
            .await
        }
    };
    stored(1).await;
    dlq_depth(0).await;

    let config = dir.path().join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let dlq = |url: &str, args: &[&str]| crate::dlq::dlq_command(&config, url, &database_url, args);

    let (code, out, err) = dlq(&operator_url, &["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 1, "{out}");
    assert_eq!(list[0]["message_id"], "ship-1");
    assert_eq!(list[0]["code"], "INVALID_EVENT");
    assert_eq!(list[0]["sales_order_number"], "8100001");

    // The worker's user may not publish upstream: one clear line.
    let (code, _, err) = dlq(&worker_url, &["replay", "--all", "--force"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.trim().lines().count() == 1
            && err.contains(&format!(
                "RabbitMQ refused user '{}' write access to exchange 'commerce.orders'",
                users.worker
            )),
        "{err}"
    );

    // The operator replays (forced: the cause is in the message): the
    // worker takes it again and, the cause not being fixed, dead-letters
    // it again: the same dead letter, seen twice.
    let (code, out, err) = dlq(
        &operator_url,
        &["replay", "--all", "--force", "--rate", "1000"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sent 1"), "{out}");
    stored(2).await;

    let (code, out, err) = dlq(&operator_url, &["purge", "--all", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 dead letter(s) would be purged"), "{out}");
    let (code, out, err) = dlq(&operator_url, &["purge", "--all"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 dead letter(s) purged"), "{out}");
    dlq_depth(0).await;

    let logs = worker.logs();
    assert!(
        !logs.contains("older holdclear"),
        "nothing outdated on the shipped definitions:\n{logs}"
    );
    let status = worker.stop().await;
    assert!(status.success(), "{status:?}\n{logs}");
    let _ = admin.close(200, "done".into()).await;
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
