//! `holdclear dlq list | replay | purge`: the dead-letter queue, for operators.

use std::io::Write;
use std::process::ExitCode;

use chrono::Utc;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use super::UsageError;
use crate::broker::Broker;
use crate::broker::dlq::{self, DeadLetter, Selection};
use crate::config::{Settings, parse_duration};

/// Subcommands of `holdclear dlq`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show the dead letters without consuming or reordering them.
    List {
        /// Machine-readable output, one JSON array.
        #[arg(long)]
        json: bool,
        /// Show at most this many messages from the head of the queue.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Put dead letters back on their original exchange and routing key.
    Replay {
        /// Every message (required when no --id or --code narrows the choice).
        #[arg(long)]
        all: bool,
        /// Only the message with this id (repeatable).
        #[arg(long = "id", value_name = "MESSAGE_ID")]
        ids: Vec<String>,
        /// Only messages with this error code (repeatable), e.g. INVALID_EVENT.
        #[arg(long = "code", value_name = "ERROR_CODE")]
        codes: Vec<String>,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Messages republished per second, at most.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// Replay at most this many messages.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters.
    Purge {
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
        /// Only messages dead-lettered longer ago than this (e.g. 7d, 12h).
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// Only messages with this error code (repeatable).
        #[arg(long = "code", value_name = "ERROR_CODE")]
        codes: Vec<String>,
    },
}

/// Runs `holdclear dlq …`.
pub async fn execute(settings: Settings, cmd: Command) -> anyhow::Result<ExitCode> {
    super::quiet_logs();
    let queue = settings.amqp.topology.dead_letter_queue.clone();
    let broker = Broker::from_settings(&settings.amqp, "holdclear-dlq");
    let conn = broker.connect("dlq").await?;
    let mut out = std::io::stdout().lock();
    match cmd {
        Command::List { json, limit } => {
            let letters = dlq::browse(&conn, &queue, limit).await?;
            if json {
                serde_json::to_writer_pretty(&mut out, &letters)?;
                writeln!(out)?;
            } else if letters.is_empty() {
                writeln!(out, "{queue} is empty.")?;
            } else {
                writeln!(out, "{}", table(&letters))?;
                writeln!(out, "{} message(s) in {queue}.", letters.len())?;
            }
        }
        Command::Replay {
            all,
            ids,
            codes,
            dry_run,
            rate,
            limit,
            json,
        } => {
            if !all && ids.is_empty() && codes.is_empty() {
                return Err(UsageError(
                    "say which messages to replay: --all, --id MESSAGE_ID or --code ERROR_CODE"
                        .into(),
                )
                .into());
            }
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(UsageError("--rate must be greater than 0".into()).into());
            }
            let selection = Selection {
                message_ids: ids,
                error_codes: codes,
                failed_before: None,
            };
            let report = dlq::replay(&conn, &queue, &selection, limit, rate, dry_run).await?;
            if json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                if !report.replayed.is_empty() {
                    writeln!(out, "{}", table(&report.replayed))?;
                }
                for (letter, reason) in &report.failed {
                    writeln!(
                        out,
                        "not replayed: {} ({reason})",
                        letter.message_id.as_deref().unwrap_or("(no message id)")
                    )?;
                }
                let verb = if dry_run {
                    "would be replayed"
                } else {
                    "replayed"
                };
                writeln!(
                    out,
                    "{} of {} message(s) {verb}; {} failed.",
                    report.replayed.len(),
                    report.examined,
                    report.failed.len()
                )?;
            }
            if !report.failed.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Purge {
            yes,
            older_than,
            codes,
        } => {
            if !yes {
                return Err(UsageError(
                    "purging deletes dead letters for good: add --yes to confirm".into(),
                )
                .into());
            }
            let failed_before = older_than
                .map(|d| {
                    parse_duration(&d)
                        .map_err(|e| UsageError(format!("--older-than: {e}")))
                        .and_then(|d| {
                            chrono::Duration::from_std(d)
                                .map(|d| Utc::now() - d)
                                .map_err(|_| UsageError("--older-than is too long".into()))
                        })
                })
                .transpose()?;
            let selection = Selection {
                message_ids: Vec::new(),
                error_codes: codes,
                failed_before,
            };
            let purged = dlq::purge(&conn, &queue, &selection).await?;
            writeln!(out, "{} message(s) purged from {queue}.", purged.len())?;
        }
    }
    crate::broker::close(&conn).await;
    Ok(ExitCode::SUCCESS)
}

fn table(letters: &[DeadLetter]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header([
        "#",
        "message id",
        "error code",
        "detail",
        "order",
        "failed at",
        "replayed",
    ]);
    for l in letters {
        t.add_row([
            l.position.to_string(),
            l.message_id.clone().unwrap_or_default(),
            l.error_code.clone().unwrap_or_default(),
            l.error_detail.clone().unwrap_or_default(),
            l.order_number.clone().unwrap_or_default(),
            l.failed_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
            l.replayed.to_string(),
        ]);
    }
    t
}
