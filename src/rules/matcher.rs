//! First match: the rules against one validated order, no I/O.
//!
//! The order's values are read once into [`Facts`] (borrowed) and looked up
//! in the rules' index once; then all rules are matched together as bitsets
//! (see [`super::index`]). Explain reads the same bits rule by rule
//! ([`Rules::holds`]), so what explain says is what decide does.

use super::index::{Bits, OrderIds, bit, first};
use super::model::{AccountSource, Condition, TargetSpec};
use super::{Decision, Rules};
use crate::domain::{AccountSelector, CountryCode, HeldOrder, HoldReason, Line, OrderType, Target};

/// What the rules look at in one order, borrowed from it, and its ids.
pub(super) struct Facts<'a> {
    /// The order itself (for building targets).
    pub order: &'a HeldOrder,
    /// Lower-case domain of the end customer's e-mail.
    pub domain: Option<&'a str>,
    /// `partner.id`, trimmed.
    pub partner_id: Option<&'a str>,
    /// `endCustomer.country`.
    pub country: Option<&'a CountryCode>,
    /// `holdReason`.
    pub hold_reason: HoldReason,
    /// `orderType`.
    pub order_type: Option<&'a OrderType>,
    /// The order lines (product families).
    lines: &'a [Line],
    /// The values as ids of the rules' index.
    ids: OrderIds,
}

impl<'a> Facts<'a> {
    /// Reads `order` and looks its values up in the rules' index (one hash
    /// lookup per value).
    pub fn new(order: &'a HeldOrder, rules: &Rules) -> Self {
        let customer = order.end_customer.as_ref();
        let mut facts = Self {
            order,
            domain: customer
                .and_then(|c| c.email.as_ref())
                .and_then(|e| e.as_str().rsplit_once('@'))
                .map(|(_, d)| d),
            partner_id: order
                .partner
                .as_ref()
                .and_then(|p| p.id.as_deref())
                .map(str::trim)
                .filter(|id| !id.is_empty()),
            country: customer.and_then(|c| c.country.as_ref()),
            hold_reason: order.hold_reason,
            order_type: order.order_type.as_ref(),
            lines: &order.lines,
            ids: OrderIds::default(),
        };
        for c in Condition::ALL {
            let kind = rules.index.kind(c);
            let id = |v: &str| kind.id(v);
            let upper = |v: &str| kind.id(&v.to_ascii_uppercase());
            facts.ids.by_kind[c as usize] = match c {
                Condition::EndCustomerDomain => facts.domain.and_then(id).into_iter().collect(),
                Condition::PartnerId => facts.partner_id.and_then(upper).into_iter().collect(),
                Condition::Country => facts
                    .country
                    .map(CountryCode::as_str)
                    .and_then(id)
                    .into_iter()
                    .collect(),
                Condition::HoldReason => id(facts.hold_reason.as_str()).into_iter().collect(),
                Condition::OrderType => facts
                    .order_type
                    .map(OrderType::as_str)
                    .and_then(id)
                    .into_iter()
                    .collect(),
                Condition::ProductFamily => facts.families().filter_map(upper).collect(),
            };
        }
        facts
    }

    /// Product families of the lines, trimmed, empty ones skipped.
    pub fn families(&self) -> impl Iterator<Item = &'a str> + 'a {
        families(self.lines)
    }
}

/// Per condition kind, the rules whose condition is present and holds for
/// one order (what explain reads rule by rule).
pub(super) struct Verdicts([Bits; 6]);

fn families(lines: &[Line]) -> impl Iterator<Item = &str> {
    lines
        .iter()
        .filter_map(|l| l.product_family.as_deref())
        .map(str::trim)
        .filter(|f| !f.is_empty())
}

impl Rules {
    /// Which rules each condition kind holds for, for this order.
    pub(super) fn verdicts(&self, facts: &Facts<'_>) -> Verdicts {
        Verdicts(Condition::ALL.map(|c| self.index.listed(c, &facts.ids, facts.domain)))
    }

    /// Whether condition `c` of rule `index` holds for the order; `None`
    /// when the rule leaves the condition out. Decide ANDs the same bits.
    pub(super) fn holds(&self, verdicts: &Verdicts, index: usize, c: Condition) -> Option<bool> {
        if bit(&self.index.kind(c).absent, index) {
            None
        } else {
            Some(bit(&verdicts.0[c as usize], index))
        }
    }

    /// The account of rule `index` can be named for this order (`from`
    /// needs an end-customer e-mail).
    pub(super) fn resolvable(&self, index: usize, facts: &Facts<'_>) -> bool {
        self.index.resolvable(index, facts.domain.is_some())
    }

    /// The first rule whose conditions hold and whose target can be built.
    pub(super) fn first_match(&self, facts: &Facts<'_>) -> Option<usize> {
        first(&self.index.matching(&facts.ids, facts.domain))
    }

    /// The decision of rule `index`, which matched.
    pub(super) fn decision(&self, index: usize, facts: &Facts<'_>) -> Option<Decision> {
        let rule = self.rules.get(index)?;
        Some(Decision {
            rule: rule.name.clone(),
            rules_hash: self.hash.clone(),
            target: target(&rule.assign, facts)?,
            fallback: rule.fallback.clone(),
        })
    }
}

fn target(spec: &TargetSpec, facts: &Facts<'_>) -> Option<Target> {
    let account = match &spec.account {
        AccountSource::Fixed(a) => a.clone(),
        AccountSource::EndCustomerDomain => {
            AccountSelector::Domain(facts.order.end_customer_domain()?)
        }
    };
    Some(Target {
        account,
        account_type: spec.account_type,
        virtual_account: spec.virtual_account.clone(),
    })
}
