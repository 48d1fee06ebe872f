//! The client-side rate limit: one budget of calls per second shared by every
//! task that holds a clone of the client, token requests included, plus a
//! shared pause while the server has asked us (429 `Retry-After`) to wait.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Calls per second, enforced before every request.
pub(crate) struct Limiter {
    bucket: DefaultDirectRateLimiter,
    /// No request before this instant (set by a 429 with `Retry-After`).
    paused_until: Mutex<Option<Instant>>,
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
        })
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
        Ok(())
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
