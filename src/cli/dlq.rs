//! `holdclear dlq …` (being built: see the issue that owns it).

use std::process::ExitCode;

/// Subcommands of `holdclear dlq`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Placeholder until the subcommands land.
    List,
}

/// Runs `holdclear dlq …`.
pub async fn execute(
    _settings: crate::config::Settings,
    _cmd: Command,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("holdclear dlq is not built yet")
}
