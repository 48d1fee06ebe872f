//! The compiled rules' types: what [`super::compile`] builds and
//! [`super::index`], [`super::matcher`] and [`super::explain`] read. No
//! logic but the lists of values; it imports no sibling.

use crate::domain::{
    AccountSelector, AccountType, CountryCode, Domain, HoldReason, OrderType, Target,
    VirtualAccountChoice,
};

/// The only value `smart_account.from` takes.
pub(super) const FROM_END_CUSTOMER_DOMAIN: &str = "end_customer_domain";

/// One compiled rule.
#[derive(Clone, Debug)]
pub(super) struct Rule {
    /// Unique, non-empty, trimmed.
    pub name: String,
    /// Line of the rule's `[[rule]]` header (1-based).
    pub line: usize,
    /// Its conditions; `None` matches anything.
    pub when: Conditions,
    /// What to assign.
    pub assign: TargetSpec,
    /// What to assign when the account of `assign` is missing or not ACTIVE
    /// (a fixed account: `from` is not allowed here).
    pub fallback: Option<Target>,
}

/// The conditions of one rule, normalised; `None` is a key left out.
#[derive(Clone, Debug, Default)]
pub(super) struct Conditions {
    /// Exact domains and `*` patterns.
    pub end_customer_domain: Option<DomainCondition>,
    /// Partner ids as written (trimmed); compared ignoring ASCII case.
    pub partner_id: Option<Vec<String>>,
    /// Upper-case country codes.
    pub country: Option<Vec<CountryCode>>,
    /// Hold reasons.
    pub hold_reason: Option<Vec<HoldReason>>,
    /// Upper-case order types.
    pub order_type: Option<Vec<OrderType>>,
    /// Product families as written (trimmed); compared ignoring ASCII case.
    pub product_family: Option<Vec<String>>,
}

impl Conditions {
    /// The values of condition `c` as the index keys them (domains lower
    /// case; partners, families, countries, order types upper case);
    /// `None` when the rule leaves it out. Domain patterns are not here:
    /// they are in the `GlobIndex`.
    pub fn values(&self, c: Condition) -> Option<Vec<String>> {
        fn strings<T: ToString>(values: &[T]) -> Vec<String> {
            values.iter().map(ToString::to_string).collect()
        }
        fn upper(values: &[String]) -> Vec<String> {
            values.iter().map(|v| v.to_ascii_uppercase()).collect()
        }
        match c {
            Condition::EndCustomerDomain => {
                self.end_customer_domain.as_ref().map(|d| strings(&d.exact))
            }
            Condition::PartnerId => self.partner_id.as_deref().map(upper),
            Condition::Country => self.country.as_deref().map(strings),
            Condition::HoldReason => self.hold_reason.as_deref().map(strings),
            Condition::OrderType => self.order_type.as_deref().map(strings),
            Condition::ProductFamily => self.product_family.as_deref().map(upper),
        }
    }
}

/// `when.end_customer_domain`: exact domains plus glob patterns. The globs
/// themselves live in the `GlobIndex` shared by all rules.
#[derive(Clone, Debug, Default)]
pub(super) struct DomainCondition {
    /// Lower-case domains without wildcards.
    pub exact: Vec<Domain>,
    /// Lower-case patterns with `*`, as shown by explain.
    pub patterns: Vec<String>,
}

/// Where the Smart Account of a target comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum AccountSource {
    /// A fixed account named in the file.
    Fixed(AccountSelector),
    /// The domain of the end customer's e-mail (`from = "end_customer_domain"`).
    EndCustomerDomain,
}

/// `[rule.assign]`: a target whose account may come from the event.
#[derive(Clone, Debug)]
pub(super) struct TargetSpec {
    /// The account, fixed or from the event.
    pub account: AccountSource,
    /// Customer or holding.
    pub account_type: AccountType,
    /// Named, or the account's default.
    pub virtual_account: VirtualAccountChoice,
}

/// A condition of `[rule.when]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Condition {
    /// `end_customer_domain`
    EndCustomerDomain,
    /// `partner_id`
    PartnerId,
    /// `country`
    Country,
    /// `hold_reason`
    HoldReason,
    /// `order_type`
    OrderType,
    /// `product_family`
    ProductFamily,
}

impl Condition {
    /// In file-key order, for explain.
    pub const ALL: [Self; 6] = [
        Self::EndCustomerDomain,
        Self::PartnerId,
        Self::Country,
        Self::HoldReason,
        Self::OrderType,
        Self::ProductFamily,
    ];

    /// The key in the rules file.
    pub fn key(self) -> &'static str {
        match self {
            Self::EndCustomerDomain => "when.end_customer_domain",
            Self::PartnerId => "when.partner_id",
            Self::Country => "when.country",
            Self::HoldReason => "when.hold_reason",
            Self::OrderType => "when.order_type",
            Self::ProductFamily => "when.product_family",
        }
    }
}
