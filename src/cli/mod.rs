//! The command line: one file per subcommand, `anyhow` only here.
//!
//! Exit codes: 0 success, 64 bad usage or invalid configuration (the message
//! names the setting), 1 anything else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, LogFormat, SecretUrl, Settings, Topology};

pub mod bench;
pub mod cases;
pub mod demo;
pub mod dlq;
pub mod migrate;
pub mod rules;
pub mod run;
pub mod sim;

/// Exit code for bad usage or invalid configuration (sysexits `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// holdclear: clears Cisco Smart Account holds on orders.
#[derive(Debug, Parser)]
#[command(name = "holdclear", version, about, long_about = None)]
pub struct Cli {
    /// Settings file (TOML); environment variables override it.
    #[arg(long, global = true, env = "HOLDCLEAR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The worker: consume held orders, drive cases, publish events, serve health and metrics.
    Run(run::Args),
    /// Apply pending database migrations and exit.
    Migrate,
    /// Validate and explain the default Smart Account rules.
    #[command(subcommand)]
    Rules(rules::Command),
    /// Inspect, replay and purge the dead-letter queue.
    #[command(subcommand)]
    Dlq(dlq::Command),
    /// The state of held orders, one case's history, and re-running a case.
    #[command(subcommand)]
    Cases(cases::Command),
    /// The commerce-API simulator.
    Sim(sim::Args),
    /// The whole loop on one machine, ending in a summary.
    Demo(demo::Args),
    /// Measure throughput, latency and memory on this machine.
    Bench(bench::Args),
}

/// An error that is the user's to fix: exits 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs the command line to completion and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() || e.downcast_ref::<UsageError>().is_some()
            {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Run(args) => run::execute(load(config)?, args).await,
        Command::Migrate => migrate::execute(load(config)?).await,
        Command::Rules(cmd) => rules::execute(config, cmd).await,
        Command::Dlq(cmd) => dlq::execute(load(config)?, cmd).await,
        Command::Cases(cmd) => cases::execute(load(config)?, cmd).await,
        Command::Sim(args) => sim::execute(args).await,
        Command::Demo(args) => demo::execute(load(config)?, args).await,
        Command::Bench(args) => bench::execute(load(config)?, args).await,
    }
}

/// Loads and validates the settings (exit 64 naming the setting on error).
pub fn load(config: Option<&std::path::Path>) -> Result<Settings, ConfigError> {
    Settings::load(config)
}

/// Log set-up for one-shot commands: holdclear's own warnings and errors
/// only, unless `RUST_LOG` says more. Libraries (lapin, sqlx, …) stay quiet:
/// a failing command prints one clear line of its own, not their log lines.
pub fn quiet_logs() {
    use std::io::IsTerminal;
    let format = if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    };
    crate::ops::logs::init(format, "off,holdclear=warn");
}

/// The database and broker names of one run of a command that works on its
/// own (`demo`, `bench`): `run` is `<pid>_<6 hex>`, the database
/// `holdclear_<what>_<run>` beside the configured one, the exchanges and
/// queues prefixed `holdclear-<what>-<run>.`.
pub(crate) struct ScratchRun {
    pub run: String,
    pub database_url: SecretUrl,
    pub topology: Topology,
}

impl ScratchRun {
    pub(crate) fn new(base: &Settings, what: &str) -> Result<Self, ConfigError> {
        let run = format!(
            "{}_{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let mut db_url = base.database_url.url().clone();
        db_url.set_path(&format!("holdclear_{what}_{run}"));
        Ok(Self {
            database_url: SecretUrl::parse("database", db_url.as_str())?,
            topology: Topology::prefixed(&format!("holdclear-{what}-{run}.")),
            run,
        })
    }
}
