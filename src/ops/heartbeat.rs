//! The worker's heartbeat: its row in the `workers` table, written at start
//! and every [`BEAT_EVERY`], marked stopped on a graceful exit. The console
//! tells from it which workers are up, which stopped and which were lost
//! (no beat for [`LOST_AFTER`], no stop: killed, or cut off from the
//! database), whether or not they are busy.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::health::Health;
use super::identity::WorkerIdentity;
use crate::store::{Beat, Store};

/// How often a worker beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(10);

/// A worker without a beat for this long, and not stopped, is lost.
pub const LOST_AFTER: Duration = Duration::from_secs(35);

/// Beats for `identity` until `stop`, then marks it stopped. A failed beat
/// is logged at debug (the database probe reports the database) and the
/// next one tries again.
pub async fn beat(
    store: Store,
    identity: WorkerIdentity,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let host = identity.host().to_owned();
    loop {
        let beat = Beat {
            id: identity.id(),
            host: &host,
            pid: identity.pid(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: identity.started_at(),
            ready: health.readiness().ready,
        };
        if let Err(e) = store.beat(&beat).await {
            tracing::debug!(error = %e, "The heartbeat was not written; trying again.");
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(BEAT_EVERY) => {}
        }
    }
    if let Err(e) = store.worker_stopped(identity.id()).await {
        tracing::debug!(error = %e, "The stop was not written; the worker will show as lost.");
    }
}
