//! `holdclear rules check [FILE]` and `holdclear rules explain [--rules FILE] [--json] EVENT.json`.
//!
//! Without a file, both use the settings' rules path (`HOLDCLEAR_RULES`,
//! default `deploy/config/rules.toml`). A bad rules file or a bad event
//! exits 64 with the reason.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use super::UsageError;
use crate::domain::HeldOrderEvent;
use crate::rules::Rules;

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
    }
    Ok(ExitCode::SUCCESS)
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
