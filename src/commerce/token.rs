//! The OAuth2 access token: fetched lazily, cached, refreshed shortly before
//! it expires, shared by every task of one client.
//!
//! One `tokio::sync::Mutex` guards the cache and is held while a new token
//! is fetched, so concurrent callers wait for that one request instead of
//! each sending their own. A generation number tells a caller whose call got
//! a 401 whether someone already replaced the token it used. A refusal of
//! the credentials is remembered for a cool-down and answered from memory,
//! so a misconfigured worker does not hammer the token endpoint.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use super::CommerceError;
use crate::config::Secret;

/// How long a refusal of the credentials is answered from memory.
pub(crate) const REFUSAL_COOL_DOWN: Duration = Duration::from_secs(30);
/// How long a transient failure of the token endpoint is answered from memory.
pub(crate) const FAILURE_COOL_DOWN: Duration = Duration::from_secs(1);
/// The most a token is refreshed ahead of its expiry.
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The longest a token is kept, whatever `expires_in` said: an endpoint
/// may answer "never" (`u64::MAX` seconds), and an `Instant` cannot be
/// moved that far (it panics). A day costs one token request a day.
pub(crate) const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A token as the token endpoint issued it.
pub(crate) struct Fresh {
    /// The bearer token.
    pub(crate) value: Secret,
    /// `expires_in`.
    pub(crate) lifetime: Duration,
}

/// A token handed to one caller, with the generation it belongs to.
#[derive(Clone)]
pub(crate) struct Lease {
    /// The bearer token.
    pub(crate) value: Secret,
    /// Pass back to [`TokenCache::invalidate`] after a 401.
    pub(crate) generation: u64,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("value", &"[redacted]")
            .field("generation", &self.generation)
            .finish()
    }
}

struct Cached {
    value: Secret,
    refresh_at: Instant,
}

struct Failure {
    until: Instant,
    error: CommerceError,
}

#[derive(Default)]
struct State {
    token: Option<Cached>,
    generation: u64,
    failure: Option<Failure>,
}

/// The shared token of one client.
#[derive(Default)]
pub(crate) struct TokenCache {
    state: tokio::sync::Mutex<State>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenCache([redacted])")
    }
}

impl TokenCache {
    /// The current token, or a new one from `fetch` when there is none or it
    /// is about to expire. A failure remembered from an earlier fetch is
    /// returned without calling `fetch` until its cool-down ends.
    pub(crate) async fn get<F, Fut>(&self, fetch: F) -> Result<Lease, CommerceError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fresh, CommerceError>>,
    {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(cached) = &state.token
            && now < cached.refresh_at
        {
            return Ok(Lease {
                value: cached.value.clone(),
                generation: state.generation,
            });
        }
        if let Some(failure) = &state.failure
            && now < failure.until
        {
            return Err(remembered(&failure.error, failure.until - now));
        }
        state.token = None;
        match fetch().await {
            Ok(fresh) => {
                let lifetime = fresh.lifetime.min(MAX_TOKEN_LIFETIME);
                let margin = (lifetime / 10).min(MAX_REFRESH_MARGIN);
                let fetched = Instant::now();
                state.generation += 1;
                state.failure = None;
                state.token = Some(Cached {
                    value: fresh.value.clone(),
                    refresh_at: fetched + lifetime.saturating_sub(margin),
                });
                Ok(Lease {
                    value: fresh.value,
                    generation: state.generation,
                })
            }
            Err(error) => {
                let cool_down = match error {
                    CommerceError::Permanent { .. } => REFUSAL_COOL_DOWN,
                    CommerceError::Transient { retry_after, .. } => retry_after
                        .unwrap_or(FAILURE_COOL_DOWN)
                        .min(REFUSAL_COOL_DOWN),
                };
                state.failure = Some(Failure {
                    until: Instant::now() + cool_down,
                    error: error.clone(),
                });
                Err(error)
            }
        }
    }

    /// Drops the token of `generation` after the server refused it (401),
    /// unless another caller has already replaced it.
    pub(crate) async fn invalidate(&self, generation: u64) {
        let mut state = self.state.lock().await;
        if state.generation == generation {
            state.token = None;
        }
    }
}

/// The remembered error; a transient one says how long it stays.
fn remembered(error: &CommerceError, left: Duration) -> CommerceError {
    match error {
        CommerceError::Transient { detail, .. } => CommerceError::Transient {
            retry_after: Some(left),
            detail: detail.clone(),
        },
        permanent => permanent.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::commerce::ErrorCode;

    fn fresh(value: &str, lifetime: Duration) -> Result<Fresh, CommerceError> {
        Ok(Fresh {
            value: Secret::new(value),
            lifetime,
        })
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let cache = Arc::new(TokenCache::default());
        let fetches = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let cache = cache.clone();
            let fetches = fetches.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get(|| async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        fresh("t1", Duration::from_secs(3600))
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().value.expose(), "t1");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stale_invalidation_keeps_the_newer_token() {
        let cache = TokenCache::default();
        let first = cache
            .get(|| async { fresh("t1", Duration::from_secs(3600)) })
            .await
            .unwrap();
        cache.invalidate(first.generation).await;
        let second = cache
            .get(|| async { fresh("t2", Duration::from_secs(3600)) })
            .await
            .unwrap();
        assert_eq!(second.value.expose(), "t2");
        // A second caller that also held the first token reports its 401 late.
        cache.invalidate(first.generation).await;
        let third = cache
            .get(|| async { fresh("t3", Duration::from_secs(3600)) })
            .await
            .unwrap();
        assert_eq!(third.value.expose(), "t2");
    }

    #[tokio::test]
    async fn a_token_is_refreshed_before_it_expires() {
        let cache = TokenCache::default();
        cache
            .get(|| async { fresh("t1", Duration::from_millis(100)) })
            .await
            .unwrap();
        // Refreshed 10% ahead: at 95 ms the token counts as expired.
        tokio::time::sleep(Duration::from_millis(95)).await;
        let next = cache
            .get(|| async { fresh("t2", Duration::from_secs(60)) })
            .await
            .unwrap();
        assert_eq!(next.value.expose(), "t2");
    }

    #[tokio::test]
    async fn a_token_that_never_expires_is_kept_a_day() {
        let cache = TokenCache::default();
        for lifetime in [
            Duration::MAX,
            Duration::from_secs(9_300_000_000_000_000_000),
        ] {
            let fetched = Instant::now();
            let lease = cache
                .get(|| async { fresh("forever", lifetime) })
                .await
                .unwrap();
            assert_eq!(lease.value.expose(), "forever");
            let state = cache.state.lock().await;
            let refresh_at = state.token.as_ref().unwrap().refresh_at;
            assert!(refresh_at <= fetched + MAX_TOKEN_LIFETIME + Duration::from_secs(1));
            assert!(refresh_at > fetched + MAX_TOKEN_LIFETIME - 2 * MAX_REFRESH_MARGIN);
            drop(state);
            cache.invalidate(lease.generation).await;
        }
    }

    #[tokio::test]
    async fn a_refusal_is_remembered() {
        let cache = TokenCache::default();
        let refused = CommerceError::Permanent {
            code: ErrorCode::InvalidCredentials,
            detail: "invalid_client".into(),
        };
        let fetches = AtomicU32::new(0);
        for _ in 0..5 {
            let err = cache
                .get(|| async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    Err(refused.clone())
                })
                .await
                .unwrap_err();
            assert_eq!(err, refused);
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(!format!("{cache:?}").contains("invalid_client"));
    }
}
