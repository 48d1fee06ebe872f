//! `holdclear bench`: what one worker does on this machine, next to what
//! the machine's RabbitMQ and PostgreSQL can do in the same run.
//!
//! - [`load`]: held-order events made up for the run, published with a window of confirms.
//! - [`intake`]: sections 1 and 2: intake against the broker's limit (an
//!   ack-only consumer) and against the database's limit (intake's own
//!   statement run directly).
//! - [`flow`]: sections 3 and 6: held orders through `holdclear run`
//!   processes and an in-process simulator until the released events
//!   arrive; throughput, latency and each worker's peak memory.
//! - [`watching`]: section 4: claiming due cases among a million watched ones.
//! - [`prune`]: section 8: intake and claims while the pruner works off
//!   millions of closed cases, and how long it takes.
//! - [`memory`]: peak resident memory from `/proc`.
//! - [`calls`]: section 7: commerce API calls per cleared order and orders
//!   cleared per minute under the API's rate limit, on a realistic mix.
//!
//! The run owns a database and exchange/queue names of its own; the caller
//! ([`crate::cli::bench`]) creates and removes them.

pub mod calls;
pub mod flow;
pub mod intake;
pub mod load;
pub mod memory;
pub mod plot;
pub mod prune;
pub mod watching;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::broker::BrokerError;
use crate::broker::PublishError;
use crate::broker::bench::DrainError;
use crate::config::Settings;
use crate::sim::SimError;
use crate::store::bench::BenchTables;
use crate::store::{Store, StoreError};

/// Why the benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// RabbitMQ failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The broker's ack-only consumer did not finish.
    #[error(transparent)]
    Drain(#[from] DrainError),
    /// Publishing the held orders failed.
    #[error("cannot publish the held orders: {0}")]
    Publish(#[from] PublishError),
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The simulator could not start.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// A worker process or a file could not be handled.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// A worker process stopped by itself during the run.
    #[error("worker process {pid} exited early ({status}); its log: {log}")]
    WorkerExited {
        /// Its process id.
        pid: u32,
        /// How it ended.
        status: String,
        /// Where its log is.
        log: String,
    },
    /// Progress stopped before every order got through.
    #[error("{what}: {done} of {expected} after waiting {waited:?} without progress")]
    Stalled {
        /// What was waited for.
        what: &'static str,
        /// How many got through.
        done: u64,
        /// How many were expected.
        expected: u64,
        /// How long nothing happened.
        waited: Duration,
    },
    /// A made-up event was refused by the service's own decoder (a bug of the benchmark).
    #[error("the benchmark's own event is invalid: {0}")]
    BadEvent(String),
}

impl BenchError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// What to run and how big.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// Held orders of sections 1 and 2.
    pub orders: u64,
    /// Held orders of sections 3 and 6 (each run).
    pub flow_orders: u64,
    /// Cases seeded in `watching` for section 4 (its large size).
    pub watching: u64,
    /// Closed cases past their retention seeded for section 8.
    pub closed: u64,
    /// Most worker processes of section 6 (runs with 1..=workers).
    pub workers: usize,
    /// Sections to run (1 to 8).
    pub sections: BTreeSet<u8>,
    /// The `holdclear` executable that runs the worker processes.
    pub worker_exe: PathBuf,
    /// A private directory for the worker processes' settings and logs.
    pub work_dir: PathBuf,
    /// Draw progress bars (on a terminal).
    pub progress: bool,
}

/// The sections and what each measures.
pub const SECTIONS: [(u8, &str); 8] = [
    (1, "intake vs the broker's limit"),
    (2, "intake vs the database's limit"),
    (3, "end to end"),
    (4, "watching at scale"),
    (5, "memory"),
    (6, "more workers"),
    (7, "API calls per order under the rate limit"),
    (8, "pruning a backlog of closed cases"),
];

/// Everything a run measured; sections not run are `None`.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The machine and the services' versions.
    pub machine: Machine,
    /// The settings the run used.
    pub settings: UsedSettings,
    /// Section 1.
    pub intake_vs_broker: Option<intake::IntakeVsBroker>,
    /// Section 2.
    pub intake_vs_database: Option<intake::IntakeVsDatabase>,
    /// Section 3.
    pub end_to_end: Option<flow::Flow>,
    /// Section 4.
    pub watching: Option<watching::Watching>,
    /// Section 5.
    pub memory: Option<memory::Memory>,
    /// Section 6: one run per number of worker processes.
    pub workers: Option<Vec<flow::Flow>>,
    /// Section 7.
    pub calls_per_order: Option<calls::Calls>,
    /// Section 8.
    pub pruning: Option<prune::Pruning>,
}

/// Where the numbers come from.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// Total memory (`MemTotal`), MiB.
    pub memory_mib: Option<u64>,
    /// PostgreSQL's `server_version`.
    pub postgresql: String,
    /// RabbitMQ's version (`rabbitmqctl version`, when it can be asked).
    pub rabbitmq: Option<String>,
    /// The 1-minute load average when the run started and when it ended:
    /// above the number of cores, other work competed for the CPU.
    pub load_average: [Option<f64>; 2],
}

/// The worker settings the run used (the user's, except where the
/// benchmark needs its own: see `docs/performance.md`).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsedSettings {
    /// Held orders of sections 1 and 2.
    pub orders: u64,
    /// Held orders per end-to-end run.
    pub flow_orders: u64,
    /// Consumer prefetch.
    pub prefetch: u16,
    /// Intake batch (and transaction) size.
    pub intake_batch: usize,
    /// Intake linger, milliseconds.
    pub intake_linger_ms: f64,
    /// Engine concurrency of the worker processes.
    pub engine_concurrency: usize,
    /// Engine claim batch of the worker processes.
    pub engine_batch: usize,
    /// First look at an assigned order after, milliseconds.
    pub poll_interval_ms: f64,
    /// Database connections per worker process.
    pub database_connections: u32,
    /// Orders published but not yet released, at most (end to end).
    pub in_flight: u64,
}

/// One benchmark run: the settings of the run's own database and topology,
/// and a store on that database.
pub struct Bench {
    /// The worker settings, pointing at the run's database and names.
    pub settings: Settings,
    /// What to run.
    pub bench: BenchSettings,
    /// The run's database.
    pub store: Store,
}

impl Bench {
    /// The statements only the benchmark runs, on the run's database.
    pub(crate) fn tables(&self) -> BenchTables {
        BenchTables::new(&self.store)
    }

    /// Empties the bench's tables and held queue, and opens a connection
    /// with a confirm-mode publisher on the declared topology: the start of
    /// every section that publishes held orders.
    pub(crate) async fn fresh_start(
        &self,
        role: &str,
    ) -> Result<(crate::broker::Connection, crate::broker::Publisher), BenchError> {
        let topology = &self.settings.amqp.topology;
        self.tables().truncate().await?;
        self.tables().checkpoint().await;
        let broker = crate::broker::Broker::from_settings(&self.settings.amqp, "holdclear bench");
        let conn = broker.connect(role).await?;
        let publisher = crate::broker::Publisher::open(&conn).await?;
        crate::broker::declare_topology(
            &broker,
            &conn,
            topology,
            self.settings.amqp.delivery_limit,
        )
        .await?;
        crate::broker::bench::purge(&conn, &topology.held_queue).await?;
        Ok((conn, publisher))
    }

    /// Runs the selected sections, in order.
    pub async fn run(&self) -> Result<Report, BenchError> {
        let s = &self.bench.sections;
        let mut report = Report {
            machine: machine(&self.store).await,
            settings: flow::used_settings(self),
            ..Report::default()
        };
        let mut memory = memory::Memory {
            target_mib: memory::TARGET_MIB,
            ..memory::Memory::default()
        };
        let mut intake_events = None;
        if s.contains(&1) || s.contains(&5) {
            let (result, peak, events) = intake::against_broker(self).await?;
            memory.intake_peak_rss_mib = peak;
            intake_events = Some(events);
            if s.contains(&1) {
                report.intake_vs_broker = Some(result);
            }
        }
        if s.contains(&2) {
            let intake_rate = report.intake_vs_broker.as_ref().map(|r| r.intake_per_sec);
            report.intake_vs_database =
                Some(intake::against_database(self, intake_events.take(), intake_rate).await?);
        }
        let mut one_worker = None;
        if s.contains(&3) || s.contains(&5) || s.contains(&6) {
            let run = flow::run(self, 1, 0).await?;
            memory.end_to_end_peak_rss_mib = run.peak_rss_mib.iter().copied().reduce(f64::max);
            if s.contains(&3) {
                report.end_to_end = Some(run.clone());
            }
            one_worker = Some(run);
        }
        if s.contains(&4) {
            report.watching = Some(watching::run(self).await?);
        }
        if s.contains(&5) {
            report.memory = Some(memory);
        }
        if s.contains(&8) {
            report.pruning = Some(prune::run(self).await?);
        }
        let finish = |mut report: Report| {
            report.machine.load_average[1] = memory::load_average();
            report
        };
        if s.contains(&7) {
            report.calls_per_order = Some(calls::run(self).await?);
        }
        if s.contains(&6) {
            let mut runs: Vec<flow::Flow> = one_worker.into_iter().collect();
            for workers in 2..=self.bench.workers.max(1) {
                runs.push(flow::run(self, workers, workers as u64).await?);
            }
            report.workers = Some(runs);
        }
        Ok(finish(report))
    }

    /// A progress bar of `len` steps (hidden unless progress is on).
    pub(crate) fn bar(&self, len: u64, message: &str) -> ProgressBar {
        if !self.bench.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:<44} [{bar:30}] {pos}/{len} ({per_sec}, {elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}

async fn machine(store: &Store) -> Machine {
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_mib: memory::mem_total_mib(),
        postgresql: BenchTables::new(store)
            .server_version()
            .await
            .unwrap_or_else(|e| format!("unknown ({e})")),
        rabbitmq: rabbitmq_version().await,
        load_average: [memory::load_average(), None],
    }
}

/// `rabbitmqctl version`, when that tool is installed and allowed to talk
/// to the local node (AMQP does not tell a client the broker's version).
async fn rabbitmq_version() -> Option<String> {
    let run = tokio::process::Command::new("rabbitmqctl")
        .arg("version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Latency percentiles, milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)] // the number of samples and the usual percentiles
pub struct Percentiles {
    pub samples: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of `samples` (milliseconds; sorted here).
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if samples.is_empty() {
                return 0.0;
            }
            let rank = (q * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1]
        };
        Self {
            samples: samples.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or(0.0),
        }
    }
}

/// Events per second, 0 for an empty duration.
pub(crate) fn rate(n: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_rank() {
        let p = Percentiles::of((1..=100).rev().map(f64::from).collect());
        assert_eq!(
            (p.samples, p.p50, p.p95, p.p99, p.max),
            (100, 50.0, 95.0, 99.0, 100.0)
        );
        let one = Percentiles::of(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(Percentiles::of(vec![]).samples, 0);
    }
}
