//! `holdclear rules …` (being built: see the issue that owns it).

use std::process::ExitCode;

/// Subcommands of `holdclear rules`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Placeholder until the subcommands land.
    List,
}

/// Runs `holdclear rules …`.
pub async fn execute(_config: Option<&std::path::Path>, _cmd: Command) -> anyhow::Result<ExitCode> {
    anyhow::bail!("holdclear rules is not built yet")
}
