//! PostgreSQL: the only module that writes SQL.
//!
//! [`Store`] owns the pool. Its methods are grouped by table in the
//! submodules: the inbox and new cases (intake), the case engine's claims and
//! steps, case history, and the outbox; [`bench::BenchTables`] holds what
//! only `holdclear bench` asks (seeding, counting, the claim's plan).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor, PgConnection, PgPool};

use crate::config::{CaFile, SecretUrl};

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
    /// The TLS handshake with PostgreSQL failed: the server's certificate
    /// is not trusted or does not name the URL's host (`sslmode=verify-full`),
    /// or the server does not speak TLS (`sslmode=require` and stronger).
    #[error("TLS to PostgreSQL at {server} failed ({source}); trusted: {trusted}")]
    Tls {
        /// `host:port` of the URL.
        server: String,
        /// Which roots were trusted.
        trusted: String,
        /// sqlx's error, with rustls's reason.
        source: sqlx::Error,
    },
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
            Self::Tls { .. } => true,
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
    /// TLS follows the URL's `sslmode` (`verify-full` checks the server's
    /// certificate and name) and trusts `tls_ca` besides the built-in roots.
    /// Every command that uses the database goes through here.
    pub async fn connect(
        url: &SecretUrl,
        tls_ca: Option<&CaFile>,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let target = Target::new(url, tls_ca)?;
        target.create_if_missing().await?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(target.options.clone())
            .await
            .map_err(|e| target.error(e))?;
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
pub async fn drop_database(url: &SecretUrl, tls_ca: Option<&CaFile>) -> Result<(), StoreError> {
    let target = Target::new(url, tls_ca)?;
    let mut conn = target.maintenance().await?;
    conn.execute(
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&target.database),
    )
    .await?;
    conn.execute(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {}",
        quote_ident(&target.database)
    )))
    .await?;
    Ok(())
}

/// The connect parameters sqlx reads from a URL's query; others are dropped
/// before it sees them (it would log their values, which may be secret).
const KNOWN_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// A database URL made into sqlx's options once, with the CA file and the
/// name of the database it points at.
struct Target {
    options: PgConnectOptions,
    database: String,
    trusted: String,
}

impl Target {
    fn new(url: &SecretUrl, tls_ca: Option<&CaFile>) -> Result<Self, StoreError> {
        let mut known = url.url().clone();
        let pairs: Vec<(String, String)> = url
            .url()
            .query_pairs()
            .filter(|(key, _)| {
                let keep = KNOWN_PARAMETERS.contains(&key.as_ref()) || key.starts_with("options[");
                if !keep {
                    tracing::warn!(parameter = %key, "Unknown database URL parameter ignored.");
                }
                keep
            })
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        known.set_query(None);
        if !pairs.is_empty() {
            known.query_pairs_mut().extend_pairs(pairs);
        }
        let mut options = PgConnectOptions::from_str(known.as_str())?.application_name("holdclear");
        if let Some(ca) = tls_ca {
            options = options.ssl_root_cert_from_pem(ca.pem().as_bytes().to_vec());
        }
        let database = options
            .get_database()
            .unwrap_or(options.get_username())
            .to_owned();
        let trusted = match tls_ca {
            Some(ca) => format!("the built-in roots and {}", ca.path().display()),
            None => "the built-in roots only (no HOLDCLEAR_DATABASE_TLS_CA_FILE or \
                     HOLDCLEAR_TLS_CA_FILE)"
                .to_owned(),
        };
        Ok(Self {
            options,
            database,
            trusted,
        })
    }

    /// A connection to the maintenance database (`postgres`, or `template1`
    /// when the target is `postgres`), as `createdb` does.
    async fn maintenance(&self) -> Result<PgConnection, StoreError> {
        let maintenance = if self.database == "postgres" {
            "template1"
        } else {
            "postgres"
        };
        self.options
            .clone()
            .database(maintenance)
            .connect()
            .await
            .map_err(|e| self.error(e))
    }

    /// Creates the database unless it exists (another worker may create it
    /// at the same moment: that is fine).
    async fn create_if_missing(&self) -> Result<(), StoreError> {
        // The target itself first: the usual case, and the only one that
        // works for a user who may not connect to the maintenance database.
        match self.options.connect().await {
            Ok(conn) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Err(e) if !is_missing_database(&e) => return Err(self.error(e)),
            Err(_) => {}
        }
        let mut conn = self.maintenance().await?;
        let create = format!("CREATE DATABASE {}", quote_ident(&self.database));
        match conn.execute(AssertSqlSafe(create)).await {
            Ok(_) => {
                tracing::info!(database = %self.database, "Database created.");
                Ok(())
            }
            // 42P04 duplicate_database, 23505 unique_violation: another
            // worker created it between the check and here.
            Err(e)
                if e.as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == "42P04" || c == "23505") =>
            {
                tracing::debug!(error = %e, "Database appeared concurrently.");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A TLS failure says where and what was trusted; others pass as they are.
    fn error(&self, e: sqlx::Error) -> StoreError {
        if !is_tls_failure(&e) {
            return e.into();
        }
        StoreError::Tls {
            server: format!("{}:{}", self.options.get_host(), self.options.get_port()),
            trusted: self.trusted.clone(),
            source: e,
        }
    }
}

/// True when TLS could not be set up: sqlx's own TLS error, or rustls
/// refusing the handshake (an untrusted or misnamed certificate).
fn is_tls_failure(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Io(io) => {
            let mut current: Option<&(dyn std::error::Error + 'static)> = io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static));
            while let Some(err) = current {
                if err.is::<rustls::Error>() {
                    return true;
                }
                current = err.source();
            }
            false
        }
        _ => false,
    }
}

/// PostgreSQL's `3D000 invalid_catalog_name`: the database does not exist.
fn is_missing_database(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "3D000")
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
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
