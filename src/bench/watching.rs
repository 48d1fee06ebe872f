//! Section 4: the engine's claim ([`crate::store::Store::claim_due`]) of
//! about a hundred due cases among many that are being watched and not due
//! for hours; first with a small number waiting, then with the large one,
//! so that the cost per claimed case can be compared. Also the claim's
//! plan: it must walk [`CLAIM_INDEX`] of the narrow `case_schedule`, not a
//! table. Seeding writes each case's schedule row beside it.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use super::{Bench, BenchError, Percentiles, load};

/// The index the claim's plan must use.
pub const CLAIM_INDEX: &str = "case_schedule_due";
/// Cases made due before each claim (and the claim's limit).
pub const DUE: i64 = 100;
/// Claims timed at each size.
const CLAIMS: usize = 200;
/// The small number of waiting cases.
const SMALL: u64 = 10_000;
/// Cases inserted per statement while seeding.
const SEED_CHUNK: u64 = 100_000;
/// The claimer's name.
const OWNER: &str = "holdclear-bench";
/// The claims' lease: long enough that a claimed case is not due again
/// during the section.
const LEASE: Duration = Duration::from_secs(3600);

/// Section 4.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Watching {
    /// The claims with few cases waiting.
    pub small: Claims,
    /// The claims with the large number waiting.
    pub large: Claims,
    /// Seeding the large number, seconds (set-based inserts).
    pub seed_seconds: f64,
    /// `large.p50 per case / small.p50 per case`: 1 means no growth.
    pub growth: f64,
    /// The claim's plan uses [`CLAIM_INDEX`].
    pub plan_uses_claim_index: bool,
    /// The index the plan must use ([`CLAIM_INDEX`]).
    pub claim_index: &'static str,
    /// The plan, as PostgreSQL printed it (with the large number waiting).
    pub plan: Vec<String>,
    /// The bar for `large.p50`, milliseconds.
    pub target_ms: f64,
    /// The bar for `large.p99`, milliseconds.
    pub target_p99_ms: f64,
}

/// Claims timed with a number of cases waiting.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    /// Watched cases not due.
    pub waiting: u64,
    /// Cases claimed per claim, on average (about [`DUE`]).
    pub claimed_per_claim: f64,
    /// One claim as the engine makes it ([`crate::store::Store::claim_due`]):
    /// the claim, then the read of the claimed cases, milliseconds.
    pub claim_ms: Percentiles,
    /// Its first half alone: the claim statement on the narrow schedule
    /// (the bar), milliseconds.
    pub claim_statement_ms: Percentiles,
    /// Its second half alone: reading and decoding the claimed cases,
    /// milliseconds.
    pub read_ms: Percentiles,
    /// The median claim divided by the cases it claimed, microseconds.
    pub per_case_us: f64,
}

/// Runs section 4.
pub async fn run(b: &Bench) -> Result<Watching, BenchError> {
    b.tables().truncate().await?;
    let event = serde_json::to_value(load::decoded(&load::held_body(
        "watch",
        4_000_000_000,
        Utc::now(),
    ))?)
    .map_err(|e| BenchError::BadEvent(e.to_string()))?;
    let large = b.bench.watching.max(SMALL);
    let start = Utc::now();
    // Due between one and seven hours from now: nothing of it is due during the run.
    let (offset, spread) = (Duration::from_secs(3600), Duration::from_secs(6 * 3600));

    let bar = b.bar(SMALL, "4. seeding watched cases");
    b.tables()
        .seed_watching(0, SMALL as i64, &event, start, offset, spread)
        .await?;
    b.tables().analyze().await?;
    b.tables().checkpoint().await;
    bar.finish_and_clear();
    let small = claims(b, SMALL, "4. claims, few waiting").await?;

    let bar = b.bar(large, "4. seeding watched cases");
    bar.set_position(SMALL);
    let seeding = Instant::now();
    let mut seeded = SMALL;
    while seeded < large {
        let take = (large - seeded).min(SEED_CHUNK);
        b.tables()
            .seed_watching(seeded as i64, take as i64, &event, start, offset, spread)
            .await?;
        seeded += take;
        bar.set_position(seeded);
    }
    b.tables().analyze().await?;
    b.tables().checkpoint().await;
    let seed_seconds = seeding.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let large = claims(b, large, "4. claims, many waiting").await?;

    let plan = b.tables().explain_claim(DUE).await?;
    let plan_uses_claim_index = plan.iter().any(|l| l.contains(CLAIM_INDEX));
    let growth = if small.per_case_us > 0.0 {
        large.per_case_us / small.per_case_us
    } else {
        0.0
    };
    b.tables().truncate().await?;
    Ok(Watching {
        small,
        large,
        seed_seconds,
        growth,
        plan_uses_claim_index,
        claim_index: CLAIM_INDEX,
        plan,
        target_ms: 2.5,
        target_p99_ms: 4.0,
    })
}

/// Makes [`DUE`] cases due, times one claim, [`CLAIMS`] times.
async fn claims(b: &Bench, waiting: u64, label: &str) -> Result<Claims, BenchError> {
    let bar = b.bar(CLAIMS as u64, label);
    let (mut times, mut claims, mut reads) = (
        Vec::with_capacity(CLAIMS),
        Vec::with_capacity(CLAIMS),
        Vec::with_capacity(CLAIMS),
    );
    let mut claimed = 0usize;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for i in 0..CLAIMS {
        b.tables().make_due(DUE).await?;
        // `Store::claim_due`, in its two halves, each timed.
        let started = Instant::now();
        let ids = b.store.claim_due_ids(OWNER, LEASE, DUE as usize).await?;
        let claim = started.elapsed();
        let got = b.store.read_claimed(&ids, OWNER).await?;
        let whole = started.elapsed();
        times.push(ms(whole));
        claims.push(ms(claim));
        reads.push(ms(whole - claim));
        // A claimed case that does not decode would time a corrupt row's
        // path, not a claim: the section fails instead.
        for c in got {
            c.case?;
            claimed += 1;
        }
        bar.set_position(i as u64 + 1);
    }
    bar.finish_and_clear();
    let claim_ms = Percentiles::of(times);
    let claim_statement_ms = Percentiles::of(claims);
    let read_ms = Percentiles::of(reads);
    let claimed_per_claim = claimed as f64 / CLAIMS as f64;
    Ok(Claims {
        waiting,
        claimed_per_claim,
        per_case_us: if claimed_per_claim > 0.0 {
            claim_ms.p50 * 1e3 / claimed_per_claim
        } else {
            0.0
        },
        claim_ms,
        claim_statement_ms,
        read_ms,
    })
}
