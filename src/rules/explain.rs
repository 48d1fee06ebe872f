//! Why the rules decided what they did for one order: per rule, matched or
//! which conditions failed with the value the event had; then the decision.
//! Shown to people by `Display`, to machines by `Serialize`.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use super::matcher::{Facts, Verdicts};
use super::model::{Condition, FROM_END_CUSTOMER_DOMAIN, Rule};
use super::{Decision, Rules};
use crate::domain::{HeldOrder, HoldReason};

/// The rules applied to one order, rule by rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The rules file.
    pub rules_file: PathBuf,
    /// SHA-256 (hex) of its content.
    pub rules_hash: String,
    /// What the rules looked at in the order.
    pub order: OrderFacts,
    /// Every rule, in file order.
    pub rules: Vec<RuleExplanation>,
    /// What would be assigned; `None` escalates `NO_RULE_MATCHED`.
    pub decision: Option<Decision>,
}

/// The values of the order the conditions test.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OrderFacts {
    /// The order (sales order number, else web order id).
    pub order: String,
    /// `holdReason`.
    pub hold_reason: HoldReason,
    /// `orderType`, if given.
    pub order_type: Option<String>,
    /// `partner.id`, if given.
    pub partner_id: Option<String>,
    /// Domain of `endCustomer.email`, if given.
    pub end_customer_domain: Option<String>,
    /// `endCustomer.country`, if given.
    pub country: Option<String>,
    /// Product families of the lines.
    pub product_families: Vec<String>,
}

/// One rule's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleExplanation {
    /// Position in the file, from 1.
    pub index: usize,
    /// The rule's name.
    pub name: String,
    /// Line of its `[[rule]]` header.
    pub line: usize,
    /// Matched, failed, or not tried.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What happened to one rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Every condition held and the target could be built: this rule decides.
    Matched,
    /// These conditions failed.
    Failed {
        /// Every failed condition, in key order.
        failures: Vec<Failure>,
    },
    /// An earlier rule matched; first match wins.
    NotTried,
}

/// One condition that did not hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The key, e.g. `when.country` or `assign.smart_account.from`.
    pub key: String,
    /// The values the rule accepts.
    pub wanted: Vec<String>,
    /// What the order had (empty: nothing).
    pub event: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.ends_with(".from") {
            return write!(
                f,
                "{}: the order has no end-customer e-mail, so there is no domain to assign",
                self.key
            );
        }
        write!(f, "{}: wants ", self.key)?;
        if self.wanted.len() > 1 {
            f.write_str("one of ")?;
        }
        f.write_str(&self.wanted.join(", "))?;
        if self.event.is_empty() {
            f.write_str("; the order has none")
        } else {
            write!(f, "; the order has {}", self.event.join(", "))
        }
    }
}

impl Rules {
    pub(super) fn explain_facts(&self, order: &HeldOrder) -> Explanation {
        let facts = Facts::new(order, self);
        let winner = self.first_match(&facts);
        let verdicts = self.verdicts(&facts);
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| RuleExplanation {
                index: i + 1,
                name: rule.name.clone(),
                line: rule.line,
                outcome: match winner {
                    Some(w) if w == i => Outcome::Matched,
                    Some(w) if w < i => Outcome::NotTried,
                    _ => Outcome::Failed {
                        failures: self.failures(&verdicts, i, rule, &facts),
                    },
                },
            })
            .collect();
        Explanation {
            rules_file: self.file.clone(),
            rules_hash: self.hash.clone(),
            order: OrderFacts {
                order: order.order.to_string(),
                hold_reason: order.hold_reason,
                order_type: facts.order_type.map(ToString::to_string),
                partner_id: facts.partner_id.map(str::to_owned),
                end_customer_domain: facts.domain.map(str::to_owned),
                country: facts.country.map(ToString::to_string),
                product_families: facts.families().map(str::to_owned).collect(),
            },
            rules,
            decision: winner.and_then(|w| self.decision(w, &facts)),
        }
    }

    /// Every failed condition of rule `index`, with the order's value.
    fn failures(
        &self,
        verdicts: &Verdicts,
        index: usize,
        rule: &Rule,
        facts: &Facts<'_>,
    ) -> Vec<Failure> {
        fn show<T: ToString>(values: &[T]) -> Vec<String> {
            values.iter().map(ToString::to_string).collect()
        }
        fn one(value: Option<impl ToString>) -> Vec<String> {
            value.map(|v| v.to_string()).into_iter().collect()
        }
        let w = &rule.when;
        let mut out: Vec<Failure> = Condition::ALL
            .into_iter()
            .filter(|&c| self.holds(verdicts, index, c) == Some(false))
            .map(|c| {
                let (wanted, event) = match c {
                    Condition::EndCustomerDomain => {
                        let d = w.end_customer_domain.as_ref();
                        let wanted = d
                            .map(|d| {
                                show(&d.exact)
                                    .into_iter()
                                    .chain(d.patterns.iter().cloned())
                                    .collect()
                            })
                            .unwrap_or_default();
                        (wanted, one(facts.domain))
                    }
                    Condition::PartnerId => (
                        w.partner_id.clone().unwrap_or_default(),
                        one(facts.partner_id),
                    ),
                    Condition::Country => (
                        w.country.as_deref().map(show).unwrap_or_default(),
                        one(facts.country),
                    ),
                    Condition::HoldReason => (
                        w.hold_reason.as_deref().map(show).unwrap_or_default(),
                        one(Some(facts.hold_reason)),
                    ),
                    Condition::OrderType => (
                        w.order_type.as_deref().map(show).unwrap_or_default(),
                        one(facts.order_type),
                    ),
                    Condition::ProductFamily => (
                        w.product_family.clone().unwrap_or_default(),
                        facts.families().map(str::to_owned).collect(),
                    ),
                };
                Failure {
                    key: c.key().to_owned(),
                    wanted,
                    event,
                }
            })
            .collect();
        if !self.resolvable(index, facts) {
            out.push(Failure {
                key: "assign.smart_account.from".to_owned(),
                wanted: vec![FROM_END_CUSTOMER_DOMAIN.to_owned()],
                event: Vec::new(),
            });
        }
        out
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.order;
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        writeln!(
            f,
            "Rules: {} ({} rule{}, sha256 {})",
            self.rules_file.display(),
            self.rules.len(),
            if self.rules.len() == 1 { "" } else { "s" },
            self.rules_hash
        )?;
        writeln!(f, "Order: {}", o.order)?;
        writeln!(f, "  hold_reason          {}", o.hold_reason)?;
        writeln!(f, "  order_type           {}", or_none(&o.order_type))?;
        writeln!(f, "  partner_id           {}", or_none(&o.partner_id))?;
        writeln!(
            f,
            "  end_customer_domain  {}",
            or_none(&o.end_customer_domain)
        )?;
        writeln!(f, "  country              {}", or_none(&o.country))?;
        let families = if o.product_families.is_empty() {
            "(none)".to_owned()
        } else {
            o.product_families.join(", ")
        };
        writeln!(f, "  product_family       {families}")?;
        writeln!(f)?;
        for r in &self.rules {
            let head = format!("#{} {} (line {})", r.index, r.name, r.line);
            match &r.outcome {
                Outcome::Matched => writeln!(f, "{head}: MATCHED")?,
                Outcome::NotTried => writeln!(f, "{head}: not tried (an earlier rule matched)")?,
                Outcome::Failed { failures } => {
                    writeln!(f, "{head}: no match")?;
                    for failure in failures {
                        writeln!(f, "    {failure}")?;
                    }
                }
            }
        }
        writeln!(f)?;
        match &self.decision {
            None => write!(
                f,
                "Decision: no rule matched; the order escalates NO_RULE_MATCHED (assign it by hand or add a rule)."
            ),
            Some(d) => {
                writeln!(f, "Decision: rule {:?}", d.rule)?;
                writeln!(f, "  assign    {}", d.target)?;
                match &d.fallback {
                    Some(fb) => write!(
                        f,
                        "  fallback  {fb} (if the account above is missing or not ACTIVE)"
                    ),
                    None => write!(f, "  fallback  (none)"),
                }
            }
        }
    }
}
