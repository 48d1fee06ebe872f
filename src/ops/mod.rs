//! Operating the service: logs, health, readiness and metrics.
//!
//! - [`logs`]: the log subscriber (JSON or pretty).
//! - [`health`]: the shared state of the dependencies, and the database probe.
//! - [`http`]: `/healthz`, `/readyz` (and the router to add `/metrics` to).

pub mod health;
pub mod http;
pub mod logs;
