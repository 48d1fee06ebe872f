//! Liveness and readiness: what the worker depends on, whether it is up,
//! and whether every task of the worker still runs.
//!
//! [`Health`] is shared: the consumer reports the broker, intake and the
//! database probe report the database, the worker's supervisor reports a
//! task that died. `/readyz` and `/healthz` read it (see [`super::http`]).

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::store::{Probe, Store};

/// Whether each dependency of the worker is usable right now, and the
/// first task of the worker that stopped when it should not have.
#[derive(Debug, Default)]
pub struct Health {
    database: AtomicBool,
    broker: AtomicBool,
    failure: Mutex<Option<TaskFailure>>,
}

/// A long-running task of the worker that ended or panicked before the
/// worker was asked to stop (`/healthz` answers 503 with it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskFailure {
    /// Which task: `engine`, `committer`, `relay`, `consumer`, `intake`,
    /// `database probe`, `rules reload`, `health server`.
    pub task: &'static str,
    /// How it ended: `it returned`, or `it panicked: <message>`.
    pub error: String,
}

/// The message of a panic's payload (`panic!("…")`), or a placeholder.
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// A snapshot of [`Health`], as `/readyz` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// True when every dependency is up.
    pub ready: bool,
    /// The dependencies that are down: `database`, `broker`.
    pub down: Vec<&'static str>,
}

impl Health {
    /// Everything down until reported up.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Reports whether the database answers with every migration applied.
    /// A change is logged (WARN when it goes down, INFO when it is back).
    pub fn set_database(&self, ok: bool) {
        if self.database.swap(ok, Ordering::AcqRel) != ok {
            if ok {
                tracing::info!(dependency = "database", "Database reachable.");
            } else {
                tracing::warn!(dependency = "database", "Database unreachable; not ready.");
            }
        }
    }

    /// Reports whether the held-order consumer is connected to RabbitMQ.
    pub fn set_broker(&self, ok: bool) {
        if self.broker.swap(ok, Ordering::AcqRel) != ok {
            if ok {
                tracing::info!(dependency = "broker", "RabbitMQ connected.");
            } else {
                tracing::warn!(dependency = "broker", "RabbitMQ disconnected; not ready.");
            }
        }
    }

    /// Records that `task` stopped when it should not have; the first
    /// failure is kept. `true` when this one is the first.
    pub fn task_failed(&self, task: &'static str, error: impl Into<String>) -> bool {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_some() {
            return false;
        }
        *failure = Some(TaskFailure {
            task,
            error: error.into(),
        });
        true
    }

    /// The first task that stopped when it should not have, if any.
    pub fn failure(&self) -> Option<TaskFailure> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// True when the database is reported up.
    pub fn database(&self) -> bool {
        self.database.load(Ordering::Acquire)
    }

    /// True when the broker is reported up.
    pub fn broker(&self) -> bool {
        self.broker.load(Ordering::Acquire)
    }

    /// Which dependencies are down.
    pub fn readiness(&self) -> Readiness {
        let mut down = Vec::new();
        if !self.database() {
            down.push("database");
        }
        if !self.broker() {
            down.push("broker");
        }
        Readiness {
            ready: down.is_empty(),
            down,
        }
    }
}

/// Longest a database probe may take before it counts as down (or busy).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes the database every `every` (connection and migrations, see
/// [`Store::probe`]) and reports it to `health`, until `cancel`.
///
/// A busy pool (every connection in use, none free in time) is not a
/// database that is down: the state in force is kept, so `/readyz` does
/// not flap under load. Busy for longer than `busy_limit` (the statement
/// timeout plus the acquire timeout: no connection is held that long by
/// one statement) counts as down: the connections are stuck.
pub async fn probe_database(
    store: Store,
    health: Arc<Health>,
    every: Duration,
    busy_limit: Duration,
    cancel: CancellationToken,
) {
    let mut busy_since: Option<Instant> = None;
    loop {
        match store.probe(PROBE_TIMEOUT).await {
            Probe::Ready => {
                busy_since = None;
                health.set_database(true);
            }
            Probe::Busy => {
                let since = *busy_since.get_or_insert_with(Instant::now);
                if since.elapsed() > busy_limit {
                    tracing::warn!(
                        busy_s = since.elapsed().as_secs(),
                        "No database connection came free for longer than a statement may run."
                    );
                    health.set_database(false);
                } else {
                    tracing::debug!("The database pool is busy; readiness unchanged.");
                }
            }
            Probe::Unmigrated | Probe::Down => {
                busy_since = None;
                health.set_database(false);
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_down() {
        let h = Health::new();
        assert_eq!(h.readiness().down, ["database", "broker"]);
        h.set_broker(true);
        assert_eq!(
            h.readiness(),
            Readiness {
                ready: false,
                down: vec!["database"]
            }
        );
        h.set_database(true);
        assert!(h.readiness().ready);
        h.set_broker(false);
        assert_eq!(h.readiness().down, ["broker"]);
    }

    #[test]
    fn the_first_task_failure_is_kept() {
        let h = Health::new();
        assert_eq!(h.failure(), None);
        assert!(h.task_failed("relay", "it returned"));
        assert!(!h.task_failed("engine", "it panicked: boom"));
        assert_eq!(
            h.failure(),
            Some(TaskFailure {
                task: "relay",
                error: "it returned".into()
            })
        );
        let payload: Box<dyn Any + Send> = Box::new(format!("boom {}", 1));
        assert_eq!(panic_message(&*payload), "boom 1");
        let payload: Box<dyn Any + Send> = Box::new("static");
        assert_eq!(panic_message(&*payload), "static");
        let payload: Box<dyn Any + Send> = Box::new(7_u8);
        assert_eq!(panic_message(&*payload), "a panic without a message");
    }
}
