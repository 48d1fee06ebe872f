//! Dead letters into PostgreSQL: every message of the dead-letter queue is
//! stored (or counted as seen again) and only then acked. While the
//! database is down the message is held and its write retried with
//! backoff: nothing is acked, nothing is lost. (Dead letters past their
//! retention are deleted by the pruner, `crate::prune`.)

use tokio_util::sync::CancellationToken;

use crate::broker::dlq_ingest::DeadLetterIngest;
use crate::domain::DeadLetterMessage;
use crate::retry::Reconnect;
use crate::store::Store;

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
