//! Liveness and readiness: what the worker depends on, and whether it is up.
//!
//! [`Health`] is shared: the consumer reports the broker, intake and the
//! database probe report the database. `/readyz` reads it (see [`super::http`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// Whether each dependency of the worker is usable right now.
#[derive(Debug, Default)]
pub struct Health {
    database: AtomicBool,
    broker: AtomicBool,
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

/// Longest a database probe may take before it counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes the database every `every` (connection and migrations, see
/// [`Store::ready`]) and reports it to `health`, until `cancel`.
pub async fn probe_database(
    store: Store,
    health: Arc<Health>,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        let ok = tokio::time::timeout(PROBE_TIMEOUT, store.ready())
            .await
            .unwrap_or(false);
        health.set_database(ok);
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
}
