//! What every integration test needs: unique names, settings that point at
//! the test's own database and topology, the binary, and waiting with a
//! deadline instead of sleeping.
#![allow(dead_code)]

pub mod events;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use holdclear::config::{Settings, Topology};
use sqlx::PgPool;

pub mod broker;
pub mod sim;
pub mod store;
pub mod worker;

/// The `holdclear` binary built for these tests.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_holdclear"))
}

/// The repository root (for sample files in `deploy/`).
pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A name no other test (or run) uses: `prefix-<pid>-<n>-<nanos>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{n}-{nanos}", std::process::id())
}

/// Whether a test that disrupts a shared service (stops RabbitMQ) or loads
/// the whole machine (the bench) may run: under the `chaos` nextest profile
/// (nextest sets `NEXTEST_PROFILE`), or when `HOLDCLEAR_DISRUPTIVE_TESTS=1`.
/// Otherwise, as under a plain `cargo test`, it says so and is skipped.
pub fn disruptive_tests_allowed(test: &str) -> bool {
    let allowed = std::env::var("NEXTEST_PROFILE").is_ok_and(|p| p == "chaos")
        || std::env::var("HOLDCLEAR_DISRUPTIVE_TESTS").is_ok_and(|v| v == "1");
    if !allowed {
        eprintln!(
            "{test}: skipped: it disrupts shared services; run `cargo nextest run --profile chaos` \
             (or set HOLDCLEAR_DISRUPTIVE_TESTS=1)"
        );
    }
    allowed
}

/// The AMQP URL of the local broker.
pub fn amqp_url() -> String {
    std::env::var("HOLDCLEAR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The URL of the database behind `pool` (the one `#[sqlx::test]` made).
pub async fn database_url(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&name);
    url.to_string()
}

/// Environment for a worker of one test: its own database, the local
/// broker, a free HTTP port, JSON logs. (The topology comes from [`config_file`].)
pub fn env_for(database_url: &str) -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert("HOLDCLEAR_DATABASE_URL".into(), database_url.to_owned());
    env.insert("HOLDCLEAR_AMQP_URL".into(), amqp_url());
    env.insert("HOLDCLEAR_HTTP_ADDR".into(), "127.0.0.1:0".into());
    env.insert("HOLDCLEAR_LOG_FORMAT".into(), "json".into());
    // Tests that look at the dead-letter queue itself need its messages to
    // stay there; the dead-letter tests turn the ingester on.
    env.insert("HOLDCLEAR_DLQ_INGEST".into(), "false".into());
    // A port nothing listens on (discard): a test that needs the commerce
    // API starts a simulator and says so; none talks to a `holdclear sim`
    // a developer happens to run on the default port.
    env.insert(
        "HOLDCLEAR_COMMERCE_BASE_URL".into(),
        "http://127.0.0.1:9".into(),
    );
    env
}

/// A settings file for a worker *process* of one test: the topology names
/// prefixed with `prefix.` (pass it with `--config`; the environment from
/// [`env_for`] carries the rest).
pub fn config_file(dir: &std::path::Path, prefix: &str) -> PathBuf {
    let t = topology(prefix);
    let path = dir.join(format!("{prefix}.toml"));
    let text = format!(
        "[topology]\norders_exchange = {:?}\nheld_routing_key = {:?}\nheld_queue = {:?}\n\
         dead_letter_exchange = {:?}\ndead_letter_queue = {:?}\nevents_exchange = {:?}\n",
        t.orders_exchange,
        t.held_routing_key,
        t.held_queue,
        t.dead_letter_exchange,
        t.dead_letter_queue,
        t.events_exchange
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Settings for an in-process worker of one test (see [`env_for`]).
pub fn settings(database_url: &str, prefix: &str, extra: &[(&str, &str)]) -> Settings {
    let mut env = env_for(database_url);
    for (k, v) in extra {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    let mut s = Settings::from_sources(None, &env).expect("test settings are valid");
    s.amqp.topology = topology(prefix);
    s
}

/// The topology of one test: the default names prefixed with `prefix.`.
pub fn topology(prefix: &str) -> Topology {
    Topology::prefixed(&format!("{prefix}."))
}

/// Polls `check` until it returns `Some`, or panics naming `what` at the deadline.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
