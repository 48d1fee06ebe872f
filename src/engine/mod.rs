//! The case engine: the state machine and the scheduler that steps due cases.
//!
//! - [`machine`]: pure transitions: (case, replies) → next call or outcome;
//!   (case, outcome) → new columns, history, events, next due time.
//! - [`Engine`]: claims due cases in batches under a lease, steps them
//!   concurrently (bounded), commits each step in one transaction.
//!
//! One held order through the engine: `deciding` (rules) → `resolving`
//! (account, status, Virtual Account) → `assigning` (one POST with a stable
//! Idempotency-Key) → `watching` (read the order, backing off) →
//! `released`, or `escalated` from any step when a person must act.
//! - [`HandWatcher`]: escalated cases watched slowly until a person
//!   releases the hold by hand (off by default).

mod hand_watch;
pub mod machine;
mod scheduler;

use crate::domain::{Case, Decision, HeldOrder};
use crate::store::StoreError;

pub use hand_watch::{HandWatcher, LOOKS_PER_ROUND};
pub use machine::MachineError;
pub use scheduler::{Engine, EngineTasks};

/// Where the engine gets its decisions: the operator's rules in production
/// (`RulesHandle`), anything deterministic in tests.
pub trait DecisionSource: Send + Sync + 'static {
    /// The decision for one held order; `None` when no rule matches.
    fn decide(&self, order: &HeldOrder) -> Option<Decision>;

    /// What the shadow rules would decide for the order, when there are
    /// shadow rules. Recorded in the case's history, never acted on.
    fn shadow(&self, _order: &HeldOrder) -> Option<ShadowDecision> {
        None
    }
}

/// What the shadow rules (`HOLDCLEAR_RULES_SHADOW_FILE`) would have decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowDecision {
    /// The shadow rules file.
    pub file: String,
    /// SHA-256 of its content.
    pub rules_hash: String,
    /// Their decision; `None`: no shadow rule matches.
    pub decision: Option<Decision>,
}

/// The rules in force at the moment of the decision (a reload never
/// changes them under a decision in progress), and their shadow.
impl DecisionSource for crate::rules::RulesHandle {
    fn decide(&self, order: &HeldOrder) -> Option<Decision> {
        self.current().decide(order)
    }

    fn shadow(&self, order: &HeldOrder) -> Option<ShadowDecision> {
        let shadow = crate::rules::RulesHandle::shadow(self)?;
        Some(ShadowDecision {
            file: shadow.file().display().to_string(),
            rules_hash: shadow.hash().to_owned(),
            decision: shadow.decide(order),
        })
    }
}

impl<F> DecisionSource for F
where
    F: Fn(&HeldOrder) -> Option<Decision> + Send + Sync + 'static,
{
    fn decide(&self, order: &HeldOrder) -> Option<Decision> {
        self(order)
    }
}

/// What can go wrong re-running a case (`holdclear cases retry`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No case for this order.
    #[error("no case for order {0}")]
    NoCase(String),
    /// The case is not escalated; only escalated cases are re-run.
    #[error(
        "the case of order {order} is {state}, not escalated: only escalated cases can be retried"
    )]
    NotEscalated {
        /// The order.
        order: String,
        /// Its case's state.
        state: crate::domain::CaseState,
    },
    /// Another case of the order is open.
    #[error("another case of order {order} is open ({case}): let it finish first")]
    OtherOpen {
        /// The order.
        order: String,
        /// The open case.
        case: String,
    },
    /// The case changed while it was being re-opened (another retry).
    #[error("the case of order {0} changed meanwhile; look at it again")]
    Changed(String),
}

/// Re-opens the latest case of `order` after a person fixed its cause: from
/// `deciding`, or where it stood if an assignment may already exist (see
/// [`machine::retry`]). Returns the re-opened case.
#[tracing::instrument(skip_all, fields(order = %order))]
pub async fn retry_case(store: &crate::store::Store, order: &str) -> Result<Case, EngineError> {
    use crate::store::RetryCommit;
    let record = store
        .latest_case(order)
        .await?
        .ok_or_else(|| EngineError::NoCase(order.to_owned()))?;
    if let Some(open) = store
        .other_open_case(
            &record.order_key,
            record.case.order.web_order_id.as_ref().map(|w| w.as_str()),
            record.case.id,
        )
        .await?
    {
        return Err(EngineError::OtherOpen {
            order: order.to_owned(),
            case: open.to_string(),
        });
    }
    let transition = machine::retry(&record.case, chrono::Utc::now()).map_err(|_| {
        EngineError::NotEscalated {
            order: order.to_owned(),
            state: record.case.state(),
        }
    })?;
    match store
        .commit_retry(&record.case, &transition.case, &transition.history)
        .await?
    {
        RetryCommit::Reopened => {
            tracing::info!(
                order = %order,
                case = %transition.case.id,
                state = %transition.case.state(),
                generation = transition.case.generation,
                "Case re-opened."
            );
            Ok(transition.case)
        }
        RetryCommit::Changed => Err(EngineError::Changed(order.to_owned())),
        RetryCommit::OtherOpen => Err(EngineError::OtherOpen {
            order: order.to_owned(),
            case: "another case".into(),
        }),
    }
}
