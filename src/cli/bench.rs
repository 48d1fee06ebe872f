//! `holdclear bench`: throughput, latency and memory of one worker on this
//! machine, next to the limits of the machine's RabbitMQ and PostgreSQL,
//! measured in the same run (see [`crate::bench`]).
//!
//! It works on a database and exchange/queue names of its own, created
//! here and removed at the end, also when a section fails.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::ExitCode;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use crate::bench::{Bench, BenchSettings, Report, SECTIONS};
use crate::broker::{self, Broker};
use crate::config::Settings;
use crate::store::Store;

/// The rules the worker runs with: the shipped example file (its
/// `acme-direct` rule decides every benchmark order).
const BENCH_RULES: &str = include_str!("../../deploy/config/rules.toml");

/// Arguments of `holdclear bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Held orders for sections 1 and 2 (intake vs broker and database).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub orders: u64,
    /// Held orders per end-to-end run (sections 3, 5 and 6).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub flow_orders: u64,
    /// Watched cases for section 4 (at least 10,000).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(10_000..=10_000_000))]
    pub watching: u64,
    /// Closed cases past their retention for section 8 (with their
    /// history, events and inbox ids).
    #[arg(long, default_value_t = 5_000_000, value_parser = clap::value_parser!(u64).range(1_000..=20_000_000))]
    pub closed: u64,
    /// Most worker processes in section 6 (runs with 1, 2, … of them).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub workers: u16,
    /// Sections to run, e.g. `1,3,5` (1 intake vs broker, 2 intake vs
    /// database, 3 end to end, 4 watching at scale, 5 memory, 6 more
    /// workers, 7 API calls per order under the rate limit, 8 pruning a
    /// backlog: not run unless named).
    #[arg(long, default_value = "1,2,3,4,5,6,7")]
    pub sections: String,
    /// Print the report as JSON (for machines) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write SVG plots of the run into this directory: orders cleared
    /// over time under the rate limit (section 7), claim p50 / p99 against
    /// watched cases (section 4).
    #[arg(long, value_name = "DIR")]
    pub plot: Option<std::path::PathBuf>,
}

fn sections(raw: &str) -> Result<BTreeSet<u8>, super::UsageError> {
    let mut set = BTreeSet::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u8>() {
            Ok(n) if SECTIONS.iter().any(|(s, _)| *s == n) => {
                set.insert(n);
            }
            _ => {
                return Err(super::UsageError(format!(
                    "--sections: {part:?} is not a section (1 to 8)"
                )));
            }
        }
    }
    if set.is_empty() {
        return Err(super::UsageError("--sections: name at least one".into()));
    }
    Ok(set)
}

/// Runs `holdclear bench`.
pub async fn execute(base: Settings, args: Args) -> anyhow::Result<ExitCode> {
    crate::ops::logs::init(crate::config::LogFormat::Pretty, "off,holdclear=error");
    let sections = sections(&args.sections)?;
    // From here on ctrl-c and SIGTERM end the run through its clean-up.
    let stop = super::interrupted();
    let scratch = super::ScratchRun::new(&base, "bench")?;
    let work_dir = std::env::temp_dir().join(format!("holdclear-bench-{}", scratch.run));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&work_dir)?;
    }
    let rules_path = work_dir.join("rules.toml");
    std::fs::write(&rules_path, BENCH_RULES)?;

    let mut settings = base.clone();
    settings.database_url = scratch.database_url.clone();
    settings.amqp.topology = scratch.topology.clone();
    settings.rules_path = rules_path;
    let bench = BenchSettings {
        orders: args.orders,
        flow_orders: args.flow_orders,
        watching: args.watching,
        closed: args.closed,
        workers: usize::from(args.workers),
        sections,
        worker_exe: std::env::current_exe()?,
        work_dir: work_dir.clone(),
        progress: !args.json,
    };
    let mut err = std::io::stderr();
    writeln!(
        err,
        "holdclear bench: database {}, exchanges and queues prefixed holdclear-bench-{}.",
        scratch.database_url, scratch.run
    )?;

    let result = measure(&settings, bench, stop).await;
    clean_up(&settings, &scratch).await;
    let report = match result {
        Ok(report) => {
            std::fs::remove_dir_all(&work_dir).ok();
            report
        }
        Err(e) => {
            keep_worker_logs(&work_dir);
            // Removed if nothing is left in it (no worker ran).
            if std::fs::remove_dir(&work_dir).is_err() {
                writeln!(err, "Worker logs: {}", work_dir.display())?;
            }
            return Err(e);
        }
    };

    if let Some(dir) = &args.plot {
        for path in crate::bench::plot::write(&report, dir)? {
            writeln!(err, "Plot written: {}", path.display())?;
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(out, "{}", table(&report))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the sections on the scratch database of `settings`, until done or
/// interrupted (ctrl-c, SIGTERM: worker processes are killed as the run is
/// dropped).
async fn measure(
    settings: &Settings,
    bench: BenchSettings,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Report> {
    // Seeding a million cases, VACUUM ANALYZE and CHECKPOINT may rightly
    // take longer than a worker's statement may.
    let timeouts = crate::config::DatabaseTimeouts {
        statement: std::time::Duration::from_secs(3600),
        ..settings.database_timeouts.clone()
    };
    let store = Store::connect_with(
        &settings.database_url,
        settings.database_tls_ca.as_ref(),
        8,
        &timeouts,
    )
    .await?;
    store.migrate().await?;
    let b = Bench {
        settings: settings.clone(),
        bench,
        store: store.clone(),
    };
    let report = tokio::select! {
        r = b.run() => r.map_err(anyhow::Error::from),
        () = stop => Err(anyhow::anyhow!("interrupted")),
    };
    store.pool().close().await;
    report
}

/// Removes the run's exchanges, queues and database, whatever happened.
async fn clean_up(settings: &Settings, scratch: &super::ScratchRun) {
    let broker = Broker::from_settings(
        &settings.amqp,
        format!("holdclear bench {} cleanup", scratch.run),
    );
    if let Ok(conn) = broker.connect("cleanup").await {
        broker::delete_topology(&conn, &scratch.topology).await.ok();
        broker::close(&conn).await;
    }
    crate::store::drop_database(&scratch.database_url, settings.database_tls_ca.as_ref())
        .await
        .ok();
}

/// Keeps the worker logs of a failed run for the reader, and removes the
/// settings files beside them (they hold URLs).
fn keep_worker_logs(work_dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(work_dir) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|x| x == "toml") {
                std::fs::remove_file(entry.path()).ok();
            }
        }
    }
}

fn per_sec(x: f64) -> String {
    format!("{x:.0}/s")
}

fn pct(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

/// The report as a plain table: section, what, value, the bar.
pub fn table(r: &Report) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(["section", "measure", "value", "bar"]);
    machine_rows(&mut t, r);
    intake_rows(&mut t, r);
    if let Some(f) = &r.end_to_end {
        let sec = format!("3. end to end ({} orders, 1 worker)", f.orders);
        flow_rows(&mut t, &sec, f, true);
    }
    if let Some(w) = &r.watching {
        watching_rows(&mut t, w);
    }
    if let Some(mem) = &r.memory {
        let fmt = |x: Option<f64>| x.map_or("not measured".into(), |m| format!("{m:.1} MiB"));
        t.add_row([
            "5. memory".to_owned(),
            "peak RSS, intake (section 1, in-process)".to_owned(),
            fmt(mem.intake_peak_rss_mib),
            format!("≤ {} MiB", mem.target_mib),
        ]);
        t.add_row([
            "5. memory".to_owned(),
            "peak RSS, worker process (section 3)".to_owned(),
            fmt(mem.end_to_end_peak_rss_mib),
            format!("≤ {} MiB", mem.target_mib),
        ]);
    }
    for f in r.workers.iter().flatten() {
        let sec = format!("6. {} worker(s), {} orders", f.workers, f.orders);
        flow_rows(&mut t, &sec, f, false);
    }
    if let Some(c) = &r.calls_per_order {
        calls_rows(&mut t, c);
    }
    if let Some(p) = &r.pruning {
        pruning_rows(&mut t, p);
    }
    t
}

/// The machine the run measured: cores, memory, versions, load.
fn machine_rows(t: &mut Table, r: &Report) {
    let m = &r.machine;
    t.add_row([
        "machine".to_owned(),
        "cores, memory, PostgreSQL, RabbitMQ".to_owned(),
        format!(
            "{} cores, {} MiB, PostgreSQL {}, RabbitMQ {}",
            m.cores,
            m.memory_mib.map_or("?".into(), |x| x.to_string()),
            m.postgresql,
            m.rabbitmq.as_deref().unwrap_or("?")
        ),
        String::new(),
    ]);
    let load = |x: Option<f64>| x.map_or("?".into(), |l| format!("{l:.1}"));
    t.add_row([
        "machine".to_owned(),
        "load average (1 min) at start, at end".to_owned(),
        format!("{}, {}", load(m.load_average[0]), load(m.load_average[1])),
        format!("≤ {} (else others shared the CPU)", m.cores),
    ]);
}

/// Sections 1 and 2: intake next to the broker's and the database's limits.
fn intake_rows(t: &mut Table, r: &Report) {
    if let Some(s) = &r.intake_vs_broker {
        let sec = format!("1. intake vs broker ({} orders)", s.orders);
        let prefetch = format!(
            "broker: ack-only consumer, prefetch {}",
            r.settings.prefetch
        );
        for (measure, value, bar) in [
            (
                "preload, windows of confirms".to_owned(),
                per_sec(s.publish_per_sec),
                String::new(),
            ),
            (prefetch, per_sec(s.broker_per_sec), String::new()),
            (
                "worker: consumer + intake".to_owned(),
                per_sec(s.intake_per_sec),
                String::new(),
            ),
            (
                "intake / broker".to_owned(),
                pct(s.ratio),
                format!("≥ {}", pct(s.target_ratio)),
            ),
        ] {
            t.add_row([sec.clone(), measure, value, bar]);
        }
    }
    if let Some(s) = &r.intake_vs_database {
        let sec = format!("2. intake vs database ({} orders)", s.orders);
        t.add_row([
            sec.clone(),
            format!(
                "database: record_held, batches of {}, {} at a time",
                s.batch, s.concurrency
            ),
            per_sec(s.database_per_sec),
            String::new(),
        ]);
        if let Some(ratio) = s.ratio {
            t.add_row([
                sec.clone(),
                "intake / its statement alone".into(),
                pct(ratio),
                String::new(),
            ]);
        }
        for run in &s.reference {
            t.add_row([
                sec.clone(),
                format!(
                    "reference: the same rows by {}, {} at a time",
                    run.how, run.concurrency
                ),
                per_sec(run.per_sec),
                String::new(),
            ]);
        }
        t.add_row([
            sec.clone(),
            "record_held alone / reference".into(),
            pct(s.statement_vs_reference),
            String::new(),
        ]);
        if let Some(ratio) = s.intake_vs_reference {
            t.add_row([
                sec,
                "intake / reference (the database's limit)".into(),
                pct(ratio),
                format!("≥ {}", pct(s.target_vs_reference)),
            ]);
        }
    }
}

/// Section 4: claims among few and many watched cases.
fn watching_rows(t: &mut Table, w: &crate::bench::watching::Watching) {
    for (c, label) in [(&w.small, "few"), (&w.large, "many")] {
        t.add_row([
            format!("4. watching ({label} waiting)"),
            format!(
                "claim of {:.0} due among {} watched: p50 / p99",
                c.claimed_per_claim, c.waiting
            ),
            format!("{:.2} / {:.2} ms", c.claim_ms.p50, c.claim_ms.p99),
            if label == "many" {
                format!("≤ {} / {} ms", w.target_ms, w.target_p99_ms)
            } else {
                String::new()
            },
        ]);
        for (part, p) in [
            ("the claim statement", &c.claim_statement_ms),
            ("reading the claimed cases", &c.read_ms),
        ] {
            t.add_row([
                format!("4. watching ({label} waiting)"),
                format!("  of which {part}: p50 / p99"),
                format!("{:.2} / {:.2} ms", p.p50, p.p99),
                String::new(),
            ]);
        }
    }
    t.add_row([
        "4. watching".to_owned(),
        "per claimed case: few → many waiting".to_owned(),
        format!(
            "{:.1} → {:.1} µs (× {:.2})",
            w.small.per_case_us, w.large.per_case_us, w.growth
        ),
        "no growth".to_owned(),
    ]);
    t.add_row([
        "4. watching".to_owned(),
        format!("claim plan uses the {} index", w.claim_index),
        if w.plan_uses_claim_index { "yes" } else { "NO" }.to_owned(),
        "yes".to_owned(),
    ]);
}

/// Section 8's rows: latencies before → during the pass, and the pass.
fn pruning_rows(t: &mut Table, p: &crate::bench::prune::Pruning) {
    let sec = format!("8. pruning {} closed cases", p.closed);
    let (b, d) = (&p.before, &p.during);
    t.add_row([
        sec.clone(),
        format!("intake batch of {}: p50 / p99, idle → pruning", b.batch),
        format!(
            "{:.1} / {:.1} → {:.1} / {:.1} ms",
            b.intake_batch_ms.p50,
            b.intake_batch_ms.p99,
            d.intake_batch_ms.p50,
            d.intake_batch_ms.p99
        ),
        String::new(),
    ]);
    t.add_row([
        sec.clone(),
        format!(
            "claim of 100 among {} open: p50 / p99, idle → pruning",
            p.open
        ),
        format!(
            "{:.2} / {:.2} → {:.2} / {:.2} ms",
            b.claim_ms.p50, b.claim_ms.p99, d.claim_ms.p50, d.claim_ms.p99
        ),
        String::new(),
    ]);
    let deleted: Vec<String> = p.deleted.iter().map(|(t, n)| format!("{t} {n}")).collect();
    t.add_row([
        sec.clone(),
        format!(
            "one pass, slices of {}, {:.0} ms pause: {}",
            p.slice,
            p.pause_ms,
            deleted.join(", ")
        ),
        format!("{:.0} s ({})", p.pass_seconds, per_sec(p.cases_per_sec)),
        String::new(),
    ]);
    t.add_row([
        sec,
        "seeding (with history, events, inbox ids)".into(),
        format!("{:.0} s", p.seed_seconds),
        String::new(),
    ]);
}

fn calls_rows(t: &mut Table, c: &crate::bench::calls::Calls) {
    use crate::bench::calls::{MAX_CALLS_PER_ORDER, MIN_OF_FLOOR};
    let sec = format!(
        "7. API calls ({} orders, {} customers, {} holding, {} calls/s, time ÷ {})",
        c.orders, c.end_customers, c.holding_accounts, c.rate_limit_per_sec, c.time_scale
    );
    let by_endpoint = (c.calls_by_endpoint.iter())
        .map(|(e, n)| format!("{e} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = [
        (
            "API calls per cleared order".to_owned(),
            format!("{:.3}", c.api_calls_per_cleared_order),
            format!("≤ {MAX_CALLS_PER_ORDER}"),
        ),
        ("calls by endpoint".to_owned(), by_endpoint, String::new()),
        (
            "order reads per cleared order".to_owned(),
            format!("{:.3}", c.order_reads_per_cleared_order),
            String::new(),
        ),
        (
            "cleared / escalated, 429 answers".to_owned(),
            format!("{} / {}, {}", c.cleared, c.escalated, c.rate_limited),
            String::new(),
        ),
        (
            "cleared per minute (real time) / floor".to_owned(),
            format!(
                "{:.0} / {:.0} ({})",
                c.cleared_per_minute,
                c.floor_per_minute,
                pct(c.of_floor)
            ),
            format!("≥ {}", pct(MIN_OF_FLOOR)),
        ),
    ];
    for (what, value, bar) in rows {
        t.add_row([sec.clone(), what, value, bar]);
    }
}

fn flow_rows(t: &mut Table, sec: &str, f: &crate::bench::flow::Flow, detailed: bool) {
    t.add_row([
        sec.to_owned(),
        "released orders per second".into(),
        per_sec(f.per_sec),
        if detailed {
            "≥ 1000/s".into()
        } else {
            String::new()
        },
    ]);
    t.add_row([
        sec.to_owned(),
        "publish → released: p50 / p95 / p99".into(),
        format!(
            "{:.0} / {:.0} / {:.0} ms",
            f.latency_ms.p50, f.latency_ms.p95, f.latency_ms.p99
        ),
        String::new(),
    ]);
    t.add_row([
        sec.to_owned(),
        "released / escalated / published".into(),
        format!("{} / {} / {}", f.released, f.escalated, f.orders),
        String::new(),
    ]);
    let peaks: Vec<String> = f.peak_rss_mib.iter().map(|m| format!("{m:.0}")).collect();
    t.add_row([
        sec.to_owned(),
        "peak RSS per worker process".into(),
        format!("{} MiB", peaks.join(", ")),
        String::new(),
    ]);
    if detailed {
        t.add_row([
            sec.to_owned(),
            "commerce API calls per order".into(),
            format!("{:.1}", f.api_calls_per_order),
            String::new(),
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_checked() {
        assert_eq!(
            sections("1, 3,5").unwrap().into_iter().collect::<Vec<_>>(),
            vec![1, 3, 5]
        );
        assert_eq!(
            sections("7,8").unwrap().into_iter().collect::<Vec<_>>(),
            vec![7, 8]
        );
        assert!(sections("9").is_err());
        assert!(sections("").is_err());
        assert!(sections("x").is_err());
    }
}
