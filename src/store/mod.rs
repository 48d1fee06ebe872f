//! PostgreSQL: the only module that writes SQL.
//!
//! [`Store`] owns the pool. Its methods are grouped by table in the
//! submodules: the inbox and new cases (intake), the case engine's claims and
//! steps, case history, and the outbox; [`bench::BenchTables`] holds what
//! only `holdclear bench` asks (seeding, counting, the claim's plan).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor, PgConnection, PgPool};

use crate::config::{CaFile, DatabaseTimeouts, SecretUrl};

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
mod console;
mod dead_letters;
mod decisions;
mod hand_fixes;
mod intake;
mod operator;
mod ops;
mod outbox;
mod prune;
mod rate_budget;
mod session_lock;
mod workers;

pub use cases::{
    CaseFilter, CaseRecord, CaseSummary, Claimed, HistoryRow, Identity, RetryCommit, StepCommit,
};
pub use console::{CaseMarks, EscalationFilter, EscalationGroup, EscalationRow, MAX_ESCALATIONS};
pub use dead_letters::{
    DeadLetterFilter, DeadLetterGroup, DeadLetterRecord, DeadLetterSummary, Note, Operation,
    OperationItem, RecordedDeadLetter, Sighting,
};
pub use decisions::{
    DecisionStats, RuleHits, ShadowPair, ShadowRecord, StoredEvent, UnmatchedGroup,
};
pub use hand_fixes::{HandFix, HandWatch, RecordedFix, WATCHED_CASE, WatchEnd};
pub use intake::Recorded;
pub use operator::{Audited, CaseNote, Closed};
pub use ops::OpsSnapshot;
pub use outbox::{OutboxBatch, OutboxFailure, OutboxRow};
pub use prune::{Cutoffs, PRUNE_LOCK, Prunable, PruneSession, PruneTable, SIZED_TABLES};
pub use session_lock::SessionLock;
pub use workers::{Beat, WorkerRow};

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
    /// Names what went wrong connecting to `database` on `server` as
    /// `user` with `error` (`timeout`: how long it was given).
    fn new(
        server: String,
        user: &str,
        database: &str,
        error: &sqlx::Error,
        timeout: Duration,
    ) -> Self {
        let user = user.to_owned();
        let database = database.to_owned();
        let failure = match error {
            sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                ConnectFailure::Refused
            }
            sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                ConnectFailure::TimedOut(timeout)
            }
            sqlx::Error::Io(e) => ConnectFailure::Unreachable(io_reason(e)),
            sqlx::Error::PoolTimedOut => ConnectFailure::TimedOut(timeout),
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
    /// [`Store::connect_with`] the default deadlines.
    pub async fn connect(
        url: &SecretUrl,
        tls_ca: Option<&CaFile>,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        Self::connect_with(url, tls_ca, max_connections, &DatabaseTimeouts::default()).await
    }

    /// Connects to `url`, creating the database first if it does not exist.
    /// TLS follows the URL's `sslmode` (`verify-full` checks the server's
    /// certificate and name) and trusts `tls_ca` besides the built-in roots.
    /// Every session of the pool has `timeouts`' statement, lock and
    /// idle-in-transaction deadlines; a connection is waited for at most
    /// `timeouts.acquire` (opening one, and the database check, included).
    /// A failure to connect is [`StoreError::Connect`] (in words) or
    /// [`StoreError::Tls`].
    pub async fn connect_with(
        url: &SecretUrl,
        tls_ca: Option<&CaFile>,
        max_connections: u32,
        timeouts: &DatabaseTimeouts,
    ) -> Result<Self, StoreError> {
        let target = Target::new(url, tls_ca, timeouts.acquire)?;
        target.create_if_missing().await?;
        target.pool(max_connections, timeouts).await
    }

    /// Connects to the existing database at `url` (never creates it: a
    /// missing one is [`ConnectFailure::NoDatabase`]), with `timeouts`.
    pub async fn open(
        url: &SecretUrl,
        tls_ca: Option<&CaFile>,
        max_connections: u32,
        timeouts: &DatabaseTimeouts,
    ) -> Result<Self, StoreError> {
        let target = Target::new(url, tls_ca, timeouts.acquire)?;
        // One session first: its error is the precise one (the pool's
        // would be a timeout after retrying a refused connection).
        let conn = target.session(&target.options).await?;
        let _ = conn.close().await;
        target.pool(max_connections, timeouts).await
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

/// Drops the database at `url` (the demo's and the benchmark's own, when
/// they finish), closing other sessions on it first.
pub async fn drop_database(url: &SecretUrl, tls_ca: Option<&CaFile>) -> Result<(), StoreError> {
    let target = Target::new(url, tls_ca, DatabaseTimeouts::default().acquire)?;
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
    /// How long one connection attempt may take.
    within: Duration,
}

impl Target {
    fn new(url: &SecretUrl, tls_ca: Option<&CaFile>, within: Duration) -> Result<Self, StoreError> {
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
            within,
        })
    }

    /// One session with `options`, bounded by the acquire timeout.
    async fn session(&self, options: &PgConnectOptions) -> Result<PgConnection, StoreError> {
        match tokio::time::timeout(self.within, options.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(self.error(e)),
            Err(_) => Err(self.error(sqlx::Error::PoolTimedOut)),
        }
    }

    /// The pool: every session with `timeouts`' deadlines; migrations get
    /// the options without them.
    async fn pool(
        &self,
        max_connections: u32,
        timeouts: &DatabaseTimeouts,
    ) -> Result<Store, StoreError> {
        let ms = |d: Duration| d.as_millis().max(1);
        let options = self.options.clone().options([
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
            .map_err(|e| self.error(e))?;
        Ok(Store {
            pool,
            migrations: Some(self.options.clone()),
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
        self.session(&self.options.clone().database(maintenance))
            .await
    }

    /// Creates the database unless it exists (another worker may create it
    /// at the same moment: that is fine).
    async fn create_if_missing(&self) -> Result<(), StoreError> {
        // The target itself first: the usual case, and the only one that
        // works for a user who may not connect to the maintenance database.
        match tokio::time::timeout(self.within, self.options.connect()).await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Ok(Err(e)) if !is_missing_database(&e) => return Err(self.error(e)),
            Ok(Err(_)) => {}
            Err(_) => return Err(self.error(sqlx::Error::PoolTimedOut)),
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
            Err(e) => Err(self.error(e)),
        }
    }

    /// A failure to open a session, said where and why: a TLS failure
    /// with what was trusted, the others in words (see [`ConnectError`]).
    fn error(&self, e: sqlx::Error) -> StoreError {
        let server = format!("{}:{}", self.options.get_host(), self.options.get_port());
        if !is_tls_failure(&e) {
            return StoreError::Connect(ConnectError::new(
                server,
                self.options.get_username(),
                &self.database,
                &e,
                self.within,
            ));
        }
        StoreError::Tls {
            server,
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
