//! `holdclear sim` (being built: see the issue that owns it).

use std::process::ExitCode;

/// Arguments of `holdclear sim`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `holdclear sim`.
pub async fn execute(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("holdclear sim is not built yet")
}
