//! Delay policies: the one module that uses the `backoff` crate.
//!
//! `backoff` is unmaintained upstream (RUSTSEC-2025-0012); keeping every use
//! here means swapping it touches one file. Three users:
//! - the case engine's durable retries: [`durable_delay`] gives the delay
//!   before attempt *n*; the case is rescheduled in PostgreSQL, not slept;
//! - quick in-call retries of the commerce client: [`quick`];
//! - reconnect loops (broker, database): [`Reconnect`].

use std::future::Future;
use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;

use crate::config::RetrySettings;

fn exponential(
    initial: Duration,
    max_interval: Duration,
    multiplier: f64,
    randomization: f64,
    max_elapsed: Option<Duration>,
) -> ExponentialBackoff {
    ExponentialBackoff {
        current_interval: initial,
        initial_interval: initial,
        randomization_factor: randomization,
        multiplier,
        max_interval,
        max_elapsed_time: max_elapsed,
        ..ExponentialBackoff::default()
    }
}

/// The delay before retry number `attempt` (1 for the first retry) under
/// the configured exponential policy, jitter included. The retry budget
/// (`max_elapsed`) is the caller's to check against the time of the first
/// failure, since that time is stored, not kept in memory.
pub fn durable_delay(settings: &RetrySettings, attempt: u32) -> Duration {
    let mut policy = exponential(
        settings.initial,
        settings.max_interval,
        settings.multiplier,
        settings.randomization,
        None,
    );
    // Without a clock budget the policy never ends; the loop is bounded by
    // the attempt number, and past 64 doublings every interval is the maximum.
    let mut delay = settings.initial;
    for _ in 0..attempt.clamp(1, 64) {
        delay = policy.next_backoff().unwrap_or(settings.max_interval);
    }
    delay.min(settings.max_interval.mul_f64(1.0 + settings.randomization))
}

/// The interval to wait before look number `polls` (0 for the first look
/// after an assignment): `initial` doubling up to `max`, without jitter so
/// that an operator can predict it.
pub fn poll_delay(initial: Duration, max: Duration, polls: u32) -> Duration {
    let factor = 2f64.powi(polls.min(32) as i32);
    initial.mul_f64(factor).min(max)
}

/// Whether a failed quick call is worth repeating, and how soon at the earliest.
#[derive(Debug)]
pub enum Quick<E> {
    /// Try again (after at least the given delay, when the server asked for one).
    Retry(E, Option<Duration>),
    /// Stop and return this error.
    Stop(E),
}

/// How hard one quick call tries before it reports a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuickPolicy {
    /// Tries in all, the first included.
    pub max_attempts: u32,
    /// Time from the first try after which no new try starts.
    pub budget: Duration,
    /// Pause after the first failure (doubles, with jitter, up to 1 s).
    pub initial: Duration,
}

impl Default for QuickPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            budget: Duration::from_secs(2),
            initial: Duration::from_millis(100),
        }
    }
}

/// Runs `op` up to `policy.max_attempts` times within `policy.budget`, with
/// short exponential delays, for failures `op` marks [`Quick::Retry`]. A
/// requested delay longer than what is left of the budget stops the retries
/// and returns that error: longer waits are the engine's job.
pub async fn quick<T, E, F, Fut>(policy: QuickPolicy, mut op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Quick<E>>>,
{
    let start = tokio::time::Instant::now();
    let mut delays = exponential(
        policy.initial,
        Duration::from_secs(1).max(policy.initial),
        2.0,
        0.3,
        Some(policy.budget),
    );
    let mut tries = 0;
    loop {
        tries += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(Quick::Stop(e)) => return Err(e),
            Err(Quick::Retry(e, asked)) => {
                if tries >= policy.max_attempts.max(1) {
                    return Err(e);
                }
                let Some(mut delay) = delays.next_backoff() else {
                    return Err(e);
                };
                if let Some(asked) = asked {
                    delay = delay.max(asked);
                }
                if start.elapsed() + delay > policy.budget {
                    return Err(e);
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Delays between reconnect attempts: 100 ms doubling to 10 s, with jitter,
/// forever; reset after a successful connection.
#[derive(Debug)]
pub struct Reconnect(ExponentialBackoff);

impl Default for Reconnect {
    fn default() -> Self {
        Self(exponential(
            Duration::from_millis(100),
            Duration::from_secs(10),
            2.0,
            0.3,
            None,
        ))
    }
}

impl Reconnect {
    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.0.next_backoff().unwrap_or(Duration::from_secs(10))
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(randomization: f64) -> RetrySettings {
        RetrySettings {
            initial: Duration::from_secs(1),
            max_interval: Duration::from_secs(300),
            max_elapsed: Duration::from_secs(3600),
            multiplier: 2.0,
            randomization,
        }
    }

    #[test]
    fn durable_delays_grow_and_cap() {
        let s = settings(0.0);
        let got: Vec<u64> = (1..=12).map(|n| durable_delay(&s, n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }

    #[test]
    fn durable_delays_jitter_within_bounds() {
        let s = settings(0.2);
        for n in 1..20 {
            let d = durable_delay(&s, n).as_secs_f64();
            let nominal = (2f64.powi(n as i32 - 1)).min(300.0);
            assert!(
                d >= nominal * 0.8 - 1e-9 && d <= (nominal * 1.2).min(360.0) + 1e-9,
                "{n}: {d}"
            );
        }
    }

    #[test]
    fn poll_delays_double_to_the_maximum() {
        let got: Vec<u64> = (0..8)
            .map(|n| poll_delay(Duration::from_secs(30), Duration::from_secs(900), n).as_secs())
            .collect();
        assert_eq!(got, [30, 60, 120, 240, 480, 900, 900, 900]);
    }

    #[tokio::test]
    async fn quick_retries_then_gives_up_within_the_budget() {
        let mut calls = 0;
        let started = tokio::time::Instant::now();
        let policy = QuickPolicy {
            max_attempts: 100,
            budget: Duration::from_millis(800),
            initial: Duration::from_millis(100),
        };
        let r: Result<(), &str> = quick(policy, || {
            calls += 1;
            async { Err(Quick::Retry("down", None)) }
        })
        .await;
        assert_eq!(r, Err("down"));
        assert!(calls >= 2, "{calls}");
        assert!(started.elapsed() <= Duration::from_millis(900));
    }

    #[tokio::test]
    async fn quick_stops_at_once_on_a_permanent_error_and_on_a_long_retry_after() {
        let mut calls = 0;
        let r: Result<(), &str> = quick(QuickPolicy::default(), || {
            calls += 1;
            async { Err(Quick::Stop("no")) }
        })
        .await;
        assert_eq!((r, calls), (Err("no"), 1));
        let mut calls = 0;
        let r: Result<(), &str> = quick(QuickPolicy::default(), || {
            calls += 1;
            async { Err(Quick::Retry("slow down", Some(Duration::from_secs(30)))) }
        })
        .await;
        assert_eq!((r, calls), (Err("slow down"), 1));
    }
}
