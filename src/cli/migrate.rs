//! `holdclear migrate`: create the database if missing, apply migrations, exit.

use std::process::ExitCode;

use crate::config::Settings;
use crate::store::Store;

/// Applies pending migrations and exits.
pub async fn execute(settings: Settings) -> anyhow::Result<ExitCode> {
    // Its own lifecycle at INFO; libraries only when RUST_LOG asks.
    crate::ops::logs::init(settings.log_format, "off,holdclear=info");
    let store = Store::connect_with(
        &settings.database_url,
        settings.database_tls_ca.as_ref(),
        2,
        &settings.database_timeouts,
    )
    .await?;
    store.migrate().await?;
    tracing::info!(database = %settings.database_url, "Migrations applied.");
    Ok(ExitCode::SUCCESS)
}
