//! `holdclear run`: the worker, until SIGTERM or ctrl-c.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::worker::WorkerError;

/// Arguments of `holdclear run`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the worker; SIGTERM and ctrl-c start a graceful shutdown, after
/// which it exits 0.
pub async fn execute(settings: Settings, _args: Args) -> anyhow::Result<ExitCode> {
    // sqlx reports PostgreSQL notices (e.g. "relation already exists,
    // skipping" from the migrator) at INFO; they are not the worker's lifecycle.
    crate::ops::logs::init(settings.log_format, "info,sqlx::postgres::notice=warn");
    let cancel = CancellationToken::new();
    tokio::spawn(stop_on_signal(cancel.clone()));
    match crate::worker::run(settings, cancel).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // A bad rules file or unusable commerce settings are the operator's to fix.
        Err(e @ (WorkerError::Rules(_) | WorkerError::Commerce(_))) => {
            Err(super::UsageError(e.to_string()).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Cancels `cancel` on the first SIGTERM or ctrl-c (SIGINT).
async fn stop_on_signal(cancel: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGTERM; only ctrl-c stops the worker.");
                std::future::pending::<()>().await;
            }
        }
    };
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "Cannot listen for ctrl-c; only SIGTERM stops the worker.");
            std::future::pending::<()>().await;
        }
    };
    let signal = tokio::select! {
        () = interrupt => "SIGINT",
        () = terminate => "SIGTERM",
    };
    tracing::info!(signal, "Signal received; shutting down.");
    cancel.cancel();
}
