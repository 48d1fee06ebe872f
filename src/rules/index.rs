//! The rules as bitsets, for matching many rules at once.
//!
//! Every value of every condition is interned to a `u32` at compile time.
//! For each condition kind (domain, partner, …) the index keeps
//! - `absent`: one bit per rule that leaves the condition out, and
//! - `postings`: for each value, the rules that list it.
//!
//! For one order, the rules whose condition of a kind holds are then
//! `absent | postings[order's value]` (for domains, also the rules whose
//! `*` pattern matches: one [`GlobSet`] pass for all patterns). ANDing the
//! six kinds gives every rule that matches; the first set bit is the first
//! match. The cost per order is a few hash lookups plus six passes over
//! `rules / 64` words: no per-rule work, no string comparison.

use std::collections::HashMap;

use globset::{Candidate, GlobSet};

use super::model::{AccountSource, Condition, Rule};

/// One bit per rule.
pub(super) type Bits = Vec<u64>;

/// Whether bit `i` is set.
pub(super) fn bit(bits: &[u64], i: usize) -> bool {
    bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn set(bits: &mut [u64], i: usize) {
    if let Some(w) = bits.get_mut(i / 64) {
        *w |= 1 << (i % 64);
    }
}

/// The first set bit.
pub(super) fn first(bits: &[u64]) -> Option<usize> {
    bits.iter()
        .enumerate()
        .find(|(_, w)| **w != 0)
        .map(|(i, w)| i * 64 + w.trailing_zeros() as usize)
}

/// The rules that list one value: their indexes, or as bits once so many
/// rules list it that ORing words is cheaper than setting bits one by one
/// (at least one per 64 rules; so the bitsets take at most 8 bytes per
/// listing in the file).
#[derive(Clone, Debug)]
enum Posting {
    Sparse(Vec<u32>),
    Dense(Bits),
}

/// One condition kind: its values and which rules list each.
#[derive(Clone, Debug, Default)]
pub(super) struct Kind {
    ids: HashMap<String, u32>,
    postings: Vec<Posting>,
    /// Rules that leave the condition out.
    pub absent: Bits,
}

impl Kind {
    fn new(words: usize) -> Self {
        Self {
            absent: vec![0; words],
            ..Self::default()
        }
    }

    fn add(&mut self, rule: usize, value: String) {
        let next = self.postings.len();
        let id = *self
            .ids
            .entry(value)
            .or_insert_with(|| u32::try_from(next).unwrap_or(u32::MAX));
        match self.postings.get_mut(id as usize) {
            Some(Posting::Sparse(list)) => list.push(rule as u32),
            Some(Posting::Dense(bits)) => set(bits, rule),
            None => self.postings.push(Posting::Sparse(vec![rule as u32])),
        }
    }

    /// Turns the long posting lists into bitsets.
    fn densify(&mut self) {
        let words = self.absent.len();
        for posting in &mut self.postings {
            if let Posting::Sparse(list) = posting
                && list.len() >= words
            {
                let mut bits = vec![0; words];
                for &rule in list.iter() {
                    set(&mut bits, rule as usize);
                }
                *posting = Posting::Dense(bits);
            }
        }
    }

    /// The id of a value some rule lists.
    pub fn id(&self, value: &str) -> Option<u32> {
        self.ids.get(value).copied()
    }

    /// ORs into `out` the rules that list any of `ids`.
    fn or_listed(&self, ids: &[u32], out: &mut [u64]) {
        for id in ids {
            match self.postings.get(*id as usize) {
                Some(Posting::Sparse(list)) => {
                    list.iter().for_each(|&rule| set(out, rule as usize))
                }
                Some(Posting::Dense(bits)) => out.iter_mut().zip(bits).for_each(|(o, b)| *o |= b),
                None => {}
            }
        }
    }
}

/// Every domain glob of every rule in one [`GlobSet`].
#[derive(Clone, Debug)]
pub(super) struct GlobIndex {
    /// All patterns.
    pub set: GlobSet,
    /// Rule index of each pattern of `set`.
    pub rule_of: Vec<usize>,
}

impl GlobIndex {
    /// ORs into `out` the rules one of whose patterns matches `domain`.
    fn or_matching(&self, domain: &str, out: &mut [u64]) {
        if self.set.is_empty() {
            return;
        }
        let mut matched = Vec::new();
        self.set
            .matches_candidate_into(&Candidate::new(domain), &mut matched);
        for glob in matched {
            if let Some(&rule) = self.rule_of.get(glob) {
                set(out, rule);
            }
        }
    }
}

/// One order's values as ids of the index (absent, or listed by no rule: `None`).
#[derive(Clone, Debug, Default)]
pub(super) struct OrderIds {
    /// Per [`Condition`] (in [`Condition::ALL`] order), the order's value ids.
    pub by_kind: [Vec<u32>; 6],
}

/// All rules as bitsets per condition kind.
#[derive(Clone, Debug)]
pub(super) struct MatchIndex {
    /// Per [`Condition`], in [`Condition::ALL`] order.
    kinds: [Kind; 6],
    globs: GlobIndex,
    /// Rules whose account comes from the end customer's domain.
    from_event: Bits,
    /// Every rule.
    all: Bits,
}

impl MatchIndex {
    /// Interns every condition value of `rules`.
    pub fn build(rules: &[Rule], globs: GlobIndex) -> Self {
        let words = rules.len().div_ceil(64);
        let mut kinds: [Kind; 6] = std::array::from_fn(|_| Kind::new(words));
        let mut from_event = vec![0; words];
        let mut all = vec![0; words];
        for (i, rule) in rules.iter().enumerate() {
            set(&mut all, i);
            if rule.assign.account == AccountSource::EndCustomerDomain {
                set(&mut from_event, i);
            }
            for c in Condition::ALL {
                let kind = &mut kinds[c as usize];
                match rule.when.values(c) {
                    None => set(&mut kind.absent, i),
                    Some(values) => values.into_iter().for_each(|v| kind.add(i, v)),
                }
            }
        }
        kinds.iter_mut().for_each(Kind::densify);
        Self {
            kinds,
            globs,
            from_event,
            all,
        }
    }

    /// The index of one condition kind.
    pub fn kind(&self, c: Condition) -> &Kind {
        &self.kinds[c as usize]
    }

    /// The rules whose condition `c` is present and holds for the order.
    pub fn listed(&self, c: Condition, ids: &OrderIds, domain: Option<&str>) -> Bits {
        let mut out = vec![0; self.all.len()];
        self.kind(c).or_listed(&ids.by_kind[c as usize], &mut out);
        if c == Condition::EndCustomerDomain
            && let Some(d) = domain
        {
            self.globs.or_matching(d, &mut out);
        }
        out
    }

    /// Rules whose account can be named for the order (`from` needs a domain).
    pub fn resolvable(&self, i: usize, has_domain: bool) -> bool {
        has_domain || !bit(&self.from_event, i)
    }

    /// Every rule that matches the order, as bits.
    pub fn matching(&self, ids: &OrderIds, domain: Option<&str>) -> Bits {
        let mut acc = self.all.clone();
        let mut holds = vec![0; acc.len()];
        for c in Condition::ALL {
            let kind = self.kind(c);
            holds.copy_from_slice(&kind.absent);
            kind.or_listed(&ids.by_kind[c as usize], &mut holds);
            if c == Condition::EndCustomerDomain
                && let Some(d) = domain
            {
                self.globs.or_matching(d, &mut holds);
            }
            let mut any = 0;
            for (a, h) in acc.iter_mut().zip(&holds) {
                *a &= h;
                any |= *a;
            }
            if any == 0 {
                return acc;
            }
        }
        if domain.is_none() {
            for (a, f) in acc.iter_mut().zip(&self.from_event) {
                *a &= !f;
            }
        }
        acc
    }
}
