//! Operating the service: logs, health, readiness and metrics.
//!
//! - [`logs`]: the log subscriber (JSON or pretty).
//! - [`health`]: the shared state of the dependencies, and the database probe.
//! - [`heartbeat`]: the worker's row in `workers`, beaten every few seconds.
//! - [`identity`]: who this worker process is (a UUID made at start).
//! - [`http`]: `/healthz`, `/readyz` (and the router to add `/metrics` to).
//! - [`metrics`]: the Prometheus recorder and the store gauges for `/metrics`.

pub mod health;
pub mod heartbeat;
pub mod http;
pub mod identity;
pub mod logs;
pub mod metrics;
