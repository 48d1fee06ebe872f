//! Sections 3 and 6: held orders from publish to `order.hold_released`,
//! through one or more `holdclear run` processes (the real binary, with the
//! benchmark's settings file) and an in-process simulator whose orders are
//! released on the first read after the assignment.
//!
//! Publishing is closed-loop: at most [`IN_FLIGHT`] orders are published
//! and not yet released, so that the worker is kept busy without building a
//! backlog that would turn latency into queueing time. Latency is measured
//! from the moment an order's window was published (its `heldAt`) to the
//! arrival of its released event on a private subscription.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use serde_json::Value;

use super::{Bench, BenchError, Percentiles, UsedSettings, load, memory, rate};
use tokio::sync::mpsc;

use crate::broker::{self, BrokerError, OutgoingMessage, Publisher, Received, Subscription};
use crate::sim::{Scenario, SimServer, SimStats};

/// Orders published and not yet released, at most.
pub const IN_FLIGHT: u64 = 2_000;
/// Orders per `publish_all` window.
const CHUNK: u64 = 100;
/// Give up when nothing arrived for this long.
const STALL: Duration = Duration::from_secs(60);
/// How long worker processes get to start consuming.
const START: Duration = Duration::from_secs(60);
/// The benchmark's worker: claim and step many cases at once, look at an
/// assigned order soon.
const ENGINE_CONCURRENCY: usize = 256;
const ENGINE_BATCH: usize = 256;
const POLL_INTERVAL_MS: u64 = 10;
const DATABASE_CONNECTIONS: u32 = 12;

/// One end-to-end run.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// Worker processes.
    pub workers: usize,
    /// Held orders published.
    pub orders: u64,
    /// `order.hold_released` events received.
    pub released: u64,
    /// `order.hold_escalated` events received (none expected).
    pub escalated: u64,
    /// From the first publish to the last arrival, seconds.
    pub seconds: f64,
    /// Released orders per second.
    pub per_sec: f64,
    /// Publish to released event, milliseconds.
    pub latency_ms: Percentiles,
    /// Peak resident memory of each worker process, MiB.
    pub peak_rss_mib: Vec<f64>,
    /// Commerce API calls the simulator answered, per order.
    pub api_calls_per_order: f64,
}

/// The settings the run's worker processes get.
pub fn used_settings(b: &Bench) -> UsedSettings {
    UsedSettings {
        orders: b.bench.orders,
        flow_orders: b.bench.flow_orders,
        prefetch: b.settings.amqp.prefetch,
        intake_batch: b.settings.amqp.intake_batch,
        intake_linger_ms: b.settings.amqp.intake_linger.as_secs_f64() * 1e3,
        engine_concurrency: ENGINE_CONCURRENCY,
        engine_batch: ENGINE_BATCH,
        poll_interval_ms: POLL_INTERVAL_MS as f64,
        database_connections: DATABASE_CONNECTIONS,
        in_flight: IN_FLIGHT,
    }
}

/// Worker processes, killed if still running when dropped.
struct Workers {
    children: Vec<(Child, PathBuf)>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Workers {
    /// An error when a worker has exited.
    fn check(&mut self) -> Result<(), BenchError> {
        for (child, log) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BenchError::WorkerExited {
                    pid: child.id(),
                    status: status.to_string(),
                    log: log.display().to_string(),
                });
            }
        }
        Ok(())
    }

    /// SIGTERM to each, then waits (bounded) for them to finish.
    async fn stop(&mut self) {
        for (child, _) in &self.children {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for (child, _) in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs `orders` held orders through `workers` worker processes; order
/// numbers start at a range of `slot`'s own.
pub async fn run(b: &Bench, workers: usize, slot: u64) -> Result<Flow, BenchError> {
    let n = b.bench.flow_orders;
    let first = 3_000_000_000 + slot * 100_000_000;
    let topology = &b.settings.amqp.topology;
    let (conn, publisher) = b.fresh_start("flow").await?;
    let (events, forwarders) = subscribe(&conn, &topology.events_exchange).await?;
    let sim = SimServer::start(([127, 0, 0, 1], 0).into(), scenario(n)?).await?;

    let config = write_config(b, &sim.base_url(), &sim.token_url(), workers)?;
    let mut procs = Workers {
        children: Vec::new(),
    };
    for i in 0..workers {
        procs.children.push(spawn_worker(b, &config, i)?);
    }
    let result = async {
        wait_consuming(&conn, &topology.held_queue, &mut procs, workers).await?;
        let label = format!(
            "{}. {workers} worker(s): held → released",
            if workers == 1 { 3 } else { 6 }
        );
        let bar = b.bar(n, &label);
        let flow = drive(b, &publisher, events, first, &mut procs, &|d| {
            bar.set_position(d)
        })
        .await;
        bar.finish_and_clear();
        flow
    }
    .await;
    let peaks: Vec<f64> = procs
        .children
        .iter()
        .filter_map(|(c, _)| memory::peak_rss_mib(&c.id().to_string()))
        .collect();
    procs.stop().await;
    drop(procs);
    for f in forwarders {
        f.abort();
    }
    let stats = sim.stats();
    sim.shutdown().await.ok();
    broker::close(&conn).await;
    let (released, escalated, elapsed, latencies) = result?;
    Ok(Flow {
        workers,
        orders: n,
        released,
        escalated,
        seconds: elapsed.as_secs_f64(),
        per_sec: rate(released, elapsed),
        latency_ms: Percentiles::of(latencies),
        peak_rss_mib: peaks,
        api_calls_per_order: api_calls(&stats) as f64 / n.max(1) as f64,
    })
}

/// The released (`true`) and escalated events, one forwarding task per
/// subscription so that no wait of the reader can drop a message
/// half-received; and a queue that drains the assigned events.
async fn subscribe(
    conn: &broker::Connection,
    exchange: &str,
) -> Result<(Events, Vec<tokio::task::JoinHandle<()>>), BenchError> {
    let (events_tx, events) = mpsc::channel(4096);
    let mut forwarders = Vec::new();
    for (binding, is_release) in [
        ("order.hold_released", true),
        ("order.hold_escalated", false),
    ] {
        let mut sub = Subscription::open(conn, exchange, binding).await?;
        let tx = events_tx.clone();
        forwarders.push(tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if tx.send((is_release, m)).await.is_err() {
                    return;
                }
            }
        }));
    }
    // Every event the worker emits has a queue, as in a deployment: the relay
    // publishes with `mandatory`, and an unroutable event stays in the
    // outbox to be tried again (which would load the run, not measure it).
    let mut assigned = Subscription::open(conn, exchange, "order.smart_account_assigned").await?;
    forwarders.push(tokio::spawn(async move {
        while assigned.next().await.is_some() {}
    }));
    Ok((events, forwarders))
}

/// The demo's accounts, no faults, no rate limit, room for `n` orders
/// released on the first read after their assignment.
fn scenario(n: u64) -> Result<Scenario, BenchError> {
    let mut scenario = Scenario::demo()?;
    scenario.rate_limit = None;
    scenario.defaults.release_after_reads = 1;
    scenario.defaults.release_after = Duration::ZERO;
    scenario.defaults.max_orders = usize::try_from(n + 1_000).unwrap_or(usize::MAX);
    scenario.faults = Default::default();
    Ok(scenario)
}

/// Waits (up to [`START`]) until `workers` processes consume `queue`.
async fn wait_consuming(
    conn: &broker::Connection,
    queue: &str,
    procs: &mut Workers,
    workers: usize,
) -> Result<(), BenchError> {
    let waiting = Instant::now();
    loop {
        procs.check()?;
        let counts = broker::bench::queue_counts(conn, queue).await?;
        if counts.consumers as usize >= workers {
            return Ok(());
        }
        if waiting.elapsed() > START {
            return Err(BenchError::Stalled {
                what: "worker processes consuming",
                done: u64::from(counts.consumers),
                expected: workers as u64,
                waited: START,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn api_calls(stats: &SimStats) -> u64 {
    stats
        .calls
        .iter()
        .filter(|(endpoint, _)| endpoint.as_str() != "token")
        .map(|(_, n)| *n)
        .sum()
}

type Arrivals = (u64, u64, Duration, Vec<f64>);

/// The released (`true`) and escalated events of the run.
type Events = mpsc::Receiver<(bool, Result<Received, BrokerError>)>;

/// What the publisher and the reader share: the orders that arrived, and
/// when each window of [`CHUNK`] orders was published.
#[derive(Default)]
struct Pace {
    arrived: AtomicU64,
    sent_at: Mutex<Vec<Instant>>,
}

impl Pace {
    /// When the window of order `i` was published.
    fn sent(&self, i: usize) -> Option<Instant> {
        let sent_at = self.sent_at.lock().unwrap_or_else(|p| p.into_inner());
        sent_at.get(i / CHUNK as usize).copied()
    }
}

/// What arrived so far: each order once, released or escalated, and the
/// latency of each.
struct Tally {
    seen: Vec<bool>,
    released: u64,
    escalated: u64,
    latencies: Vec<f64>,
    last: Instant,
}

impl Tally {
    fn new(n: u64, started: Instant) -> Self {
        let seen = vec![false; usize::try_from(n).unwrap_or(0)];
        Self {
            latencies: Vec::with_capacity(seen.len()),
            seen,
            released: 0,
            escalated: 0,
            last: started,
        }
    }

    fn done(&self) -> u64 {
        self.released + self.escalated
    }

    /// Counts the first event of order `i`; `false` for a repeat.
    fn count(&mut self, i: usize, is_release: bool, sent: Option<Instant>, now: Instant) -> bool {
        if std::mem::replace(&mut self.seen[i], true) {
            return false;
        }
        if let Some(sent) = sent {
            self.latencies
                .push(now.duration_since(sent).as_secs_f64() * 1e3);
        }
        if is_release {
            self.released += 1;
        } else {
            self.escalated += 1;
        }
        self.last = now;
        true
    }
}

/// Publishes the run's `n` orders from `first` on, closed loop: never more
/// than [`IN_FLIGHT`] ahead of the arrivals.
async fn publish(
    publisher: Publisher,
    topology: crate::config::Topology,
    first: u64,
    n: u64,
    pace: Arc<Pace>,
) -> Result<(), BenchError> {
    let run = format!("flow{first}");
    let mut published = 0u64;
    while published < n {
        while published.saturating_sub(pace.arrived.load(Ordering::Acquire)) >= IN_FLIGHT {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let take = (n - published).min(CHUNK);
        let now = Utc::now();
        let msgs: Vec<OutgoingMessage> = (published..published + take)
            .map(|i| {
                let number = first + i;
                load::message(&topology, &run, number, load::held_body(&run, number, now))
            })
            .collect();
        (pace.sent_at.lock().unwrap_or_else(|p| p.into_inner())).push(Instant::now());
        load::publish_windowed(&publisher, &topology.orders_exchange, &msgs).await?;
        published += take;
    }
    Ok(())
}

/// Publishes (closed loop) and collects the outcomes.
async fn drive(
    b: &Bench,
    publisher: &Publisher,
    mut events: Events,
    first: u64,
    procs: &mut Workers,
    progress: &dyn Fn(u64),
) -> Result<Arrivals, BenchError> {
    let n = b.bench.flow_orders;
    let pace = Arc::new(Pace::default());
    let started = Instant::now();
    let publishing = tokio::spawn(publish(
        publisher.clone(),
        b.settings.amqp.topology.clone(),
        first,
        n,
        Arc::clone(&pace),
    ));
    let mut tally = Tally::new(n, started);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        if tally.done() >= n {
            break Ok(());
        }
        let (is_release, msg) = tokio::select! {
            m = events.recv() => match m {
                Some(m) => m,
                None => break Err(BrokerError::Cancelled.into()),
            },
            _ = check.tick() => {
                if let Err(e) = procs.check() {
                    break Err(e);
                }
                if publishing.is_finished() && tally.last.elapsed() > STALL {
                    break Err(BenchError::Stalled {
                        what: "released events",
                        done: tally.done(),
                        expected: n,
                        waited: STALL,
                    });
                }
                continue;
            }
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => break Err(e.into()),
        };
        let now = Instant::now();
        let Some(i) = order_index(&msg.body, first, n) else {
            continue;
        };
        if !tally.count(i, is_release, pace.sent(i), now) {
            continue;
        }
        pace.arrived.store(tally.done(), Ordering::Release);
        if tally.done().is_multiple_of(50) || tally.done() == n {
            progress(tally.done());
        }
    };
    publishing.abort();
    let published = publishing.await;
    outcome?;
    if let Ok(Err(e)) = published {
        return Err(e);
    }
    let elapsed = tally.last.duration_since(started);
    Ok((tally.released, tally.escalated, elapsed, tally.latencies))
}

/// The position of the order an event is about, if it is one of this run's.
fn order_index(body: &[u8], first: u64, n: u64) -> Option<usize> {
    let event: Value = serde_json::from_slice(body).ok()?;
    let number: u64 = event["data"]["salesOrderNumber"].as_str()?.parse().ok()?;
    let i = number.checked_sub(first)?;
    (i < n).then(|| usize::try_from(i).ok()).flatten()
}

/// The settings file of the run's worker processes (private to the user).
fn write_config(
    b: &Bench,
    base_url: &str,
    token_url: &str,
    workers: usize,
) -> Result<PathBuf, BenchError> {
    let s = &b.settings;
    let t = &s.amqp.topology;
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    // The CA files, since the workers see no HOLDCLEAR_* variables.
    let mut tls = String::new();
    for (key, ca) in [
        ("amqp_tls_ca_file", &s.amqp.tls_ca),
        ("database_tls_ca_file", &s.database_tls_ca),
    ] {
        if let Some(ca) = ca {
            tls.push_str(&format!("{key} = {:?}\n", ca.path().display().to_string()));
        }
    }
    let text = format!(
        "database_url = {db:?}\n\
         database_max_connections = {conns}\n\
         amqp_url = {amqp:?}\n\
         amqp_prefetch = {prefetch}\n\
         max_payload_bytes = {payload}\n\
         memory_budget = \"{budget}\"\n\
         intake_batch = {batch}\n\
         intake_linger = {linger:?}\n\
         delivery_limit = {limit}\n\
         commerce_base_url = {base_url:?}\n\
         commerce_token_url = {token_url:?}\n\
         commerce_client_id = {id:?}\n\
         commerce_client_secret = {secret:?}\n\
         commerce_rate_limit = 1000000.0\n\
         rules = {rules:?}\n\
         poll_interval = \"{POLL_INTERVAL_MS}ms\"\n\
         poll_max_interval = \"1s\"\n\
         escalate_after = \"1h\"\n\
         engine_concurrency = {ENGINE_CONCURRENCY}\n\
         engine_batch_size = {ENGINE_BATCH}\n\
         engine_idle_poll = \"100ms\"\n\
         http_addr = \"127.0.0.1:0\"\n\
         log_format = \"json\"\n\
         shutdown_timeout = \"10s\"\n\
         {tls}\
         [topology]\n\
         orders_exchange = {oe:?}\n\
         held_routing_key = {rk:?}\n\
         held_queue = {hq:?}\n\
         dead_letter_exchange = {dx:?}\n\
         dead_letter_queue = {dq:?}\n\
         events_exchange = {ee:?}\n",
        db = s.database_url.expose(),
        conns = DATABASE_CONNECTIONS,
        amqp = s.amqp.url.expose(),
        prefetch = s.amqp.prefetch,
        payload = s.amqp.max_payload_bytes,
        budget = s.amqp.memory_budget_bytes,
        batch = s.amqp.intake_batch,
        linger = ms(s.amqp.intake_linger),
        limit = s.amqp.delivery_limit,
        id = crate::config::DEMO_CLIENT_ID,
        secret = crate::config::DEMO_CLIENT_SECRET,
        rules = s.rules_path.display().to_string(),
        oe = t.orders_exchange,
        rk = t.held_routing_key,
        hq = t.held_queue,
        dx = t.dead_letter_exchange,
        dq = t.dead_letter_queue,
        ee = t.events_exchange,
    );
    let path = b.bench.work_dir.join(format!("worker-{workers}.toml"));
    write_private(&path, &text).map_err(BenchError::io(format!(
        "cannot write the worker settings {}",
        path.display()
    )))?;
    Ok(path)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// Starts `holdclear run` with `config` only (no `HOLDCLEAR_*` of ours
/// leaks in), warnings and errors logged to a file of the run.
fn spawn_worker(b: &Bench, config: &Path, i: usize) -> Result<(Child, PathBuf), BenchError> {
    let log = b
        .bench
        .work_dir
        .join(format!("worker-{i}-{}.log", Utc::now().timestamp_millis()));
    let stderr = std::fs::File::create(&log).map_err(BenchError::io(format!(
        "cannot create the worker log {}",
        log.display()
    )))?;
    let mut cmd = Command::new(&b.bench.worker_exe);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HOLDCLEAR_") {
            cmd.env_remove(&key);
        }
    }
    cmd.arg("--config")
        .arg(config)
        .arg("run")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let child = cmd.spawn().map_err(BenchError::io(format!(
        "cannot start {}",
        b.bench.worker_exe.display()
    )))?;
    Ok((child, log))
}
