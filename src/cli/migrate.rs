//! `holdclear migrate`: create the database if missing, apply migrations, exit.

use std::process::ExitCode;

use crate::config::Settings;
use crate::store::Store;

/// Applies pending migrations and exits.
pub async fn execute(settings: Settings) -> anyhow::Result<ExitCode> {
    crate::ops::logs::init(settings.log_format, "info");
    let store =
        Store::connect(&settings.database_url, settings.database_tls_ca.as_ref(), 2).await?;
    store.migrate().await?;
    tracing::info!(database = %settings.database_url, "Migrations applied.");
    Ok(ExitCode::SUCCESS)
}
