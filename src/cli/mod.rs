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
pub mod console;
pub mod demo;
pub mod dlq;
pub mod migrate;
pub mod prune;
pub mod rules;
mod rules_suggest;
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

/// The subcommands, one file each under `cli/`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The worker: consume held orders, drive cases, publish events, serve health and metrics.
    Run(run::Args),
    /// Apply pending database migrations and exit.
    Migrate,
    /// Validate and explain the default Smart Account rules.
    #[command(subcommand)]
    Rules(rules::Command),
    /// Dead letters kept in PostgreSQL: list, show, group, archive, purge, replay.
    #[command(subcommand)]
    Dlq(dlq::Command),
    /// The state of held orders, one case's history, and acting on a case.
    #[command(subcommand)]
    Cases(cases::Command),
    /// The operators' web console (its own process and port).
    Console(console::Args),
    /// The commerce-API simulator.
    Sim(sim::Args),
    /// The whole loop on one machine, ending in a summary.
    Demo(demo::Args),
    /// Measure throughput, latency and memory on this machine.
    Bench(bench::Args),
    /// Delete rows past their retention now (one pass), or say what a pass would delete.
    Prune(prune::Args),
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
            eprintln!("error: {}", one_line(&e));
            if e.downcast_ref::<ConfigError>().is_some() || e.downcast_ref::<UsageError>().is_some()
            {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, each cause said once: a cause
/// whose text the line already holds (errors that show their source in
/// their own message, as most do) is not repeated.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Run(args) => run::execute(config, args).await,
        Command::Migrate => migrate::execute(load(config)?).await,
        Command::Rules(cmd) => rules::execute(config, cmd).await,
        Command::Dlq(cmd) => dlq::execute(load(config)?, cmd).await,
        Command::Cases(cmd) => cases::execute(load(config)?, cmd).await,
        Command::Console(args) => console::execute(config, args).await,
        Command::Sim(args) => sim::execute(args).await,
        Command::Demo(args) => demo::execute(load(config)?, args).await,
        Command::Bench(args) => bench::execute(load(config)?, args).await,
        Command::Prune(args) => prune::execute(load(config)?, args).await,
    }
}

/// Loads and validates the settings (exit 64 naming the setting on error).
pub fn load(config: Option<&std::path::Path>) -> Result<Settings, ConfigError> {
    Settings::load(config)
}

/// The store of a one-shot command: two connections, and never a database
/// it creates (a missing or unmigrated one is named, with what to do).
pub async fn open_store(settings: &Settings) -> anyhow::Result<crate::store::Store> {
    let store = crate::store::Store::open(
        &settings.database_url,
        settings.database_tls_ca.as_ref(),
        2,
        &settings.database_timeouts,
    )
    .await?;
    if !store.ready().await {
        anyhow::bail!(
            "the database {} has no (or an older) holdclear schema: run `holdclear migrate`",
            settings.database_url
        );
    }
    Ok(store)
}

/// Log set-up for one-shot commands: holdclear's own warnings and errors
/// only, unless `RUST_LOG` says more. Libraries (sqlx, lapin, …) stay out
/// of a command's output: what failed is said once, by the command.
pub fn quiet_logs() {
    use std::io::IsTerminal;
    let format = if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    };
    crate::ops::logs::init(format, "off,holdclear=warn");
}

/// Resolves on ctrl-c or SIGTERM: the commands that make scratch
/// databases and queues (`bench`, `demo`) stop on either and remove them.
/// Both signals are taken over when this is called, not when it is first
/// awaited: one that comes in between is kept for it, never the default
/// end of the process with the scratch left behind.
pub(crate) fn interrupted() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    async fn next(s: Option<&mut tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    async move {
        tokio::select! {
            () = next(int.as_mut()) => {}
            () = next(term.as_mut()) => {}
        }
    }
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

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot reach it: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("the broker is away")]
    struct Quiet(#[source] Inner);

    #[test]
    fn each_cause_is_said_once() {
        // The top error already says its cause: once.
        let e = anyhow::Error::new(Outer(Inner));
        assert_eq!(one_line(&e), "cannot reach it: connection refused");
        // A context and a cause that is not in the line yet: both.
        let e = anyhow::Error::new(Quiet(Inner)).context("dlq list");
        assert_eq!(
            one_line(&e),
            "dlq list: the broker is away: connection refused"
        );
        // Line breaks inside a message become spaces.
        let e = anyhow::anyhow!("two\nlines");
        assert_eq!(one_line(&e), "two lines");
    }
}
