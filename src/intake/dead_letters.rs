//! Dead letters into PostgreSQL: every message of the dead-letter queue is
//! stored (or counted as seen again) and only then acked. While the
//! database is down the message is held and its write retried with
//! backoff: nothing is acked, nothing is lost. A bounded prune deletes
//! archived and replayed dead letters past their retention, a small slice
//! at a time.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::broker::dlq_ingest::DeadLetterIngest;
use crate::domain::DeadLetterMessage;
use crate::retry::Reconnect;
use crate::store::Store;

/// Dead letters deleted by one prune statement, at most.
pub const PRUNE_SLICE: i64 = 500;
/// Pause between prune passes when nothing was left to delete.
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Consumes the dead-letter queue into the store until `stop` fires.
pub async fn ingest(store: Store, ingest: DeadLetterIngest, stop: CancellationToken) {
    let run_stop = stop.clone();
    ingest
        .run(
            move |msg| {
                let store = store.clone();
                let stop = stop.clone();
                async move { store_until_done(&store, &msg, &stop).await }
            },
            run_stop,
        )
        .await;
}

/// Writes `msg`, retrying while the database fails; false when `stop`
/// fired first (the message stays unacked).
async fn store_until_done(
    store: &Store,
    msg: &DeadLetterMessage,
    stop: &CancellationToken,
) -> bool {
    let mut delays = Reconnect::default();
    loop {
        match store.record_dead_letter(msg).await {
            Ok(r) => {
                metrics::counter!("holdclear_dead_letters_ingested_total", "code" => msg.code.clone())
                    .increment(1);
                tracing::info!(
                    dead_letter = r.id,
                    code = %msg.code,
                    new = r.new,
                    seen_again = r.sighted && !r.new,
                    "Dead letter stored."
                );
                return true;
            }
            Err(e) => {
                let delay = delays.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "Cannot store a dead letter; holding it and retrying.");
                tokio::select! {
                    () = stop.cancelled() => return false,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Deletes archived and replayed dead letters older than `retention`, in
/// slices of [`PRUNE_SLICE`], until `stop` fires.
pub async fn prune(store: Store, retention: Duration, stop: CancellationToken) {
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    loop {
        let before = Utc::now()
            .checked_sub_signed(retention)
            .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
        let pause = match store.prune_dead_letters(before, before, PRUNE_SLICE).await {
            Ok(n) if n as i64 == PRUNE_SLICE => Duration::from_millis(200),
            Ok(n) => {
                if n > 0 {
                    tracing::info!(deleted = n, "Pruned dead letters past their retention.");
                }
                PRUNE_EVERY
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot prune dead letters; trying again later.");
                PRUNE_EVERY
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
