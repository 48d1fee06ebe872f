//! The rules in force, shared by every task, replaced whole on reload.
//!
//! A reload builds the new [`Rules`] first and swaps only on success, so a
//! file that fails validation leaves the rules in force. A task holds the
//! `Arc<Rules>` it got from [`RulesHandle::current`] for one decision; a
//! reload never changes rules under a decision in progress.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::{Rules, RulesError};

/// Listens for SIGHUP from now on: a SIGHUP no longer terminates the
/// process, and each one that arrives (several before a read count as one)
/// waits in the stream until [`RulesHandle::reload_on_sighup`] reads it.
/// Must be called inside a tokio runtime.
pub fn listen_for_hangups() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}

/// Cheaply clonable handle to the rules in force.
#[derive(Clone, Debug)]
pub struct RulesHandle {
    inner: Arc<RwLock<Arc<Rules>>>,
}

impl RulesHandle {
    /// A handle whose rules in force are `rules`.
    pub fn new(rules: Rules) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Arc::new(rules))),
        }
    }

    /// The rules in force now.
    pub fn current(&self) -> Arc<Rules> {
        // The lock guards a pointer swap that cannot panic half-way, so a
        // poisoned lock still holds a consistent value.
        let guard = self.inner.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&guard)
    }

    /// Loads `path` and puts it in force; on error the rules in force stay.
    pub fn reload(&self, path: &Path) -> Result<(), RulesError> {
        let rules = Arc::new(Rules::load(path)?);
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        *guard = rules;
        Ok(())
    }

    /// Reloads `path` on every SIGHUP that `hangups` hears until `cancel`
    /// fires: INFO with the rule count and hash on success, ERROR with the
    /// reason on failure (the rules in force stay).
    ///
    /// `hangups` must listen from before the rules in force were read (see
    /// [`listen_for_hangups`]): a SIGHUP that arrives before this task runs
    /// then waits in it and is a reload, never lost.
    pub async fn reload_on_sighup(
        self,
        path: PathBuf,
        mut hangups: Signal,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                }
            }
            let handle = self.clone();
            let file = path.clone();
            let result = tokio::task::spawn_blocking(move || handle.reload(&file)).await;
            match result {
                Ok(Ok(())) => {
                    let rules = self.current();
                    tracing::info!(
                        file = %path.display(),
                        rules = rules.len(),
                        hash = %rules.hash(),
                        "Rules reloaded."
                    );
                }
                Ok(Err(e)) => {
                    let kept = self.current();
                    tracing::error!(
                        error = %e,
                        kept_hash = %kept.hash(),
                        "Rules reload failed; the rules in force are kept."
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "Rules reload task failed; the rules in force are kept.");
                }
            }
        }
    }
}
