//! PostgreSQL: the only module that writes SQL.
//!
//! [`Store`] owns the pool. Its methods are grouped by table in the
//! submodules: the inbox and new cases (intake), the case engine's claims and
//! steps, case history, and the outbox; [`bench::BenchTables`] holds what
//! only `holdclear bench` asks (seeding, counting, the claim's plan).

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::config::SecretUrl;

/// An open case, as SQL: its state is none of the terminal ones
/// ([`crate::domain::CaseState::is_terminal`]; a test keeps the two equal).
/// `open_case!()` for `state`, `open_case!(c)` for `c.state`. The migrations'
/// partial indexes spell the same list.
macro_rules! open_case {
    () => {
        concat!("state NOT IN ", terminal_states!())
    };
    ($alias:ident) => {
        concat!(stringify!($alias), ".state NOT IN ", terminal_states!())
    };
}

/// The terminal states, as an SQL list (see [`open_case!`]).
macro_rules! terminal_states {
    () => {
        "('released', 'escalated', 'merged')"
    };
}

pub mod bench;
mod case_row;
mod cases;
mod intake;
mod ops;
mod outbox;

pub use cases::{
    CaseFilter, CaseRecord, CaseSummary, Claimed, HistoryRow, Identity, RetryCommit, StepCommit,
};
pub use intake::Recorded;
pub use ops::OpsSnapshot;
pub use outbox::{OutboxBatch, OutboxFailure, OutboxRow};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row could not be read back into the domain.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// Table the row is in.
        table: &'static str,
        /// What could not be read.
        detail: String,
    },
}

impl StoreError {
    /// A unique violation or a deadlock between two writers of the same
    /// rows: the statement is worth running again at once (its next snapshot
    /// sees the other writer's commit).
    pub fn is_race(&self) -> bool {
        match self {
            Self::Database(e) => e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| matches!(c.as_ref(), "23505" | "40P01" | "40001")),
            _ => false,
        }
    }

    /// A failure of the connection rather than of the statement: the
    /// connection broke, or PostgreSQL refuses connections now (the database
    /// does not allow connections, does not exist, has no slot left). Worth
    /// retrying once the database is back; not the data's fault.
    pub fn is_connection(&self) -> bool {
        match self {
            Self::Database(e) => {
                matches!(
                    e,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed
                        | sqlx::Error::Tls(_)
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    // Class 08: connection exception; 57P01..03: admin shutdown, crash,
                    // cannot connect now; 55000: connections not allowed; 3D000: no such
                    // database; 53300: too many connections.
                    .is_some_and(|c| {
                        c.starts_with("08")
                            || c.starts_with("57P")
                            || matches!(c.as_ref(), "55000" | "3D000" | "53300")
                    })
            }
            _ => false,
        }
    }
}

/// The pool and every query of the service.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects to `url`, creating the database first if it does not exist.
    pub async fn connect(url: &SecretUrl, max_connections: u32) -> Result<Self, StoreError> {
        if !Postgres::database_exists(url.expose()).await? {
            match Postgres::create_database(url.expose()).await {
                Ok(()) => tracing::info!(database = %url, "Database created."),
                // Another worker created it between the check and here.
                Err(e)
                    if Postgres::database_exists(url.expose())
                        .await
                        .unwrap_or(false) =>
                {
                    tracing::debug!(error = %e, "Database appeared concurrently.");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let options = PgConnectOptions::from_str(url.expose())?.application_name("holdclear");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    /// Wraps an existing pool (tests get one per test from `#[sqlx::test]`).
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool, for the few callers that need it (benchmarks, tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// True when the database answers and every migration is applied.
    pub async fn ready(&self) -> bool {
        let applied: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await;
        matches!(applied, Ok(n) if n as usize >= MIGRATOR.iter().count())
    }
}

/// Drops the database at `url` (the demo's and the benchmark's own, when
/// they finish), closing other sessions on it first.
pub async fn drop_database(url: &SecretUrl) -> Result<(), StoreError> {
    Postgres::force_drop_database(url.expose()).await?;
    Ok(())
}

#[cfg(test)]
mod open_case_tests {
    use crate::domain::CaseState;

    #[test]
    fn the_open_case_predicate_names_exactly_the_terminal_states() {
        let terminal: Vec<String> = CaseState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .map(|s| format!("'{s}'"))
            .collect();
        assert_eq!(terminal_states!(), format!("({})", terminal.join(", ")));
        assert_eq!(
            open_case!(c),
            concat!("c.state NOT IN ", terminal_states!())
        );
    }
}
