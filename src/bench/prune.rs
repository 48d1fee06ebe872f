//! Section 7: the pruner over a large backlog. Closed cases past their
//! retention (each with its history, its published event and its inbox
//! id) are seeded set-based beside open watched cases; then intake's
//! statement ([`crate::store::Store::record_held`], one intake batch) and
//! the engine's claim ([`crate::store::Store::claim_due`]) are timed with
//! the pruner idle, and again while one pass of it (the worker's settings:
//! slice, pause, retention) works the backlog off; the pass is timed too.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Bench, BenchError, Percentiles, load, watching};
use crate::prune::{Pass, Pruner};

/// Open watched cases beside the backlog (the claims' haystack).
const OPEN: u64 = 100_000;
/// Closed cases inserted per statement while seeding.
const SEED_CHUNK: u64 = 50_000;
/// Samples (one intake batch and one claim each) with the pruner idle.
const BEFORE: usize = 200;
/// Most samples while the pass runs (one every [`GAP`]).
const DURING_MAX: usize = 20_000;
/// Time between two samples.
const GAP: Duration = Duration::from_millis(100);
/// The claims' lease (as section 4).
const LEASE: Duration = Duration::from_secs(3600);

/// Section 7.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pruning {
    /// Closed cases seeded past their retention.
    pub closed: u64,
    /// Rows seeded with them: history lines, outbox rows, inbox ids.
    pub history: u64,
    /// Open watched cases beside them.
    pub open: u64,
    /// Seeding, seconds.
    pub seed_seconds: f64,
    /// Intake batch and claim with the pruner idle.
    pub before: Latencies,
    /// The same while the pass runs.
    pub during: Latencies,
    /// The pass over the whole backlog, seconds.
    pub pass_seconds: f64,
    /// Rows the pass deleted, per table (rows that went with them not counted).
    pub deleted: Vec<(String, u64)>,
    /// Cases deleted per second over the pass.
    pub cases_per_sec: f64,
    /// The pass's slice and pause, milliseconds.
    pub slice: u32,
    /// Pause between two slices, milliseconds.
    pub pause_ms: f64,
}

/// Latencies of intake and claims, milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Latencies {
    /// One intake batch (`record_held`).
    pub intake_batch_ms: Percentiles,
    /// Intake batch size.
    pub batch: usize,
    /// One claim of [`watching::DUE`] due cases.
    pub claim_ms: Percentiles,
}

/// Runs section 8.
pub async fn run(b: &Bench) -> Result<Pruning, BenchError> {
    b.tables().truncate().await?;
    let event = serde_json::to_value(load::decoded(&load::held_body(
        "prune",
        4_100_000_000,
        Utc::now(),
    ))?)
    .map_err(|e| BenchError::BadEvent(e.to_string()))?;
    let closed = b.bench.closed;
    let seeding = Instant::now();
    let (hour, spread) = (Duration::from_secs(3600), Duration::from_secs(6 * 3600));
    b.tables()
        .seed_watching(0, OPEN as i64, &event, Utc::now(), hour, spread)
        .await?;
    let bar = b.bar(closed, "7. seeding closed cases");
    let mut seeded = 0;
    while seeded < closed {
        let take = (closed - seeded).min(SEED_CHUNK);
        b.tables()
            .seed_closed(seeded as i64, take as i64, &event)
            .await?;
        seeded += take;
        bar.set_position(seeded);
    }
    bar.finish_and_clear();
    b.tables().vacuum_all().await?;
    b.tables().checkpoint().await;
    let seed_seconds = seeding.elapsed().as_secs_f64();

    let mut sampler = Sampler::new(b)?;
    for _ in 0..BEFORE {
        sampler.sample(b).await?;
    }
    let before = sampler.take();

    let settings = b.settings.prune.clone();
    let pruner = Pruner::new(b.store.clone(), settings.clone(), "holdclear-bench");
    let bar = b.bar(closed, "7. pruning (cases deleted)");
    let pass = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let pass = pruner
                .pass(&CancellationToken::new(), &mut |t, n| {
                    if t == crate::store::PruneTable::Cases {
                        bar.inc(n);
                    }
                })
                .await;
            (pass, started.elapsed())
        })
    };
    while !pass.is_finished() && sampler.len() < DURING_MAX {
        sampler.sample(b).await?;
        tokio::time::sleep(GAP).await;
    }
    let during = sampler.take();
    let (pass, elapsed) = pass.await.map_err(|e| BenchError::Io {
        what: "the pruning pass".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    bar.finish_and_clear();
    let deleted = match pass? {
        Pass::Done(d) | Pass::Stopped(d) => d,
        Pass::Busy => Vec::new(),
    };
    let cases = deleted
        .iter()
        .find(|(t, _)| *t == crate::store::PruneTable::Cases)
        .map_or(0, |(_, n)| *n);
    b.tables().truncate().await?;
    Ok(Pruning {
        closed,
        history: closed * (HISTORY_PER_CASE + 2),
        open: OPEN,
        seed_seconds,
        before,
        during,
        pass_seconds: elapsed.as_secs_f64(),
        deleted: deleted
            .into_iter()
            .map(|(t, n)| (t.as_str().to_owned(), n))
            .collect(),
        cases_per_sec: super::rate(cases, elapsed),
        slice: settings.slice,
        pause_ms: settings.pause.as_secs_f64() * 1e3,
    })
}

/// History lines per seeded closed case.
pub const HISTORY_PER_CASE: u64 = crate::store::bench::CLOSED_HISTORY_PER_CASE;

/// Times one intake batch of new held orders and one claim per sample.
struct Sampler {
    run: String,
    next: u64,
    batch: usize,
    intake: Vec<f64>,
    claims: Vec<f64>,
}

impl Sampler {
    fn new(b: &Bench) -> Result<Self, BenchError> {
        Ok(Self {
            run: format!("prune-{}", std::process::id()),
            next: 4_200_000_000,
            batch: b.settings.amqp.intake_batch,
            intake: Vec::new(),
            claims: Vec::new(),
        })
    }

    fn len(&self) -> usize {
        self.claims.len()
    }

    async fn sample(&mut self, b: &Bench) -> Result<(), BenchError> {
        let events = (self.next..self.next + self.batch as u64)
            .map(|n| load::decoded(&load::held_body(&self.run, n, Utc::now())))
            .collect::<Result<Vec<_>, _>>()?;
        self.next += self.batch as u64;
        let started = Instant::now();
        b.store.record_held(&events).await?;
        self.intake.push(started.elapsed().as_secs_f64() * 1e3);
        b.tables().make_due(watching::DUE).await?;
        let started = Instant::now();
        b.store
            .claim_due("holdclear-bench", LEASE, watching::DUE as usize)
            .await?;
        self.claims.push(started.elapsed().as_secs_f64() * 1e3);
        Ok(())
    }

    fn take(&mut self) -> Latencies {
        Latencies {
            intake_batch_ms: Percentiles::of(std::mem::take(&mut self.intake)),
            batch: self.batch,
            claim_ms: Percentiles::of(std::mem::take(&mut self.claims)),
        }
    }
}
