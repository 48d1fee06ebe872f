//! The rules file as written: a serde model that rejects unknown keys and
//! keeps the byte span of every value, so later checks can name the line.
//!
//! Nothing here is interpreted; [`super::compile`] turns it into rules.
//! Required keys are `Option`s on purpose: a missing one becomes a
//! [`super::RulesError`] that names the rule and the key, not serde's
//! generic "missing field".

use serde::Deserialize;
use toml::Spanned;

/// The whole file: `[[rule]]` tables, tried top to bottom.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    /// The rules, in file order. A file without any is valid (no order matches).
    #[serde(default)]
    pub rule: Vec<Spanned<RawRule>>,
}

/// One `[[rule]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    /// Unique, non-empty; recorded on every case the rule decides.
    pub name: Option<Spanned<String>>,
    /// Conditions; left out, the rule matches every order.
    pub when: Option<Spanned<RawWhen>>,
    /// What to assign; required.
    pub assign: Option<Spanned<RawTarget>>,
    /// What to assign when the `assign` account is missing or not ACTIVE.
    pub fallback: Option<Spanned<RawTarget>>,
}

/// A list of strings, with the span of the list and of each value.
pub(super) type RawList = Spanned<Vec<Spanned<String>>>;

/// `[rule.when]`: each key a list; a key left out matches anything.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWhen {
    /// Domain of the end customer's e-mail; `*` globs allowed.
    pub end_customer_domain: Option<RawList>,
    /// `partner.id`.
    pub partner_id: Option<RawList>,
    /// `endCustomer.country` (ISO alpha-2).
    pub country: Option<RawList>,
    /// `holdReason`.
    pub hold_reason: Option<RawList>,
    /// `orderType`.
    pub order_type: Option<RawList>,
    /// `lines[].productFamily` (any line).
    pub product_family: Option<RawList>,
}

/// `[rule.assign]` or `[rule.fallback]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    /// `{ domain = … }`, `{ name = … }`, `{ email = … }` or `{ from = … }`.
    pub smart_account: Option<Spanned<RawAccount>>,
    /// `CUSTOMER` or `HOLDING`.
    pub account_type: Option<Spanned<String>>,
    /// A Virtual Account name; left out, the account's default one.
    pub virtual_account: Option<Spanned<String>>,
}

/// `smart_account = { … }`: exactly one key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    /// The account's domain.
    pub domain: Option<Spanned<String>>,
    /// The account's name.
    pub name: Option<Spanned<String>>,
    /// The account's e-mail.
    pub email: Option<Spanned<String>>,
    /// Where in the event the account comes from (`end_customer_domain`).
    pub from: Option<Spanned<String>>,
}
