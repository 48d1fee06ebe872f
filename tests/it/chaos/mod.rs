//! Chaos: real worker processes, the real broker and database, the
//! simulator over HTTP — and something breaking while held orders flow.
//! Each scenario ends with the [`checker`]: every order has exactly one
//! terminal event, at most one accepted assignment, every malformed input is
//! dead-lettered once, and no case is stuck.
//!
//! (`panics` is the one scenario with its worker in the test process: no
//! input a worker process can be sent makes a step panic any more, so a
//! commerce client that panics is put in at the trait's boundary.)
//!
//! Disruptions touch only what belongs to the test: its worker processes,
//! the worker's own broker connections, the test's database, its exchange.
//! The one exception, `broker_restarted`, stops RabbitMQ for everyone and
//! runs alone (`.config/nextest.toml`).

mod checker;
mod crash_loop;
mod dead_letters;
mod disruptive;
mod panics;
mod poison;
mod replicas;
mod scenarios;
mod secrets;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use holdclear::broker::OutgoingMessage;
use holdclear::config::Topology;
use holdclear::sim::SimHandle;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::broker::message;
use crate::support::{amqp_url, bin, config_file, env_for, repo_path, unique};

pub use checker::{Expect, check};

/// Settings that make a worker process quick enough for a test: short
/// polls, backoff and leases; a commerce timeout shorter than the
/// simulator's hang; few database connections (tests run side by side).
pub fn worker_env(database_url: &str, sim: &SimHandle, config: &Path) -> HashMap<String, String> {
    let mut env = env_for(database_url);
    let rules = repo_path("deploy/config/rules.toml");
    for (k, v) in [
        ("HOLDCLEAR_CONFIG", config.display().to_string()),
        ("HOLDCLEAR_RULES", rules.display().to_string()),
        ("HOLDCLEAR_COMMERCE_BASE_URL", sim.base_url()),
        ("HOLDCLEAR_COMMERCE_TOKEN_URL", sim.token_url()),
        ("HOLDCLEAR_COMMERCE_RATE_LIMIT", "150".into()),
        ("HOLDCLEAR_COMMERCE_TIMEOUT", "3s".into()),
        ("HOLDCLEAR_POLL_INTERVAL", "200ms".into()),
        ("HOLDCLEAR_POLL_MAX_INTERVAL", "1s".into()),
        ("HOLDCLEAR_RETRY_INITIAL", "200ms".into()),
        ("HOLDCLEAR_RETRY_MAX_INTERVAL", "2s".into()),
        ("HOLDCLEAR_RETRY_MAX_ELAPSED", "5m".into()),
        ("HOLDCLEAR_ENGINE_LEASE", "3s".into()),
        ("HOLDCLEAR_ENGINE_IDLE_POLL", "200ms".into()),
        ("HOLDCLEAR_SHUTDOWN_TIMEOUT", "5s".into()),
        ("HOLDCLEAR_DATABASE_MAX_CONNECTIONS", "6".into()),
        ("RUST_LOG", "info".into()),
    ] {
        env.insert(k.to_owned(), v);
    }
    env
}

/// A `holdclear run` process that can be killed and started again; its
/// stderr (JSON logs) of every start is appended to one file. Killed when
/// dropped. An *isolated* one runs as PID 1 of a PID namespace of its own,
/// as in a container (`unshare --pid --fork`), when the machine allows it.
pub struct WorkerProcess {
    env: HashMap<String, String>,
    child: Option<Child>,
    /// In a PID namespace of its own (`child` is then `unshare`).
    isolated: bool,
    /// Where the logs go.
    pub log: PathBuf,
    /// How many times it was started.
    pub starts: usize,
}

/// Whether `unshare --pid --fork` works here (root, or user namespaces).
pub fn pid_namespaces() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

impl WorkerProcess {
    /// Starts `holdclear run` with `env`.
    pub fn start(env: HashMap<String, String>, dir: &Path) -> Self {
        Self::launch(env, dir, false)
    }

    /// Starts `holdclear run` with `env` as PID 1 of a PID namespace of its
    /// own, if [`pid_namespaces`] work here (else as a plain process).
    pub fn start_isolated(env: HashMap<String, String>, dir: &Path) -> Self {
        Self::launch(env, dir, pid_namespaces())
    }

    fn launch(env: HashMap<String, String>, dir: &Path, isolated: bool) -> Self {
        let mut w = Self {
            env,
            child: None,
            isolated,
            log: dir.join("worker.log"),
            starts: 0,
        };
        w.spawn();
        w
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = if self.isolated {
            let mut cmd = std::process::Command::new("unshare");
            cmd.args(["--pid", "--fork", "--kill-child"])
                .arg(env!("CARGO_BIN_EXE_holdclear"));
            cmd
        } else {
            bin()
        };
        cmd.arg("run")
            .env_clear()
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        self.child = Some(cmd.spawn().expect("holdclear run starts"));
        self.starts += 1;
    }

    /// The process running `holdclear run` (for an isolated one, the child
    /// of `unshare`, once it exists).
    fn worker_pid(&self) -> Option<nix::unistd::Pid> {
        let child = self.child.as_ref()?.id();
        if !self.isolated {
            return Some(nix::unistd::Pid::from_raw(child as i32));
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            let children = std::fs::read_to_string(format!("/proc/{child}/task/{child}/children"))
                .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                return pid.parse().ok().map(nix::unistd::Pid::from_raw);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Sends `signal` to the process running `holdclear run`.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.worker_pid() {
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// SIGKILL, reaped.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.worker_pid() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGKILL, then a fresh start with the same settings.
    pub fn kill_and_restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGTERM; fails the test unless it exits 0 within 15 s.
    pub async fn stops_cleanly(&mut self) {
        let code = self.terminate(Duration::from_secs(15)).await;
        assert_eq!(code, Some(0), "a clean stop:\n{}", self.tail());
    }

    /// SIGTERM and wait for the exit (bounded); the exit code.
    pub async fn terminate(&mut self, deadline: Duration) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take()?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("holdclear run did not stop within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Still running (not exited by itself)?
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Everything it logged, over every start.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the logs (for failure messages).
    pub fn tail(&self) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One event as it arrived on the test's watch queue.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Routing key.
    pub routing_key: String,
    /// AMQP `message_id` (= the envelope id).
    pub envelope_id: String,
    /// `data.salesOrderNumber`.
    pub order: String,
    /// `data.reason` of an escalation.
    pub reason: Option<String>,
    /// The whole body, as text.
    pub body: String,
    /// When it arrived.
    pub at: Instant,
}

impl Seen {
    /// `order.hold_released`, or an escalation other than `HOLD_PERSISTS`.
    pub fn is_terminal(&self) -> bool {
        match self.routing_key.as_str() {
            "order.hold_released" => true,
            "order.hold_escalated" => self.reason.as_deref() != Some("HOLD_PERSISTS"),
            _ => false,
        }
    }
}

/// Everything published on the test's events exchange, collected in the
/// background by a queue bound with `#`.
pub struct Collector {
    conn: Option<Connection>,
    channel: Channel,
    queue: String,
    exchange: String,
    /// A durable queue that outlives the broker's restart (see
    /// [`Collector::start_durable`]).
    durable: bool,
    /// What arrived so far.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Binds a fresh exclusive queue to the events exchange of `topology`
    /// and starts collecting.
    pub async fn start(topology: &Topology) -> Self {
        Self::open(topology, false).await
    }

    /// Like [`Collector::start`], but the queue is a durable quorum queue
    /// and each event is acked once it is recorded: events the worker
    /// published before the broker stopped, or while this collector was
    /// disconnected, wait in the queue. After a restart, call
    /// [`Collector::reconnect`]. The queue is deleted on drop (and expires
    /// unused after 10 minutes, should that fail).
    pub async fn start_durable(topology: &Topology) -> Self {
        Self::open(topology, true).await
    }

    async fn open(topology: &Topology, durable: bool) -> Self {
        let queue = unique("chaos-watch");
        let exchange = topology.events_exchange.clone();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (conn, channel, task) = subscribe(&queue, &exchange, durable, &seen).await;
        Self {
            conn: Some(conn),
            channel,
            queue,
            exchange,
            durable,
            seen,
            task,
        }
    }

    /// A new connection consuming the same (durable) queue, after the
    /// broker restarted; what arrived so far is kept.
    pub async fn reconnect(&mut self) {
        assert!(self.durable, "only a durable collector outlives a restart");
        self.task.abort();
        let (conn, channel, task) = subscribe(&self.queue, &self.exchange, true, &self.seen).await;
        self.conn = Some(conn);
        self.channel = channel;
        self.task = task;
    }

    /// Declares the events exchange (as the worker does) and binds the queue.
    pub async fn declare_and_bind(&self) {
        declare_and_bind(&self.channel, &self.exchange, &self.queue).await;
    }

    /// Deletes the test's events exchange (its bindings go with it).
    pub async fn delete_exchange(&self) {
        self.channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .expect("delete the events exchange");
    }

    /// A copy of what arrived so far.
    pub fn snapshot(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Orders with a terminal event so far.
    pub fn terminal_orders(&self) -> usize {
        let seen = self.seen.lock().unwrap();
        let orders: std::collections::HashSet<&str> = seen
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.order.as_str())
            .collect();
        orders.len()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
        if self.durable {
            // Deleted with a connection of its own on a thread of its own
            // (bounded): the test's runtime may be blocked here.
            let queue = self.queue.clone();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let delete = async {
                        let conn = Connection::connect(&amqp_url(), Default::default()).await?;
                        let channel = conn.create_channel().await?;
                        channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await?;
                        conn.close(200, "done".into()).await
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(10), delete).await;
                });
            })
            .join();
        }
        // An exclusive queue goes with the connection.
        if let Some(conn) = self.conn.take() {
            tokio::spawn(async move {
                let _ = conn.close(200, "done".into()).await;
            });
        }
    }
}

async fn declare_and_bind(channel: &Channel, exchange: &str, queue: &str) {
    channel
        .exchange_declare(
            exchange.into(),
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
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the watch queue");
}

/// Connects, declares the watch queue (exclusive, or durable), binds it
/// and starts collecting into `seen`.
async fn subscribe(
    queue: &str,
    exchange: &str,
    durable: bool,
    seen: &Arc<Mutex<Vec<Seen>>>,
) -> (Connection, Channel, tokio::task::JoinHandle<()>) {
    let conn = Connection::connect(
        &amqp_url(),
        ConnectionProperties::default().with_connection_name(queue.to_owned().into()),
    )
    .await
    .expect("connect to RabbitMQ");
    let channel = conn.create_channel().await.unwrap();
    let (options, arguments) = if durable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert("x-expires".into(), AMQPValue::LongUInt(600_000));
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        (options, args)
    } else {
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        (options, FieldTable::default())
    };
    channel
        .queue_declare(queue.into(), options, arguments)
        .await
        .unwrap();
    declare_and_bind(&channel, exchange, queue).await;
    if durable {
        channel
            .basic_qos(500, BasicQosOptions::default())
            .await
            .unwrap();
    }
    let consumer = channel
        .basic_consume(
            queue.into(),
            queue.into(),
            BasicConsumeOptions {
                no_ack: !durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let task = tokio::spawn(collect(consumer, Arc::clone(seen), durable));
    (conn, channel, task)
}

/// Records every delivery; acks it afterwards when `ack` (a durable queue).
async fn collect(mut consumer: lapin::Consumer, seen: Arc<Mutex<Vec<Seen>>>, ack: bool) {
    while let Some(Ok(d)) = consumer.next().await {
        let body: Value = serde_json::from_slice(&d.data).unwrap_or(Value::Null);
        let data = &body["data"];
        seen.lock().unwrap().push(Seen {
            routing_key: d.routing_key.as_str().to_owned(),
            envelope_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default(),
            order: data["salesOrderNumber"].as_str().unwrap_or("").to_owned(),
            reason: data["reason"].as_str().map(str::to_owned),
            body: String::from_utf8_lossy(&d.data).into_owned(),
            at: Instant::now(),
        });
        if ack && d.acker.ack(BasicAckOptions::default()).await.is_err() {
            return;
        }
    }
}

/// One held order of a run and the outcome its situation calls for.
#[derive(Clone, Debug)]
pub struct Order {
    /// Sales order number.
    pub number: String,
    /// The event (its envelope).
    pub event: Value,
    /// The outcome.
    pub expect: Expect,
}

/// `n` held orders with a mix of outcomes under the shipped rules and the
/// demo simulator: most released (acme.com direct; initech.com PENDING with
/// the partner's holding fallback), the rest escalated (hooli.com inactive,
/// no e-mail so no rule, an unknown account, a stocking order).
pub fn orders(tag: &str, first: u64, n: usize) -> Vec<Order> {
    (0..n)
        .map(|i| {
            let number = format!("{}", first + i as u64);
            let mut ev = crate::support::broker::held_event(&format!("{tag}-{i}"), &number);
            let d = &mut ev["data"];
            let expect = match i % 8 {
                0..=2 => Expect::Released,
                3 => {
                    d["holdReason"] = json!("PENDING_SMART_ACCOUNT");
                    d["smartAccount"] = json!({"domain": "initech.com", "status": "PENDING"});
                    d["endCustomer"]["email"] = json!("it@initech.com");
                    Expect::Released
                }
                4 => {
                    d["endCustomer"]["email"] = json!("it@hooli.com");
                    d["partner"]["id"] = json!("P-200");
                    Expect::Escalated("SMART_ACCOUNT_NOT_ACTIVE")
                }
                5 => {
                    d["endCustomer"].as_object_mut().unwrap().remove("email");
                    d["partner"]["id"] = json!("P-200");
                    Expect::Escalated("NO_RULE_MATCHED")
                }
                6 => {
                    d["endCustomer"]["email"] = json!("cto@unknown-co.example");
                    d["partner"]["id"] = json!("P-200");
                    Expect::Escalated("SMART_ACCOUNT_NOT_FOUND")
                }
                _ => {
                    d["orderType"] = json!("STOCKING");
                    Expect::Escalated("ASSIGNMENT_LOCKED")
                }
            };
            Order {
                number,
                event: ev,
                expect,
            }
        })
        .collect()
}

/// The messages of `orders`, as upstream publishes them.
pub fn messages(orders: &[Order]) -> Vec<OutgoingMessage> {
    orders.iter().map(|o| message(&o.event)).collect()
}

/// The RabbitMQ pids of the worker's own connections (their names carry
/// the test's held queue).
pub fn worker_connections(topology: &Topology) -> Vec<String> {
    crate::support::broker::connections_named(&format!("queue={}", topology.held_queue))
}

/// What a scenario needs: the simulator, the test's topology and a
/// collector on its events exchange, a settings file, a temp dir.
pub struct Stage {
    /// The simulator.
    pub sim: SimHandle,
    /// The test's RabbitMQ topology (deleted on drop).
    pub rabbit: crate::support::broker::Rabbit,
    /// Events emitted.
    pub events: Collector,
    /// The worker's settings (environment).
    pub env: HashMap<String, String>,
    /// The test's database.
    pub pool: PgPool,
    /// The test's database URL.
    pub database_url: String,
    /// Where the worker's logs go.
    pub dir: tempfile::TempDir,
}

impl Stage {
    /// Sets the stage for scenario `name` with the simulator `scenario`.
    pub async fn new(name: &str, pool: PgPool, scenario: holdclear::sim::Scenario) -> Self {
        let prefix = unique(&format!("chaos-{name}"));
        let rabbit = crate::support::broker::Rabbit::new(&prefix).await;
        let events = Collector::start(&rabbit.topology).await;
        let sim = crate::support::sim::start(scenario).await;
        let dir = tempfile::tempdir().unwrap();
        let config = config_file(dir.path(), &prefix);
        let database_url = crate::support::database_url(&pool).await;
        let env = worker_env(&database_url, &sim, &config);
        Self {
            sim,
            rabbit,
            events,
            env,
            pool,
            database_url,
            dir,
        }
    }

    /// Starts a worker process with the stage's settings and waits until
    /// it consumes.
    pub async fn worker(&self) -> WorkerProcess {
        let w = WorkerProcess::start(self.env.clone(), self.dir.path());
        self.wait_consumers(1).await;
        w
    }

    /// Waits until `n` consumers are on the held queue.
    pub async fn wait_consumers(&self, n: u32) {
        let queue = self.rabbit.topology.held_queue.clone();
        crate::support::wait_for(Duration::from_secs(30), "the worker to consume", || async {
            (self.rabbit.consumers(&queue).await == n).then_some(())
        })
        .await;
    }
}
