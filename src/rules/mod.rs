//! The default Smart Account rules: file, compile, first-match, explain,
//! reload. Pure: the matcher is a function of (compiled rules, validated
//! order); the only I/O is reading the file in [`Rules::load`].
//!
//! # The file
//! `[[rule]]` tables, tried top to bottom; the first whose every condition
//! holds wins (see `deploy/config/rules.toml` for a commented example).
//!
//! - `name`: required, non-empty, unique; recorded on every case it decides.
//! - `[rule.when]`: optional; each key a list of values, any of which may
//!   match. A key left out matches anything; a rule without `when` matches
//!   every order.
//!   - `end_customer_domain`: the domain of `endCustomer.email`. `*` is the
//!     only wildcard: `*.acme.com` matches `x.acme.com` and `a.b.acme.com`,
//!     not `acme.com`. Compared ignoring case.
//!   - `partner_id`: `partner.id`, ignoring ASCII case.
//!   - `country`: `endCustomer.country`, two letters, any case in the file.
//!   - `hold_reason`: `NO_SMART_ACCOUNT` / `PENDING_SMART_ACCOUNT` (the only
//!     two; anything else is an error).
//!   - `order_type`: `STANDARD`, `STOCKING`, `EA`, … The set is open, so only
//!     the spelling is checked (letters, digits, `_`, `-`), any case.
//!   - `product_family`: holds when any line has one of the families,
//!     ignoring ASCII case.
//!   - **An empty list is an error**: `country = []` would match no order,
//!     which is never what was meant; leave the key out to match anything.
//!   - An order without the value (no partner, no e-mail, …) fails the
//!     condition.
//! - `[rule.assign]`: required. `smart_account` is exactly one of
//!   `{ domain = … }`, `{ name = … }`, `{ email = … }` or
//!   `{ from = "end_customer_domain" }`; `account_type` is `CUSTOMER` or
//!   `HOLDING`; `virtual_account` names one, left out it is the account's
//!   default. A rule whose account comes `from` the end customer's domain
//!   does not match an order without an end-customer e-mail (explain says
//!   so), and the next rule is tried.
//! - `[rule.fallback]`: optional, same keys as `assign`, `smart_account`
//!   required; used when the `assign` account is missing or not ACTIVE. **A
//!   fallback names a fixed account** (`domain`, `name` or `email`): it is the
//!   safety net, usually the partner's holding account, so it must not depend
//!   on the order like `from` does.
//! - A file with no rule is valid: every order escalates `NO_RULE_MATCHED`.
//!
//! Every mistake is a [`RulesError`] naming the file, the rule (index from 1
//! and name) and the key, with the line where the parser knows it.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::domain::HeldOrder;

mod compile;
mod diff;
mod explain;
mod file;
mod index;
mod matcher;
mod model;
mod reload;
mod suggest;
#[cfg(test)]
mod tests;

pub use diff::{
    Change, ChangeCount, ChangeKind, Choice, Differences, Unreplayable, WhatIf, WhatIfReport,
};
pub use explain::{Explanation, Failure, OrderFacts, Outcome, RuleExplanation};
pub use reload::{RulesHandle, listen_for_hangups};
pub use suggest::{
    Chosen, ChosenTimes, Disagreement, FixGroup, Learned, Learner, Suggestion, TooFew,
};

pub use crate::domain::Decision;

/// A rule named in an error: its position (from 1) and its name, if it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    /// Position in the file, from 1.
    pub index: usize,
    /// The rule's `name`, when it has a readable one.
    pub name: Option<String>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) if !name.is_empty() => write!(f, "rule #{} {name:?}", self.index),
            _ => write!(f, "rule #{} (unnamed)", self.index),
        }
    }
}

/// Where in a rules file: `file:line: rule #2 "name"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The rules file.
    pub file: PathBuf,
    /// 1-based line, when the parser gives one.
    pub line: Option<usize>,
    /// The rule, when the mistake is inside one.
    pub rule: Option<RuleRef>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(rule) = &self.rule {
            write!(f, ": {rule}")?;
        }
        Ok(())
    }
}

/// Why a rules file cannot be used. Every message names the file, the rule
/// and the key, and the line where known.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file cannot be read (missing, no permission, not UTF-8).
    #[error("{}: cannot read the rules file: {source}", file.display())]
    Unreadable {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{at}: not valid TOML: {message}")]
    Syntax {
        /// Where the parser stopped.
        at: Box<Location>,
        /// The parser's message.
        message: String,
    },
    /// A key the rules file does not have (often a typo).
    #[error("{at}: unknown key `{key}`{}", if expected.is_empty() { String::new() } else { format!("; {expected}") })]
    UnknownKey {
        #[allow(missing_docs)] // where in the file, in every variant
        at: Box<Location>,
        /// The key, with its table inside the rule (`when.contry`).
        key: String,
        /// The keys allowed there, as `expected one of …`.
        expected: String,
    },
    /// A required key is missing.
    #[error("{at}: `{key}` is required")]
    MissingKey {
        /// Where (the rule or table that lacks it).
        at: Box<Location>,
        /// The key (`name`, `assign.account_type`, …).
        key: String,
    },
    /// A value of the wrong type or outside its set.
    #[error("{at}: `{key}`: {reason}")]
    InvalidValue {
        #[allow(missing_docs)] // where in the file, in every variant
        at: Box<Location>,
        /// The key.
        key: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// `name = ""`.
    #[error("{at}: `name` is empty; every rule needs a unique name")]
    EmptyName {
        #[allow(missing_docs)] // where in the file, in every variant
        at: Box<Location>,
    },
    /// Two rules with the same name.
    #[error("{at}: `name` {name:?} is already the name of rule #{first} (line {first_line})")]
    DuplicateName {
        /// The second rule with the name.
        at: Box<Location>,
        /// The name.
        name: String,
        /// Index (from 1) of the first rule with it.
        first: usize,
        /// Line of the first rule with it.
        first_line: usize,
    },
    /// A domain pattern that is not a `*` glob over a domain.
    #[error("{at}: `{key}`: bad domain pattern {pattern:?}: {reason}")]
    BadGlob {
        #[allow(missing_docs)] // where in the file, in every variant
        at: Box<Location>,
        /// The key (`when.end_customer_domain`).
        key: String,
        /// The pattern as written.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `when` list with no values: it would match no order.
    #[error(
        "{at}: `{key}` is an empty list, which matches no order; leave the key out to match any value"
    )]
    EmptyList {
        #[allow(missing_docs)] // where in the file, in every variant
        at: Box<Location>,
        /// The key.
        key: String,
    },
    /// A rule without `[rule.assign]`.
    #[error(
        "{at}: `assign` is missing: every rule needs [rule.assign] with smart_account and account_type"
    )]
    MissingAssign {
        /// The rule.
        at: Box<Location>,
    },
    /// `from = …` other than `end_customer_domain`.
    #[error(
        "{at}: `{key}`: from = {value:?} is not supported; the only source is \"end_customer_domain\""
    )]
    UnsupportedFrom {
        #[allow(missing_docs)] // where in the file, in every variant
        at: Box<Location>,
        /// The key (`assign.smart_account.from`).
        key: String,
        /// The value as written.
        value: String,
    },
    /// `from` in a fallback, which must name a fixed account.
    #[error(
        "{at}: `fallback.smart_account.from`: a fallback names a fixed account (domain, name or email), not one taken from the order"
    )]
    FromInFallback {
        #[allow(missing_docs)] // where in the file, in every variant
        at: Box<Location>,
    },
    /// A `[rule.fallback]` without `smart_account`.
    #[error(
        "{at}: `fallback.smart_account` is required: a fallback names the account to use instead"
    )]
    FallbackWithoutAccount {
        /// The fallback table.
        at: Box<Location>,
    },
}

/// The compiled rules of one file, ready to match.
#[derive(Clone, Debug)]
pub struct Rules {
    file: PathBuf,
    hash: String,
    rules: Vec<model::Rule>,
    index: index::MatchIndex,
}

impl Rules {
    /// Reads and compiles the rules file at `path`.
    pub fn load(path: &Path) -> Result<Rules, RulesError> {
        let unreadable = |source| RulesError::Unreadable {
            file: path.to_path_buf(),
            source,
        };
        let bytes = std::fs::read(path).map_err(unreadable)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let offset = e.utf8_error().valid_up_to();
            unreadable(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 (invalid byte at offset {offset})"),
            ))
        })?;
        Self::parse(&text, path)
    }

    /// Compiles rules from `text`; `file` names it in errors and explanations.
    pub fn parse(text: &str, file: &Path) -> Result<Rules, RulesError> {
        compile::compile(text, file)
    }

    /// The first rule that matches `order` and what it assigns; `None` when
    /// no rule does.
    pub fn decide(&self, order: &HeldOrder) -> Option<Decision> {
        let facts = matcher::Facts::new(order, self);
        let index = self.first_match(&facts)?;
        self.decision(index, &facts)
    }

    /// Per rule in order: matched, or which conditions failed with the value
    /// the order had; then the decision (the same as [`Rules::decide`]).
    pub fn explain(&self, order: &HeldOrder) -> Explanation {
        self.explain_facts(order)
    }

    /// SHA-256 (hex) of the file content.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// How many rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// No rules at all (every order escalates `NO_RULE_MATCHED`).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The file the rules were read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The rule names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }
}
