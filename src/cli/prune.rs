//! `holdclear prune`: one pass of the pruner now (an operator catching up
//! on a large backlog, with progress), or, with `--dry-run`, what the next
//! pass would delete, per table. The retention settings are `holdclear
//! run`'s; a worker pruning at the same time makes this pass wait for
//! its turn rather than run beside it.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::config::{PruneSettings, Settings, format_duration_short};
use crate::ops::identity::WorkerIdentity;
use crate::prune::{Pass, Pruner};
use crate::store::PruneTable;

/// Arguments of `holdclear prune`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print what a pass would delete, per table, and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Runs `holdclear prune`.
pub async fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    super::quiet_logs();
    let store = super::open_store(&settings).await?;
    let identity = WorkerIdentity::new();
    let pruner = Pruner::new(store, settings.prune.clone(), format!("cli {identity}"));
    let prunable = pruner.dry_run().await?;
    let mut out = std::io::stdout().lock();
    if args.dry_run {
        writeln!(out, "A pass now would delete:")?;
        for (table, rows) in &prunable.rows {
            writeln!(
                out,
                "  {table:<22} {rows:>12}  {}",
                rule(&settings.prune, table)
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let expected: HashMap<&str, i64> = prunable.rows.iter().copied().collect();
    let bars = MultiProgress::new();
    let mut by_table: HashMap<PruneTable, ProgressBar> = HashMap::new();
    for table in PruneTable::ALL {
        let bar = bars.add(ProgressBar::new(
            expected.get(table.as_str()).copied().unwrap_or(0).max(0) as u64,
        ));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>14} {bar:30} {pos}/{len} {per_sec} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(table.as_str());
        by_table.insert(table, bar);
    }
    let stop = CancellationToken::new();
    let interrupt = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            interrupt.cancel();
        }
    });
    let mut progress = |table: PruneTable, n: u64| {
        if let Some(bar) = by_table.get(&table) {
            bar.inc(n);
        }
    };
    let pass = pass_when_free(&pruner, &stop, &mut progress).await?;
    let _ = bars.clear();
    let (deleted, word) = match pass {
        Pass::Done(deleted) => (deleted, "Deleted"),
        Pass::Stopped(deleted) => (deleted, "Interrupted; deleted"),
        Pass::Busy => {
            anyhow::bail!("another worker is pruning; nothing was deleted (try again later)")
        }
    };
    let said: Vec<String> = deleted
        .iter()
        .map(|(t, n)| format!("{} {n}", t.as_str()))
        .collect();
    let said = if said.is_empty() {
        "nothing (every retention is off)".to_owned()
    } else {
        said.join(", ")
    };
    writeln!(out, "{word}: {said}.")?;
    Ok(ExitCode::SUCCESS)
}

/// A pass, waiting up to a minute for a worker's pass to finish first.
async fn pass_when_free(
    pruner: &Pruner,
    stop: &CancellationToken,
    progress: &mut (dyn FnMut(PruneTable, u64) + Send),
) -> anyhow::Result<Pass> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let pass = pruner.pass(stop, progress).await?;
        if pass != Pass::Busy || tokio::time::Instant::now() >= deadline {
            return Ok(pass);
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(Pass::Busy),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A table's rule, in words, with its setting.
fn rule(s: &PruneSettings, table: &str) -> String {
    let keep = |d: Option<Duration>| match d {
        Some(d) => format_duration_short(d),
        None => "for ever".to_owned(),
    };
    match table {
        "outbox" => format!(
            "published events, kept {} (HOLDCLEAR_OUTBOX_RETENTION)",
            keep(s.outbox)
        ),
        "inbox" => format!(
            "event ids, kept {} (HOLDCLEAR_INBOX_RETENTION)",
            keep(s.inbox)
        ),
        "cases" => format!(
            "released and merged cases kept {} (HOLDCLEAR_CASE_RETENTION), escalated {} (HOLDCLEAR_ESCALATED_CASE_RETENTION)",
            keep(s.cases),
            keep(s.escalated_cases)
        ),
        "dead_letters" => format!(
            "archived and replayed dead letters, kept {} (HOLDCLEAR_DLQ_RETENTION)",
            keep(s.dead_letters)
        ),
        "case_history" => "with their cases".to_owned(),
        _ => "with their dead letters".to_owned(),
    }
}
