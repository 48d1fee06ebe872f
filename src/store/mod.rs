//! PostgreSQL: the only module that writes SQL.
//!
//! [`Store`] owns the pool. Its methods are grouped by table in the
//! submodules: the inbox and new cases (intake), the case engine's claims and
//! steps, case history, and the outbox; `bench` holds what only
//! `holdclear bench` asks (seeding, counting, the claim's plan).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use crate::config::{DatabaseTimeouts, SecretUrl};

mod bench;
mod cases;
mod intake;
mod ops;
mod outbox;

pub use cases::{
    CaseFilter, CaseRecord, CaseSummary, Claimed, HistoryRow, RetryCommit, StepCommit,
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
    /// No session could be opened: said in words an operator acts on
    /// (what failed, why, which setting to check).
    #[error("{0}")]
    Connect(ConnectError),
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

/// Why no session with PostgreSQL could be opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectError {
    /// `host:port` of the server.
    pub server: String,
    /// What went wrong.
    pub failure: ConnectFailure,
}

/// What went wrong opening a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens there.
    Refused,
    /// No answer within the acquire timeout.
    TimedOut(Duration),
    /// The network said no (host unknown or unreachable, reset, …).
    Unreachable(String),
    /// The server refused the user (no such role, wrong password).
    Login {
        /// The user of the URL.
        user: String,
        /// The server's words.
        message: String,
    },
    /// The database does not exist.
    NoDatabase {
        /// Its name.
        database: String,
    },
    /// The database does not exist and the user may not create it.
    CannotCreate {
        /// Its name.
        database: String,
        /// The server's words.
        message: String,
    },
    /// The server is up but takes no session now (starting, shutting
    /// down, no connection slot left, connections not allowed).
    NotNow(String),
    /// Anything else (TLS, a bad URL parameter, …).
    Other(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = &self.server;
        match &self.failure {
            ConnectFailure::Refused => write!(
                f,
                "cannot connect to PostgreSQL at {server} (connection refused): is it running? Check HOLDCLEAR_DATABASE_URL"
            ),
            ConnectFailure::TimedOut(t) => write!(
                f,
                "cannot connect to PostgreSQL at {server} (no answer within {}): is it running and reachable? Check HOLDCLEAR_DATABASE_URL",
                humantime::format_duration(*t)
            ),
            ConnectFailure::Unreachable(why) => write!(
                f,
                "cannot connect to PostgreSQL at {server} ({why}): is the host right and reachable? Check HOLDCLEAR_DATABASE_URL"
            ),
            ConnectFailure::Login { user, message } => write!(
                f,
                "PostgreSQL at {server} refused user \"{user}\" ({message}): check the user and password in HOLDCLEAR_DATABASE_URL"
            ),
            ConnectFailure::NoDatabase { database } => write!(
                f,
                "the database \"{database}\" does not exist on PostgreSQL at {server}: `holdclear migrate` creates it; or check the name in HOLDCLEAR_DATABASE_URL"
            ),
            ConnectFailure::CannotCreate { database, message } => write!(
                f,
                "cannot create the database \"{database}\" on PostgreSQL at {server} ({message}): create it, or let the user of HOLDCLEAR_DATABASE_URL create databases"
            ),
            ConnectFailure::NotNow(why) => write!(
                f,
                "PostgreSQL at {server} takes no connection now ({why}); try again later, or check HOLDCLEAR_DATABASE_URL"
            ),
            ConnectFailure::Other(why) => write!(
                f,
                "cannot connect to PostgreSQL at {server}: {why}; check HOLDCLEAR_DATABASE_URL"
            ),
        }
    }
}

impl ConnectError {
    /// Names what went wrong connecting to `url` with `error`.
    fn new(url: &SecretUrl, error: &sqlx::Error, timeout: Duration) -> Self {
        let u = url.url();
        let server = format!(
            "{}:{}",
            u.host_str()
                .filter(|h| !h.is_empty())
                .unwrap_or("localhost"),
            u.port().unwrap_or(5432)
        );
        let user = if u.username().is_empty() {
            "(the OS user)".to_owned()
        } else {
            u.username().to_owned()
        };
        let database = u.path().trim_start_matches('/').to_owned();
        let failure = match error {
            sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                ConnectFailure::Refused
            }
            sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                ConnectFailure::TimedOut(timeout)
            }
            sqlx::Error::Io(e) => ConnectFailure::Unreachable(io_reason(e)),
            sqlx::Error::PoolTimedOut => ConnectFailure::TimedOut(timeout),
            sqlx::Error::Tls(e) => ConnectFailure::Other(format!("TLS: {e}")),
            sqlx::Error::Database(d) => {
                let message = d.message().to_owned();
                match d.code().as_deref().unwrap_or_default() {
                    "28P01" | "28000" => ConnectFailure::Login { user, message },
                    "3D000" => ConnectFailure::NoDatabase { database },
                    "42501" => ConnectFailure::CannotCreate { database, message },
                    code if code.starts_with("57P") || matches!(code, "53300" | "55000") => {
                        ConnectFailure::NotNow(message)
                    }
                    _ => ConnectFailure::Other(message),
                }
            }
            other => ConnectFailure::Other(other.to_string()),
        };
        Self { server, failure }
    }

    /// Worth retrying: the server may be back, or take sessions, later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.failure,
            ConnectFailure::Refused
                | ConnectFailure::TimedOut(_)
                | ConnectFailure::Unreachable(_)
                | ConnectFailure::NoDatabase { .. }
                | ConnectFailure::NotNow(_)
        )
    }
}

/// An I/O error in a few words, without the OS error number.
fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.split_once(" (os error") {
        Some((words, _)) => words.to_lowercase(),
        None => text,
    }
}

impl StoreError {
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
            Self::Connect(c) => c.is_transient(),
            _ => false,
        }
    }

    /// A wait that ran out of time: a statement past `statement_timeout`
    /// (57014), a lock past `lock_timeout` (55P03), a session idle in a
    /// transaction past its limit (25P03), no pooled connection in time.
    /// Not the data's fault: the same statement is tried again.
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::Database(sqlx::Error::PoolTimedOut) => true,
            Self::Database(e) => e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| matches!(c.as_ref(), "57014" | "55P03" | "25P03")),
            _ => false,
        }
    }

    /// Worth trying again as it is: [`Self::is_connection`] or
    /// [`Self::is_timeout`].
    pub fn is_transient(&self) -> bool {
        self.is_connection() || self.is_timeout()
    }
}

/// What the readiness probe found (see [`Store::probe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The database answers, every migration applied.
    Ready,
    /// It answers, but migrations are missing.
    Unmigrated,
    /// No connection of the pool came free in time because every one is
    /// in use: the database is busy, not down.
    Busy,
    /// It does not answer (or answers with an error).
    Down,
}

/// The pool and every query of the service.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// How migrations connect: the pool's options without its statement
    /// and lock deadlines (a migration may rightly take long, or wait for
    /// another worker's). `None` for a wrapped pool.
    migrations: Option<PgConnectOptions>,
}

impl Store {
    /// Connects to `url` with the default deadlines, creating the database
    /// first if it does not exist.
    pub async fn connect(url: &SecretUrl, max_connections: u32) -> Result<Self, StoreError> {
        Self::connect_with(url, max_connections, &DatabaseTimeouts::default()).await
    }

    /// Connects to `url`, creating the database first if it does not
    /// exist. Every session of the pool has `timeouts`' statement, lock and
    /// idle-in-transaction deadlines; a connection of the pool is waited
    /// for at most `timeouts.acquire`. A failure to connect is
    /// [`StoreError::Connect`], in words.
    pub async fn connect_with(
        url: &SecretUrl,
        max_connections: u32,
        timeouts: &DatabaseTimeouts,
    ) -> Result<Self, StoreError> {
        let within = timeouts.acquire;
        let named = |e: sqlx::Error| StoreError::Connect(ConnectError::new(url, &e, within));
        let exists = bounded(within, Postgres::database_exists(url.expose()))
            .await
            .map_err(named)?;
        if !exists {
            match bounded(within, Postgres::create_database(url.expose())).await {
                Ok(()) => tracing::info!(database = %url, "Database created."),
                // Another worker created it between the check and here.
                Err(e)
                    if bounded(within, Postgres::database_exists(url.expose()))
                        .await
                        .unwrap_or(false) =>
                {
                    tracing::debug!(error = %e, "Database appeared concurrently.");
                }
                Err(e) => return Err(named(e)),
            }
        }
        Self::with_pool(url, max_connections, timeouts).await
    }

    /// Connects to the existing database at `url` (never creates it: a
    /// missing one is [`ConnectFailure::NoDatabase`]), with `timeouts`.
    pub async fn open(
        url: &SecretUrl,
        max_connections: u32,
        timeouts: &DatabaseTimeouts,
    ) -> Result<Self, StoreError> {
        let within = timeouts.acquire;
        let options = PgConnectOptions::from_str(url.expose())?;
        // One session first: its error is the precise one (the pool's
        // would be a timeout after retrying a refused connection).
        let conn = bounded(within, PgConnection::connect_with(&options))
            .await
            .map_err(|e| StoreError::Connect(ConnectError::new(url, &e, within)))?;
        let _ = conn.close().await;
        Self::with_pool(url, max_connections, timeouts).await
    }

    async fn with_pool(
        url: &SecretUrl,
        max_connections: u32,
        timeouts: &DatabaseTimeouts,
    ) -> Result<Self, StoreError> {
        let ms = |d: Duration| d.as_millis().max(1);
        let migrations = PgConnectOptions::from_str(url.expose())?.application_name("holdclear");
        let options = migrations.clone().options([
            ("statement_timeout", ms(timeouts.statement)),
            ("lock_timeout", ms(timeouts.lock)),
            (
                "idle_in_transaction_session_timeout",
                ms(timeouts.idle_in_transaction),
            ),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeouts.acquire)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Connect(ConnectError::new(url, &e, timeouts.acquire)))?;
        Ok(Self {
            pool,
            migrations: Some(migrations),
        })
    }

    /// Wraps an existing pool (tests get one per test from `#[sqlx::test]`).
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            migrations: None,
        }
    }

    /// The pool, for the few callers that need it (benchmarks, tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations, on a session of their own without the
    /// pool's statement and lock deadlines.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.migrations {
            Some(options) => {
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(self.pool.options().get_acquire_timeout())
                    .connect_with(options.clone())
                    .await?;
                let result = MIGRATOR.run(&pool).await;
                pool.close().await;
                result?;
            }
            None => MIGRATOR.run(&self.pool).await?,
        }
        Ok(())
    }

    /// True when the database answers and every migration is applied.
    pub async fn ready(&self) -> bool {
        self.applied().await.is_ok_and(|all| all)
    }

    /// Whether every migration is applied.
    async fn applied(&self) -> Result<bool, sqlx::Error> {
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        Ok(applied as usize >= MIGRATOR.iter().count())
    }

    /// Probes the database within `within`: ready, unmigrated, down — or
    /// busy, when no connection came free because the pool is full and
    /// every connection is in use (a timeout then says nothing about the
    /// database, only that it is busy).
    pub async fn probe(&self, within: Duration) -> Probe {
        match tokio::time::timeout(within, self.applied()).await {
            Ok(Ok(true)) => Probe::Ready,
            Ok(Ok(false)) => Probe::Unmigrated,
            Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_) if self.saturated() => Probe::Busy,
            Ok(Err(_)) | Err(_) => Probe::Down,
        }
    }

    /// Every connection of the pool is open and in use.
    fn saturated(&self) -> bool {
        self.pool.num_idle() == 0 && self.pool.size() >= self.pool.options().get_max_connections()
    }
}

/// `fut`, or a pool timeout after `within`.
async fn bounded<T>(
    within: Duration,
    fut: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout(within, fut)
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// Drops the database at `url` (the demo's and the benchmark's own, when
/// they finish), closing other sessions on it first.
pub async fn drop_database(url: &SecretUrl) -> Result<(), StoreError> {
    Postgres::force_drop_database(url.expose()).await?;
    Ok(())
}
