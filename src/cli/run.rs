//! `holdclear run` (being built: see the issue that owns it).

use std::process::ExitCode;

/// Arguments of `holdclear run`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `holdclear run`.
pub async fn execute(_settings: crate::config::Settings, _args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("holdclear run is not built yet")
}
