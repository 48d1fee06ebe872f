//! A few quick in-call retries of transient failures (delays from
//! [`crate::retry::quick`], the one module that uses `backoff`).
//!
//! Durable retries belong to the engine (the case is rescheduled); here a
//! call gets at most [`QuickRetry::max_attempts`] tries within
//! [`QuickRetry::budget`]. A `Retry-After` that fits in what is left of the
//! budget is waited for; a longer one ends the call with
//! [`CommerceError::Transient`] carrying it, so the engine reschedules.

use std::future::Future;
use std::time::Duration;

use super::CommerceError;
use crate::retry::{Quick, QuickPolicy, quick};

/// How hard one call tries before it reports a transient failure.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QuickRetry {
    /// Tries in all, the first included.
    pub(crate) max_attempts: u32,
    /// Time from the first try after which no new try starts.
    pub(crate) budget: Duration,
    /// Pause after the first failure (doubles, with jitter).
    pub(crate) initial: Duration,
}

impl Default for QuickRetry {
    fn default() -> Self {
        let p = QuickPolicy::default();
        Self {
            max_attempts: p.max_attempts,
            budget: p.budget,
            initial: p.initial,
        }
    }
}

impl QuickRetry {
    /// Runs `attempt` until it succeeds, fails permanently, or the attempts
    /// or the budget run out; returns the last error then.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        endpoint: &'static str,
        mut attempt: F,
    ) -> Result<T, CommerceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CommerceError>>,
    {
        let policy = QuickPolicy {
            max_attempts: self.max_attempts,
            budget: self.budget,
            initial: self.initial,
        };
        quick(policy, || {
            let fut = attempt();
            async move {
                match fut.await {
                    Ok(v) => Ok(v),
                    Err(e @ CommerceError::Permanent { .. }) => Err(Quick::Stop(e)),
                    Err(e @ CommerceError::Transient { retry_after, .. }) => {
                        tracing::debug!(endpoint, error = %e, "Commerce call failed; may retry shortly.");
                        Err(Quick::Retry(e, retry_after))
                    }
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use std::time::Instant;

    use super::*;
    use crate::commerce::ErrorCode;

    fn transient(retry_after: Option<Duration>) -> CommerceError {
        CommerceError::Transient {
            retry_after,
            detail: "HTTP 503".into(),
        }
    }

    #[tokio::test]
    async fn retries_transient_failures_up_to_the_attempt_limit() {
        let calls = AtomicU32::new(0);
        let policy = QuickRetry {
            initial: Duration::from_millis(5),
            ..QuickRetry::default()
        };
        let out: Result<(), _> = policy
            .run("test", || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(transient(None)) }
            })
            .await;
        assert_eq!(out, Err(transient(None)));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn stops_at_a_permanent_failure_and_returns_success() {
        let calls = AtomicU32::new(0);
        let policy = QuickRetry {
            initial: Duration::from_millis(5),
            ..QuickRetry::default()
        };
        let refused = CommerceError::Permanent {
            code: ErrorCode::OrderNotFound,
            detail: "no".into(),
        };
        let out: Result<(), _> = policy
            .run("test", || {
                calls.fetch_add(1, Ordering::SeqCst);
                let e = refused.clone();
                async move { Err(e) }
            })
            .await;
        assert_eq!(out, Err(refused));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let calls = AtomicU32::new(0);
        let out = policy
            .run("test", || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move { if n == 0 { Err(transient(None)) } else { Ok(n) } }
            })
            .await;
        assert_eq!(out, Ok(1));
    }

    #[tokio::test]
    async fn a_retry_after_beyond_the_budget_is_handed_back() {
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        let wait = Some(Duration::from_secs(30));
        let out: Result<(), _> = QuickRetry::default()
            .run("test", || {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Err(transient(wait)) }
            })
            .await;
        assert_eq!(out, Err(transient(wait)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
