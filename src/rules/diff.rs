//! What-if: the same orders through two rule sets, and every order whose
//! decision would change. Pure: the caller feeds the orders (`rules diff`
//! streams them from the store).

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::Rules;
use crate::domain::{Decision, HeldOrder, Target};

/// How one order's decision would change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Another rule would decide.
    Rule,
    /// The same rule, another target or fallback (the rule was edited).
    Target,
    /// No rule would match any more: the order would escalate `NO_RULE_MATCHED`.
    NewlyUnmatched,
    /// A rule would match an order that matched none.
    NewlyMatched,
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rule => "rule changes",
            Self::Target => "target changes",
            Self::NewlyUnmatched => "newly unmatched",
            Self::NewlyMatched => "newly matched",
        })
    }
}

/// One side of a change: the rule and what it assigns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Choice {
    /// The rule that matches.
    pub rule: String,
    /// What it assigns.
    pub target: Target,
    /// What it assigns when the target's account is missing or not ACTIVE.
    pub fallback: Option<Target>,
}

impl Choice {
    fn of(d: Decision) -> Self {
        Self {
            rule: d.rule,
            target: d.target,
            fallback: d.fallback,
        }
    }
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} → {}", self.rule, self.target)?;
        if let Some(fb) = &self.fallback {
            write!(f, ", fallback {fb}")?;
        }
        Ok(())
    }
}

/// One order whose decision would change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The order (its key).
    pub order: String,
    /// What changes.
    pub kind: ChangeKind,
    /// With the rules in force; `None`: no rule matched.
    pub old: Option<Choice>,
    /// With the new rules; `None`: no rule would match.
    pub new: Option<Choice>,
}

/// How many orders make one change (kind, old rule → new rule).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChangeCount {
    /// What changes.
    pub kind: ChangeKind,
    /// The rule in force; `None`: no rule.
    pub old_rule: Option<String>,
    /// The new rule; `None`: no rule.
    pub new_rule: Option<String>,
    /// How many orders.
    pub orders: u64,
}

/// A stored order that could not be replayed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unreplayable {
    /// The order (its key).
    pub order: String,
    /// The id of the case whose stored event was replayed.
    pub case_id: String,
    /// Why its event cannot be read.
    pub reason: String,
}

/// The result of a what-if over many orders.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WhatIfReport {
    /// Orders replayed through both rule sets.
    pub replayed: u64,
    /// Of those, orders whose decision would not change.
    pub unchanged: u64,
    /// Per change, most orders first.
    pub counts: Vec<ChangeCount>,
    /// Every order whose decision would change, in the order fed.
    pub changes: Vec<Change>,
    /// Stored orders whose event could not be read, so not replayed.
    pub unreadable: Vec<Unreplayable>,
}

impl WhatIfReport {
    /// Orders that would newly match no rule.
    pub fn newly_unmatched(&self) -> impl Iterator<Item = &Change> {
        self.changes
            .iter()
            .filter(|c| c.kind == ChangeKind::NewlyUnmatched)
    }
}

/// Replays orders through the rules in force (`old`) and `new`.
#[derive(Debug)]
pub struct WhatIf<'a> {
    old: &'a Rules,
    new: &'a Rules,
    tally: Differences,
}

impl<'a> WhatIf<'a> {
    /// A what-if from the rules in force to `new`.
    pub fn new(old: &'a Rules, new: &'a Rules) -> Self {
        Self {
            old,
            new,
            tally: Differences::default(),
        }
    }

    /// Replays one order; `key` names it in the report.
    pub fn replay(&mut self, key: &str, order: &HeldOrder) {
        let old = self.old.decide(order);
        let new = self.new.decide(order);
        self.tally.record(key, old, new);
    }

    /// Records a stored order whose event cannot be read.
    pub fn unreadable(&mut self, key: &str, case_id: &str, reason: &str) {
        self.tally.unreadable(key, case_id, reason);
    }

    /// The report.
    pub fn finish(self) -> WhatIfReport {
        self.tally.finish()
    }
}

/// Two decisions per order, made elsewhere (the rules in force and the
/// shadow rules, recorded live), tallied into a [`WhatIfReport`].
#[derive(Debug, Default)]
pub struct Differences {
    report: WhatIfReport,
    counts: BTreeMap<(ChangeKind, Option<String>, Option<String>), u64>,
}

impl Differences {
    /// Records one order's two decisions; `key` names it in the report.
    pub fn record(&mut self, key: &str, old: Option<Decision>, new: Option<Decision>) {
        self.report.replayed += 1;
        let old = old.map(Choice::of);
        let new = new.map(Choice::of);
        let kind = match (&old, &new) {
            (None, None) => None,
            (Some(_), None) => Some(ChangeKind::NewlyUnmatched),
            (None, Some(_)) => Some(ChangeKind::NewlyMatched),
            (Some(o), Some(n)) if o.rule != n.rule => Some(ChangeKind::Rule),
            (Some(o), Some(n)) if o != n => Some(ChangeKind::Target),
            (Some(_), Some(_)) => None,
        };
        let Some(kind) = kind else {
            self.report.unchanged += 1;
            return;
        };
        let rule = |c: &Option<Choice>| c.as_ref().map(|c| c.rule.clone());
        *self
            .counts
            .entry((kind, rule(&old), rule(&new)))
            .or_default() += 1;
        self.report.changes.push(Change {
            order: key.to_owned(),
            kind,
            old,
            new,
        });
    }

    /// Records an order whose decisions cannot be read.
    pub fn unreadable(&mut self, key: &str, case_id: &str, reason: &str) {
        self.report.unreadable.push(Unreplayable {
            order: key.to_owned(),
            case_id: case_id.to_owned(),
            reason: reason.to_owned(),
        });
    }

    /// The report over every order replayed.
    pub fn finish(mut self) -> WhatIfReport {
        let mut counts: Vec<ChangeCount> = (self.counts.into_iter())
            .map(|((kind, old_rule, new_rule), orders)| ChangeCount {
                kind,
                old_rule,
                new_rule,
                orders,
            })
            .collect();
        counts.sort_by_key(|c| std::cmp::Reverse(c.orders));
        self.report.counts = counts;
        self.report
    }
}
