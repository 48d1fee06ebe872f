//! Settings: an optional TOML file overridden by `HOLDCLEAR_*` environment
//! variables, validated once into [`Settings`].
//!
//! Every setting has a default that works on a developer machine with
//! RabbitMQ and PostgreSQL on localhost. An invalid value is a
//! [`ConfigError`] that names the setting (the CLI exits 64 with it).
//! Secrets are wrapped in [`Secret`], whose `Debug` and `Display` print
//! `[redacted]`; URLs that may carry a password are [`SecretUrl`].

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// What went wrong while reading the settings; always names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting has a value that cannot be used.
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        /// The environment variable or file key, e.g. `HOLDCLEAR_POLL_INTERVAL`.
        setting: String,
        /// What is wrong with it, without echoing secrets.
        reason: String,
    },
    /// The settings file could not be read or parsed.
    #[error("invalid settings file {path}: {reason}")]
    File {
        /// The file given with `--config` or `HOLDCLEAR_CONFIG`.
        path: PathBuf,
        /// The parser's message (file keys, never values of secrets).
        reason: String,
    },
}

impl ConfigError {
    fn invalid(setting: &str, reason: impl fmt::Display) -> Self {
        Self::Invalid {
            setting: setting.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// A value that must never appear in logs, errors or `Debug` output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A connection URL whose password is redacted whenever it is shown.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Url);

impl SecretUrl {
    /// Parses a URL; the error never repeats the URL (it may hold a password).
    pub fn parse(setting: &str, value: &str) -> Result<Self, ConfigError> {
        Url::parse(value)
            .map(Self)
            .map_err(|e| ConfigError::invalid(setting, format!("not a URL ({e})")))
    }

    /// The full URL, password included, for the one place that connects.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// The parsed URL, password included.
    pub fn url(&self) -> &Url {
        &self.0
    }

    /// The URL with every secret replaced, safe to log: the password, the
    /// value of each query parameter whose name looks secret (see
    /// [`is_secret_key`]: `password=`, `sslpassword=`, `sslkey=`,
    /// `…secret…`, `…token…`), and a fragment.
    pub fn redacted(&self) -> String {
        let mut shown = self.0.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some(REDACTED));
        }
        // Rebuilt only when there is something to hide: otherwise the query
        // is shown exactly as written.
        if shown.query_pairs().any(|(k, _)| is_secret_key(&k)) {
            let pairs: Vec<(String, String)> = shown
                .query_pairs()
                .map(|(k, v)| {
                    let v = if is_secret_key(&k) {
                        REDACTED.to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        if shown.fragment().is_some() {
            shown.set_fragment(Some(REDACTED));
        }
        shown.to_string()
    }
}

/// What [`SecretUrl::redacted`] shows instead of a secret.
const REDACTED: &str = "redacted";

/// True for a URL query parameter whose value may be a secret: its name
/// (any case) contains `pass` (`password`, `sslpassword`, `passphrase`,
/// `passfile`), `pwd`, `secret`, `token`, `key` (`sslkey`, `api_key`),
/// `auth` or `credential`. Shown redacted; an innocent parameter caught
/// by this costs only a less helpful log line.
pub fn is_secret_key(name: &str) -> bool {
    const WORDS: [&str; 7] = [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "auth",
        "credential",
    ];
    let name = name.to_ascii_lowercase();
    WORDS.iter().any(|w| name.contains(w))
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A PEM bundle of CA certificates trusted for TLS to a dependency (a
/// private CA), read and checked once at start: a file that is missing,
/// unreadable, not PEM, or without a parsable certificate is a
/// [`ConfigError`] naming the setting. The certificates are added to the
/// built-in roots, not instead of them.
#[derive(Clone, PartialEq, Eq)]
pub struct CaFile {
    path: PathBuf,
    pem: String,
    certificates: usize,
}

impl CaFile {
    /// Reads and checks the PEM file at `path`, given by `setting`.
    pub fn load(setting: &str, path: &Path) -> Result<Self, ConfigError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;

        let shown = path.display();
        let bytes = std::fs::read(path)
            .map_err(|e| ConfigError::invalid(setting, format!("cannot read {shown}: {e}")))?;
        let pem = String::from_utf8(bytes).map_err(|_| {
            ConfigError::invalid(setting, format!("{shown} is not a PEM file (not text)"))
        })?;
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::invalid(setting, format!("{shown} is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(ConfigError::invalid(
                setting,
                format!("{shown} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            roots.add(cert.clone()).map_err(|e| {
                ConfigError::invalid(
                    setting,
                    format!(
                        "certificate {} of {shown} is not a usable CA certificate: {e}",
                        i + 1
                    ),
                )
            })?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            pem,
            certificates: certs.len(),
        })
    }

    /// Where it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's text: one or more `CERTIFICATE` PEM blocks.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// How many certificates it holds.
    pub fn certificates(&self) -> usize {
        self.certificates
    }
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CaFile({}, {} certificate(s))",
            self.path.display(),
            self.certificates
        )
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable, coloured when on a terminal.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Names of the AMQP exchanges and queues (defaults from the event contract).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topology {
    /// Upstream topic exchange the held orders are published on.
    pub orders_exchange: String,
    /// Routing key of held-order events.
    pub held_routing_key: String,
    /// The worker's quorum queue of held orders.
    pub held_queue: String,
    /// Fanout dead-letter exchange.
    pub dead_letter_exchange: String,
    /// Quorum queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// Topic exchange of everything the worker emits.
    pub events_exchange: String,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            orders_exchange: "commerce.orders".into(),
            held_routing_key: "order.held".into(),
            held_queue: "holdclear.order-held".into(),
            dead_letter_exchange: "holdclear.dlx".into(),
            dead_letter_queue: "holdclear.order-held.dlq".into(),
            events_exchange: "holdclear.events".into(),
        }
    }
}

impl Topology {
    /// The alternate exchange of the events exchange (fanout): events no
    /// queue is bound for go there. `<events_exchange>.unrouted`.
    pub fn unrouted_exchange(&self) -> String {
        format!("{}.unrouted", self.events_exchange)
    }

    /// The quorum queue bound to [`Self::unrouted_exchange`], where the
    /// broker keeps those events (same name as that exchange).
    pub fn unrouted_queue(&self) -> String {
        self.unrouted_exchange()
    }

    /// The default names with `prefix` in front of each, for tests, the demo
    /// and the benchmark, so they never touch a real setup.
    pub fn prefixed(prefix: &str) -> Self {
        let d = Self::default();
        Self {
            orders_exchange: format!("{prefix}{}", d.orders_exchange),
            held_routing_key: d.held_routing_key,
            held_queue: format!("{prefix}{}", d.held_queue),
            dead_letter_exchange: format!("{prefix}{}", d.dead_letter_exchange),
            dead_letter_queue: format!("{prefix}{}", d.dead_letter_queue),
            events_exchange: format!("{prefix}{}", d.events_exchange),
        }
    }
}

impl AmqpSettings {
    /// Checks that the worst case of message bodies in flight, every
    /// unacknowledged delivery the broker may hand over at the payload limit
    /// (`prefetch × max_payload_bytes`), fits `memory_budget_bytes`.
    /// [`Settings::load`] does (so every command refuses such settings at
    /// start, exit 64); settings built otherwise, as tests do, are not held
    /// to it unless they ask.
    pub fn check_memory_budget(&self) -> Result<(), ConfigError> {
        let in_flight = u64::from(self.prefetch).saturating_mul(self.max_payload_bytes as u64);
        if in_flight <= self.memory_budget_bytes {
            return Ok(());
        }
        Err(ConfigError::invalid(
            "HOLDCLEAR_MEMORY_BUDGET",
            format!(
                "HOLDCLEAR_AMQP_PREFETCH ({}) × HOLDCLEAR_MAX_PAYLOAD_BYTES ({}) = {} of \
                 message bodies in flight at worst, more than the budget of {}; lower the \
                 prefetch or the payload limit, or raise the budget (docs/deployment.md, Memory)",
                self.prefetch,
                self.max_payload_bytes,
                format_bytes(in_flight),
                format_bytes(self.memory_budget_bytes)
            ),
        ))
    }
}

/// Connection to RabbitMQ and the bounds of consuming.
#[derive(Clone, Debug)]
pub struct AmqpSettings {
    /// `amqp://` or `amqps://` URL.
    pub url: SecretUrl,
    /// Exchange and queue names.
    pub topology: Topology,
    /// Unacknowledged deliveries the broker may hand the worker at once.
    pub prefetch: u16,
    /// Largest accepted message body, in bytes.
    pub max_payload_bytes: usize,
    /// Memory allowed for message bodies in flight: `prefetch ×
    /// max_payload_bytes` must fit (checked at start; docs/deployment.md).
    pub memory_budget_bytes: u64,
    /// `x-delivery-limit` of the held-order queue (poison-loop guard).
    pub delivery_limit: u32,
    /// Deliveries written to the database in one transaction, at most.
    pub intake_batch: usize,
    /// How long intake waits for a batch to fill before writing it.
    pub intake_linger: Duration,
    /// Longest wait for the broker's confirm of a publish (dead letters,
    /// events); past it the publish counts as failed and is retried.
    pub confirm_timeout: Duration,
    /// CA trusted for `amqps://` besides the built-in roots.
    pub tls_ca: Option<CaFile>,
    /// Whether `holdclear run` consumes the dead-letter queue into the
    /// `dead_letters` table (`HOLDCLEAR_DLQ_INGEST`).
    pub dead_letter_ingest: bool,
}

/// Deadlines on every wait for PostgreSQL; a wait that runs out fails
/// with an error its caller retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseTimeouts {
    /// `statement_timeout` of every session: the longest one statement runs.
    pub statement: Duration,
    /// `lock_timeout` of every session: the longest a statement waits for a lock.
    pub lock: Duration,
    /// `idle_in_transaction_session_timeout`: a session left idle inside a
    /// transaction this long is ended by the server (its locks released).
    pub idle_in_transaction: Duration,
    /// The longest wait for a connection of the pool (opening one included).
    pub acquire: Duration,
}

impl Default for DatabaseTimeouts {
    /// `30s`, `10s`, `60s`, `5s`.
    fn default() -> Self {
        Self {
            statement: Duration::from_secs(30),
            lock: Duration::from_secs(10),
            idle_in_transaction: Duration::from_secs(60),
            acquire: Duration::from_secs(5),
        }
    }
}

/// The commerce API client.
#[derive(Clone, Debug)]
pub struct CommerceSettings {
    /// Base URL all API paths are relative to.
    pub base_url: Url,
    /// OAuth2 token endpoint.
    pub token_url: Url,
    /// OAuth2 client id.
    pub client_id: String,
    /// OAuth2 client secret; never logged.
    pub client_secret: Secret,
    /// Calls per second, all tasks of one worker together.
    pub rate_limit: f64,
    /// Timeout of one HTTP request.
    pub request_timeout: Duration,
    /// How long a found ACTIVE account and a Virtual Account list are
    /// reused by every case of the worker; zero: never (no cache).
    pub cache_ttl: Duration,
    /// Most account searches (and, apart, Virtual Account lists) kept.
    pub cache_entries: usize,
    /// CA trusted for `https://` besides the built-in roots.
    pub tls_ca: Option<CaFile>,
}

/// Exponential backoff for transient failures (see the `backoff` crate).
#[derive(Clone, Debug, PartialEq)]
pub struct RetrySettings {
    /// First delay.
    pub initial: Duration,
    /// Longest delay between two attempts.
    pub max_interval: Duration,
    /// Retry budget: past this since the first failure, give up.
    pub max_elapsed: Duration,
    /// Growth factor of the delay.
    pub multiplier: f64,
    /// Jitter, as a fraction of the delay (0 to 1).
    pub randomization: f64,
}

/// One `HOLD_PERSISTS` escalation threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EscalationThreshold {
    /// Time since the accepted assignment.
    pub after: Duration,
    /// `warning` or `critical`.
    pub level: crate::domain::EscalationLevel,
}

/// The case engine: watching, escalation, concurrency.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// First look at the order after an assignment.
    pub poll_interval: Duration,
    /// Longest wait between two looks.
    pub poll_max_interval: Duration,
    /// `HOLD_PERSISTS` thresholds, ascending; the first is `HOLDCLEAR_ESCALATE_AFTER`.
    pub escalation: Vec<EscalationThreshold>,
    /// Backoff of transient failures.
    pub retry: RetrySettings,
    /// Cases stepped at once by one worker.
    pub concurrency: usize,
    /// Cases claimed per query.
    pub batch_size: usize,
    /// How long a claim is valid unless renewed.
    pub lease: Duration,
    /// How often to look for due cases created by other workers.
    pub idle_poll: Duration,
}

/// Escalated cases watched slowly until a person releases the hold by
/// hand (`HOLDCLEAR_ESCALATED_WATCH_INTERVAL`, `…_FOR`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EscalatedWatch {
    /// Between two looks at one order (at least 1s).
    pub interval: Duration,
    /// How long after its escalation a case is watched.
    pub watch_for: Duration,
}

/// The shortest inbox retention accepted (`HOLDCLEAR_INBOX_RETENTION`):
/// an event id must outlive every way the same event can come back
/// (docs/deployment.md, "Keeping the tables small").
pub const INBOX_RETENTION_FLOOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest case retention accepted: a late announcement of an order
/// looks for the order's cases closed since its own case opened.
pub const CASE_RETENTION_FLOOR: Duration = Duration::from_secs(24 * 3600);
/// The largest prune slice accepted (`HOLDCLEAR_PRUNE_SLICE`).
pub const PRUNE_SLICE_MAX: u32 = 10_000;

/// The pruner: how long each table keeps its rows (`None`: for ever) and
/// how it deletes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneSettings {
    /// Published outbox rows, after they were sent.
    pub outbox: Option<Duration>,
    /// Inbox event ids, after they were received; at least
    /// [`INBOX_RETENTION_FLOOR`].
    pub inbox: Option<Duration>,
    /// Released and merged cases (history and events with them), after
    /// they closed.
    pub cases: Option<Duration>,
    /// Escalated cases, after their last change.
    pub escalated_cases: Option<Duration>,
    /// Archived dead letters, and replayed ones not seen since
    /// (`HOLDCLEAR_DLQ_RETENTION`).
    pub dead_letters: Option<Duration>,
    /// Time between two passes of `holdclear run`'s pruner.
    pub interval: Duration,
    /// Rows deleted per statement, at most.
    pub slice: u32,
    /// Pause between two slices.
    pub pause: Duration,
}

impl Default for PruneSettings {
    /// The defaults of [`SETTINGS`].
    fn default() -> Self {
        Settings::build(FileSettings::default(), &HashMap::<String, String>::new())
            .expect("the defaults are valid")
            .prune
    }
}

/// Everything `holdclear run` needs, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// PostgreSQL URL; the database is created if missing.
    pub database_url: SecretUrl,
    /// Connections in the pool.
    pub database_max_connections: u32,
    /// Deadlines of statements, locks, idle transactions and pool waits.
    pub database_timeouts: DatabaseTimeouts,
    /// CA trusted for TLS to PostgreSQL besides the built-in roots (the
    /// URL's `sslmode` says whether and how the server is verified).
    pub database_tls_ca: Option<CaFile>,
    /// RabbitMQ.
    pub amqp: AmqpSettings,
    /// Commerce API.
    pub commerce: CommerceSettings,
    /// Rules file.
    pub rules_path: PathBuf,
    /// Shadow rules file: what it would decide is recorded for each case
    /// decided, never acted on (`HOLDCLEAR_RULES_SHADOW_FILE`).
    pub rules_shadow_path: Option<PathBuf>,
    /// Case engine.
    pub engine: EngineSettings,
    /// Escalated cases watched until a person releases the hold; `None`
    /// (the default): an escalated case is not looked at again.
    pub escalated_watch: Option<EscalatedWatch>,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub http_addr: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// How long shutdown waits for in-flight work.
    pub shutdown_timeout: Duration,
    /// Retention and the pruner.
    pub prune: PruneSettings,
    /// `holdclear console`.
    pub console: ConsoleSettings,
}

/// A console user's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads everything, changes nothing.
    Viewer,
    /// Reads and acts.
    Operator,
}

impl Role {
    /// `viewer` or `operator`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
        }
    }
}

/// One console sign-in token: who signs in with it, and as what.
#[derive(Clone, Debug)]
pub struct ConsoleToken {
    /// The user's name (recorded as the operator of what they do).
    pub user: String,
    /// The role.
    pub role: Role,
    /// The token (redacted in `Debug`).
    pub token: Secret,
}

/// `holdclear console`: where it listens and who may sign in.
#[derive(Clone, Debug)]
pub struct ConsoleSettings {
    /// Listen address.
    pub addr: SocketAddr,
    /// Sign-in tokens, operators' and viewers'.
    pub tokens: Vec<ConsoleToken>,
    /// A header an authenticating proxy sets to the user's name.
    pub trusted_header: Option<String>,
    /// Users (from the trusted header) who are operators; the others are viewers.
    pub trusted_operators: Vec<String>,
    /// Key that signs session cookies; `None`: a random one per process.
    pub session_key: Option<Secret>,
    /// How long a sign-in lasts.
    pub session_ttl: Duration,
    /// Session cookies carry `Secure` (the console is served over HTTPS).
    pub secure_cookie: bool,
}

/// Shortest console token accepted.
pub const MIN_CONSOLE_TOKEN: usize = 16;

impl ConsoleSettings {
    /// The console takes no anonymous user: at least one token or a trusted header.
    pub fn check_credentials(&self) -> Result<(), ConfigError> {
        if self.tokens.is_empty() && self.trusted_header.is_none() {
            return Err(ConfigError::invalid(
                "HOLDCLEAR_CONSOLE_OPERATOR_TOKENS",
                "the console has no credential: set it (or HOLDCLEAR_CONSOLE_VIEWER_TOKENS, or HOLDCLEAR_CONSOLE_TRUSTED_HEADER behind an authenticating proxy); it never serves anonymous users",
            ));
        }
        Ok(())
    }
}

/// The settings file: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileSettings {
    database_url: Option<String>,
    database_max_connections: Option<u32>,
    database_statement_timeout: Option<String>,
    database_lock_timeout: Option<String>,
    database_idle_in_transaction_timeout: Option<String>,
    database_acquire_timeout: Option<String>,
    amqp_url: Option<String>,
    amqp_prefetch: Option<u16>,
    max_payload_bytes: Option<usize>,
    memory_budget: Option<String>,
    delivery_limit: Option<u32>,
    intake_batch: Option<usize>,
    intake_linger: Option<String>,
    dlq_ingest: Option<bool>,
    dlq_retention: Option<String>,
    outbox_retention: Option<String>,
    inbox_retention: Option<String>,
    case_retention: Option<String>,
    escalated_case_retention: Option<String>,
    prune_interval: Option<String>,
    prune_slice: Option<u32>,
    prune_pause: Option<String>,
    amqp_confirm_timeout: Option<String>,
    topology: Option<Topology>,
    commerce_base_url: Option<String>,
    commerce_token_url: Option<String>,
    commerce_client_id: Option<String>,
    commerce_client_secret: Option<String>,
    commerce_rate_limit: Option<f64>,
    commerce_timeout: Option<String>,
    commerce_cache_ttl: Option<String>,
    commerce_cache_entries: Option<usize>,
    rules: Option<PathBuf>,
    rules_shadow_file: Option<PathBuf>,
    poll_interval: Option<String>,
    poll_max_interval: Option<String>,
    escalate_after: Option<String>,
    escalated_watch_interval: Option<String>,
    escalated_watch_for: Option<String>,
    escalation_levels: Option<Vec<FileEscalationLevel>>,
    retry_initial: Option<String>,
    retry_max_interval: Option<String>,
    retry_max_elapsed: Option<String>,
    retry_multiplier: Option<f64>,
    retry_randomization: Option<f64>,
    engine_concurrency: Option<usize>,
    engine_batch_size: Option<usize>,
    engine_lease: Option<String>,
    engine_idle_poll: Option<String>,
    http_addr: Option<String>,
    log_format: Option<String>,
    shutdown_timeout: Option<String>,
    // TLS and plaintext (see `TlsFiles`).
    tls_ca_file: Option<PathBuf>,
    amqp_tls_ca_file: Option<PathBuf>,
    database_tls_ca_file: Option<PathBuf>,
    commerce_tls_ca_file: Option<PathBuf>,
    commerce_allow_plaintext: Option<bool>,
    console_addr: Option<String>,
    console_operator_tokens: Option<String>,
    console_viewer_tokens: Option<String>,
    console_trusted_header: Option<String>,
    console_trusted_operators: Option<String>,
    console_session_key: Option<String>,
    console_session_ttl: Option<String>,
    console_secure_cookie: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEscalationLevel {
    after: String,
    level: String,
}

/// The simulator's demo client id (also the default of the worker).
pub const DEMO_CLIENT_ID: &str = "holdclear-demo";
/// The simulator's demo client secret (also the default of the worker).
pub const DEMO_CLIENT_SECRET: &str = "holdclear-demo-secret";

/// A source of `HOLDCLEAR_*` values: the process environment, or a map in tests.
pub trait Env {
    /// The value of `name`, if set and valid Unicode.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// What a setting falls back to when neither the environment nor the file
/// sets it.
#[derive(Clone, Copy, Debug)]
pub enum Fallback {
    /// This value, parsed like one that was set.
    Value(&'static str),
    /// Worked out at start (documented in these words).
    Computed(&'static str),
}

/// One setting: its variable, its default and what it means. The file key
/// is the variable without `HOLDCLEAR_`, in lower case.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The environment variable.
    pub env: &'static str,
    /// When it is set nowhere.
    pub fallback: Fallback,
    /// What it does, for the README.
    pub meaning: &'static str,
}

impl Setting {
    /// The key in the settings file.
    pub fn file_key(&self) -> String {
        self.env
            .trim_start_matches("HOLDCLEAR_")
            .to_ascii_lowercase()
    }
}

const fn value(env: &'static str, default: &'static str, meaning: &'static str) -> Setting {
    Setting {
        env,
        fallback: Fallback::Value(default),
        meaning,
    }
}

const fn computed(env: &'static str, default: &'static str, meaning: &'static str) -> Setting {
    Setting {
        env,
        fallback: Fallback::Computed(default),
        meaning,
    }
}

/// Every setting, in the README's order. [`Settings::load`] takes its
/// defaults from here and [`settings_table`] prints the README's table from
/// it (a test keeps the README equal to it).
pub const SETTINGS: &[Setting] = &[
    value(
        "HOLDCLEAR_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/holdclear",
        "created if missing; `?sslmode=verify-full` for TLS",
    ),
    value("HOLDCLEAR_DATABASE_MAX_CONNECTIONS", "16", "pool size"),
    value(
        "HOLDCLEAR_DATABASE_STATEMENT_TIMEOUT",
        "30s",
        "PostgreSQL's `statement_timeout` of every session; a statement that runs out is retried (migrations have none)",
    ),
    value(
        "HOLDCLEAR_DATABASE_LOCK_TIMEOUT",
        "10s",
        "PostgreSQL's `lock_timeout` of every session",
    ),
    value(
        "HOLDCLEAR_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT",
        "60s",
        "the server ends a session left idle inside a transaction (its locks go with it); longer than `HOLDCLEAR_AMQP_CONFIRM_TIMEOUT` (the relay waits for confirms inside one)",
    ),
    value(
        "HOLDCLEAR_DATABASE_ACQUIRE_TIMEOUT",
        "5s",
        "longest wait for a pooled connection (opening one included)",
    ),
    value(
        "HOLDCLEAR_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "`amqps://` works too",
    ),
    value(
        "HOLDCLEAR_COMMERCE_BASE_URL",
        "http://127.0.0.1:8089",
        "the simulator's address; `https://` unless loopback or `HOLDCLEAR_COMMERCE_ALLOW_PLAINTEXT`",
    ),
    computed(
        "HOLDCLEAR_TLS_CA_FILE",
        "none (built-in roots)",
        "PEM bundle of a private CA trusted for AMQPS, PostgreSQL and HTTPS, besides the built-in roots",
    ),
    computed(
        "HOLDCLEAR_AMQP_TLS_CA_FILE",
        "`HOLDCLEAR_TLS_CA_FILE`",
        "the same for RabbitMQ alone (wins over the shared one)",
    ),
    computed(
        "HOLDCLEAR_DATABASE_TLS_CA_FILE",
        "`HOLDCLEAR_TLS_CA_FILE`",
        "the same for PostgreSQL alone",
    ),
    computed(
        "HOLDCLEAR_COMMERCE_TLS_CA_FILE",
        "`HOLDCLEAR_TLS_CA_FILE`",
        "the same for the commerce API alone",
    ),
    value(
        "HOLDCLEAR_COMMERCE_ALLOW_PLAINTEXT",
        "false",
        "accept `http://` commerce URLs off loopback (the client secret would travel in clear text)",
    ),
    computed(
        "HOLDCLEAR_COMMERCE_TOKEN_URL",
        "base URL + `/oauth2/default/v1/token`",
        "the OAuth2 token endpoint",
    ),
    computed(
        "HOLDCLEAR_COMMERCE_CLIENT_ID",
        "the simulator's demo id",
        "OAuth2 client id",
    ),
    computed(
        "HOLDCLEAR_COMMERCE_CLIENT_SECRET",
        "the simulator's demo secret",
        "never logged or printed",
    ),
    value(
        "HOLDCLEAR_COMMERCE_RATE_LIMIT",
        "10",
        "calls per second, all workers together (a budget shared through PostgreSQL)",
    ),
    value("HOLDCLEAR_COMMERCE_TIMEOUT", "10s", "one HTTP request"),
    value(
        "HOLDCLEAR_COMMERCE_CACHE_TTL",
        "15m",
        "how long a found ACTIVE Smart Account and a Virtual Account list are reused by every case of a worker (the assignment still checks them); `0` turns the cache off",
    ),
    value(
        "HOLDCLEAR_COMMERCE_CACHE_ENTRIES",
        "10000",
        "most account searches kept, and as many Virtual Account lists",
    ),
    value(
        "HOLDCLEAR_RULES",
        "deploy/config/rules.toml",
        "the default Smart Account rules",
    ),
    computed(
        "HOLDCLEAR_RULES_SHADOW_FILE",
        "none (no shadow)",
        "a second rules file: for each case decided, what it would have decided is recorded (never acted on; `holdclear rules diff --shadow`); checked at start like the rules, reloaded with them on SIGHUP",
    ),
    value(
        "HOLDCLEAR_POLL_INTERVAL",
        "30s",
        "first look at the order after an assignment; doubling from there",
    ),
    value(
        "HOLDCLEAR_POLL_MAX_INTERVAL",
        "15m",
        "longest wait between two looks",
    ),
    value(
        "HOLDCLEAR_ESCALATE_AFTER",
        "4h",
        "`HOLD_PERSISTS` (warning); more levels in the file",
    ),
    value(
        "HOLDCLEAR_ESCALATED_WATCH_INTERVAL",
        "off",
        "between two looks at an escalated order, until a person releases its hold by hand (then `order.hold_released`, and the account they chose is recorded for `holdclear rules suggest`); `off`: an escalated case is not looked at again",
    ),
    value(
        "HOLDCLEAR_ESCALATED_WATCH_FOR",
        "7d",
        "how long after its escalation a case is watched so",
    ),
    value(
        "HOLDCLEAR_RETRY_INITIAL",
        "1s",
        "first delay after a transient failure",
    ),
    value(
        "HOLDCLEAR_RETRY_MAX_INTERVAL",
        "5m",
        "longest delay between two tries",
    ),
    value(
        "HOLDCLEAR_RETRY_MAX_ELAPSED",
        "1h",
        "past this, `RETRIES_EXHAUSTED`",
    ),
    value("HOLDCLEAR_RETRY_MULTIPLIER", "2", "growth of that backoff"),
    value(
        "HOLDCLEAR_RETRY_RANDOMIZATION",
        "0.2",
        "jitter of that backoff",
    ),
    value(
        "HOLDCLEAR_HTTP_ADDR",
        "127.0.0.1:9090",
        "`/healthz`, `/readyz`, `/metrics`",
    ),
    computed(
        "HOLDCLEAR_LOG_FORMAT",
        "`pretty` on a terminal, else `json`",
        "levels with `RUST_LOG`",
    ),
    value(
        "HOLDCLEAR_AMQP_PREFETCH",
        "1024",
        "unacknowledged deliveries at once; intake writes prefetch / `HOLDCLEAR_INTAKE_BATCH` batches at once (1 to 8)",
    ),
    value(
        "HOLDCLEAR_MAX_PAYLOAD_BYTES",
        "262144",
        "larger messages are dead-lettered",
    ),
    value(
        "HOLDCLEAR_MEMORY_BUDGET",
        "256MiB",
        "most memory the bodies in flight may take: prefetch × payload limit must fit (exit 64 at start otherwise)",
    ),
    value(
        "HOLDCLEAR_AMQP_CONFIRM_TIMEOUT",
        "30s",
        "longest wait for the broker's confirm of a dead letter or an event; then it is published again",
    ),
    value(
        "HOLDCLEAR_DELIVERY_LIMIT",
        "20",
        "`x-delivery-limit` of the held-order queue",
    ),
    value(
        "HOLDCLEAR_INTAKE_BATCH",
        "256",
        "deliveries per intake transaction",
    ),
    value(
        "HOLDCLEAR_INTAKE_LINGER",
        "5ms",
        "longest wait to fill an intake batch",
    ),
    value(
        "HOLDCLEAR_DLQ_INGEST",
        "true",
        "`holdclear run` keeps every dead letter in PostgreSQL (acked after commit)",
    ),
    value(
        "HOLDCLEAR_DLQ_RETENTION",
        "30d",
        "archived dead letters, and replayed ones not seen since, are deleted this long after; `off` (or `0`) keeps them",
    ),
    value(
        "HOLDCLEAR_OUTBOX_RETENTION",
        "30d",
        "published events' outbox rows are deleted this long after they were sent (unsent ones never); `off` keeps them",
    ),
    value(
        "HOLDCLEAR_INBOX_RETENTION",
        "90d",
        "event ids are kept this long after they arrived, at least `7d` (docs/deployment.md); `off` keeps them",
    ),
    value(
        "HOLDCLEAR_CASE_RETENTION",
        "365d",
        "released and merged cases, with their history and events, are deleted this long after they closed (at least `1d`); `off` keeps them",
    ),
    value(
        "HOLDCLEAR_ESCALATED_CASE_RETENTION",
        "730d",
        "escalated cases are deleted this long after their last change (at least `1d`); `off` keeps them",
    ),
    value(
        "HOLDCLEAR_PRUNE_INTERVAL",
        "1h",
        "time between two pruning passes (one worker at a time prunes)",
    ),
    value(
        "HOLDCLEAR_PRUNE_SLICE",
        "500",
        "rows (cases: cases) deleted per statement, 1 to 10000",
    ),
    value(
        "HOLDCLEAR_PRUNE_PAUSE",
        "100ms",
        "pause between two slices of a pass",
    ),
    value(
        "HOLDCLEAR_ENGINE_CONCURRENCY",
        "64",
        "cases stepped at once",
    ),
    value(
        "HOLDCLEAR_ENGINE_BATCH_SIZE",
        "128",
        "cases claimed per query",
    ),
    value("HOLDCLEAR_ENGINE_LEASE", "30s", "claim lease"),
    value(
        "HOLDCLEAR_ENGINE_IDLE_POLL",
        "1s",
        "how often to look for others' work",
    ),
    value("HOLDCLEAR_SHUTDOWN_TIMEOUT", "20s", "drain time on SIGTERM"),
    value(
        "HOLDCLEAR_CONSOLE_ADDR",
        "127.0.0.1:8090",
        "where `holdclear console` listens",
    ),
    computed(
        "HOLDCLEAR_CONSOLE_OPERATOR_TOKENS",
        "none",
        "console users who act: `name:token,name:token` (tokens of 16 characters or more; secret). The console refuses to start with no token and no trusted header",
    ),
    computed(
        "HOLDCLEAR_CONSOLE_VIEWER_TOKENS",
        "none",
        "console users who only read, same form (secret)",
    ),
    computed(
        "HOLDCLEAR_CONSOLE_TRUSTED_HEADER",
        "none",
        "a header an authenticating proxy sets to the user's name (e.g. `X-Forwarded-User`); only behind such a proxy",
    ),
    computed(
        "HOLDCLEAR_CONSOLE_TRUSTED_OPERATORS",
        "none",
        "users of the trusted header who act (comma-separated); the others only read",
    ),
    computed(
        "HOLDCLEAR_CONSOLE_SESSION_KEY",
        "random per process",
        "signs the console's session cookies (secret, 32 characters or more); set it when several replicas serve the console",
    ),
    value(
        "HOLDCLEAR_CONSOLE_SESSION_TTL",
        "12h",
        "how long a console sign-in lasts",
    ),
    value(
        "HOLDCLEAR_CONSOLE_SECURE_COOKIE",
        "false",
        "mark the session cookie `Secure` (set it when the console is served over HTTPS)",
    ),
];

/// The default of `env` from [`SETTINGS`] (a setting missing there, or one
/// without a plain default, is a bug a test finds).
fn default_of(env: &str) -> &'static str {
    match SETTINGS.iter().find(|s| s.env == env).map(|s| s.fallback) {
        Some(Fallback::Value(v)) => v,
        _ => panic!("{env} has no default value in SETTINGS"),
    }
}

/// The README's settings table, from [`SETTINGS`].
pub fn settings_table() -> String {
    let mut out = String::from("| variable | file key | default | meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let default = match s.fallback {
            Fallback::Value(v) => format!("`{v}`"),
            Fallback::Computed(text) => text.to_owned(),
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {default} | {} |\n",
            s.env,
            s.file_key(),
            s.meaning
        ));
    }
    out
}

/// Reads one setting: environment first, then the file, then the default.
struct Reader<'a> {
    env: &'a dyn Env,
}

impl Reader<'_> {
    fn string(&self, env: &str, file: Option<String>) -> String {
        self.string_or(env, file, default_of(env))
    }

    /// A setting whose default is worked out ([`Fallback::Computed`]).
    fn string_or(&self, env: &str, file: Option<String>, default: &str) -> String {
        self.env
            .var(env)
            .or(file)
            .unwrap_or_else(|| default.to_owned())
    }

    fn parsed<T: std::str::FromStr>(&self, env: &str, file: Option<T>) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        let parse = |v: &str| {
            v.trim()
                .parse()
                .map_err(|e| ConfigError::invalid(env, format!("{v:?}: {e}")))
        };
        match (self.env.var(env), file) {
            (Some(v), _) => parse(&v),
            (None, Some(f)) => Ok(f),
            (None, None) => parse(default_of(env)),
        }
    }

    /// A CA file setting: read and checked now, so that a bad one stops
    /// the start naming `env`.
    fn ca_file(&self, env: &str, file: Option<PathBuf>) -> Result<Option<CaFile>, ConfigError> {
        match self.env.var(env).map(|v| PathBuf::from(v.trim())).or(file) {
            Some(path) => CaFile::load(env, &path).map(Some),
            None => Ok(None),
        }
    }

    /// A retention: a duration, or `off` / `0` for "keep for ever"
    /// (`None`); one set shorter than `floor` is refused.
    fn retention(
        &self,
        env: &str,
        file: Option<String>,
        floor: Duration,
    ) -> Result<Option<Duration>, ConfigError> {
        let raw = self.string(env, file);
        if matches!(raw.trim(), "off" | "0") {
            return Ok(None);
        }
        let d = parse_duration(&raw).map_err(|reason| {
            ConfigError::invalid(env, format!("{reason}, or off to keep rows for ever"))
        })?;
        if d.is_zero() || d < floor {
            let floor = format_duration_short(floor.max(Duration::from_secs(1)));
            return Err(ConfigError::invalid(
                env,
                format!(
                    "{raw:?} is shorter than the floor of {floor} (docs/deployment.md); off keeps rows for ever"
                ),
            ));
        }
        Ok(Some(d))
    }

    fn duration(&self, env: &str, file: Option<String>) -> Result<Duration, ConfigError> {
        let raw = self.string(env, file);
        parse_duration(&raw).map_err(|reason| ConfigError::invalid(env, reason))
    }
}

/// A duration as the settings spell it: `90d`, `12h`, `15m`, `30s` when
/// whole, else humantime's spelling (`1h 30m`).
pub fn format_duration_short(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return humantime::format_duration(d).to_string();
    }
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// Parses `500ms`, `30s`, `15m`, `4h` (and combinations such as `1h30m`).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim())
        .map_err(|e| format!("{raw:?} is not a duration like 500ms, 30s, 15m or 4h ({e})"))
}

impl Settings {
    /// Reads the optional file and the process environment, and checks
    /// the memory budget ([`AmqpSettings::check_memory_budget`]).
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let settings = Self::from_sources(file, &ProcessEnv)?;
        settings.amqp.check_memory_budget()?;
        Ok(settings)
    }

    /// Reads the optional file and the given environment.
    pub fn from_sources(file: Option<&Path>, env: &dyn Env) -> Result<Self, ConfigError> {
        let path = file
            .map(Path::to_path_buf)
            .or_else(|| env.var("HOLDCLEAR_CONFIG").map(PathBuf::from));
        let f = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::File {
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
                toml::from_str::<FileSettings>(&text).map_err(|e| ConfigError::File {
                    path: p.clone(),
                    reason: e.message().to_owned(),
                })?
            }
            None => FileSettings::default(),
        };
        Self::build(f, env)
    }

    fn build(mut f: FileSettings, env: &dyn Env) -> Result<Self, ConfigError> {
        let r = Reader { env };
        let f = &mut f;
        let [amqp_tls_ca, database_tls_ca, commerce_tls_ca] = tls_cas(&r, f)?;
        let allow_plaintext = r.parsed(
            "HOLDCLEAR_COMMERCE_ALLOW_PLAINTEXT",
            f.commerce_allow_plaintext.take(),
        )?;
        let database_url = SecretUrl::parse(
            "HOLDCLEAR_DATABASE_URL",
            &r.string("HOLDCLEAR_DATABASE_URL", f.database_url.take()),
        )?;
        if !matches!(database_url.url().scheme(), "postgres" | "postgresql")
            || database_url.url().cannot_be_a_base()
        {
            return Err(ConfigError::invalid(
                "HOLDCLEAR_DATABASE_URL",
                "must start with postgres://",
            ));
        }
        let database_max_connections = r.parsed(
            "HOLDCLEAR_DATABASE_MAX_CONNECTIONS",
            f.database_max_connections.take(),
        )?;
        positive(
            "HOLDCLEAR_DATABASE_MAX_CONNECTIONS",
            database_max_connections as f64,
        )?;
        let database_timeouts = database_timeouts(&r, f)?;
        let amqp = amqp(&r, f, amqp_tls_ca, &database_timeouts)?;
        let commerce = commerce(&r, f, commerce_tls_ca, allow_plaintext)?;
        let rules_path = f
            .rules
            .take()
            .map(|p| p.to_string_lossy().into_owned())
            .map(Some)
            .unwrap_or(None);
        let rules_path = PathBuf::from(r.string("HOLDCLEAR_RULES", rules_path));
        let rules_shadow_path = (r.env.var("HOLDCLEAR_RULES_SHADOW_FILE"))
            .map(|v| PathBuf::from(v.trim()))
            .or(f.rules_shadow_file.take());

        let engine = engine(&r, f)?;
        let escalated_watch = escalated_watch(&r, f)?;
        let http_addr_raw = r.string("HOLDCLEAR_HTTP_ADDR", f.http_addr.take());
        let http_addr = http_addr_raw.trim().parse().map_err(|_| {
            ConfigError::invalid(
                "HOLDCLEAR_HTTP_ADDR",
                format!("{http_addr_raw:?} is not an address like 127.0.0.1:9090"),
            )
        })?;

        let log_format = log_format(&r, f)?;
        let shutdown_timeout =
            r.duration("HOLDCLEAR_SHUTDOWN_TIMEOUT", f.shutdown_timeout.take())?;
        let prune = prune(&r, f)?;
        let console = console(&r, f)?;

        Ok(Self {
            database_url,
            database_max_connections,
            database_timeouts,
            database_tls_ca,
            amqp,
            commerce,
            rules_path,
            rules_shadow_path,
            engine,
            escalated_watch,
            http_addr,
            log_format,
            shutdown_timeout,
            prune,
            console,
        })
    }
}

/// `holdclear console`'s settings (their presence is checked when the console starts).
fn console(r: &Reader<'_>, f: &mut FileSettings) -> Result<ConsoleSettings, ConfigError> {
    let raw = r.string("HOLDCLEAR_CONSOLE_ADDR", f.console_addr.take());
    let addr = raw.trim().parse().map_err(|_| {
        ConfigError::invalid(
            "HOLDCLEAR_CONSOLE_ADDR",
            format!("{raw:?} is not an address like 127.0.0.1:8090"),
        )
    })?;
    let mut tokens = Vec::new();
    for (env, file, role) in [
        (
            "HOLDCLEAR_CONSOLE_OPERATOR_TOKENS",
            f.console_operator_tokens.take(),
            Role::Operator,
        ),
        (
            "HOLDCLEAR_CONSOLE_VIEWER_TOKENS",
            f.console_viewer_tokens.take(),
            Role::Viewer,
        ),
    ] {
        if let Some(list) = r.env.var(env).or(file) {
            tokens.extend(console_tokens(env, &list, role)?);
        }
    }
    let trusted_header = (r.env.var("HOLDCLEAR_CONSOLE_TRUSTED_HEADER"))
        .or(f.console_trusted_header.take())
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty());
    if let Some(h) = &trusted_header
        && axum::http::HeaderName::from_bytes(h.as_bytes()).is_err()
    {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_CONSOLE_TRUSTED_HEADER",
            format!("{h:?} is not a header name"),
        ));
    }
    let trusted_operators = (r.env.var("HOLDCLEAR_CONSOLE_TRUSTED_OPERATORS"))
        .or(f.console_trusted_operators.take())
        .map(|l| {
            l.split(',')
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let session_key = (r.env.var("HOLDCLEAR_CONSOLE_SESSION_KEY"))
        .or(f.console_session_key.take())
        .map(Secret::new);
    if session_key.as_ref().is_some_and(|k| k.expose().len() < 32) {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_CONSOLE_SESSION_KEY",
            "is shorter than 32 characters",
        ));
    }
    let session_ttl = r.duration(
        "HOLDCLEAR_CONSOLE_SESSION_TTL",
        f.console_session_ttl.take(),
    )?;
    nonzero("HOLDCLEAR_CONSOLE_SESSION_TTL", session_ttl)?;
    Ok(ConsoleSettings {
        addr,
        tokens,
        trusted_header,
        trusted_operators,
        session_key,
        session_ttl,
        secure_cookie: r.parsed(
            "HOLDCLEAR_CONSOLE_SECURE_COOKIE",
            f.console_secure_cookie.take(),
        )?,
    })
}

/// `name:token,name:token`; the error names the setting, never a token.
fn console_tokens(env: &str, list: &str, role: Role) -> Result<Vec<ConsoleToken>, ConfigError> {
    let mut out = Vec::new();
    for (i, entry) in list.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let Some((user, token)) = entry.split_once(':') else {
            return Err(ConfigError::invalid(
                env,
                format!("entry {} is not name:token", i + 1),
            ));
        };
        let user = user.trim();
        let valid_name = !user.is_empty()
            && user.len() <= 64
            && (user.chars()).all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
        if !valid_name {
            return Err(ConfigError::invalid(
                env,
                format!(
                    "entry {}: the name must be 1 to 64 of A-Z a-z 0-9 . _ @ -",
                    i + 1
                ),
            ));
        }
        if token.trim().len() < MIN_CONSOLE_TOKEN {
            return Err(ConfigError::invalid(
                env,
                format!("the token of {user} is shorter than {MIN_CONSOLE_TOKEN} characters"),
            ));
        }
        out.push(ConsoleToken {
            user: user.to_owned(),
            role,
            token: Secret::new(token.trim()),
        });
    }
    Ok(out)
}

/// Each dependency's CA file (RabbitMQ, PostgreSQL, the commerce API): its
/// own wins over the shared one.
fn tls_cas(r: &Reader<'_>, f: &mut FileSettings) -> Result<[Option<CaFile>; 3], ConfigError> {
    let shared_ca = r.ca_file("HOLDCLEAR_TLS_CA_FILE", f.tls_ca_file.take())?;
    let amqp_tls_ca = r
        .ca_file("HOLDCLEAR_AMQP_TLS_CA_FILE", f.amqp_tls_ca_file.take())?
        .or_else(|| shared_ca.clone());
    let database_tls_ca = r
        .ca_file(
            "HOLDCLEAR_DATABASE_TLS_CA_FILE",
            f.database_tls_ca_file.take(),
        )?
        .or_else(|| shared_ca.clone());
    let commerce_tls_ca = r
        .ca_file(
            "HOLDCLEAR_COMMERCE_TLS_CA_FILE",
            f.commerce_tls_ca_file.take(),
        )?
        .or(shared_ca);
    Ok([amqp_tls_ca, database_tls_ca, commerce_tls_ca])
}

fn log_format(r: &Reader<'_>, f: &mut FileSettings) -> Result<LogFormat, ConfigError> {
    Ok(
        match r.env.var("HOLDCLEAR_LOG_FORMAT").or(f.log_format.take()) {
            None => {
                use std::io::IsTerminal;
                if std::io::stderr().is_terminal() {
                    LogFormat::Pretty
                } else {
                    LogFormat::Json
                }
            }
            Some(v) => match v.trim() {
                "pretty" => LogFormat::Pretty,
                "json" => LogFormat::Json,
                other => {
                    return Err(ConfigError::invalid(
                        "HOLDCLEAR_LOG_FORMAT",
                        format!("{other:?} is neither pretty nor json"),
                    ));
                }
            },
        },
    )
}

/// PostgreSQL's session limits and the pool's wait.
fn database_timeouts(
    r: &Reader<'_>,
    f: &mut FileSettings,
) -> Result<DatabaseTimeouts, ConfigError> {
    let timeouts = DatabaseTimeouts {
        statement: r.duration(
            "HOLDCLEAR_DATABASE_STATEMENT_TIMEOUT",
            f.database_statement_timeout.take(),
        )?,
        lock: r.duration(
            "HOLDCLEAR_DATABASE_LOCK_TIMEOUT",
            f.database_lock_timeout.take(),
        )?,
        idle_in_transaction: r.duration(
            "HOLDCLEAR_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT",
            f.database_idle_in_transaction_timeout.take(),
        )?,
        acquire: r.duration(
            "HOLDCLEAR_DATABASE_ACQUIRE_TIMEOUT",
            f.database_acquire_timeout.take(),
        )?,
    };
    for (setting, value) in [
        ("HOLDCLEAR_DATABASE_STATEMENT_TIMEOUT", timeouts.statement),
        ("HOLDCLEAR_DATABASE_LOCK_TIMEOUT", timeouts.lock),
        (
            "HOLDCLEAR_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT",
            timeouts.idle_in_transaction,
        ),
        ("HOLDCLEAR_DATABASE_ACQUIRE_TIMEOUT", timeouts.acquire),
    ] {
        // PostgreSQL takes whole milliseconds (0 would mean "no limit").
        if value < Duration::from_millis(1) {
            return Err(ConfigError::invalid(setting, "must be at least 1ms"));
        }
        if value > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::invalid(setting, "must be at most 24h"));
        }
    }
    Ok(timeouts)
}

fn amqp(
    r: &Reader<'_>,
    f: &mut FileSettings,
    tls_ca: Option<CaFile>,
    database: &DatabaseTimeouts,
) -> Result<AmqpSettings, ConfigError> {
    let amqp_url = SecretUrl::parse(
        "HOLDCLEAR_AMQP_URL",
        &r.string("HOLDCLEAR_AMQP_URL", f.amqp_url.take()),
    )?;
    // (`amqp:user:pw@host`, without `//`, is no URL with a host: lapin
    // would repeat it whole in its error.)
    if !matches!(amqp_url.url().scheme(), "amqp" | "amqps") || amqp_url.url().cannot_be_a_base() {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_AMQP_URL",
            "must start with amqp:// or amqps://",
        ));
    }
    let prefetch = r.parsed("HOLDCLEAR_AMQP_PREFETCH", f.amqp_prefetch.take())?;
    positive("HOLDCLEAR_AMQP_PREFETCH", prefetch as f64)?;
    let max_payload_bytes = r.parsed("HOLDCLEAR_MAX_PAYLOAD_BYTES", f.max_payload_bytes.take())?;
    positive("HOLDCLEAR_MAX_PAYLOAD_BYTES", max_payload_bytes as f64)?;
    let memory_budget_raw = r.string("HOLDCLEAR_MEMORY_BUDGET", f.memory_budget.take());
    let memory_budget_bytes = parse_bytes(&memory_budget_raw)
        .map_err(|reason| ConfigError::invalid("HOLDCLEAR_MEMORY_BUDGET", reason))?;
    let delivery_limit = r.parsed("HOLDCLEAR_DELIVERY_LIMIT", f.delivery_limit.take())?;
    positive("HOLDCLEAR_DELIVERY_LIMIT", delivery_limit as f64)?;
    let intake_batch = r.parsed("HOLDCLEAR_INTAKE_BATCH", f.intake_batch.take())?;
    positive("HOLDCLEAR_INTAKE_BATCH", intake_batch as f64)?;
    let intake_linger = r.duration("HOLDCLEAR_INTAKE_LINGER", f.intake_linger.take())?;
    let dead_letter_ingest = r.parsed("HOLDCLEAR_DLQ_INGEST", f.dlq_ingest.take())?;
    let confirm_timeout = r.duration(
        "HOLDCLEAR_AMQP_CONFIRM_TIMEOUT",
        f.amqp_confirm_timeout.take(),
    )?;
    nonzero("HOLDCLEAR_AMQP_CONFIRM_TIMEOUT", confirm_timeout)?;
    // The relay keeps its rows' transaction open while it waits for the
    // broker's confirms: the server must not end it meanwhile.
    if database.idle_in_transaction <= confirm_timeout {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT",
            "must be longer than HOLDCLEAR_AMQP_CONFIRM_TIMEOUT (the outbox relay holds a transaction while it waits for confirms)",
        ));
    }

    let topology = f.topology.take().unwrap_or_default();
    for (key, name) in [
        ("topology.orders_exchange", &topology.orders_exchange),
        ("topology.held_routing_key", &topology.held_routing_key),
        ("topology.held_queue", &topology.held_queue),
        (
            "topology.dead_letter_exchange",
            &topology.dead_letter_exchange,
        ),
        ("topology.dead_letter_queue", &topology.dead_letter_queue),
        ("topology.events_exchange", &topology.events_exchange),
    ] {
        if name.trim().is_empty() || name.len() > 255 {
            return Err(ConfigError::invalid(key, "must be 1 to 255 characters"));
        }
    }

    Ok(AmqpSettings {
        url: amqp_url,
        topology,
        prefetch,
        max_payload_bytes,
        memory_budget_bytes,
        delivery_limit,
        intake_batch,
        intake_linger,
        confirm_timeout,
        tls_ca,
        dead_letter_ingest,
    })
}

fn commerce(
    r: &Reader<'_>,
    f: &mut FileSettings,
    tls_ca: Option<CaFile>,
    allow_plaintext: bool,
) -> Result<CommerceSettings, ConfigError> {
    let base_url = parse_http_url(
        "HOLDCLEAR_COMMERCE_BASE_URL",
        &r.string("HOLDCLEAR_COMMERCE_BASE_URL", f.commerce_base_url.take()),
    )?;
    check_commerce_url("HOLDCLEAR_COMMERCE_BASE_URL", &base_url, allow_plaintext)?;
    let default_token = format!(
        "{}/oauth2/default/v1/token",
        base_url.as_str().trim_end_matches('/')
    );
    let token_url = parse_http_url(
        "HOLDCLEAR_COMMERCE_TOKEN_URL",
        &r.string_or(
            "HOLDCLEAR_COMMERCE_TOKEN_URL",
            f.commerce_token_url.take(),
            &default_token,
        ),
    )?;
    check_commerce_url("HOLDCLEAR_COMMERCE_TOKEN_URL", &token_url, allow_plaintext)?;
    let client_id = r.string_or(
        "HOLDCLEAR_COMMERCE_CLIENT_ID",
        f.commerce_client_id.take(),
        DEMO_CLIENT_ID,
    );
    if client_id.trim().is_empty() {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_COMMERCE_CLIENT_ID",
            "is empty",
        ));
    }
    let client_secret = Secret::new(r.string_or(
        "HOLDCLEAR_COMMERCE_CLIENT_SECRET",
        f.commerce_client_secret.take(),
        DEMO_CLIENT_SECRET,
    ));
    if client_secret.expose().is_empty() {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_COMMERCE_CLIENT_SECRET",
            "is empty",
        ));
    }
    let rate_limit = r.parsed(
        "HOLDCLEAR_COMMERCE_RATE_LIMIT",
        f.commerce_rate_limit.take(),
    )?;
    positive("HOLDCLEAR_COMMERCE_RATE_LIMIT", rate_limit)?;
    let request_timeout = r.duration("HOLDCLEAR_COMMERCE_TIMEOUT", f.commerce_timeout.take())?;
    nonzero("HOLDCLEAR_COMMERCE_TIMEOUT", request_timeout)?;
    let cache_ttl = r.duration("HOLDCLEAR_COMMERCE_CACHE_TTL", f.commerce_cache_ttl.take())?;
    let cache_entries = r.parsed(
        "HOLDCLEAR_COMMERCE_CACHE_ENTRIES",
        f.commerce_cache_entries.take(),
    )?;
    if !(1..=1_000_000).contains(&cache_entries) {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_COMMERCE_CACHE_ENTRIES",
            "must be between 1 and 1000000",
        ));
    }

    Ok(CommerceSettings {
        base_url,
        token_url,
        client_id,
        client_secret,
        rate_limit,
        request_timeout,
        cache_ttl,
        cache_entries,
        tls_ca,
    })
}

/// `HOLDCLEAR_ESCALATED_WATCH_INTERVAL` (`off`, or at least 1s) and
/// `HOLDCLEAR_ESCALATED_WATCH_FOR` (not zero).
fn escalated_watch(
    r: &Reader<'_>,
    f: &mut FileSettings,
) -> Result<Option<EscalatedWatch>, ConfigError> {
    const INTERVAL: &str = "HOLDCLEAR_ESCALATED_WATCH_INTERVAL";
    let raw = r.string(INTERVAL, f.escalated_watch_interval.take());
    let watch_for = r.duration(
        "HOLDCLEAR_ESCALATED_WATCH_FOR",
        f.escalated_watch_for.take(),
    )?;
    nonzero("HOLDCLEAR_ESCALATED_WATCH_FOR", watch_for)?;
    if raw.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let interval = parse_duration(&raw)
        .map_err(|reason| ConfigError::invalid(INTERVAL, format!("{reason}, or off")))?;
    if interval < Duration::from_secs(1) {
        return Err(ConfigError::invalid(
            INTERVAL,
            format!("{raw:?} is shorter than 1s: each look is a call to the commerce API"),
        ));
    }
    Ok(Some(EscalatedWatch {
        interval,
        watch_for,
    }))
}

/// Retention per table and the pruner's pace.
fn prune(r: &Reader<'_>, f: &mut FileSettings) -> Result<PruneSettings, ConfigError> {
    let none = Duration::ZERO;
    let prune = PruneSettings {
        outbox: r.retention(
            "HOLDCLEAR_OUTBOX_RETENTION",
            f.outbox_retention.take(),
            none,
        )?,
        inbox: r.retention(
            "HOLDCLEAR_INBOX_RETENTION",
            f.inbox_retention.take(),
            INBOX_RETENTION_FLOOR,
        )?,
        cases: r.retention(
            "HOLDCLEAR_CASE_RETENTION",
            f.case_retention.take(),
            CASE_RETENTION_FLOOR,
        )?,
        escalated_cases: r.retention(
            "HOLDCLEAR_ESCALATED_CASE_RETENTION",
            f.escalated_case_retention.take(),
            CASE_RETENTION_FLOOR,
        )?,
        dead_letters: r.retention("HOLDCLEAR_DLQ_RETENTION", f.dlq_retention.take(), none)?,
        interval: r.duration("HOLDCLEAR_PRUNE_INTERVAL", f.prune_interval.take())?,
        slice: r.parsed("HOLDCLEAR_PRUNE_SLICE", f.prune_slice.take())?,
        pause: r.duration("HOLDCLEAR_PRUNE_PAUSE", f.prune_pause.take())?,
    };
    nonzero("HOLDCLEAR_PRUNE_INTERVAL", prune.interval)?;
    if !(1..=PRUNE_SLICE_MAX).contains(&prune.slice) {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_PRUNE_SLICE",
            format!("must be 1 to {PRUNE_SLICE_MAX}"),
        ));
    }
    Ok(prune)
}

fn engine(r: &Reader<'_>, f: &mut FileSettings) -> Result<EngineSettings, ConfigError> {
    let poll_interval = r.duration("HOLDCLEAR_POLL_INTERVAL", f.poll_interval.take())?;
    nonzero("HOLDCLEAR_POLL_INTERVAL", poll_interval)?;
    let poll_max_interval =
        r.duration("HOLDCLEAR_POLL_MAX_INTERVAL", f.poll_max_interval.take())?;
    if poll_max_interval < poll_interval {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_POLL_MAX_INTERVAL",
            "is shorter than HOLDCLEAR_POLL_INTERVAL",
        ));
    }
    let escalate_after = r.duration("HOLDCLEAR_ESCALATE_AFTER", f.escalate_after.take())?;
    nonzero("HOLDCLEAR_ESCALATE_AFTER", escalate_after)?;
    let escalation = escalation(escalate_after, f.escalation_levels.take())?;
    let retry = RetrySettings {
        initial: r.duration("HOLDCLEAR_RETRY_INITIAL", f.retry_initial.take())?,
        max_interval: r.duration("HOLDCLEAR_RETRY_MAX_INTERVAL", f.retry_max_interval.take())?,
        max_elapsed: r.duration("HOLDCLEAR_RETRY_MAX_ELAPSED", f.retry_max_elapsed.take())?,
        multiplier: r.parsed("HOLDCLEAR_RETRY_MULTIPLIER", f.retry_multiplier.take())?,
        randomization: r.parsed(
            "HOLDCLEAR_RETRY_RANDOMIZATION",
            f.retry_randomization.take(),
        )?,
    };
    nonzero("HOLDCLEAR_RETRY_INITIAL", retry.initial)?;
    if retry.max_interval < retry.initial {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_RETRY_MAX_INTERVAL",
            "is shorter than HOLDCLEAR_RETRY_INITIAL",
        ));
    }
    nonzero("HOLDCLEAR_RETRY_MAX_ELAPSED", retry.max_elapsed)?;
    if retry.multiplier < 1.0 || !retry.multiplier.is_finite() {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_RETRY_MULTIPLIER",
            "must be at least 1",
        ));
    }
    if !(0.0..=1.0).contains(&retry.randomization) {
        return Err(ConfigError::invalid(
            "HOLDCLEAR_RETRY_RANDOMIZATION",
            "must be between 0 and 1",
        ));
    }

    let engine = EngineSettings {
        poll_interval,
        poll_max_interval,
        escalation,
        retry,
        concurrency: r.parsed("HOLDCLEAR_ENGINE_CONCURRENCY", f.engine_concurrency.take())?,
        batch_size: r.parsed("HOLDCLEAR_ENGINE_BATCH_SIZE", f.engine_batch_size.take())?,
        lease: r.duration("HOLDCLEAR_ENGINE_LEASE", f.engine_lease.take())?,
        idle_poll: r.duration("HOLDCLEAR_ENGINE_IDLE_POLL", f.engine_idle_poll.take())?,
    };
    positive("HOLDCLEAR_ENGINE_CONCURRENCY", engine.concurrency as f64)?;
    positive("HOLDCLEAR_ENGINE_BATCH_SIZE", engine.batch_size as f64)?;
    nonzero("HOLDCLEAR_ENGINE_LEASE", engine.lease)?;
    nonzero("HOLDCLEAR_ENGINE_IDLE_POLL", engine.idle_poll)?;

    Ok(engine)
}

/// `HOLDCLEAR_ESCALATE_AFTER` (warning) and the file's later levels.
fn escalation(
    escalate_after: Duration,
    levels: Option<Vec<FileEscalationLevel>>,
) -> Result<Vec<EscalationThreshold>, ConfigError> {
    let mut escalation = vec![EscalationThreshold {
        after: escalate_after,
        level: crate::domain::EscalationLevel::Warning,
    }];
    for (i, lvl) in levels.unwrap_or_default().into_iter().enumerate() {
        let key = format!("escalation_levels[{i}]");
        let after = parse_duration(&lvl.after)
            .map_err(|reason| ConfigError::invalid(&format!("{key}.after"), reason))?;
        let level = lvl
            .level
            .parse()
            .map_err(|reason| ConfigError::invalid(&format!("{key}.level"), reason))?;
        if after <= escalation.last().map(|l| l.after).unwrap_or_default() {
            return Err(ConfigError::invalid(
                &format!("{key}.after"),
                "must be later than HOLDCLEAR_ESCALATE_AFTER and the levels before it",
            ));
        }
        escalation.push(EscalationThreshold { after, level });
    }

    Ok(escalation)
}

/// Parses a size: bytes (`262144`) or with a binary unit (`256KiB`,
/// `256MiB`, `1GiB`; a space before the unit is fine).
pub fn parse_bytes(raw: &str) -> Result<u64, String> {
    let t = raw.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{raw:?} is not a size like 262144, 256KiB, 256MiB or 1GiB"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "{raw:?}: unknown unit {other:?} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    n.checked_mul(factor)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{raw:?} must be greater than 0 and below 16 EiB"))
}

/// A size as a person reads it: `256 KiB`, `1 GiB`, or bytes.
pub fn format_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20))
    } else {
        format!("{n} bytes")
    }
}

fn parse_http_url(setting: &str, raw: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(raw.trim())
        .map_err(|e| ConfigError::invalid(setting, format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::invalid(
            setting,
            "must start with http:// or https://",
        ));
    }
    Ok(url)
}

/// A commerce URL carries no credentials (they are the client id and
/// secret settings, sent only in the token request's body), and is
/// `https://` unless its host is loopback (the simulator on this machine)
/// or `HOLDCLEAR_COMMERCE_ALLOW_PLAINTEXT` is true: the client secret and
/// the tokens never travel in clear text by accident.
fn check_commerce_url(setting: &str, url: &Url, allow_plaintext: bool) -> Result<(), ConfigError> {
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::invalid(
            setting,
            "must not carry a user or password (the credentials are \
             HOLDCLEAR_COMMERCE_CLIENT_ID and HOLDCLEAR_COMMERCE_CLIENT_SECRET)",
        ));
    }
    if let Some((key, _)) = url.query_pairs().find(|(k, _)| is_secret_key(k)) {
        return Err(ConfigError::invalid(
            setting,
            format!("must not carry a secret in its query ({key}=…)"),
        ));
    }
    if url.scheme() == "http" && !allow_plaintext && !is_loopback(url) {
        return Err(ConfigError::invalid(
            setting,
            "is http:// to a host that is not loopback: the client secret and the \
             tokens would travel in clear text; use https://, or set \
             HOLDCLEAR_COMMERCE_ALLOW_PLAINTEXT=true to accept that",
        ));
    }
    Ok(())
}

/// `localhost`, 127.0.0.0/8 or `::1`.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn positive(setting: &str, value: f64) -> Result<(), ConfigError> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(ConfigError::invalid(setting, "must be greater than 0"))
    }
}

fn nonzero(setting: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(ConfigError::invalid(setting, "must be longer than 0s"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_sources(None, &env)
    }

    /// The README's settings table is [`settings_table`]: the docs cannot
    /// drift from the defaults the code uses.
    #[test]
    fn the_readme_settings_table_is_the_rendered_table() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("| variable | file key |")
            .expect("the README has a settings table");
        let end = readme[start..]
            .find("\n\n")
            .map_or(readme.len(), |n| start + n + 1);
        assert_eq!(
            &readme[start..end],
            settings_table(),
            "run `cargo test -p holdclear config::tests::print_settings_table -- --nocapture` and paste"
        );
        for s in SETTINGS {
            if let Fallback::Value(_) = s.fallback {
                default_of(s.env);
            }
        }
    }

    #[test]
    fn print_settings_table() {
        println!("{}", settings_table());
    }

    #[test]
    fn defaults_work_on_localhost() {
        let s = with(&[]).unwrap();
        assert_eq!(
            s.database_url.expose(),
            "postgres://postgres@127.0.0.1:5432/holdclear"
        );
        assert_eq!(
            s.commerce.token_url.as_str(),
            "http://127.0.0.1:8089/oauth2/default/v1/token"
        );
        assert_eq!(s.engine.poll_interval, Duration::from_secs(30));
        assert_eq!(s.engine.poll_max_interval, Duration::from_secs(15 * 60));
        assert_eq!(s.engine.escalation[0].after, Duration::from_secs(4 * 3600));
        assert_eq!(s.engine.retry.max_elapsed, Duration::from_secs(3600));
        assert_eq!(s.amqp.max_payload_bytes, 256 * 1024);
        assert_eq!(s.amqp.topology.held_queue, "holdclear.order-held");
        assert_eq!(s.database_timeouts, DatabaseTimeouts::default());
        assert_eq!(s.amqp.confirm_timeout, Duration::from_secs(30));
    }

    #[test]
    fn database_and_confirm_deadlines() {
        let s = with(&[
            ("HOLDCLEAR_DATABASE_STATEMENT_TIMEOUT", "2s"),
            ("HOLDCLEAR_DATABASE_LOCK_TIMEOUT", "300ms"),
            ("HOLDCLEAR_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT", "1m"),
            ("HOLDCLEAR_DATABASE_ACQUIRE_TIMEOUT", "500ms"),
            ("HOLDCLEAR_AMQP_CONFIRM_TIMEOUT", "5s"),
        ])
        .unwrap();
        assert_eq!(
            s.database_timeouts,
            DatabaseTimeouts {
                statement: Duration::from_secs(2),
                lock: Duration::from_millis(300),
                idle_in_transaction: Duration::from_secs(60),
                acquire: Duration::from_millis(500),
            }
        );
        assert_eq!(s.amqp.confirm_timeout, Duration::from_secs(5));
        for (name, value) in [
            ("HOLDCLEAR_DATABASE_STATEMENT_TIMEOUT", "0s"),
            ("HOLDCLEAR_DATABASE_LOCK_TIMEOUT", "500us"),
            ("HOLDCLEAR_DATABASE_ACQUIRE_TIMEOUT", "2d"),
            ("HOLDCLEAR_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT", "soon"),
            ("HOLDCLEAR_AMQP_CONFIRM_TIMEOUT", "0s"),
            ("HOLDCLEAR_AMQP_CONFIRM_TIMEOUT", "2m"),
            ("HOLDCLEAR_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT", "30s"),
        ] {
            let err = with(&[(name, value)]).unwrap_err().to_string();
            assert!(err.contains(name), "{name}={value}: {err}");
        }
    }

    #[test]
    fn bad_values_name_the_setting() {
        let cases = [
            ("HOLDCLEAR_POLL_INTERVAL", "soon"),
            ("HOLDCLEAR_COMMERCE_RATE_LIMIT", "0"),
            ("HOLDCLEAR_COMMERCE_RATE_LIMIT", "fast"),
            ("HOLDCLEAR_AMQP_URL", "http://x"),
            ("HOLDCLEAR_DATABASE_URL", "not a url"),
            ("HOLDCLEAR_HTTP_ADDR", "localhost"),
            ("HOLDCLEAR_LOG_FORMAT", "xml"),
            ("HOLDCLEAR_RETRY_MULTIPLIER", "0.5"),
            ("HOLDCLEAR_ESCALATED_WATCH_INTERVAL", "hourly"),
            ("HOLDCLEAR_ESCALATED_WATCH_INTERVAL", "200ms"),
            ("HOLDCLEAR_ESCALATED_WATCH_FOR", "0s"),
            ("HOLDCLEAR_COMMERCE_CACHE_TTL", "a while"),
            ("HOLDCLEAR_COMMERCE_CACHE_ENTRIES", "0"),
            ("HOLDCLEAR_COMMERCE_CACHE_ENTRIES", "many"),
        ];
        for (name, value) in cases {
            let err = with(&[(name, value)]).unwrap_err().to_string();
            assert!(err.contains(name), "{name}={value}: {err}");
        }
    }

    /// Retention: a duration, `off` or `0` (keep for ever); below a
    /// table's floor, or not a duration, is refused naming the setting.
    #[test]
    fn retentions_parse_off_and_refuse_values_under_their_floor() {
        let day = Duration::from_secs(24 * 3600);
        let d = with(&[]).unwrap().prune;
        assert_eq!(d.outbox, Some(30 * day));
        assert_eq!(d.inbox, Some(90 * day));
        assert_eq!(d.cases, Some(365 * day));
        assert_eq!(d.escalated_cases, Some(730 * day));
        assert_eq!(d.dead_letters, Some(30 * day));
        assert_eq!((d.slice, d.interval), (500, Duration::from_secs(3600)));
        let p = with(&[
            ("HOLDCLEAR_OUTBOX_RETENTION", "off"),
            ("HOLDCLEAR_INBOX_RETENTION", "0"),
            ("HOLDCLEAR_CASE_RETENTION", "1d"),
            ("HOLDCLEAR_ESCALATED_CASE_RETENTION", " off "),
            ("HOLDCLEAR_DLQ_RETENTION", "12h"),
        ])
        .unwrap()
        .prune;
        assert_eq!(p.outbox, None);
        assert_eq!(p.inbox, None);
        assert_eq!(p.cases, Some(day));
        assert_eq!(p.escalated_cases, None);
        assert_eq!(p.dead_letters, Some(day / 2));
        for (name, value, says) in [
            ("HOLDCLEAR_INBOX_RETENTION", "6d", "7d"),
            ("HOLDCLEAR_INBOX_RETENTION", "forever", "off"),
            ("HOLDCLEAR_CASE_RETENTION", "23h", "1d"),
            ("HOLDCLEAR_ESCALATED_CASE_RETENTION", "1h", "1d"),
            ("HOLDCLEAR_OUTBOX_RETENTION", "0s", "off"),
            ("HOLDCLEAR_DLQ_RETENTION", "never", "off"),
            ("HOLDCLEAR_PRUNE_SLICE", "0", "1 to 10000"),
            ("HOLDCLEAR_PRUNE_SLICE", "20000", "1 to 10000"),
            ("HOLDCLEAR_PRUNE_INTERVAL", "0s", "longer than 0s"),
            ("HOLDCLEAR_PRUNE_PAUSE", "a while", "duration"),
        ] {
            let err = with(&[(name, value)]).unwrap_err().to_string();
            assert!(
                err.contains(name) && err.contains(says),
                "{name}={value}: {err}"
            );
        }
    }

    #[test]
    fn the_escalated_watch_is_off_by_default_and_bounded_when_on() {
        assert_eq!(with(&[]).unwrap().escalated_watch, None);
        let on = with(&[("HOLDCLEAR_ESCALATED_WATCH_INTERVAL", "1h")]).unwrap();
        assert_eq!(
            on.escalated_watch,
            Some(EscalatedWatch {
                interval: Duration::from_secs(3600),
                watch_for: Duration::from_secs(7 * 86_400),
            })
        );
        let off = with(&[("HOLDCLEAR_ESCALATED_WATCH_INTERVAL", "OFF")]).unwrap();
        assert_eq!(off.escalated_watch, None);
    }

    #[test]
    fn the_resolve_cache_is_on_by_default_and_0_turns_it_off() {
        let s = with(&[]).unwrap();
        assert_eq!(s.commerce.cache_ttl, Duration::from_secs(15 * 60));
        assert_eq!(s.commerce.cache_entries, 10_000);
        let off = with(&[("HOLDCLEAR_COMMERCE_CACHE_TTL", "0")]).unwrap();
        assert_eq!(off.commerce.cache_ttl, Duration::ZERO);
    }

    #[test]
    fn bodies_in_flight_must_fit_the_memory_budget() {
        // The defaults fit: 1024 × 256 KiB = 256 MiB.
        let checked = |vars: &[(&str, &str)]| with(vars)?.amqp.check_memory_budget();
        let s = with(&[]).unwrap();
        assert_eq!(s.amqp.memory_budget_bytes, 256 << 20);
        s.amqp.check_memory_budget().unwrap();
        let err = checked(&[("HOLDCLEAR_AMQP_PREFETCH", "2048")])
            .unwrap_err()
            .to_string();
        for named in [
            "HOLDCLEAR_MEMORY_BUDGET",
            "HOLDCLEAR_AMQP_PREFETCH (2048)",
            "HOLDCLEAR_MAX_PAYLOAD_BYTES (262144)",
            "512 MiB",
            "256 MiB",
        ] {
            assert!(err.contains(named), "{named}: {err}");
        }
        checked(&[
            ("HOLDCLEAR_AMQP_PREFETCH", "2048"),
            ("HOLDCLEAR_MEMORY_BUDGET", "512MiB"),
        ])
        .unwrap();
        checked(&[
            ("HOLDCLEAR_AMQP_PREFETCH", "2048"),
            ("HOLDCLEAR_MAX_PAYLOAD_BYTES", "131072"),
        ])
        .unwrap();
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        let cases = [
            ("262144", Some(262_144)),
            ("256KiB", Some(262_144)),
            ("256 MiB", Some(256 << 20)),
            ("1GiB", Some(1 << 30)),
            ("1GB", None),
            ("0", None),
            ("lots", None),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_bytes(raw).ok(), want, "{raw}");
        }
        assert_eq!(format_bytes(1 << 30), "1 GiB");
        assert_eq!(format_bytes(256 << 10), "256 KiB");
        assert_eq!(format_bytes(1000), "1000 bytes");
    }

    #[test]
    fn secrets_are_redacted() {
        let s = with(&[
            ("HOLDCLEAR_COMMERCE_CLIENT_SECRET", "s3cr3t-value"),
            ("HOLDCLEAR_AMQP_URL", "amqp://user:hunter2@rabbit:5672/%2f"),
        ])
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn console_tokens_roles_and_their_mistakes() {
        let s = with(&[
            (
                "HOLDCLEAR_CONSOLE_OPERATOR_TOKENS",
                "ann:0123456789abcdef-ann, bob:0123456789abcdef-bob",
            ),
            (
                "HOLDCLEAR_CONSOLE_VIEWER_TOKENS",
                "vic:0123456789abcdef-vic",
            ),
            ("HOLDCLEAR_CONSOLE_SESSION_KEY", &"k".repeat(32)),
        ])
        .unwrap();
        let c = &s.console;
        assert_eq!(c.addr.to_string(), "127.0.0.1:8090");
        let users: Vec<(&str, Role)> = c.tokens.iter().map(|t| (t.user.as_str(), t.role)).collect();
        assert_eq!(
            users,
            [
                ("ann", Role::Operator),
                ("bob", Role::Operator),
                ("vic", Role::Viewer)
            ]
        );
        assert!(c.check_credentials().is_ok());
        let shown = format!("{s:?}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(!shown.contains("kkkk"), "{shown}");

        // Nothing configured: the console refuses to start, naming the setting.
        let e = with(&[]).unwrap().console.check_credentials().unwrap_err();
        assert!(
            e.to_string().contains("HOLDCLEAR_CONSOLE_OPERATOR_TOKENS"),
            "{e}"
        );
        // A trusted header is a credential.
        let h = with(&[("HOLDCLEAR_CONSOLE_TRUSTED_HEADER", "X-Forwarded-User")]).unwrap();
        assert_eq!(
            h.console.trusted_header.as_deref(),
            Some("x-forwarded-user")
        );
        assert!(h.console.check_credentials().is_ok());

        for (var, value, says) in [
            (
                "HOLDCLEAR_CONSOLE_OPERATOR_TOKENS",
                "ann:short-token",
                "shorter than 16",
            ),
            (
                "HOLDCLEAR_CONSOLE_VIEWER_TOKENS",
                "no-colon-here-0123456789",
                "not name:token",
            ),
            (
                "HOLDCLEAR_CONSOLE_OPERATOR_TOKENS",
                "a b:0123456789abcdef",
                "the name must",
            ),
            (
                "HOLDCLEAR_CONSOLE_SESSION_KEY",
                "too-short-key",
                "shorter than 32",
            ),
            (
                "HOLDCLEAR_CONSOLE_TRUSTED_HEADER",
                "bad header",
                "not a header name",
            ),
            ("HOLDCLEAR_CONSOLE_ADDR", "localhost", "not an address"),
            ("HOLDCLEAR_CONSOLE_SECURE_COOKIE", "maybe", "maybe"),
        ] {
            let e = with(&[(var, value)]).unwrap_err().to_string();
            assert!(e.contains(var) && e.contains(says), "{var}: {e}");
            if var != "HOLDCLEAR_CONSOLE_TRUSTED_HEADER"
                && var != "HOLDCLEAR_CONSOLE_ADDR"
                && var != "HOLDCLEAR_CONSOLE_SECURE_COOKIE"
            {
                let secret = value.split(':').next_back().unwrap();
                assert!(!e.contains(secret), "{var} shows its value: {e}");
            }
        }
    }

    #[test]
    fn bad_url_error_does_not_echo_the_password() {
        for (name, value) in [
            ("HOLDCLEAR_DATABASE_URL", "postgres://u:hunter2@[bad"),
            ("HOLDCLEAR_DATABASE_URL", "postgres:u:hunter2@db/hc"),
            ("HOLDCLEAR_AMQP_URL", "amqp:guest:hunter2@rabbit"),
            ("HOLDCLEAR_AMQP_URL", "amqps//guest:hunter2@rabbit"),
        ] {
            let err = with(&[(name, value)]).unwrap_err().to_string();
            assert!(err.contains(name), "{value}: {err}");
            assert!(!err.contains("hunter2"), "{value}: {err}");
        }
    }

    /// Checks how `url` is shown: none of `hidden` appears, all of `shown` do,
    /// in `redacted()`, `Display` and `Debug` alike.
    fn check_redacted(url: &str, hidden: &[&str], shown: &[&str]) {
        let secret = SecretUrl::parse("test", url).unwrap();
        for text in [secret.redacted(), secret.to_string(), format!("{secret:?}")] {
            for h in hidden {
                assert!(!text.contains(h), "{url}: {h:?} shows in {text}");
            }
            for s in shown {
                assert!(text.contains(s), "{url}: {s:?} missing from {text}");
            }
        }
        assert_eq!(secret.expose(), url, "expose() keeps the URL as given");
    }

    #[test]
    fn urls_are_shown_without_their_secrets() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            (
                "postgres://u:hunter2@db:5432/hc",
                &["hunter2"],
                &["postgres://u:redacted@db:5432/hc"],
            ),
            (
                "postgres://u@db/hc?password=hunter2",
                &["hunter2"],
                &["password=redacted"],
            ),
            (
                "postgres://u@db/hc?sslmode=verify-full&sslpassword=hunter2&sslrootcert=%2Fetc%2Fca.pem",
                &["hunter2"],
                &[
                    "sslmode=verify-full",
                    "sslpassword=redacted",
                    "sslrootcert=",
                ],
            ),
            (
                "postgres://u@db/hc?sslkey=/keys/hunter2.key&sslcert=/keys/client.pem",
                &["hunter2"],
                &["sslkey=redacted", "client.pem"],
            ),
            (
                "postgres://u@db/hc?PassWord=hunter2&Client_Secret=hunter3&x-auth-token=hunter4",
                &["hunter2", "hunter3", "hunter4"],
                &["PassWord=redacted", "Client_Secret=redacted"],
            ),
            (
                // A percent-encoded name is still a password.
                "postgres://u@db/hc?pass%77ord=hunter2",
                &["hunter2"],
                &["=redacted"],
            ),
            (
                // A percent-encoded value is hidden in both spellings.
                "postgres://u@db/hc?password=hun%74er2",
                &["hunter2", "hun%74er2"],
                &["password=redacted"],
            ),
            (
                "postgres://u@db/hc?password=hunter2&password=hunter3&application_name=hc",
                &["hunter2", "hunter3"],
                &["application_name=hc"],
            ),
            (
                "amqps://u:hunter2@rabbit:5671/%2f?heartbeat=30&api_key=hunter3#hunter4",
                &["hunter2", "hunter3", "hunter4"],
                &["amqps://u:redacted@rabbit:5671/%2f", "heartbeat=30"],
            ),
            (
                "postgres://u@db/hc?sslmode=verify-full&sslrootcert=/etc/ca.pem",
                &[],
                &["postgres://u@db/hc?sslmode=verify-full&sslrootcert=/etc/ca.pem"],
            ),
        ];
        for (url, hidden, shown) in cases {
            check_redacted(url, hidden, shown);
        }
    }

    #[test]
    fn secret_query_keys() {
        let cases = [
            ("password", true),
            ("sslpassword", true),
            ("passfile", true),
            ("sslkey", true),
            ("ssl-key", true),
            ("client_secret", true),
            ("access_token", true),
            ("Authorization", true),
            ("sslmode", false),
            ("sslrootcert", false),
            ("application_name", false),
            ("heartbeat", false),
            ("host", false),
        ];
        for (key, secret) in cases {
            assert_eq!(is_secret_key(key), secret, "{key}");
        }
    }

    /// A CA certificate in PEM, made for the test.
    fn ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn ca_files_per_dependency_win_over_the_shared_one() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared.pem");
        let amqp = dir.path().join("amqp.pem");
        std::fs::write(&shared, ca_pem()).unwrap();
        std::fs::write(&amqp, format!("{}{}", ca_pem(), ca_pem())).unwrap();

        let s = with(&[]).unwrap();
        assert!(s.amqp.tls_ca.is_none() && s.database_tls_ca.is_none());
        assert!(s.commerce.tls_ca.is_none());

        let s = with(&[
            ("HOLDCLEAR_TLS_CA_FILE", shared.to_str().unwrap()),
            ("HOLDCLEAR_AMQP_TLS_CA_FILE", amqp.to_str().unwrap()),
        ])
        .unwrap();
        let amqp_ca = s.amqp.tls_ca.as_ref().unwrap();
        assert_eq!(amqp_ca.path(), amqp);
        assert_eq!(amqp_ca.certificates(), 2);
        assert_eq!(s.database_tls_ca.as_ref().unwrap().path(), shared);
        assert_eq!(s.commerce.tls_ca.as_ref().unwrap().path(), shared);
        assert!(format!("{s:?}").contains("1 certificate(s)"));

        // The file's keys, with the environment over them.
        let file = dir.path().join("holdclear.toml");
        std::fs::write(
            &file,
            format!(
                "tls_ca_file = {:?}\ndatabase_tls_ca_file = {:?}\n",
                shared.to_str().unwrap(),
                amqp.to_str().unwrap()
            ),
        )
        .unwrap();
        let env: HashMap<String, String> = [(
            "HOLDCLEAR_COMMERCE_TLS_CA_FILE".to_owned(),
            amqp.display().to_string(),
        )]
        .into();
        let s = Settings::from_sources(Some(&file), &env).unwrap();
        assert_eq!(s.amqp.tls_ca.unwrap().path(), shared);
        assert_eq!(s.database_tls_ca.unwrap().path(), amqp);
        assert_eq!(s.commerce.tls_ca.unwrap().path(), amqp);
    }

    #[test]
    fn bad_ca_files_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p.display().to_string()
        };
        let missing = dir.path().join("missing.pem").display().to_string();
        let directory = dir.path().display().to_string();
        let text = write("notes.txt", b"just some text\n");
        let binary = write("der.bin", &[0x30, 0x82, 0xff, 0xfe, 0x00]);
        let key_only = write(
            "key.pem",
            rcgen::KeyPair::generate()
                .unwrap()
                .serialize_pem()
                .as_bytes(),
        );
        let junk = write(
            "junk.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        );
        let unterminated = write("cut.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n");
        let cases = [
            (missing.as_str(), "cannot read"),
            (directory.as_str(), "cannot read"),
            (text.as_str(), "no PEM certificate"),
            (binary.as_str(), "not a PEM file"),
            (key_only.as_str(), "no PEM certificate"),
            (junk.as_str(), "not a usable CA certificate"),
            (unterminated.as_str(), "not valid PEM"),
        ];
        for setting in [
            "HOLDCLEAR_TLS_CA_FILE",
            "HOLDCLEAR_AMQP_TLS_CA_FILE",
            "HOLDCLEAR_DATABASE_TLS_CA_FILE",
            "HOLDCLEAR_COMMERCE_TLS_CA_FILE",
        ] {
            for (path, why) in cases {
                let err = with(&[(setting, path)]).unwrap_err().to_string();
                assert!(err.contains(setting), "{setting}={path}: {err}");
                assert!(err.contains(why), "{setting}={path}: {err}");
            }
        }
    }

    #[test]
    fn commerce_urls_in_clear_text_only_on_loopback_or_when_allowed() {
        let base = "HOLDCLEAR_COMMERCE_BASE_URL";
        let token = "HOLDCLEAR_COMMERCE_TOKEN_URL";
        let allow = "HOLDCLEAR_COMMERCE_ALLOW_PLAINTEXT";
        // (settings, the setting refused or None)
        type Vars<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Vars, Option<&str>)] = &[
            (&[], None),
            (&[(base, "http://localhost:8089")], None),
            (&[(base, "http://127.0.0.2:8089")], None),
            (&[(base, "http://[::1]:8089")], None),
            (&[(base, "https://api.example.com")], None),
            (&[(base, "http://api.example.com")], Some(base)),
            (&[(base, "http://10.0.0.5:8089")], Some(base)),
            (&[(base, "http://localhost.example.com")], Some(base)),
            (&[(base, "http://sim:8089"), (allow, "true")], None),
            (&[(base, "http://sim:8089"), (allow, "false")], Some(base)),
            (&[(base, "http://sim:8089"), (allow, "yes")], Some(allow)),
            (
                &[
                    (base, "https://api.example.com"),
                    (token, "http://id.example.com/token"),
                ],
                Some(token),
            ),
            (
                &[
                    (base, "http://127.0.0.1:8089"),
                    (token, "http://id.example.com/token"),
                ],
                Some(token),
            ),
            (
                &[
                    (base, "https://api.example.com"),
                    (token, "http://id.example.com/token"),
                    (allow, "true"),
                ],
                None,
            ),
            (&[(base, "https://u:hunter2@api.example.com")], Some(base)),
            (
                &[
                    (base, "https://api.example.com"),
                    (token, "https://id.example.com/token?client_secret=hunter2"),
                ],
                Some(token),
            ),
        ];
        for (vars, refused) in cases {
            match (with(vars), refused) {
                (Ok(_), None) => {}
                (Err(e), Some(name)) => {
                    let e = e.to_string();
                    assert!(e.contains(name), "{vars:?}: {e}");
                    assert!(!e.contains("hunter2"), "{vars:?}: {e}");
                }
                (Ok(_), Some(name)) => panic!("{vars:?}: {name} accepted"),
                (Err(e), None) => panic!("{vars:?}: refused: {e}"),
            }
        }
    }

    #[test]
    fn file_settings_and_escalation_levels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holdclear.toml");
        std::fs::write(
            &path,
            r#"
poll_interval = "1s"
escalate_after = "1h"
escalation_levels = [{ after = "4h", level = "critical" }]
[topology]
held_queue = "custom.held"
"#,
        )
        .unwrap();
        let env: HashMap<String, String> =
            [("HOLDCLEAR_POLL_INTERVAL".to_owned(), "2s".to_owned())].into();
        let s = Settings::from_sources(Some(&path), &env).unwrap();
        assert_eq!(
            s.engine.poll_interval,
            Duration::from_secs(2),
            "env wins over the file"
        );
        assert_eq!(s.engine.escalation.len(), 2);
        assert_eq!(s.amqp.topology.held_queue, "custom.held");
        assert_eq!(s.amqp.topology.events_exchange, "holdclear.events");

        std::fs::write(&path, "pol_interval = \"1s\"\n").unwrap();
        let err = Settings::from_sources(Some(&path), &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pol_interval"), "{err}");
    }
}
