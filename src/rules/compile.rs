//! From the file as written ([`super::file`]) to rules ready to match:
//! every value parsed once, lists normalised, globs compiled once, and every
//! mistake a [`RulesError`] naming the file, the rule, the key and the line.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use globset::{GlobBuilder, GlobSetBuilder};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::file::{RawAccount, RawFile, RawList, RawRule, RawTarget, RawWhen};
use super::index::{GlobIndex, MatchIndex};
use super::model::{
    AccountSource, Conditions, DomainCondition, FROM_END_CUSTOMER_DOMAIN, Rule, TargetSpec,
};
use super::{Location, RuleRef, Rules, RulesError};
use crate::domain::{
    AccountSelector, AccountType, CountryCode, Domain, Email, HoldReason, OrderType, Target,
    VirtualAccountChoice,
};

/// Byte offsets of line starts, to turn a span into a 1-based line number.
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self(starts)
    }

    fn of(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset)
    }
}

/// What every check needs to build an error: the file, lines, the rule.
struct Ctx<'a> {
    file: &'a Path,
    lines: Lines,
}

impl Ctx<'_> {
    fn at(&self, span: Range<usize>, rule: &RuleRef) -> Box<Location> {
        Box::new(Location {
            file: self.file.to_path_buf(),
            line: Some(self.lines.of(span.start)),
            rule: Some(rule.clone()),
        })
    }
}

/// Parses and compiles a rules file (see [`Rules::parse`]).
pub(super) fn compile(text: &str, file: &Path) -> Result<Rules, RulesError> {
    let ctx = Ctx {
        file,
        lines: Lines::new(text),
    };
    let (table, errors) = DeTable::parse_recoverable(text);
    if let Some(error) = errors.into_iter().next() {
        let offset = error.span().map(|s| s.start);
        let rule = offset.and_then(|o| rule_before(table.get_ref(), o));
        return Err(RulesError::Syntax {
            at: Box::new(Location {
                file: file.to_path_buf(),
                line: offset.map(|o| ctx.lines.of(o)),
                rule,
            }),
            message: error.message().to_owned(),
        });
    }
    let raw = RawFile::deserialize(toml::de::Deserializer::from(table))
        .map_err(|e| serde_error(text, &ctx, &e))?;

    let mut rules = Vec::with_capacity(raw.rule.len());
    let mut names: HashMap<String, (usize, usize)> = HashMap::new();
    let mut globs = GlobSetBuilder::new();
    let mut rule_of = Vec::new();
    for (i, raw_rule) in raw.rule.into_iter().enumerate() {
        let rule = compile_rule(&ctx, i, raw_rule, &mut globs, &mut rule_of)?;
        if let Some(&(first, line)) = names.get(&rule.name) {
            let at = Box::new(Location {
                file: file.to_path_buf(),
                line: Some(rule.line),
                rule: Some(RuleRef {
                    index: i + 1,
                    name: Some(rule.name.clone()),
                }),
            });
            return Err(RulesError::DuplicateName {
                at,
                name: rule.name,
                first,
                first_line: line,
            });
        }
        names.insert(rule.name.clone(), (i + 1, rule.line));
        rules.push(rule);
    }
    let set = globs.build().map_err(|e| RulesError::BadGlob {
        // Each pattern compiled alone already; a set that fails to build
        // is a limit of the matcher (e.g. too many patterns), not a line.
        at: Box::new(Location {
            file: file.to_path_buf(),
            line: None,
            rule: None,
        }),
        key: "when.end_customer_domain".into(),
        pattern: e.glob().unwrap_or("(all patterns)").to_owned(),
        reason: e.kind().to_string(),
    })?;
    Ok(Rules {
        file: file.to_path_buf(),
        hash: hex::encode(Sha256::digest(text.as_bytes())),
        index: MatchIndex::build(&rules, GlobIndex { set, rule_of }),
        rules,
    })
}

fn compile_rule(
    ctx: &Ctx<'_>,
    index: usize,
    raw: Spanned<RawRule>,
    globs: &mut GlobSetBuilder,
    rule_of: &mut Vec<usize>,
) -> Result<Rule, RulesError> {
    let header = raw.span();
    let raw = raw.into_inner();
    let mut rule = RuleRef {
        index: index + 1,
        name: raw.name.as_ref().map(|n| n.get_ref().trim().to_owned()),
    };
    let name = match &raw.name {
        None => {
            return Err(RulesError::MissingKey {
                at: ctx.at(header, &rule),
                key: "name".into(),
            });
        }
        Some(n) if n.get_ref().trim().is_empty() => {
            rule.name = None;
            return Err(RulesError::EmptyName {
                at: ctx.at(n.span(), &rule),
            });
        }
        Some(n) if n.get_ref().chars().any(char::is_control) => {
            return Err(RulesError::InvalidValue {
                at: ctx.at(n.span(), &rule),
                key: "name".into(),
                reason: "must not contain control characters".into(),
            });
        }
        Some(n) => n.get_ref().trim().to_owned(),
    };
    let when = match raw.when {
        None => Conditions::default(),
        Some(w) => compile_when(ctx, &rule, index, w.into_inner(), globs, rule_of)?,
    };
    let Some(assign) = raw.assign else {
        return Err(RulesError::MissingAssign {
            at: ctx.at(header.clone(), &rule),
        });
    };
    let assign = compile_target(ctx, &rule, "assign", assign)?;
    let fallback = match raw.fallback {
        None => None,
        Some(f) => {
            let spec = compile_target(ctx, &rule, "fallback", f)?;
            let AccountSource::Fixed(account) = spec.account else {
                unreachable!("compile_target rejects `from` in a fallback");
            };
            Some(Target {
                account,
                account_type: spec.account_type,
                virtual_account: spec.virtual_account,
            })
        }
    };
    Ok(Rule {
        name,
        line: ctx.lines.of(header.start),
        when,
        assign,
        fallback,
    })
}

/// A `when` list: rejected when empty (it would match no order), else each
/// value parsed by `parse`, which returns the reason a value is refused.
fn list<T>(
    ctx: &Ctx<'_>,
    rule: &RuleRef,
    key: &str,
    raw: Option<RawList>,
    mut parse: impl FnMut(&str) -> Result<T, String>,
) -> Result<Option<Vec<T>>, RulesError> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.get_ref().is_empty() {
        return Err(RulesError::EmptyList {
            at: ctx.at(raw.span(), rule),
            key: format!("when.{key}"),
        });
    }
    let mut out = Vec::with_capacity(raw.get_ref().len());
    for value in raw.into_inner() {
        let parsed = parse(value.get_ref()).map_err(|reason| RulesError::InvalidValue {
            at: ctx.at(value.span(), rule),
            key: format!("when.{key}"),
            reason,
        })?;
        out.push(parsed);
    }
    Ok(Some(out))
}

/// A free-text value (partner id, product family): trimmed, not empty.
fn text(raw: &str) -> Result<String, String> {
    let v = raw.trim();
    if v.is_empty() {
        Err("an empty string matches nothing; remove it".into())
    } else if v.chars().any(char::is_control) {
        Err(format!("{raw:?} contains control characters"))
    } else {
        Ok(v.to_owned())
    }
}

fn compile_when(
    ctx: &Ctx<'_>,
    rule: &RuleRef,
    index: usize,
    raw: RawWhen,
    globs: &mut GlobSetBuilder,
    rule_of: &mut Vec<usize>,
) -> Result<Conditions, RulesError> {
    let end_customer_domain = match raw.end_customer_domain {
        None => None,
        Some(list) => Some(compile_domains(ctx, rule, index, list, globs, rule_of)?),
    };
    Ok(Conditions {
        end_customer_domain,
        partner_id: list(ctx, rule, "partner_id", raw.partner_id, text)?,
        country: list(ctx, rule, "country", raw.country, |v| {
            CountryCode::parse(v).map_err(|e| e.to_string())
        })?,
        hold_reason: list(ctx, rule, "hold_reason", raw.hold_reason, |v| {
            HoldReason::parse(&v.trim().to_ascii_uppercase()).ok_or_else(|| {
                format!("{v:?} is not a hold reason: NO_SMART_ACCOUNT or PENDING_SMART_ACCOUNT")
            })
        })?,
        order_type: list(ctx, rule, "order_type", raw.order_type, |v| {
            OrderType::parse(v).map_err(|e| e.to_string())
        })?,
        product_family: list(ctx, rule, "product_family", raw.product_family, text)?,
    })
}

fn compile_domains(
    ctx: &Ctx<'_>,
    rule: &RuleRef,
    index: usize,
    raw: RawList,
    globs: &mut GlobSetBuilder,
    rule_of: &mut Vec<usize>,
) -> Result<DomainCondition, RulesError> {
    const KEY: &str = "when.end_customer_domain";
    if raw.get_ref().is_empty() {
        return Err(RulesError::EmptyList {
            at: ctx.at(raw.span(), rule),
            key: KEY.into(),
        });
    }
    let mut cond = DomainCondition::default();
    for value in raw.into_inner() {
        let span = value.span();
        let written = value.into_inner();
        let pattern = written.trim().trim_end_matches('.').to_ascii_lowercase();
        let bad_glob = |reason: String| RulesError::BadGlob {
            at: ctx.at(span.clone(), rule),
            key: KEY.into(),
            pattern: written.clone(),
            reason,
        };
        if let Some(c) = pattern
            .chars()
            .find(|c| matches!(c, '?' | '[' | ']' | '{' | '}' | '!' | '\\' | '/'))
        {
            return Err(bad_glob(format!(
                "{c:?} is not allowed: `*` is the only wildcard in domains"
            )));
        }
        if !pattern.contains('*') {
            let domain = Domain::parse(&pattern).map_err(|e| RulesError::InvalidValue {
                at: ctx.at(span.clone(), rule),
                key: KEY.into(),
                reason: e.to_string(),
            })?;
            cond.exact.push(domain);
            continue;
        }
        if Domain::parse(&pattern.replace('*', "x")).is_err() {
            return Err(bad_glob(
                "not a domain pattern (labels of letters, digits, '-' and `*`, separated by dots)"
                    .into(),
            ));
        }
        // Case-insensitive by folding: the pattern is lower-cased here and
        // an event's domain by `Email::parse`. globset's own
        // `case_insensitive` would turn every pattern into a regex (its
        // literal prefix/suffix strategies are off then): ~10x slower.
        let glob = GlobBuilder::new(&pattern)
            .case_insensitive(false)
            .literal_separator(false)
            .backslash_escape(false)
            .build()
            .map_err(|e| bad_glob(e.kind().to_string()))?;
        globs.add(glob);
        rule_of.push(index);
        cond.patterns.push(pattern);
    }
    Ok(cond)
}

fn compile_target(
    ctx: &Ctx<'_>,
    rule: &RuleRef,
    section: &str,
    raw: Spanned<RawTarget>,
) -> Result<TargetSpec, RulesError> {
    let header = raw.span();
    let raw = raw.into_inner();
    let fallback = section == "fallback";
    let Some(account) = raw.smart_account else {
        let at = ctx.at(header, rule);
        return Err(if fallback {
            RulesError::FallbackWithoutAccount { at }
        } else {
            RulesError::MissingKey {
                at,
                key: format!("{section}.smart_account"),
            }
        });
    };
    let account = compile_account(ctx, rule, section, account)?;
    let account_type = match raw.account_type {
        None => {
            return Err(RulesError::MissingKey {
                at: ctx.at(header, rule),
                key: format!("{section}.account_type"),
            });
        }
        Some(t) => {
            AccountType::parse(t.get_ref().trim()).ok_or_else(|| RulesError::InvalidValue {
                at: ctx.at(t.span(), rule),
                key: format!("{section}.account_type"),
                reason: format!("{:?} is neither CUSTOMER nor HOLDING", t.get_ref()),
            })?
        }
    };
    let virtual_account = match raw.virtual_account {
        None => VirtualAccountChoice::AccountDefault,
        Some(v) => VirtualAccountChoice::Named(text(v.get_ref()).map_err(|reason| {
            RulesError::InvalidValue {
                at: ctx.at(v.span(), rule),
                key: format!("{section}.virtual_account"),
                reason: format!("{reason} (leave the key out for the account's default)"),
            }
        })?),
    };
    Ok(TargetSpec {
        account,
        account_type,
        virtual_account,
    })
}

fn compile_account(
    ctx: &Ctx<'_>,
    rule: &RuleRef,
    section: &str,
    raw: Spanned<RawAccount>,
) -> Result<AccountSource, RulesError> {
    let span = raw.span();
    let RawAccount {
        domain,
        name,
        email,
        from,
    } = raw.into_inner();
    let key = format!("{section}.smart_account");
    let given = [&domain, &name, &email, &from]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if given != 1 {
        return Err(RulesError::InvalidValue {
            at: ctx.at(span, rule),
            key,
            reason: format!("takes exactly one of domain, name, email or from; {given} given"),
        });
    }
    let invalid = |span: Range<usize>, field: &str, reason: String| RulesError::InvalidValue {
        at: ctx.at(span, rule),
        key: format!("{section}.smart_account.{field}"),
        reason,
    };
    if let Some(from) = from {
        if section == "fallback" {
            return Err(RulesError::FromInFallback {
                at: ctx.at(from.span(), rule),
            });
        }
        if from.get_ref().trim() != FROM_END_CUSTOMER_DOMAIN {
            return Err(RulesError::UnsupportedFrom {
                at: ctx.at(from.span(), rule),
                key: format!("{key}.from"),
                value: from.into_inner(),
            });
        }
        return Ok(AccountSource::EndCustomerDomain);
    }
    if let Some(d) = domain {
        if d.get_ref().contains('*') {
            return Err(invalid(
                d.span(),
                "domain",
                "an account domain is exact; `*` belongs in when.end_customer_domain".into(),
            ));
        }
        let domain =
            Domain::parse(d.get_ref()).map_err(|e| invalid(d.span(), "domain", e.to_string()))?;
        return Ok(AccountSource::Fixed(AccountSelector::Domain(domain)));
    }
    if let Some(e) = email {
        let email =
            Email::parse(e.get_ref()).map_err(|err| invalid(e.span(), "email", err.to_string()))?;
        return Ok(AccountSource::Fixed(AccountSelector::Email(email)));
    }
    match name {
        Some(n) => {
            let name = text(n.get_ref()).map_err(|reason| invalid(n.span(), "name", reason))?;
            Ok(AccountSource::Fixed(AccountSelector::Name(name)))
        }
        None => unreachable!("exactly one of the four keys is set"),
    }
}

/// The last `[[rule]]` that starts before `offset` (for syntax errors, where
/// only a partial document exists).
fn rule_before(root: &DeTable<'_>, offset: usize) -> Option<RuleRef> {
    let rules = root.get("rule")?.get_ref().as_array()?;
    let (index, item) = rules
        .iter()
        .enumerate()
        .rfind(|(_, item)| item.span().start <= offset)?;
    Some(RuleRef {
        index: index + 1,
        name: rule_name(item.get_ref()),
    })
}

fn rule_name(item: &DeValue<'_>) -> Option<String> {
    let name = item.as_table()?.get("name")?.get_ref().as_str()?;
    Some(name.trim().to_owned())
}

/// One step of a key path: a table key or an array index.
#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A serde error (unknown key, wrong type) located: the rule from the key
/// path, the key from the span, the line from the offset.
fn serde_error(text: &str, ctx: &Ctx<'_>, error: &toml::de::Error) -> RulesError {
    let offset = error.span().map(|s| s.start);
    let message = error.message().to_owned();
    // The document parsed once already; parse it again only on this cold path.
    let path = match (offset, DeTable::parse(text)) {
        (Some(o), Ok(root)) => find(root.get_ref(), o, &mut Vec::new()).map(|p| (p, root)),
        _ => None,
    };
    let (rule, key) = match &path {
        Some((segs, root)) => split_rule(segs, root.get_ref()),
        None => (None, String::new()),
    };
    let at = Box::new(Location {
        file: ctx.file.to_path_buf(),
        line: offset.map(|o| ctx.lines.of(o)),
        rule,
    });
    if let Some(rest) = message.strip_prefix("unknown field ") {
        // serde: "unknown field `x`, expected one of `a`, `b`"
        let expected = rest
            .split_once(", ")
            .map(|(_, e)| e.to_owned())
            .unwrap_or_default();
        let key = if key.is_empty() {
            rest.split('`').nth(1).unwrap_or(rest).to_owned()
        } else {
            key
        };
        return RulesError::UnknownKey { at, key, expected };
    }
    RulesError::InvalidValue {
        at,
        key: if key.is_empty() {
            "(document)".into()
        } else {
            key
        },
        reason: message,
    }
}

/// The key path of the deepest key or value whose span holds `offset`.
/// Tables opened by a header only span the header, so every child is
/// searched, not only those whose span holds the offset.
fn find(table: &DeTable<'_>, offset: usize, path: &mut Vec<Seg>) -> Option<Vec<Seg>> {
    for (k, v) in table.iter() {
        path.push(Seg::Key(k.get_ref().to_string()));
        if k.span().contains(&offset) {
            return Some(path.clone());
        }
        if let Some(found) = find_value(v, offset, path) {
            return Some(found);
        }
        path.pop();
    }
    None
}

fn find_value(
    value: &Spanned<DeValue<'_>>,
    offset: usize,
    path: &mut Vec<Seg>,
) -> Option<Vec<Seg>> {
    match value.get_ref() {
        DeValue::Table(t) => {
            if let Some(found) = find(t, offset, path) {
                return Some(found);
            }
        }
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                if let Some(found) = find_value(item, offset, path) {
                    return Some(found);
                }
                path.pop();
            }
        }
        _ => {}
    }
    value.span().contains(&offset).then(|| path.clone())
}

/// `rule[2].when.contry` becomes rule #3 (with its name) and `when.contry`.
fn split_rule(segs: &[Seg], root: &DeTable<'_>) -> (Option<RuleRef>, String) {
    let (rule, rest) = match segs {
        [Seg::Key(k), Seg::Index(i), rest @ ..] if k == "rule" => {
            let name = root
                .get("rule")
                .and_then(|r| r.get_ref().as_array())
                .and_then(|a| a.get(*i))
                .and_then(|item| rule_name(item.get_ref()));
            (Some(RuleRef { index: i + 1, name }), rest)
        }
        _ => (None, segs),
    };
    let key = rest
        .iter()
        .map(|s| match s {
            Seg::Key(k) => k.clone(),
            Seg::Index(i) => format!("[{i}]"),
        })
        .collect::<Vec<_>>()
        .join(".")
        .replace(".[", "[");
    (rule, key)
}
