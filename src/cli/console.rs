//! `holdclear console`: the operators' web console, until SIGTERM or
//! ctrl-c. It talks to PostgreSQL and RabbitMQ like the CLI; workers do not
//! serve it. It refuses to start without a credential (exit 64).

use std::path::Path;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::run::Signals;
use crate::console::{self, ConsoleError};

/// `holdclear console` takes no arguments: its settings say where it
/// listens and who may sign in.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the console until SIGTERM or ctrl-c; replays it runs are left
/// interrupted (resumable).
pub async fn execute(config: Option<&Path>, _args: Args) -> anyhow::Result<ExitCode> {
    // SIGHUP is listened for (and ignored): the console has nothing to reload.
    let (signals, _hangups) = Signals::install()?;
    let settings = super::load(config)?;
    settings.console.check_credentials()?;
    crate::ops::logs::init(settings.log_format, "info,sqlx::postgres::notice=warn");
    let store = crate::store::Store::open(
        &settings.database_url,
        settings.database_tls_ca.as_ref(),
        settings.database_max_connections.min(8),
        &settings.database_timeouts,
    )
    .await?;
    if !store.ready().await {
        anyhow::bail!(
            "the database {} has no (or an older) holdclear schema: run `holdclear migrate`",
            settings.database_url
        );
    }
    let stop = CancellationToken::new();
    tokio::spawn(signals.stop_on_signal(stop.clone()));
    let handle = match console::start(settings, store, stop).await {
        Ok(h) => h,
        Err(ConsoleError::Config(e)) => return Err(e.into()),
        Err(e) => return Err(super::UsageError(e.to_string()).into()),
    };
    eprintln!("holdclear console listening on http://{}", handle.addr);
    handle.wait().await?;
    Ok(ExitCode::SUCCESS)
}
