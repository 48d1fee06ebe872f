//! `holdclear demo` (being built: see the issue that owns it).

use std::process::ExitCode;

/// Arguments of `holdclear demo`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `holdclear demo`.
pub async fn execute(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("holdclear demo is not built yet")
}
