//! Rules learned from the hand fixes: escalated orders a person released
//! by assigning an account in Cisco's portal, grouped by the fields a rule
//! can match (partner, end-customer domain, country). A group whose fixes
//! all chose one account becomes a suggested rule, written as TOML ready to
//! paste. Pure: the caller feeds the fixes (`holdclear rules suggest`
//! streams them from the store).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::domain::HeldOrder;

/// What a rule would match: the order's partner, end-customer domain and
/// country (`None`: the order did not carry it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FixGroup {
    /// `partner.id`.
    pub partner_id: Option<String>,
    /// The domain of `endCustomer.email`, lower case.
    pub end_customer_domain: Option<String>,
    /// `endCustomer.country`.
    pub country: Option<String>,
}

impl FixGroup {
    /// The facts of `order`.
    pub fn of(order: &HeldOrder) -> Self {
        Self {
            partner_id: (order.partner.as_ref()).and_then(|p| p.id.clone()),
            end_customer_domain: order
                .end_customer_domain()
                .map(|d| d.as_str().to_ascii_lowercase()),
            country: (order.end_customer.as_ref())
                .and_then(|c| c.country.as_ref())
                .map(|c| c.as_str().to_owned()),
        }
    }

    fn is_empty(&self) -> bool {
        self.partner_id.is_none() && self.end_customer_domain.is_none() && self.country.is_none()
    }

    /// `partner P-100, end customer domain x.example, country US`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.partner_id {
            parts.push(format!("partner {p}"));
        }
        if let Some(d) = &self.end_customer_domain {
            parts.push(format!("end customer domain {d}"));
        }
        if let Some(c) = &self.country {
            parts.push(format!("country {c}"));
        }
        parts.join(", ")
    }
}

/// The account a person chose, as the order showed it after the fix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Chosen {
    /// The Smart Account's domain.
    pub smart_account_domain: String,
    /// The Virtual Account, if the order showed one.
    pub virtual_account: Option<String>,
}

/// One suggested rule with its evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Suggestion {
    /// The rule's name (unique in the file it is meant for).
    pub name: String,
    /// What it matches.
    pub when: FixGroup,
    /// What it assigns.
    pub assign: Chosen,
    /// `CUSTOMER` when the account is the end customer's own domain, else
    /// `HOLDING` (the order read does not say; check it).
    pub account_type: &'static str,
    /// How many hand fixes chose it (every fix of the group).
    pub fixes: u64,
    /// The orders fixed so (their keys), oldest first.
    pub orders: Vec<String>,
    /// One sentence: the evidence.
    pub evidence: String,
    /// The `[[rule]]` as TOML, evidence in a comment.
    pub toml: String,
}

/// A group whose fixes disagree: no rule is suggested.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Disagreement {
    /// The group.
    pub when: FixGroup,
    /// Each account chosen and how often.
    pub chosen: Vec<ChosenTimes>,
}

/// An account chosen by hand, and how often.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChosenTimes {
    /// The account (and Virtual Account).
    #[serde(flatten)]
    pub chosen: Chosen,
    /// How many fixes chose it.
    pub fixes: u64,
}

/// A group with fewer agreeing fixes than the minimum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TooFew {
    /// The group.
    pub when: FixGroup,
    /// Its fixes.
    pub fixes: u64,
}

/// What was learned from the fixes of a window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Learned {
    /// Hand fixes read.
    pub fixes: u64,
    /// Rules to add, most evidence first.
    pub suggestions: Vec<Suggestion>,
    /// Groups with too few fixes (fewer than the minimum), by size.
    pub too_few: Vec<TooFew>,
    /// Groups whose fixes chose different accounts.
    pub disagreements: Vec<Disagreement>,
}

/// Gathers hand fixes and proposes rules.
#[derive(Debug, Default)]
pub struct Learner {
    groups: BTreeMap<FixGroup, Vec<(String, Chosen)>>,
    fixes: u64,
}

impl Learner {
    /// Adds one fix: order `key` (as `order`) was assigned `chosen` by hand.
    pub fn add(&mut self, key: &str, order: &HeldOrder, chosen: Chosen) {
        self.fixes += 1;
        let facts = FixGroup::of(order);
        self.groups
            .entry(facts)
            .or_default()
            .push((key.to_owned(), chosen));
    }

    /// The rules that `min` or more fixes agree on; `taken` are names
    /// already used (the rules in force), which suggestions avoid.
    pub fn finish<'n>(self, min: u64, taken: impl IntoIterator<Item = &'n str>) -> Learned {
        let mut names: Vec<String> = taken.into_iter().map(str::to_owned).collect();
        let mut learned = Learned {
            fixes: self.fixes,
            ..Learned::default()
        };
        for (facts, fixes) in self.groups {
            let mut chosen: BTreeMap<&Chosen, u64> = BTreeMap::new();
            for (_, c) in &fixes {
                *chosen.entry(c).or_default() += 1;
            }
            let n = fixes.len() as u64;
            if facts.is_empty() || chosen.len() > 1 {
                learned.disagreements.push(Disagreement {
                    when: facts,
                    chosen: (chosen.into_iter())
                        .map(|(c, fixes)| ChosenTimes {
                            chosen: c.clone(),
                            fixes,
                        })
                        .collect(),
                });
                continue;
            }
            if n < min {
                learned.too_few.push(TooFew {
                    when: facts,
                    fixes: n,
                });
                continue;
            }
            let assign = fixes[0].1.clone();
            let orders: Vec<String> = fixes.into_iter().map(|(k, _)| k).collect();
            let name = unique_name(&facts, &mut names);
            learned
                .suggestions
                .push(suggestion(name, facts, assign, orders));
        }
        learned
            .suggestions
            .sort_by_key(|s| std::cmp::Reverse(s.fixes));
        learned.too_few.sort_by_key(|t| std::cmp::Reverse(t.fixes));
        learned
    }
}

fn suggestion(name: String, when: FixGroup, assign: Chosen, orders: Vec<String>) -> Suggestion {
    let fixes = orders.len() as u64;
    let own = when.end_customer_domain.as_deref() == Some(assign.smart_account_domain.as_str());
    let account_type = if own { "CUSTOMER" } else { "HOLDING" };
    let va = (assign.virtual_account.as_deref())
        .map_or(String::new(), |v| format!(" (virtual account {v})"));
    let evidence = format!(
        "{} {} assigned by hand to Smart Account {}{va} {fixes} time{}, never otherwise",
        when.describe(),
        if fixes == 1 { "was" } else { "were" },
        assign.smart_account_domain,
        if fixes == 1 { "" } else { "s" },
    );
    let toml = rule_toml(&name, &when, &assign, account_type, &evidence, &orders);
    Suggestion {
        name,
        when,
        assign,
        account_type,
        fixes,
        orders,
        evidence,
        toml,
    }
}

/// The `[[rule]]` table, with the evidence as comments.
fn rule_toml(
    name: &str,
    when: &FixGroup,
    assign: &Chosen,
    account_type: &str,
    evidence: &str,
    orders: &[String],
) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut out = String::new();
    let shown: Vec<&str> = orders.iter().take(10).map(String::as_str).collect();
    let more = orders.len().saturating_sub(shown.len());
    let _ = writeln!(out, "# Learned: {evidence}.");
    let _ = write!(out, "# Orders: {}", shown.join(", "));
    let _ = writeln!(
        out,
        "{}",
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "# account_type is {account_type} because the account {} the end customer's domain: check it.",
        if account_type == "CUSTOMER" {
            "is"
        } else {
            "is not"
        }
    );
    let _ = writeln!(out, "[[rule]]\nname = {}\n[rule.when]", q(name));
    let conditions = [
        ("partner_id", &when.partner_id),
        ("end_customer_domain", &when.end_customer_domain),
        ("country", &when.country),
    ];
    for (key, value) in conditions {
        if let Some(v) = value {
            let _ = writeln!(out, "{key} = [{}]", q(v));
        }
    }
    let _ = writeln!(
        out,
        "[rule.assign]\nsmart_account = {{ domain = {} }}\naccount_type = {}",
        q(&assign.smart_account_domain),
        q(account_type)
    );
    if let Some(va) = &assign.virtual_account {
        let _ = writeln!(out, "virtual_account = {}", q(va));
    }
    out
}

/// `learned-<partner>-<domain>-<country>`, lower case, made unique.
fn unique_name(facts: &FixGroup, taken: &mut Vec<String>) -> String {
    let parts = [
        &facts.partner_id,
        &facts.end_customer_domain,
        &facts.country,
    ];
    let mut base = String::from("learned");
    for p in parts.into_iter().flatten() {
        base.push('-');
        base.extend(p.chars().map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        }));
    }
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    taken.push(name.clone());
    name
}
