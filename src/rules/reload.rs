//! The rules in force, shared by every task, replaced whole on reload;
//! and the shadow rules, if any, reloaded with them.
//!
//! A reload builds the new [`Rules`] (and the new shadow rules) first and
//! swaps only when both are valid, so a file that fails validation leaves
//! the rules in force, and their shadow. A task holds the `Arc<Rules>` it
//! got from [`RulesHandle::current`] for one decision; a reload never
//! changes rules under a decision in progress.
//!
//! The shadow rules (`HOLDCLEAR_RULES_SHADOW_FILE`) decide nothing: for each
//! case decided, the engine records what they would have decided beside
//! what the rules in force did (`holdclear rules diff --shadow`).

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

/// Cheaply clonable handle to the rules in force (and their shadow).
#[derive(Clone, Debug)]
pub struct RulesHandle {
    inner: Arc<RwLock<InForce>>,
}

/// What a reload replaces, together.
#[derive(Debug)]
struct InForce {
    rules: Arc<Rules>,
    shadow: Option<Arc<Rules>>,
}

impl RulesHandle {
    /// A handle whose rules in force are `rules`, without shadow rules.
    pub fn new(rules: Rules) -> Self {
        Self::with_shadow(rules, None)
    }

    /// A handle whose rules in force are `rules`, shadowed by `shadow`
    /// (reloaded from its own file, [`Rules::file`]).
    pub fn with_shadow(rules: Rules, shadow: Option<Rules>) -> Self {
        Self {
            inner: Arc::new(RwLock::new(InForce {
                rules: Arc::new(rules),
                shadow: shadow.map(Arc::new),
            })),
        }
    }

    /// Loads the rules file and, if given, the shadow rules file: a
    /// mistake in either is a [`RulesError`] naming its file, rule and key.
    pub fn load(path: &Path, shadow: Option<&Path>) -> Result<Self, RulesError> {
        let rules = Rules::load(path)?;
        let shadow = shadow.map(Rules::load).transpose()?;
        Ok(Self::with_shadow(rules, shadow))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, InForce> {
        // The lock guards a pointer swap that cannot panic half-way, so a
        // poisoned lock still holds a consistent value.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The rules in force now.
    pub fn current(&self) -> Arc<Rules> {
        Arc::clone(&self.read().rules)
    }

    /// The shadow rules now, if there are any.
    pub fn shadow(&self) -> Option<Arc<Rules>> {
        self.read().shadow.clone()
    }

    /// Loads `path` (and the shadow rules again, from their file) and puts
    /// them in force; on error the rules in force and their shadow stay.
    pub fn reload(&self, path: &Path) -> Result<(), RulesError> {
        let rules = Arc::new(Rules::load(path)?);
        let shadow = match self.shadow() {
            Some(old) => Some(Arc::new(Rules::load(old.file())?)),
            None => None,
        };
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        *guard = InForce { rules, shadow };
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
                    let shadow = self.shadow().map(|s| s.hash().to_owned());
                    tracing::info!(
                        file = %path.display(),
                        rules = rules.len(),
                        hash = %rules.hash(),
                        shadow_hash = shadow.as_deref().unwrap_or("-"),
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
