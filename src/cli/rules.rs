//! `holdclear rules check [FILE]`, `rules explain [--rules FILE] [--json] EVENT.json`,
//! `rules stats [--rules FILE] [--since 7d] [--json]` and
//! `rules diff [--rules FILE] [--since 7d] [--json] NEW.toml`.
//!
//! Without a file, they use the settings' rules path (`HOLDCLEAR_RULES`,
//! default `deploy/config/rules.toml`). A bad rules file or a bad event
//! exits 64 with the reason. `stats` and `diff` read the cases of the
//! window and change nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;

use super::UsageError;
use crate::config::{Settings, parse_duration};
use crate::domain::HeldOrderEvent;
use crate::rules::{Rules, WhatIf, WhatIfReport};
use crate::store::{DecisionStats, Store};

/// Largest event file `rules explain` reads, as the worker's default payload limit.
const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Subcommands of `holdclear rules`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Validate a rules file: exit 0 with the rule count and hash, or 64 naming file, rule, key and line.
    Check {
        /// The rules file [default: the settings' rules path, HOLDCLEAR_RULES].
        file: Option<PathBuf>,
    },
    /// Which rule matches a held-order event, which conditions failed for the others, and what would be assigned.
    Explain {
        /// The rules file [default: the settings' rules path, HOLDCLEAR_RULES].
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// A CloudEvents `commerce.order.held.v1` envelope (JSON).
        event: PathBuf,
    },
    /// How many cases each rule decided in a window (and via its fallback), the rules that never matched, and the orders no rule matched.
    Stats {
        /// The rules in force and the window.
        #[command(flatten)]
        window: Window,
    },
    /// Which past orders a new rules file would decide differently (read-only: replays the cases' stored events).
    Diff {
        /// The rules in force and the window.
        #[command(flatten)]
        window: Window,
        /// The new rules file, compared with the rules in force.
        new: PathBuf,
    },
}

/// The rules in force and the cases looked at, for `stats` and `diff`.
#[derive(Debug, clap::Args)]
pub struct Window {
    /// The rules in force [default: the settings' rules path, HOLDCLEAR_RULES].
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// The cases opened this long ago or later (`7d`, `24h`, `30m`).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    since: Duration,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl Window {
    fn start(&self) -> anyhow::Result<DateTime<Utc>> {
        let since = chrono::Duration::from_std(self.since).context("--since is too long")?;
        Ok(Utc::now() - since)
    }

    fn label(&self) -> String {
        humantime::format_duration(self.since).to_string()
    }
}

/// Runs `holdclear rules …`.
pub async fn execute(config: Option<&Path>, cmd: Command) -> anyhow::Result<ExitCode> {
    super::quiet_logs();
    match cmd {
        Command::Check { file } => {
            let path = rules_path(config, file)?;
            let rules = load(&path)?;
            let n = rules.len();
            println!(
                "{}: {n} rule{} OK (sha256 {})",
                path.display(),
                if n == 1 { "" } else { "s" },
                rules.hash()
            );
        }
        Command::Explain { rules, json, event } => {
            let path = rules_path(config, rules)?;
            let rules = load(&path)?;
            let body = std::fs::read(&event).map_err(|e| {
                UsageError(format!("{}: cannot read the event: {e}", event.display()))
            })?;
            let held = HeldOrderEvent::decode(&body, MAX_EVENT_BYTES).map_err(|e| {
                UsageError(format!("{}: not a held-order event: {e}", event.display()))
            })?;
            let explanation = rules.explain(&held.data);
            if json {
                let text = serde_json::to_string_pretty(&explanation)
                    .context("writing the explanation as JSON")?;
                println!("{text}");
            } else {
                println!("{explanation}");
            }
        }
        Command::Stats { window } => stats(config, &window).await?,
        Command::Diff { window, new } => diff(config, &window, &new).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Settings, the rules in force and the store, for `stats` and `diff`.
async fn in_force(config: Option<&Path>, window: &Window) -> anyhow::Result<(Rules, Store)> {
    let settings: Settings = super::load(config)?;
    let path = window.rules.clone().unwrap_or(settings.rules_path.clone());
    let rules = load(&path)?;
    let store = super::open_store(&settings).await?;
    Ok((rules, store))
}

/// `rules stats`.
async fn stats(config: Option<&Path>, window: &Window) -> anyhow::Result<()> {
    let (rules, store) = in_force(config, window).await?;
    let from = window.start()?;
    let stats = store.decision_stats(from).await?;
    let never: Vec<&str> = rules
        .names()
        .filter(|n| !stats.hits.iter().any(|h| h.rule_name == *n))
        .collect();
    if window.json {
        println!("{}", stats_json(&rules, window, from, &stats, &never));
    } else {
        print_stats(&rules, window, from, &stats, &never);
    }
    Ok(())
}

fn stats_json(
    rules: &Rules,
    window: &Window,
    from: DateTime<Utc>,
    stats: &DecisionStats,
    never: &[&str],
) -> serde_json::Value {
    let hits: Vec<_> = (stats.hits.iter())
        .map(|h| {
            serde_json::json!({
                "rule": h.rule_name, "rules_hash": h.rules_hash,
                "in_force": h.rules_hash == rules.hash(),
                "decided": h.decided, "via_fallback": h.via_fallback,
            })
        })
        .collect();
    let groups: Vec<_> = (stats.unmatched.iter())
        .map(|g| {
            serde_json::json!({
                "partner_id": g.partner_id, "end_customer_domain": g.end_customer_domain,
                "country": g.country, "orders": g.cases,
            })
        })
        .collect();
    serde_json::json!({
        "since": window.label(), "from": from, "cases": stats.cases,
        "rules_file": rules.file(), "rules_hash": rules.hash(),
        "hits": hits, "never_matched": never,
        "no_rule_matched": {
            "orders": stats.unmatched.iter().map(|g| g.cases).sum::<i64>(),
            "groups": groups,
        },
    })
}

fn print_stats(
    rules: &Rules,
    window: &Window,
    from: DateTime<Utc>,
    stats: &DecisionStats,
    never: &[&str],
) {
    let from = from.format("%Y-%m-%d %H:%M UTC");
    if stats.cases == 0 {
        println!(
            "No case was opened since {from} (--since {}): nothing to count.",
            window.label()
        );
        return;
    }
    println!(
        "{} cases opened since {from} (--since {}).",
        stats.cases,
        window.label()
    );
    println!(
        "Rules in force: {} (sha256 {})",
        rules.file().display(),
        rules.hash()
    );
    println!("\nDecided per rule:");
    for h in &stats.hits {
        let file = if h.rules_hash == rules.hash() {
            "in force"
        } else {
            "older file"
        };
        println!(
            "  {:<28} {:>7} decided, {:>6} via fallback   (rules {} , {file})",
            h.rule_name,
            h.decided,
            h.via_fallback,
            h.rules_hash.get(..12).unwrap_or(&h.rules_hash),
        );
    }
    if stats.hits.is_empty() {
        println!("  none");
    }
    println!(
        "\nNever matched in the window ({}): {}",
        never.len(),
        never.join(", ")
    );
    let unmatched: i64 = stats.unmatched.iter().map(|g| g.cases).sum();
    println!("\nNo rule matched (NO_RULE_MATCHED): {unmatched} orders");
    for g in &stats.unmatched {
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        println!(
            "  {:>7}  partner_id {}  end_customer_domain {}  country {}",
            g.cases,
            or_none(&g.partner_id),
            or_none(&g.end_customer_domain),
            or_none(&g.country),
        );
    }
}

/// `rules diff`: the new file is checked first (exit 64 like `rules check`).
async fn diff(config: Option<&Path>, window: &Window, new: &Path) -> anyhow::Result<()> {
    let new = load(new)?;
    let (old, store) = in_force(config, window).await?;
    let from = window.start()?;
    let mut what_if = WhatIf::new(&old, &new);
    let mut events = std::pin::pin!(store.stored_events(from));
    while let Some(stored) = events.try_next().await? {
        match &stored.event {
            Ok(event) => what_if.replay(&stored.order_key, &event.data),
            Err(reason) => {
                what_if.unreadable(&stored.order_key, &stored.case_id.to_string(), reason)
            }
        }
    }
    let report = what_if.finish();
    if window.json {
        let json = serde_json::json!({
            "since": window.label(), "from": from,
            "old": {"file": old.file(), "rules_hash": old.hash()},
            "new": {"file": new.file(), "rules_hash": new.hash()},
            "report": report,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&json).context("writing the diff as JSON")?
        );
    } else {
        print_diff(&old, &new, window, from, &report);
    }
    Ok(())
}

fn print_diff(old: &Rules, new: &Rules, window: &Window, from: DateTime<Utc>, r: &WhatIfReport) {
    let from = from.format("%Y-%m-%d %H:%M UTC");
    let (label, unreadable) = (window.label(), r.unreadable.len());
    if r.replayed == 0 && unreadable == 0 {
        println!("No case was opened since {from} (--since {label}): nothing to replay.");
        return;
    }
    println!(
        "Replayed {} orders opened since {from} (--since {label})",
        r.replayed
    );
    println!(
        "  in force: {} (sha256 {})",
        old.file().display(),
        old.hash()
    );
    println!(
        "  new:      {} (sha256 {})",
        new.file().display(),
        new.hash()
    );
    println!(
        "{} unchanged, {} would change.",
        r.unchanged,
        r.changes.len()
    );
    let rule = |r: &Option<String>| {
        r.as_ref()
            .map_or("(no rule)".to_owned(), |r| format!("{r:?}"))
    };
    for c in &r.counts {
        let (o, n) = (rule(&c.old_rule), rule(&c.new_rule));
        println!("  {:>7}  {}: {o} → {n}", c.orders, c.kind);
    }
    if !r.changes.is_empty() {
        println!("\nOrders whose decision would change:");
    }
    let side = |c: &Option<crate::rules::Choice>| {
        c.as_ref()
            .map_or("no rule (NO_RULE_MATCHED)".to_owned(), ToString::to_string)
    };
    for c in &r.changes {
        println!(
            "  {} ({}): {}\n      ⇒ {}",
            c.order,
            c.kind,
            side(&c.old),
            side(&c.new)
        );
    }
    let newly: Vec<&str> = r.newly_unmatched().map(|c| c.order.as_str()).collect();
    println!("\nNewly unmatched ({}): {}", newly.len(), newly.join(", "));
    if unreadable > 0 {
        println!("\nStored events the current decoder cannot read, not replayed ({unreadable}):");
        for u in &r.unreadable {
            println!("  {} (case {}): {}", u.order, u.case_id, u.reason);
        }
    }
}

/// The file given, else the settings' rules path (settings are read only then).
fn rules_path(config: Option<&Path>, given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => Ok(p),
        None => Ok(super::load(config)?.rules_path),
    }
}

fn load(path: &Path) -> Result<Rules, UsageError> {
    Rules::load(path).map_err(|e| UsageError(e.to_string()))
}
