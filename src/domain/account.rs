//! What to assign: the Smart Account, its type and the Virtual Account.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::values::{Domain, Email};

/// Whose Smart Account is assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccountType {
    /// The end customer's own account.
    Customer,
    /// The partner's holding account.
    Holding,
}

impl AccountType {
    /// `CUSTOMER` or `HOLDING`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "CUSTOMER",
            Self::Holding => "HOLDING",
        }
    }

    /// Parses `CUSTOMER` or `HOLDING` (any case).
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.to_ascii_uppercase().as_str() {
            "CUSTOMER" => Some(Self::Customer),
            "HOLDING" => Some(Self::Holding),
            _ => None,
        }
    }
}

impl fmt::Display for AccountType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the Smart Account is searched for (exact match on one field).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountSelector {
    /// By the account's domain.
    Domain(Domain),
    /// By the account's name (compared case-insensitively).
    Name(String),
    /// By the account's e-mail.
    Email(Email),
}

impl fmt::Display for AccountSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Domain(d) => write!(f, "domain {d}"),
            Self::Name(n) => write!(f, "name {n:?}"),
            Self::Email(e) => write!(f, "e-mail {e}"),
        }
    }
}

/// Which Virtual Account of the Smart Account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtualAccountChoice {
    /// The one with this name (it must be PUBLIC).
    Named(String),
    /// The account's PUBLIC `isDefault` one.
    AccountDefault,
}

impl fmt::Display for VirtualAccountChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Named(n) => f.write_str(n),
            Self::AccountDefault => f.write_str("(account default)"),
        }
    }
}

/// One assignment target: account, type and virtual account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Target {
    /// The Smart Account to search for.
    pub account: AccountSelector,
    /// Customer or holding account.
    pub account_type: AccountType,
    /// The Virtual Account.
    pub virtual_account: VirtualAccountChoice,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, virtual account {})",
            self.account, self.account_type, self.virtual_account
        )
    }
}

/// What to assign to an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The chosen account's domain.
    pub smart_account_domain: String,
    /// Customer or holding account.
    pub account_type: AccountType,
    /// The chosen Virtual Account's name.
    pub virtual_account_name: String,
}
