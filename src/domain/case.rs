//! A case: one held order being worked, its states, how it can end, and
//! the lines of its history.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::account::{AccountType, Assignment, Target};
use super::event::HeldOrderEvent;
use super::values::{OrderId, SalesOrderNumber};

/// Where a case stands. `Released`, `Escalated` and `Merged` are terminal; a
/// case that escalated with `HOLD_PERSISTS` stays `Watching`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaseState {
    /// Apply the rules.
    Deciding,
    /// Find the Smart Account and the Virtual Account.
    Resolving,
    /// Send the assignment.
    Assigning,
    /// Read the order until the Smart Account hold is released.
    Watching,
    /// The hold was released (terminal).
    Released,
    /// A person must act (terminal).
    Escalated,
    /// The order turned out to have another open case (it was first known by
    /// another id); this one was joined into it and ends here (terminal).
    Merged,
}

impl CaseState {
    /// Every state, in the order a case moves through them.
    pub const ALL: [Self; 7] = [
        Self::Deciding,
        Self::Resolving,
        Self::Assigning,
        Self::Watching,
        Self::Released,
        Self::Escalated,
        Self::Merged,
    ];

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deciding => "deciding",
            Self::Resolving => "resolving",
            Self::Assigning => "assigning",
            Self::Watching => "watching",
            Self::Released => "released",
            Self::Escalated => "escalated",
            Self::Merged => "merged",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// No more steps.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Released | Self::Escalated | Self::Merged)
    }
}

impl fmt::Display for CaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How urgent an escalation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscalationLevel {
    /// Look at it soon.
    Warning,
    /// Look at it now.
    Critical,
}

impl EscalationLevel {
    /// `warning` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

impl std::str::FromStr for EscalationLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "warning" => Ok(Self::Warning),
            "critical" => Ok(Self::Critical),
            other => Err(format!("{other:?} is neither warning nor critical")),
        }
    }
}

impl fmt::Display for EscalationLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a person must act (the `reason` of `order.hold_escalated`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EscalationReason {
    /// No default rule covers the order.
    NoRuleMatched,
    /// The rule's account does not exist.
    SmartAccountNotFound,
    /// The account is PENDING/INACTIVE and no fallback applies.
    SmartAccountNotActive,
    /// The named Virtual Account is missing or not PUBLIC.
    VirtualAccountNotFound,
    /// 403/404 on the order.
    OrderNotAccessible,
    /// 409: past Booked, stocking or EA order.
    AssignmentLocked,
    /// Any other permanent refusal.
    AssignmentRejected,
    /// Transient failures outlasted the retry budget.
    RetriesExhausted,
    /// Assigned to an ACTIVE account, hold still on after the configured time.
    HoldPersists,
    /// More than one ACTIVE account (or order, for a web order id) matches exactly.
    AmbiguousMatch,
}

impl EscalationReason {
    /// Every reason, for metrics and docs.
    pub const ALL: [Self; 10] = [
        Self::NoRuleMatched,
        Self::SmartAccountNotFound,
        Self::SmartAccountNotActive,
        Self::VirtualAccountNotFound,
        Self::OrderNotAccessible,
        Self::AssignmentLocked,
        Self::AssignmentRejected,
        Self::RetriesExhausted,
        Self::HoldPersists,
        Self::AmbiguousMatch,
    ];

    /// The contract's code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRuleMatched => "NO_RULE_MATCHED",
            Self::SmartAccountNotFound => "SMART_ACCOUNT_NOT_FOUND",
            Self::SmartAccountNotActive => "SMART_ACCOUNT_NOT_ACTIVE",
            Self::VirtualAccountNotFound => "VIRTUAL_ACCOUNT_NOT_FOUND",
            Self::OrderNotAccessible => "ORDER_NOT_ACCESSIBLE",
            Self::AssignmentLocked => "ASSIGNMENT_LOCKED",
            Self::AssignmentRejected => "ASSIGNMENT_REJECTED",
            Self::RetriesExhausted => "RETRIES_EXHAUSTED",
            Self::HoldPersists => "HOLD_PERSISTS",
            Self::AmbiguousMatch => "AMBIGUOUS_MATCH",
        }
    }

    /// Parses the contract's code.
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == raw)
    }

    /// One sentence telling the operator what to do.
    pub fn action(self) -> &'static str {
        match self {
            Self::NoRuleMatched => {
                "Assign the Smart Account by hand or add a default rule that covers this order."
            }
            Self::SmartAccountNotFound => {
                "Check the rule's Smart Account, or ask the customer which account to use."
            }
            Self::SmartAccountNotActive => {
                "Ask the customer to activate their Smart Account, then run `holdclear cases retry`."
            }
            Self::VirtualAccountNotFound => {
                "Fix the rule's virtual account: it must exist and be PUBLIC."
            }
            Self::OrderNotAccessible => {
                "Check whether the order was fulfilled; if so, open a support case."
            }
            Self::AssignmentLocked => {
                "Open a support case: the order no longer takes a Smart Account assignment."
            }
            Self::AssignmentRejected => "Read the detail: the commerce API refused the assignment.",
            Self::RetriesExhausted => {
                "Check the commerce API and the credentials, then run `holdclear cases retry`."
            }
            Self::HoldPersists => {
                "Open a licensing support case (SCM): the hold stayed on after a valid assignment."
            }
            Self::AmbiguousMatch => {
                "Pick the right account (or order) from the detail and assign it by hand; make the rule more specific."
            }
        }
    }
}

impl fmt::Display for EscalationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the rules decided for one held order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Name of the rule that matched.
    pub rule: String,
    /// SHA-256 (hex) of the rules file content the decision was made with.
    pub rules_hash: String,
    /// What to assign.
    pub target: Target,
    /// What to assign when the target's account is missing or not ACTIVE.
    pub fallback: Option<Target>,
}

/// The resolved target: what is (or was) assigned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedTarget {
    /// The chosen account's domain.
    pub smart_account_domain: String,
    /// Customer or holding account.
    pub account_type: AccountType,
    /// The chosen Virtual Account; `None` when nothing needed assigning (the
    /// pending account of the hold turned ACTIVE).
    pub virtual_account_name: Option<String>,
    /// The rule's fallback target was used.
    pub via_fallback: bool,
}

impl ResolvedTarget {
    /// The assignment to send, if one is needed.
    pub fn assignment(&self) -> Option<Assignment> {
        Some(Assignment {
            smart_account_domain: self.smart_account_domain.clone(),
            account_type: self.account_type,
            virtual_account_name: self.virtual_account_name.clone()?,
        })
    }
}

/// An accepted assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The assignment's id.
    pub id: String,
    /// When it was accepted.
    pub at: DateTime<Utc>,
}

/// What a case had reached when it ended (kept for the operator, and for
/// `holdclear cases retry` to resume from).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    /// What the rules decided.
    pub decision: Option<Decision>,
    /// The resolved account, type and Virtual Account.
    pub target: Option<ResolvedTarget>,
    /// Idempotency-Key of the assignment.
    pub idempotency_key: Option<String>,
    /// The accepted assignment.
    pub assignment: Option<Accepted>,
    /// When the last watch began.
    pub watching_since: Option<DateTime<Utc>>,
}

/// Where a case stands, with what that stage needs ([`Stage::state`] is
/// the plain [`CaseState`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Stage {
    /// Apply the rules.
    Deciding,
    /// Find the Smart Account and the Virtual Account.
    Resolving {
        /// What the rules decided.
        decision: Decision,
    },
    /// Send the assignment.
    Assigning {
        /// What the rules decided.
        decision: Decision,
        /// The order (known by its sales order number by now).
        order: SalesOrderNumber,
        /// What to assign.
        assignment: Assignment,
        /// The rule's fallback target is used.
        via_fallback: bool,
        /// Idempotency-Key of the assignment.
        key: String,
    },
    /// Read the order until the Smart Account hold is released.
    Watching {
        /// What the rules decided.
        decision: Option<Decision>,
        /// What is assigned.
        target: ResolvedTarget,
        /// Idempotency-Key of the assignment, if one was sent.
        key: Option<String>,
        /// The accepted assignment, if one was needed.
        assignment: Option<Accepted>,
        /// When the watch began.
        since: DateTime<Utc>,
    },
    /// The hold was released (terminal).
    Released {
        /// What the case had reached.
        progress: Progress,
        /// When the hold was released.
        released_at: DateTime<Utc>,
        /// When the case closed.
        closed_at: DateTime<Utc>,
    },
    /// A person must act (terminal).
    Escalated {
        /// The contract's reason code, as `order.hold_escalated` said it.
        reason: EscalationReason,
        /// What the case had reached.
        progress: Progress,
        /// When the case closed.
        closed_at: DateTime<Utc>,
    },
    /// Joined into another case of the same order (terminal).
    Merged {
        /// What the case had reached.
        progress: Progress,
        /// When the case closed.
        closed_at: Option<DateTime<Utc>>,
    },
}

impl Stage {
    /// The plain state (the stored `state` column).
    pub fn state(&self) -> CaseState {
        match self {
            Self::Deciding => CaseState::Deciding,
            Self::Resolving { .. } => CaseState::Resolving,
            Self::Assigning { .. } => CaseState::Assigning,
            Self::Watching { .. } => CaseState::Watching,
            Self::Released { .. } => CaseState::Released,
            Self::Escalated { .. } => CaseState::Escalated,
            Self::Merged { .. } => CaseState::Merged,
        }
    }

    /// What the case has reached so far, whatever its stage.
    pub fn progress(&self) -> Progress {
        match self {
            Self::Deciding => Progress::default(),
            Self::Resolving { decision } => Progress {
                decision: Some(decision.clone()),
                ..Progress::default()
            },
            Self::Assigning {
                decision,
                assignment,
                via_fallback,
                key,
                ..
            } => Progress {
                decision: Some(decision.clone()),
                target: Some(ResolvedTarget {
                    smart_account_domain: assignment.smart_account_domain.clone(),
                    account_type: assignment.account_type,
                    virtual_account_name: Some(assignment.virtual_account_name.clone()),
                    via_fallback: *via_fallback,
                }),
                idempotency_key: Some(key.clone()),
                ..Progress::default()
            },
            Self::Watching {
                decision,
                target,
                key,
                assignment,
                since,
            } => Progress {
                decision: decision.clone(),
                target: Some(target.clone()),
                idempotency_key: key.clone(),
                assignment: assignment.clone(),
                watching_since: Some(*since),
            },
            Self::Released { progress, .. }
            | Self::Escalated { progress, .. }
            | Self::Merged { progress, .. } => progress.clone(),
        }
    }

    /// What the rules decided, if they did (and it is still current).
    pub fn decision(&self) -> Option<&Decision> {
        match self {
            Self::Deciding => None,
            Self::Resolving { decision } | Self::Assigning { decision, .. } => Some(decision),
            Self::Watching { decision, .. } => decision.as_ref(),
            Self::Released { progress, .. }
            | Self::Escalated { progress, .. }
            | Self::Merged { progress, .. } => progress.decision.as_ref(),
        }
    }

    /// Why the case escalated (terminal), if it did.
    pub fn escalation_reason(&self) -> Option<EscalationReason> {
        match self {
            Self::Escalated { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// When the hold was released, if it was.
    pub fn released_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Self::Released { released_at, .. } => Some(*released_at),
            _ => None,
        }
    }

    /// When the case reached a terminal state.
    pub fn closed_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Self::Released { closed_at, .. } | Self::Escalated { closed_at, .. } => {
                Some(*closed_at)
            }
            Self::Merged { closed_at, .. } => *closed_at,
            _ => None,
        }
    }
}

/// One case as the engine sees it (a row of `cases`).
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// Case id.
    pub id: Uuid,
    /// The order; the sales order number is filled in once learned.
    pub order: OrderId,
    /// The event that opened the case.
    pub event: HeldOrderEvent,
    /// Where the case stands, with what that stage needs.
    pub stage: Stage,
    /// When the hold was applied (the event's `heldAt`, else its arrival).
    pub held_at: DateTime<Utc>,
    /// Transient failures in the current streak.
    pub attempt: u32,
    /// First transient failure of the current streak.
    pub retry_since: Option<DateTime<Utc>>,
    /// Looks at the order since the watch began.
    pub polls: u32,
    /// `HOLD_PERSISTS` thresholds already emitted.
    pub escalation_level: u32,
    /// Re-runs by `holdclear cases retry`.
    pub generation: u32,
    /// When the case is next due; `None` exactly when it is terminal.
    pub next_action_at: Option<DateTime<Utc>>,
}

impl Case {
    /// The number an operator knows the order by: the sales order number,
    /// else the web order id.
    pub fn subject(&self) -> String {
        match (&self.order.sales_order_number, &self.order.web_order_id) {
            (Some(so), _) => so.to_string(),
            (None, Some(web)) => web.to_string(),
            (None, None) => self.order.key(),
        }
    }

    /// Where the case stands (the plain state).
    pub fn state(&self) -> CaseState {
        self.stage.state()
    }

    /// The rule that decided the case, if any.
    pub fn rule(&self) -> Option<&str> {
        self.stage.decision().map(|d| d.rule.as_str())
    }

    /// Seconds from the hold to `at` (never negative).
    pub fn held_seconds(&self, at: DateTime<Utc>) -> i64 {
        (at - self.held_at).num_seconds().max(0)
    }
}

/// One line of a case's history.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// `call`, `decided`, `resolved`, `assigned`, `still_held`, `released`,
    /// `escalated`, `retry_scheduled`, `retry`, `event` (rows written before
    /// the stage carried its data may also hold `redecide`).
    pub kind: &'static str,
    /// The case's state after this entry.
    pub state: CaseState,
    /// What the entry says, by kind (the call and its reply, the rule and
    /// its hash, the target and key, the reason …): what `cases show` prints.
    pub detail: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_reads_back_and_tells_the_operator_what_to_do() {
        for reason in EscalationReason::ALL {
            assert_eq!(EscalationReason::parse(reason.as_str()), Some(reason));
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::json!(reason.as_str())
            );
            let action = reason.action();
            assert!(action.ends_with('.'), "{reason}: {action}");
        }
        assert_eq!(
            EscalationReason::parse("AMBIGUOUS_MATCH"),
            Some(EscalationReason::AmbiguousMatch)
        );
    }
}
