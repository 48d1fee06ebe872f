//! `holdclear bench` (being built: see the issue that owns it).

use std::process::ExitCode;

/// Arguments of `holdclear bench`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `holdclear bench`.
pub async fn execute(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("holdclear bench is not built yet")
}
