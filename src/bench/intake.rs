//! Sections 1 and 2: how fast the worker's intake turns held orders into
//! cases, next to the broker's limit (a consumer that only acknowledges,
//! with the worker's prefetch) and the database's limit (the cheapest
//! write of the same rows, [`BenchTables::write_reference`], by `unnest`
//! and by `COPY`, with intake's and with the pool's number of transactions
//! at once; the best is the limit), measured on the same orders. Intake's
//! own statement ([`crate::store::Store::record_held`]) is timed alone
//! beside it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Bench, BenchError, load, memory, rate};
use crate::broker::{self, Broker, Consumer, ConsumerSettings};
use crate::domain::HeldOrderEvent;
use crate::intake::{Intake, IntakeSettings};
use crate::ops::health::Health;
use crate::store::bench::{BenchTables, ReferenceWrite};

/// Give up when nothing moved for this long.
const STALL: Duration = Duration::from_secs(60);
/// How often intake's progress is read from the queue's depth.
const DEPTH_EVERY: Duration = Duration::from_millis(50);
/// How often the inbox is counted once the queue shows nothing ready.
const COUNT_LAST_EVERY: Duration = Duration::from_millis(5);
/// Order numbers of section 1: the broker's run, then intake's.
const FIRST_BROKER: u64 = 1_000_000_000;
const FIRST_INTAKE: u64 = 2_000_000_000;

/// Section 1.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IntakeVsBroker {
    /// Held orders in each run.
    pub orders: u64,
    /// Preloading with a window of confirms, per second.
    pub publish_per_sec: f64,
    /// The ack-only consumer, per second.
    pub broker_per_sec: f64,
    /// The worker's consumer and intake (committed, then acked), per second.
    pub intake_per_sec: f64,
    /// `intake / broker`.
    pub ratio: f64,
    /// The bar for the ratio.
    pub target_ratio: f64,
}

/// Section 2.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IntakeVsDatabase {
    /// Held orders written.
    pub orders: u64,
    /// Events per transaction (intake's batch).
    pub batch: usize,
    /// Transactions in flight at once (as many as intake writes at once).
    pub concurrency: usize,
    /// Intake's statement run directly, per second.
    pub database_per_sec: f64,
    /// Section 1's intake, per second, when it ran.
    pub intake_per_sec: Option<f64>,
    /// `intake / database` (intake's statement alone).
    pub ratio: Option<f64>,
    /// The cheapest writes of the same rows, each way and concurrency tried.
    pub reference: Vec<ReferenceRun>,
    /// The fastest of `reference`, per second: the database's limit.
    pub reference_per_sec: f64,
    /// `intake / reference_per_sec`, when section 1 ran.
    pub intake_vs_reference: Option<f64>,
    /// `record_held alone / reference_per_sec`.
    pub statement_vs_reference: f64,
    /// The bar for `intake_vs_reference`.
    pub target_vs_reference: f64,
}

/// One run of the reference write.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceRun {
    /// `unnest` or `copy`.
    pub how: &'static str,
    /// Transactions at once.
    pub concurrency: usize,
    /// Events made durable per second.
    pub per_sec: f64,
}

/// Runs section 1; also returns this process's peak memory while intake
/// ran (MiB) and the intake run's events, decoded, for section 2.
pub async fn against_broker(
    b: &Bench,
) -> Result<(IntakeVsBroker, Option<f64>, Vec<HeldOrderEvent>), BenchError> {
    let n = b.bench.orders;
    let topology = &b.settings.amqp.topology;
    let run = run_tag(b);
    let (conn, publisher) = b.fresh_start("publisher").await?;

    // The broker's limit.
    let bar = b.bar(n, "1. preloading held orders");
    let started = Instant::now();
    load::preload(&publisher, topology, &run, FIRST_BROKER, n, &|d| {
        bar.set_position(d)
    })
    .await?;
    let publish_per_sec = rate(n, started.elapsed());
    bar.finish_and_clear();
    let bar = b.bar(n, "1. broker: ack-only consumer");
    let broker_time = broker::bench::drain_ack_only(
        &conn,
        &topology.held_queue,
        b.settings.amqp.prefetch,
        n,
        STALL,
        &|d| bar.set_position(d),
    )
    .await?;
    bar.finish_and_clear();

    // The worker's intake on as many orders.
    let bar = b.bar(n, "1. preloading held orders again");
    load::preload(&publisher, topology, &run, FIRST_INTAKE, n, &|d| {
        bar.set_position(d)
    })
    .await?;
    bar.finish_and_clear();
    let bar = b.bar(n, "1. intake: consumer + intake (commit, ack)");
    b.tables().checkpoint().await;
    let reset = memory::reset_peak();
    let intake_time = run_intake(b, n, &|d| bar.set_position(d)).await?;
    let peak = if reset {
        memory::peak_rss_mib("self")
    } else {
        None
    };
    bar.finish_and_clear();
    broker::close(&conn).await;

    let events = (FIRST_INTAKE..FIRST_INTAKE + n)
        .map(|number| load::decoded(&load::held_body(&run, number, chrono::Utc::now())))
        .collect::<Result<Vec<_>, _>>()?;
    let broker_per_sec = rate(n, broker_time);
    let intake_per_sec = rate(n, intake_time);
    Ok((
        IntakeVsBroker {
            orders: n,
            publish_per_sec,
            broker_per_sec,
            intake_per_sec,
            ratio: if broker_per_sec > 0.0 {
                intake_per_sec / broker_per_sec
            } else {
                0.0
            },
            target_ratio: 0.7,
        },
        peak,
        events,
    ))
}

/// The worker's consumer and intake, wired as `holdclear run` wires them,
/// until the inbox holds `n` events; the time from the subscription on.
async fn run_intake(b: &Bench, n: u64, progress: &dyn Fn(u64)) -> Result<Duration, BenchError> {
    let health = Health::new();
    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    let (tx, rx) = mpsc::channel(usize::from(b.settings.amqp.prefetch).max(1));
    let consumer = Consumer::new(
        Broker::from_settings(&b.settings.amqp, "holdclear bench intake"),
        ConsumerSettings {
            topology: b.settings.amqp.topology.clone(),
            prefetch: b.settings.amqp.prefetch,
            delivery_limit: b.settings.amqp.delivery_limit,
        },
        Arc::clone(&health),
    );
    let intake = Intake::new(
        b.store.clone(),
        IntakeSettings::from(&b.settings.amqp),
        health,
        Arc::new(Notify::new()),
    );
    let started = Instant::now();
    let consuming = tokio::spawn(consumer.run(tx, stop.clone(), abort.clone()));
    let intaking = tokio::spawn(intake.run(rx, abort.clone()));

    // Progress from the queue's depth (the broker answers, not the
    // database under test); the inbox is counted only for the last few
    // hundred orders, which the queue no longer shows.
    let result = async {
        let conn = Broker::from_settings(&b.settings.amqp, "holdclear bench")
            .connect("depth")
            .await?;
        let queue = &b.settings.amqp.topology.held_queue;
        let mut last = (0u64, Instant::now());
        let outcome = loop {
            let ready = broker::bench::queue_counts(&conn, queue).await?.ready;
            let mut done = n.saturating_sub(u64::from(ready));
            if ready == 0 {
                done = b.tables().inbox_count().await?.max(0) as u64;
                if done >= n {
                    break Ok(started.elapsed());
                }
            }
            progress(done);
            if done > last.0 {
                last = (done, Instant::now());
            } else if last.1.elapsed() > STALL {
                break Err(BenchError::Stalled {
                    what: "intake",
                    done,
                    expected: n,
                    waited: STALL,
                });
            }
            let pause = if ready == 0 {
                COUNT_LAST_EVERY
            } else {
                DEPTH_EVERY
            };
            tokio::time::sleep(pause).await;
        };
        broker::close(&conn).await;
        outcome
    }
    .await;

    stop.cancel();
    let closing = tokio::time::timeout(Duration::from_secs(10), consuming).await;
    if tokio::time::timeout(Duration::from_secs(10), intaking)
        .await
        .is_err()
    {
        abort.cancel();
    }
    if let Ok(Ok(Some(conn))) = closing {
        conn.close().await;
    }
    result
}

/// Runs section 2 on `events` (section 1's, or made here), comparing with
/// section 1's intake rate when there is one.
pub async fn against_database(
    b: &Bench,
    events: Option<Vec<HeldOrderEvent>>,
    intake_per_sec: Option<f64>,
) -> Result<IntakeVsDatabase, BenchError> {
    let n = b.bench.orders;
    let events = match events {
        Some(e) => e,
        None => {
            let run = run_tag(b);
            (FIRST_INTAKE..FIRST_INTAKE + n)
                .map(|number| load::decoded(&load::held_body(&run, number, chrono::Utc::now())))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    let batch = b.settings.amqp.intake_batch.max(1);
    let concurrency = crate::intake::IntakeSettings::from(&b.settings.amqp).in_flight;
    let bar = b.bar(n, "2. database: intake's statement, directly");
    let database_per_sec = timed(
        b,
        &events,
        concurrency,
        &|d| bar.set_position(d),
        |chunk| async move { b.store.record_held(chunk).await.map(|r| r.len() as u64) },
    )
    .await?;
    bar.finish_and_clear();
    let reference = reference_runs(b, &events, concurrency).await?;
    let reference_per_sec = reference.iter().map(|r| r.per_sec).fold(0.0, f64::max);
    let vs = |x: f64| (reference_per_sec > 0.0).then(|| x / reference_per_sec);
    Ok(IntakeVsDatabase {
        orders: events.len() as u64,
        batch,
        concurrency,
        database_per_sec,
        intake_per_sec,
        ratio: intake_per_sec
            .filter(|_| database_per_sec > 0.0)
            .map(|i| i / database_per_sec),
        intake_vs_reference: intake_per_sec.and_then(vs),
        statement_vs_reference: vs(database_per_sec).unwrap_or(0.0),
        reference,
        reference_per_sec,
        target_vs_reference: 0.8,
    })
}

/// The reference write, by `unnest` and by `COPY`, with intake's number of
/// transactions at once and with the bench pool's (8).
async fn reference_runs(
    b: &Bench,
    events: &[HeldOrderEvent],
    intake_concurrency: usize,
) -> Result<Vec<ReferenceRun>, BenchError> {
    let mut concurrencies = vec![intake_concurrency, REFERENCE_MAX_CONCURRENCY];
    concurrencies.dedup();
    let mut runs = Vec::new();
    for how in [ReferenceWrite::Unnest, ReferenceWrite::Copy] {
        for &concurrency in &concurrencies {
            let label = format!("2. reference: {}, {concurrency} at once", how.name());
            let bar = b.bar(events.len() as u64, &label);
            let tables = b.tables();
            let tables = &tables;
            let per_sec = timed(
                b,
                events,
                concurrency,
                &|d| bar.set_position(d),
                |chunk| async move { tables.write_reference(how, chunk).await },
            )
            .await?;
            bar.finish_and_clear();
            runs.push(ReferenceRun {
                how: how.name(),
                concurrency,
                per_sec,
            });
        }
    }
    Ok(runs)
}

/// Transactions at once of the reference's second try: the bench's pool.
const REFERENCE_MAX_CONCURRENCY: usize = 8;

/// Empties the tables, then writes `events` in intake's batches with
/// `concurrency` writes at once; events per second.
async fn timed<'a, F, Fut>(
    b: &Bench,
    events: &'a [HeldOrderEvent],
    concurrency: usize,
    progress: &dyn Fn(u64),
    write: F,
) -> Result<f64, BenchError>
where
    F: Fn(&'a [HeldOrderEvent]) -> Fut,
    Fut: std::future::Future<Output = Result<u64, crate::store::StoreError>>,
{
    let tables: BenchTables = b.tables();
    tables.truncate().await?;
    tables.checkpoint().await;
    let batch = b.settings.amqp.intake_batch.max(1);
    let started = Instant::now();
    let mut writes = futures_util::stream::iter(events.chunks(batch))
        .map(write)
        .buffer_unordered(concurrency.max(1));
    let mut done = 0u64;
    while let Some(written) = writes.next().await {
        done += written?;
        progress(done);
    }
    Ok(rate(done, started.elapsed()))
}

/// Event ids are unique per run: the run's database name ends with its tag.
fn run_tag(b: &Bench) -> String {
    b.settings
        .database_url
        .url()
        .path()
        .rsplit('_')
        .next()
        .unwrap_or("run")
        .to_owned()
}
