//! First match: the rules against one validated order, no I/O.
//!
//! The event's facts are read once into [`Facts`] (borrowed, no copies);
//! each rule then costs a few comparisons and no allocation. Domain globs of
//! all rules are matched in one pass, lazily, the first time a rule with a
//! pattern is reached. [`super::explain`] uses the same predicates, so what
//! explain says is what decide does.

use std::cell::OnceCell;

use super::compile::{AccountSource, DomainCondition, GlobIndex, Rule, TargetSpec};
use super::{Decision, Rules};
use crate::domain::{AccountSelector, CountryCode, HeldOrder, HoldReason, Line, OrderType, Target};

/// What the rules look at in one order, borrowed from it.
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
    pub lines: &'a [Line],
    /// One bit per rule whose domain pattern matches `domain`; filled on first use.
    glob_hits: OnceCell<Vec<u64>>,
}

impl<'a> Facts<'a> {
    pub fn new(order: &'a HeldOrder) -> Self {
        let customer = order.end_customer.as_ref();
        Self {
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
            glob_hits: OnceCell::new(),
        }
    }

    /// Product families of the lines, trimmed, empty ones skipped.
    pub fn families(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.lines
            .iter()
            .filter_map(|l| l.product_family.as_deref())
            .map(str::trim)
            .filter(|f| !f.is_empty())
    }

    fn glob_hit(&self, globs: &GlobIndex, rules: usize, rule: usize, domain: &str) -> bool {
        let bits = self.glob_hits.get_or_init(|| globs.hits(domain, rules));
        bits.get(rule / 64).is_some_and(|w| w & (1 << (rule % 64)) != 0)
    }
}

impl Rules {
    /// `when.end_customer_domain` holds for rule `index`.
    pub(super) fn domain_ok(&self, index: usize, cond: &DomainCondition, facts: &Facts<'_>) -> bool {
        let Some(domain) = facts.domain else {
            return false;
        };
        cond.exact.iter().any(|d| d.as_str() == domain)
            || (!cond.patterns.is_empty()
                && facts.glob_hit(&self.globs, self.rules.len(), index, domain))
    }

    /// Every `when` condition of rule `index` holds (cheapest first).
    pub(super) fn conditions_hold(&self, index: usize, rule: &Rule, facts: &Facts<'_>) -> bool {
        let w = &rule.when;
        w.hold_reason.as_ref().is_none_or(|r| hold_reason_ok(r, facts))
            && w.country.as_ref().is_none_or(|c| country_ok(c, facts))
            && w.order_type.as_ref().is_none_or(|t| order_type_ok(t, facts))
            && w.partner_id.as_ref().is_none_or(|p| partner_ok(p, facts))
            && w.end_customer_domain
                .as_ref()
                .is_none_or(|d| self.domain_ok(index, d, facts))
            && w.product_family.as_ref().is_none_or(|f| family_ok(f, facts))
    }

    /// The first rule whose conditions hold and whose target can be built.
    pub(super) fn first_match(&self, facts: &Facts<'_>) -> Option<usize> {
        self.rules.iter().enumerate().position(|(i, rule)| {
            self.conditions_hold(i, rule, facts) && resolvable(&rule.assign, facts)
        })
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

pub(super) fn hold_reason_ok(wanted: &[HoldReason], facts: &Facts<'_>) -> bool {
    wanted.contains(&facts.hold_reason)
}

pub(super) fn country_ok(wanted: &[CountryCode], facts: &Facts<'_>) -> bool {
    facts.country.is_some_and(|c| wanted.contains(c))
}

pub(super) fn order_type_ok(wanted: &[OrderType], facts: &Facts<'_>) -> bool {
    facts.order_type.is_some_and(|t| wanted.contains(t))
}

pub(super) fn partner_ok(wanted: &[String], facts: &Facts<'_>) -> bool {
    facts
        .partner_id
        .is_some_and(|id| wanted.iter().any(|w| w.eq_ignore_ascii_case(id)))
}

pub(super) fn family_ok(wanted: &[String], facts: &Facts<'_>) -> bool {
    facts
        .families()
        .any(|f| wanted.iter().any(|w| w.eq_ignore_ascii_case(f)))
}

/// The target can be built from this order (`from` needs an e-mail).
pub(super) fn resolvable(spec: &TargetSpec, facts: &Facts<'_>) -> bool {
    match spec.account {
        AccountSource::Fixed(_) => true,
        AccountSource::EndCustomerDomain => facts.domain.is_some(),
    }
}

fn target(spec: &TargetSpec, facts: &Facts<'_>) -> Option<Target> {
    let account = match &spec.account {
        AccountSource::Fixed(a) => a.clone(),
        AccountSource::EndCustomerDomain => AccountSelector::Domain(facts.order.end_customer_domain()?),
    };
    Some(Target {
        account,
        account_type: spec.account_type,
        virtual_account: spec.virtual_account.clone(),
    })
}
