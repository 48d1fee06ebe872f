//! The client-side rate limit: one budget of calls per second shared by every
//! task that holds a clone of the client, token requests included, plus a
//! shared pause while the server has asked us (429 `Retry-After`) to wait.
//!
//! `HOLDCLEAR_COMMERCE_RATE_LIMIT` holds for the whole deployment: once the
//! worker's store is up, [`Limiter::share`] hands it a [`RateBudget`] (a
//! token bucket in PostgreSQL, one row). Each call then passes the local
//! limiter (evenly spaced at the full rate: no worker alone exceeds it)
//! and spends one token of a small grant taken from the shared bucket (a
//! twentieth of a second's worth, one round trip for that many calls).
//! Grants not spent soon lapse, so no worker sits on budget it is not
//! using. The shared bucket holds at most half a second's worth: the
//! servers' limits commonly allow a second's burst, so the deployment never
//! sends more than the server allows in any window. While the database
//! cannot be asked, calls go on under the local limit alone (the engine
//! cannot commit steps then anyway).

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// How long a grant from the shared budget stays usable.
const GRANT_LIFETIME: Duration = Duration::from_millis(250);
/// A grant covers this much of the rate.
const GRANT_SPAN: f64 = 0.05;
/// The largest grant asked for.
const MAX_GRANT: u32 = 50;
/// The shared bucket holds at most this much of the rate.
const BURST_SPAN: f64 = 0.5;
/// Longest sleep before asking the shared budget again.
const MAX_BUDGET_WAIT: Duration = Duration::from_secs(1);
/// At most one warning per this while the shared budget cannot be asked.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Calls of the deployment's budget a worker was granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Calls granted (0: none left now).
    pub granted: u32,
    /// With none granted: how long until the next call is.
    pub next_in: Duration,
}

/// The deployment's budget of commerce calls, shared by every worker.
#[async_trait::async_trait]
pub trait RateBudget: Send + Sync {
    /// Takes up to `want` calls of a budget refilled at `rate` calls per
    /// second and holding at most `burst`; `Err` says why it cannot be
    /// asked (never a secret).
    async fn take(&self, want: u32, rate: f64, burst: f64) -> Result<Grant, String>;
}

/// Calls per second, enforced before every request.
pub(crate) struct Limiter {
    bucket: DefaultDirectRateLimiter,
    /// No request before this instant (set by a 429 with `Retry-After`).
    paused_until: Mutex<Option<Instant>>,
    rate: f64,
    /// The deployment's budget, once the worker's store is up.
    shared: OnceLock<Arc<dyn RateBudget>>,
    /// Calls granted by the shared budget and not spent yet.
    granted: Mutex<(u32, Instant)>,
    /// One request to the shared budget at a time per worker.
    asking: tokio::sync::Mutex<Option<Instant>>,
}

impl Limiter {
    /// A limiter of `per_second` calls (fractions allowed, e.g. 0.5), without
    /// bursts: calls are spaced evenly. `None` when the rate is not positive.
    pub(crate) fn new(per_second: f64) -> Option<Self> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return None;
        }
        let period = Duration::try_from_secs_f64(1.0 / per_second).ok()?;
        let quota = Quota::with_period(period)?.allow_burst(NonZeroU32::MIN);
        Some(Self {
            bucket: RateLimiter::direct(quota),
            paused_until: Mutex::new(None),
            rate: per_second,
            shared: OnceLock::new(),
            granted: Mutex::new((0, Instant::now())),
            asking: tokio::sync::Mutex::new(None),
        })
    }

    /// From now on, every call also spends the deployment's `budget`.
    pub(crate) fn share(&self, budget: Arc<dyn RateBudget>) {
        let _ = self.shared.set(budget);
    }

    /// Waits for a slot. When the server asked for a pause that ends later
    /// than `max_wait` from now, returns at once with the time left instead.
    pub(crate) async fn acquire(&self, max_wait: Duration) -> Result<(), Duration> {
        if let Some(left) = self.pause_left() {
            if left > max_wait {
                return Err(left);
            }
            tokio::time::sleep(left).await;
        }
        self.bucket.until_ready().await;
        if let Some(budget) = self.shared.get() {
            self.spend_shared(budget.as_ref()).await;
        }
        Ok(())
    }

    /// One call of the shared budget: from this worker's grant, else from
    /// a new grant, waiting for the bucket to refill when it is empty.
    async fn spend_shared(&self, budget: &dyn RateBudget) {
        let want = ((self.rate * GRANT_SPAN).ceil() as u32).clamp(1, MAX_GRANT);
        let burst = (self.rate * BURST_SPAN).max(1.0);
        loop {
            if self.spend_granted() {
                return;
            }
            let mut warned = self.asking.lock().await;
            if self.spend_granted() {
                return;
            }
            match budget.take(want, self.rate, burst).await {
                Ok(grant) if grant.granted > 0 => {
                    let mut g = self.granted.lock().unwrap_or_else(|p| p.into_inner());
                    *g = (grant.granted - 1, Instant::now() + GRANT_LIFETIME);
                    return;
                }
                // Others wait behind this lock: one asks for all of them.
                Ok(grant) => {
                    let wait = grant
                        .next_in
                        .clamp(Duration::from_millis(1), MAX_BUDGET_WAIT);
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        tracing::warn!(error = %e, "Cannot take from the shared commerce rate budget; calls go on under this worker's limit alone.");
                        *warned = Some(Instant::now());
                    }
                    return;
                }
            }
        }
    }

    fn spend_granted(&self) -> bool {
        let mut g = self.granted.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 > 0 && Instant::now() < g.1 {
            g.0 -= 1;
            return true;
        }
        false
    }

    /// Holds every request of this client back for `wait` (a 429's `Retry-After`).
    pub(crate) fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }

    fn pause_left(&self) -> Option<Duration> {
        let paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        paused
            .and_then(|until| until.checked_duration_since(Instant::now()))
            .filter(|left| !left.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_rates_that_are_not_positive() {
        assert!(Limiter::new(0.0).is_none());
        assert!(Limiter::new(-1.0).is_none());
        assert!(Limiter::new(f64::NAN).is_none());
        assert!(Limiter::new(0.5).is_some());
    }

    #[tokio::test]
    async fn spaces_calls_evenly() {
        let limiter = Limiter::new(50.0).unwrap();
        let start = Instant::now();
        for _ in 0..11 {
            limiter.acquire(Duration::ZERO).await.unwrap();
        }
        // Ten intervals of 20 ms after the first free call.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(190), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(600), "{elapsed:?}");
    }

    #[tokio::test]
    async fn a_long_pause_is_reported_not_waited() {
        let limiter = Limiter::new(100.0).unwrap();
        limiter.pause_for(Duration::from_secs(5));
        let left = limiter.acquire(Duration::from_secs(1)).await.unwrap_err();
        assert!(
            left > Duration::from_secs(4) && left <= Duration::from_secs(5),
            "{left:?}"
        );

        let short = Limiter::new(100.0).unwrap();
        short.pause_for(Duration::from_millis(100));
        let start = Instant::now();
        short.acquire(Duration::from_secs(1)).await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(90));
    }
}
