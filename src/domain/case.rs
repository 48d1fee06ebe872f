//! A case: one held order being worked, its states and how it can end.

use std::fmt;

use serde::{Deserialize, Serialize};

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
