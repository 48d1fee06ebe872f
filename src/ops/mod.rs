//! Operating the service: logs, health, readiness and metrics.

pub mod logs;
pub mod metrics;
