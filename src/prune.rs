//! The pruner: built-in retention. Each table keeps its rows for its
//! retention setting ([`PruneSettings`]) and a pass deletes what is past
//! it, table after table, in slices of at most `slice` rows (one short
//! statement each, rows other transactions hold skipped) with a pause
//! between them, so that intake and the engine's claims never wait long.
//!
//! One worker of the deployment prunes at a time: a pass runs only while
//! it holds the store's advisory lock ([`Store::try_prune_session`]); a
//! worker that finds it taken skips its turn ([`Pass::Busy`]). `holdclear
//! run` passes every `interval`; `holdclear prune` runs one pass now.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::PruneSettings;
use crate::store::{Cutoffs, Prunable, PruneTable, Store, StoreError};

/// How a pass ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Every table is within its retention; rows deleted per table (a
    /// table kept for ever is not listed).
    Done(Vec<(PruneTable, u64)>),
    /// Another worker holds the lock: nothing was deleted.
    Busy,
    /// Stopped between two slices; what was deleted so far.
    Stopped(Vec<(PruneTable, u64)>),
}

/// Deletes rows past their retention (see the module's doc).
#[derive(Clone)]
pub struct Pruner {
    store: Store,
    settings: PruneSettings,
    worker: String,
}

impl Pruner {
    /// A pruner of `store` with `settings`; `worker` names it in the
    /// record of its passes.
    pub fn new(store: Store, settings: PruneSettings, worker: impl Into<String>) -> Self {
        Self {
            store,
            settings,
            worker: worker.into(),
        }
    }

    /// The cut-offs of a pass starting now.
    pub fn cutoffs(&self) -> Cutoffs {
        let now = Utc::now();
        let before = |keep: Option<Duration>| {
            keep.map(|d| {
                chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| now.checked_sub_signed(d))
                    .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
            })
        };
        let s = &self.settings;
        Cutoffs {
            outbox: before(s.outbox),
            inbox: before(s.inbox),
            cases: before(s.cases),
            escalated_cases: before(s.escalated_cases),
            dead_letters: before(s.dead_letters),
        }
    }

    /// What a pass would delete now, per table.
    pub async fn dry_run(&self) -> Result<Prunable, StoreError> {
        self.store.prunable(&self.cutoffs()).await
    }

    /// One pass, if no other worker is in one: each table's rows past its
    /// retention, a slice at a time; `progress` hears of every slice.
    /// Stops between two slices when `stop` fires. A failed statement ends
    /// the pass (its session closes, and the lock with it).
    pub async fn pass(
        &self,
        stop: &CancellationToken,
        progress: &mut (dyn FnMut(PruneTable, u64) + Send),
    ) -> Result<Pass, StoreError> {
        let Some(mut session) = self.store.try_prune_session().await? else {
            return Ok(Pass::Busy);
        };
        let cutoffs = self.cutoffs();
        let slice = i64::from(self.settings.slice);
        let mut deleted = Vec::new();
        for table in PruneTable::ALL.into_iter().filter(|t| cutoffs.prunes(*t)) {
            let mut total = 0;
            loop {
                let n = session.delete_slice(table, &cutoffs, slice).await?;
                total += n;
                metrics::counter!("holdclear_prune_deleted_total", "table" => table.as_str())
                    .increment(n);
                progress(table, n);
                // A short slice is the table's last, except for cases: the
                // merged cases a slice deleted may have freed the cases they
                // were merged into, so cases go on until a slice is empty.
                if n == 0 || ((n as i64) < slice && table != PruneTable::Cases) {
                    break;
                }
                tokio::select! {
                    () = stop.cancelled() => {
                        deleted.push((table, total));
                        session.release().await?;
                        return Ok(Pass::Stopped(deleted));
                    }
                    () = tokio::time::sleep(self.settings.pause) => {}
                }
            }
            deleted.push((table, total));
        }
        session.release().await?;
        self.store.record_prune_pass(&self.worker, &deleted).await?;
        Ok(Pass::Done(deleted))
    }

    /// `holdclear run`'s pruner: a pass now, then one every `interval`,
    /// until `stop` fires. A failed pass is logged and tried again at the
    /// next turn (the last successful one is on `/metrics`).
    pub async fn run(self, stop: CancellationToken) {
        loop {
            match self.pass(&stop, &mut |_, _| {}).await {
                Ok(Pass::Done(deleted)) => {
                    let total: u64 = deleted.iter().map(|(_, n)| n).sum();
                    if total > 0 {
                        let by_table = deleted
                            .iter()
                            .map(|(t, n)| format!("{}={n}", t.as_str()))
                            .collect::<Vec<_>>()
                            .join(" ");
                        tracing::info!(deleted = total, tables = %by_table, "Pruned rows past their retention.");
                    }
                }
                Ok(Pass::Busy) => {
                    tracing::debug!("Another worker is pruning; skipping this turn.")
                }
                Ok(Pass::Stopped(_)) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot prune; trying again at the next turn.")
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.settings.interval) => {}
            }
        }
    }
}
