//! The resolve cache: account searches and Virtual Account lists shared by
//! every case of a worker, so that the held orders of one end customer or
//! one partner's holding account ask the API once per TTL, not once each.
//!
//! - **Single-flight**: one fetch per key at a time; the cases that ask
//!   while it runs wait for it and share its answer (or its failure), so a
//!   hundred cases needing the same account make one call.
//! - **What is kept**: only answers an assignment can check. An account
//!   search is kept when it found an ACTIVE account (the assignment names
//!   that account, and the API refuses it if it is not usable any more);
//!   "not found" or a PENDING/INACTIVE account decides an escalation or a
//!   fallback, so it is always read fresh. A Virtual Account list is kept;
//!   a list that lacks the wanted account is read again fresh before the
//!   case escalates (the engine asks for that read).
//! - **Invalidation**: [`ResolveCache::forget_domain`] drops what was kept
//!   about an account, called when an assignment to it is refused in a way
//!   that says a kept answer may be stale (`SMART_ACCOUNT_NOT_ACTIVE`,
//!   `SMART_ACCOUNT_NOT_FOUND`, `VIRTUAL_ACCOUNT_NOT_FOUND`).
//! - **Bounded**: at most `max_entries` keys per kind; a full map first
//!   drops expired and idle entries, then the oldest.
//!
//! Answers are cached exactly as the client selected them (exact matches,
//! `AMBIGUOUS_MATCH` never cached: it is a failure), keyed by the exact
//! query.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{AccountStatus, CommerceError, SmartAccount, VirtualAccount};
use crate::domain::{AccountSelector, AccountType, Domain};

/// Whether an answer came from the cache (for metrics and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// Kept from an earlier fetch.
    Cached,
    /// Fetched by this call, or by the call this one waited for.
    Fetched,
}

/// The answers kept by one client (all clones of it).
pub(crate) struct ResolveCache {
    ttl: Duration,
    accounts: Slots<(AccountSelector, Option<AccountType>), Option<SmartAccount>>,
    virtual_accounts: Slots<String, Vec<VirtualAccount>>,
}

impl ResolveCache {
    /// A cache keeping answers for `ttl`, at most `max_entries` keys per
    /// kind; `None` when `ttl` is zero (the cache is off).
    pub(crate) fn new(ttl: Duration, max_entries: usize) -> Option<Self> {
        if ttl.is_zero() || max_entries == 0 {
            return None;
        }
        Some(Self {
            ttl,
            accounts: Slots::new(max_entries),
            virtual_accounts: Slots::new(max_entries),
        })
    }

    /// The account search for `selector`, from the cache or `fetch`.
    pub(crate) async fn account<F, Fut>(
        &self,
        selector: &AccountSelector,
        account_type: Option<AccountType>,
        fetch: F,
    ) -> (Result<Option<SmartAccount>, CommerceError>, Source)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<SmartAccount>, CommerceError>>,
    {
        let key = (selector.clone(), account_type);
        let keep = |found: &Option<SmartAccount>| {
            found
                .as_ref()
                .is_some_and(|a| a.status == AccountStatus::Active)
        };
        let got = self.accounts.get(key, self.ttl, keep, fetch).await;
        count("search", got.1);
        got
    }

    /// The Virtual Accounts of `domain`, from the cache or `fetch`; with
    /// `fresh`, always fetched (and kept for the next ones).
    pub(crate) async fn virtual_accounts<F, Fut>(
        &self,
        domain: &Domain,
        fresh: bool,
        fetch: F,
    ) -> (Result<Vec<VirtualAccount>, CommerceError>, Source)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<VirtualAccount>, CommerceError>>,
    {
        let key = domain.as_str().to_ascii_lowercase();
        if fresh {
            self.virtual_accounts.forget(|k, _| *k == key);
        }
        let got = (self.virtual_accounts)
            .get(key, self.ttl, |_| true, fetch)
            .await;
        count("virtual_accounts", got.1);
        got
    }

    /// Drops every kept answer about the account with `domain`: its
    /// searches and its Virtual Accounts.
    pub(crate) fn forget_domain(&self, domain: &str) {
        let same = |d: &str| d.eq_ignore_ascii_case(domain);
        self.accounts.forget(|_, found| {
            found
                .as_ref()
                .is_some_and(|a| same(&a.domain) || same(a.domain.trim_end_matches('.')))
        });
        self.virtual_accounts.forget(|k, _| same(k));
        tracing::debug!(domain, "Dropped the cached answers about an account.");
    }
}

fn count(kind: &'static str, source: Source) {
    let outcome = match source {
        Source::Cached => "hit",
        Source::Fetched => "miss",
    };
    metrics::counter!("holdclear_commerce_cache_total", "kind" => kind, "outcome" => outcome)
        .increment(1);
}

/// One kind of answer, by key.
struct Slots<K, V> {
    max_entries: usize,
    map: Mutex<HashMap<K, Arc<Slot<V>>>>,
}

/// One key: its fetch lock and its last answer.
struct Slot<V> {
    /// Held while fetching: the single flight.
    fetch: tokio::sync::Mutex<()>,
    last: Mutex<Last<V>>,
}

struct Last<V> {
    /// Fetches finished so far.
    fetches: u64,
    /// The kept answer and when it was fetched.
    kept: Option<(Instant, V)>,
    /// The last fetch's answer when it was not kept (shared with the cases
    /// that waited for it, never with later ones).
    unkept: Option<Result<V, CommerceError>>,
}

impl<K: Clone + Eq + Hash, V: Clone> Slots<K, V> {
    fn new(max_entries: usize) -> Self {
        Self {
            max_entries,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: K, ttl: Duration) -> Arc<Slot<V>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = map.get(&key) {
            return Arc::clone(slot);
        }
        if map.len() >= self.max_entries {
            // Expired and idle first; if none, the oldest kept answer.
            map.retain(|_, s| Arc::strong_count(s) > 1 || s.fresh(ttl).is_some());
            if map.len() >= self.max_entries
                && let Some(oldest) = (map.iter())
                    .min_by_key(|(_, s)| s.fetched_at())
                    .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let slot = Arc::new(Slot {
            fetch: tokio::sync::Mutex::new(()),
            last: Mutex::new(Last {
                fetches: 0,
                kept: None,
                unkept: None,
            }),
        });
        map.insert(key, Arc::clone(&slot));
        slot
    }

    async fn get<F, Fut>(
        &self,
        key: K,
        ttl: Duration,
        keep: impl Fn(&V) -> bool,
        fetch: F,
    ) -> (Result<V, CommerceError>, Source)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, CommerceError>>,
    {
        let slot = self.slot(key, ttl);
        if let Some(v) = slot.fresh(ttl) {
            return (Ok(v), Source::Cached);
        }
        let asked_after = slot.lock().fetches;
        let _flight = slot.fetch.lock().await;
        {
            let last = slot.lock();
            if last.fetches > asked_after {
                // A fetch finished while this call waited: its answer.
                if let Some((at, v)) = &last.kept
                    && at.elapsed() < ttl
                {
                    return (Ok(v.clone()), Source::Fetched);
                }
                if let Some(answer) = &last.unkept {
                    return (answer.clone(), Source::Fetched);
                }
            }
        }
        let answer = fetch().await;
        let mut last = slot.lock();
        last.fetches += 1;
        match &answer {
            Ok(v) if keep(v) => {
                last.kept = Some((Instant::now(), v.clone()));
                last.unkept = None;
            }
            _ => {
                last.kept = None;
                last.unkept = Some(answer.clone());
            }
        }
        (answer, Source::Fetched)
    }

    /// Drops the keys whose kept answer (or key) `matches`.
    fn forget(&self, matches: impl Fn(&K, &V) -> bool) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|k, slot| {
            let mut last = slot.lock();
            let stale = last.kept.as_ref().is_some_and(|(_, v)| matches(k, v));
            if stale {
                last.kept = None;
            }
            !stale
        });
    }
}

impl<V: Clone> Slot<V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Last<V>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self, ttl: Duration) -> Option<V> {
        let last = self.lock();
        let (at, v) = last.kept.as_ref()?;
        (at.elapsed() < ttl).then(|| v.clone())
    }

    fn fetched_at(&self) -> Option<Instant> {
        self.lock().kept.as_ref().map(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn account(domain: &str, status: AccountStatus) -> SmartAccount {
        SmartAccount {
            id: format!("SA-{domain}"),
            domain: domain.into(),
            name: domain.into(),
            account_type: "CUSTOMER".into(),
            status,
        }
    }

    fn by_domain(d: &str) -> AccountSelector {
        AccountSelector::Domain(Domain::parse(d).unwrap())
    }

    #[tokio::test]
    async fn a_hundred_cases_asking_at_once_make_one_call() {
        let cache = Arc::new(ResolveCache::new(Duration::from_secs(60), 100).unwrap());
        let calls = Arc::new(AtomicU32::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let (cache, calls) = (Arc::clone(&cache), Arc::clone(&calls));
            tasks.spawn(async move {
                let fetch = || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(Some(account("acme.com", AccountStatus::Active)))
                };
                let (got, _) = cache
                    .account(&by_domain("acme.com"), Some(AccountType::Customer), fetch)
                    .await;
                got.unwrap().unwrap().domain
            });
        }
        while let Some(domain) = tasks.join_next().await {
            assert_eq!(domain.unwrap(), "acme.com");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn only_active_accounts_are_kept() {
        let cache = ResolveCache::new(Duration::from_secs(60), 100).unwrap();
        let calls = AtomicU32::new(0);
        for status in [AccountStatus::Pending, AccountStatus::Inactive] {
            for _ in 0..2 {
                let (got, source) = cache
                    .account(&by_domain("initech.com"), None, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Ok(Some(account("initech.com", status.clone())))
                    })
                    .await;
                assert_eq!(got.unwrap().unwrap().status, status);
                assert_eq!(source, Source::Fetched);
            }
        }
        for _ in 0..2 {
            let (got, source) = cache
                .account(&by_domain("nobody.com"), None, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(None)
                })
                .await;
            assert_eq!((got.unwrap(), source), (None, Source::Fetched));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 6, "nothing of these was kept");
    }

    #[tokio::test]
    async fn forgetting_a_domain_drops_its_searches_and_lists() {
        let cache = ResolveCache::new(Duration::from_secs(60), 100).unwrap();
        let name = AccountSelector::Name("Acme Corp".into());
        let domain = Domain::parse("acme.com").unwrap();
        let active = || async { Ok(Some(account("acme.com", AccountStatus::Active))) };
        let list = || async { Ok(vec![]) };
        cache.account(&name, None, active).await.0.unwrap();
        cache
            .virtual_accounts(&domain, false, list)
            .await
            .0
            .unwrap();
        let (_, source) = cache.account(&name, None, active).await;
        assert_eq!(source, Source::Cached);
        let (_, source) = cache.virtual_accounts(&domain, false, list).await;
        assert_eq!(source, Source::Cached);

        cache.forget_domain("ACME.com");
        let (_, source) = cache.account(&name, None, active).await;
        assert_eq!(source, Source::Fetched);
        let (_, source) = cache.virtual_accounts(&domain, false, list).await;
        assert_eq!(source, Source::Fetched);
        let (_, source) = cache.virtual_accounts(&domain, true, list).await;
        assert_eq!(source, Source::Fetched, "a fresh read is never cached");
    }

    #[tokio::test]
    async fn answers_expire_and_failures_are_not_kept() {
        let cache = ResolveCache::new(Duration::from_millis(30), 100).unwrap();
        let domain = Domain::parse("acme.com").unwrap();
        let failing = || async {
            Err(CommerceError::Transient {
                retry_after: None,
                detail: "down".into(),
            })
        };
        assert!(
            cache
                .virtual_accounts(&domain, false, failing)
                .await
                .0
                .is_err()
        );
        let (got, source) = cache
            .virtual_accounts(&domain, false, || async { Ok(vec![]) })
            .await;
        assert_eq!((got.unwrap().len(), source), (0, Source::Fetched));
        let (_, source) = cache
            .virtual_accounts(&domain, false, || async { Ok(vec![]) })
            .await;
        assert_eq!(source, Source::Cached);
        tokio::time::sleep(Duration::from_millis(40)).await;
        let (_, source) = cache
            .virtual_accounts(&domain, false, || async { Ok(vec![]) })
            .await;
        assert_eq!(source, Source::Fetched, "expired");
    }

    #[tokio::test]
    async fn the_map_stays_bounded() {
        let cache = ResolveCache::new(Duration::from_secs(60), 8).unwrap();
        for i in 0..50 {
            let domain = Domain::parse(&format!("d{i}.com")).unwrap();
            cache
                .virtual_accounts(&domain, false, || async { Ok(vec![]) })
                .await
                .0
                .unwrap();
        }
        let kept = cache.virtual_accounts.map.lock().unwrap().len();
        assert!(kept <= 8, "{kept} entries");
        assert!(ResolveCache::new(Duration::ZERO, 8).is_none(), "0 is off");
    }
}
