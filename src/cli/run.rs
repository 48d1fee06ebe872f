//! `holdclear run`: the worker, until SIGTERM or ctrl-c.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::worker::WorkerError;

/// Arguments of `holdclear run`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the worker; SIGTERM and ctrl-c start a graceful shutdown, after
/// which it exits 0. SIGHUP reloads the rules, and never kills it: it is
/// listened for before anything else, settings included (the default action
/// of SIGHUP is to terminate), and one that comes while the worker starts
/// waits for the reload task (the worker hears the same stream).
pub async fn execute(config: Option<&Path>, _args: Args) -> anyhow::Result<ExitCode> {
    let (signals, hangups) = Signals::install()?;
    let settings = super::load(config)?;
    // sqlx reports PostgreSQL notices (e.g. "relation already exists,
    // skipping" from the migrator) at INFO; they are not the worker's lifecycle.
    crate::ops::logs::init(settings.log_format, "info,sqlx::postgres::notice=warn");
    log_panics();
    let cancel = CancellationToken::new();
    tokio::spawn(signals.stop_on_signal(cancel.clone()));
    match crate::worker::run(settings, cancel, hangups).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // A bad rules file, unusable commerce settings or refused commerce
        // credentials are the operator's to fix.
        Err(
            e
            @ (WorkerError::Rules(_) | WorkerError::Commerce(_) | WorkerError::Credentials { .. }),
        ) => Err(super::UsageError(e.to_string()).into()),
        Err(e) => Err(e.into()),
    }
}

/// Panics become log lines (ERROR, with where and, when `RUST_BACKTRACE`
/// asks, the backtrace), not text among the JSON lines. A panic in a step
/// or a task is caught and handled (see the engine and the worker's
/// supervisor); this only says where it happened.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = crate::ops::health::panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(panic = %message, location = %location, backtrace = %backtrace, "Panicked.");
        } else {
            tracing::error!(panic = %message, location = %location, "Panicked.");
        }
    }));
}

/// The signals that stop `holdclear run`, listened for from its first line.
pub(crate) struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    /// Listens for SIGTERM, SIGINT and SIGHUP (the last one's stream is the
    /// rules reload's).
    pub(crate) fn install() -> anyhow::Result<(Self, Signal)> {
        let listen = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot listen for {name}"))
        };
        let signals = Self {
            terminate: listen(SignalKind::terminate(), "SIGTERM")?,
            interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
        };
        let hangups = crate::rules::listen_for_hangups().context("cannot listen for SIGHUP")?;
        Ok((signals, hangups))
    }

    /// Cancels `cancel` on the first SIGTERM or ctrl-c (SIGINT).
    pub(crate) async fn stop_on_signal(mut self, cancel: CancellationToken) {
        let signal = tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal, "Signal received; shutting down.");
        cancel.cancel();
    }
}
