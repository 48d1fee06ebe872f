//! Secrets: with a distinctive client secret configured (and token churn,
//! refusals, a wrong secret, secrets in URLs), nothing the operator can see
//! contains it: the worker's logs, `/metrics`, `/readyz`, the CLI's output
//! and errors, the events, the dead letters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use holdclear::sim::{EndpointFaults, Forced, Scenario, SimEndpoint};
use serde_json::{Value, json};
use sqlx::PgPool;

use super::{Stage, WorkerProcess, check, messages, orders};
use crate::support::broker::message;
use crate::support::worker::http_get;
use crate::support::{bin, repo_path, wait_for};

const SECRET: &str = "hc-Qz7vT9-chaos-secret-do-not-print";
const WRONG: &str = "hc-Wr0ng-chaos-secret-also-hidden";

/// Runs the CLI with `env`; stdout and stderr together.
fn cli(env: &HashMap<String, String>, args: &[&str]) -> (Output, String) {
    let mut cmd = bin();
    cmd.args(args).env_clear().envs(env);
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    let out = cmd.output().expect("the CLI runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// The address the worker's HTTP server bound, from its JSON logs (one
/// flat object per line).
fn http_addr(logs: &str) -> Option<SocketAddr> {
    logs.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "HTTP server listening.")
        .find_map(|v| v["addr"].as_str()?.parse().ok())
}

#[sqlx::test]
async fn secrets_never_shown(pool: PgPool) {
    let mut scenario = Scenario::demo().unwrap();
    scenario.client_secret = SECRET.to_owned();
    scenario.token_ttl = Duration::from_secs(2);
    scenario.faults.token = EndpointFaults {
        error_rate: 0.2,
        ..EndpointFaults::default()
    };
    scenario.faults.search.script = vec![Forced::Unauthorized, Forced::Unauthorized];
    scenario.faults.order.error_rate = 0.2;
    let mut stage = Stage::new("secrets", pool, scenario).await;
    stage
        .env
        .insert("HOLDCLEAR_COMMERCE_CLIENT_SECRET".into(), SECRET.into());
    stage
        .env
        .insert("RUST_LOG".into(), "info,holdclear=debug".into());
    let orders = orders("secrets", 87_000_000, 40);
    let mut worker = stage.worker().await;
    stage.rabbit.publish(&messages(&orders)).await;
    let mut bad = message(&json!({"id": "secret-bad-1"}));
    bad.body = b"{\"specversion\": \"1.0\", ".to_vec();
    stage.rabbit.publish(&[bad]).await;
    let report = check(
        &stage,
        "secrets_never_shown",
        &orders,
        &[("secret-bad-1".to_owned(), "MALFORMED_JSON")],
        Instant::now(),
        Duration::from_secs(90),
    )
    .await;
    // Leave the dead letter for `dlq list`: publish it again under a new id.
    let mut bad = message(&json!({"id": "secret-bad-2"}));
    bad.body = b"not json".to_vec();
    stage.rabbit.publish(&[bad]).await;
    let dlq = stage.rabbit.topology.dead_letter_queue.clone();
    wait_for(Duration::from_secs(30), "the dead letter", || async {
        (stage.rabbit.depth(&dlq).await == 1).then_some(())
    })
    .await;
    // A second worker that keeps dead letters in PostgreSQL (the stage's
    // workers leave the queue to the checker) stores it for `dlq list`.
    let mut ingesting = stage.env.clone();
    ingesting.insert("HOLDCLEAR_DLQ_INGEST".into(), "true".into());
    let mut ingester = super::WorkerProcess::start(ingesting, stage.dir.path());
    wait_for(
        Duration::from_secs(30),
        "the dead letter stored",
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
                .fetch_one(&stage.pool)
                .await
                .ok()?;
            (n == 1).then_some(())
        },
    )
    .await;

    let mut shown: Vec<(String, String)> = Vec::new();
    let addr = http_addr(&worker.logs()).expect("the worker logs its HTTP address");
    for path in ["/metrics", "/readyz", "/healthz"] {
        let (status, body) = http_get(addr, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        shown.push((path.to_owned(), body));
    }
    assert!(shown[0].1.contains("holdclear_"), "{}", shown[0].1);

    let env = &stage.env;
    let released = &orders[0].number;
    let escalated = &orders[4].number;
    let rules = repo_path("deploy/config/rules.toml").display().to_string();
    for args in [
        vec!["cases", "list"],
        vec!["cases", "list", "--json"],
        vec!["cases", "show", released],
        vec!["cases", "show", escalated],
        vec!["dlq", "list"],
        vec!["dlq", "queue"],
        vec!["rules", "check", &rules],
    ] {
        let (out, text) = cli(env, &args);
        assert!(out.status.success(), "{args:?}: {text}");
        shown.push((format!("holdclear {}", args.join(" ")), text));
    }
    assert!(shown[3].1.contains(released.as_str()), "{}", shown[3].1);
    assert!(shown[7].1.contains("MALFORMED_JSON"), "{}", shown[7].1);
    // Bad settings, and secrets inside URLs that cannot be used.
    let with = |k: &str, v: &str| {
        let mut e = env.clone();
        e.insert(k.to_owned(), v.to_owned());
        e
    };
    let bad_settings = [
        (
            with("HOLDCLEAR_COMMERCE_RATE_LIMIT", "fast"),
            vec!["run"],
            64,
        ),
        (
            with(
                "HOLDCLEAR_COMMERCE_BASE_URL",
                &format!("not a url {SECRET}"),
            ),
            vec!["run"],
            64,
        ),
        (
            with(
                "HOLDCLEAR_DATABASE_URL",
                &format!("postgres://postgres:{SECRET}@127.0.0.1:1/nowhere"),
            ),
            vec!["cases", "list"],
            1,
        ),
        (
            with(
                "HOLDCLEAR_AMQP_URL",
                &format!("amqp://guest:{SECRET}@127.0.0.1:5672/%2f"),
            ),
            vec!["dlq", "queue"],
            1,
        ),
    ];
    for (e, args, code) in bad_settings {
        let (out, text) = cli(&e, &args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {text}");
        shown.push((format!("holdclear {} (bad setting)", args.join(" ")), text));
    }
    for e in stage.events.snapshot() {
        shown.push((format!("event {}", e.envelope_id), e.body));
    }
    for m in stage.rabbit.drain(&dlq).await {
        shown.push((
            "dead letter".into(),
            format!("{:?} {}", m.properties, String::from_utf8_lossy(&m.body)),
        ));
    }

    assert_eq!(
        worker.terminate(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        worker.tail()
    );
    // The ingester is a whole worker with the right secret: stopped, so the
    // orders below reach the worker with the wrong one.
    assert_eq!(
        ingester.terminate(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        ingester.tail()
    );
    shown.push(("ingesting worker logs (stderr)".into(), ingester.logs()));
    // A worker with the wrong secret: refused tokens, logged as such.
    let mut wrong = WorkerProcess::start(
        with("HOLDCLEAR_COMMERCE_CLIENT_SECRET", WRONG),
        stage.dir.path(),
    );
    let more = orders_after(&orders);
    stage.rabbit.publish(&messages(&more)).await;
    let refused = stage.sim.stats().responses(SimEndpoint::Token, 401);
    wait_for(
        Duration::from_secs(30),
        "a refused token request",
        || async { (stage.sim.stats().responses(SimEndpoint::Token, 401) > refused).then_some(()) },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "the refusal in the logs",
        || async {
            let logs = wrong.logs();
            logs.contains("The token endpoint refused the client credentials")
                .then_some(())
        },
    )
    .await;
    let _ = wrong.terminate(Duration::from_secs(15)).await;
    let logs = worker.logs();
    assert!(logs.contains("Worker stopped."), "{}", worker.tail());
    shown.push(("worker logs (stderr)".into(), logs));
    shown.push(("wrong-secret worker logs (stderr)".into(), wrong.logs()));

    let leaks: Vec<&str> = shown
        .iter()
        .filter(|(_, text)| text.contains(SECRET) || text.contains(WRONG))
        .map(|(what, _)| what.as_str())
        .collect();
    assert!(leaks.is_empty(), "the client secret shows in: {leaks:?}");
    report.assert_clean();
}

/// A few more orders for the worker with the wrong secret.
fn orders_after(orders: &[super::Order]) -> Vec<super::Order> {
    super::orders("secrets-wrong", 87_100_000 + orders.len() as u64, 3)
}

/// A database URL with a password in its user info and in its query
/// (`password=`, `sslpassword=`, an `sslkey` path), an AMQP URL with a
/// password and a token, both unreachable, every log level on: no command
/// prints any of them, neither in its own lines (the URLs are shown
/// redacted) nor in what sqlx or lapin say about them.
#[tokio::test]
async fn database_url_secrets_never_shown() {
    const USER_PW: &str = "hc-Kq3-userinfo-password-do-not-print";
    const QUERY_PW: &str = "hc-Kq3-query-password-do-not-print";
    const SSL_PW: &str = "hc-Kq3-sslpassword-do-not-print";
    const KEY: &str = "hc-Kq3-key-name-do-not-print";
    const AMQP_PW: &str = "hc-Kq3-amqp-password-do-not-print";
    const AMQP_TOKEN: &str = "hc-Kq3-amqp-token-do-not-print";
    let secrets = [USER_PW, QUERY_PW, SSL_PW, KEY, AMQP_PW, AMQP_TOKEN];
    let url = format!(
        "postgres://holdclear:{USER_PW}@127.0.0.1:1/holdclear?sslmode=verify-full\
         &password={QUERY_PW}&sslpassword={SSL_PW}&sslkey=/nonexistent/{KEY}.key"
    );
    // Unreachable too (`dlq list`, the bench's clean-up), with secrets of its own.
    let amqp =
        format!("amqp://guest:{AMQP_PW}@127.0.0.1:1/%2f?heartbeat=30&auth_token={AMQP_TOKEN}");
    let dir = tempfile::tempdir().unwrap();
    let env: HashMap<String, String> = [
        ("HOLDCLEAR_DATABASE_URL", url.as_str()),
        ("HOLDCLEAR_AMQP_URL", amqp.as_str()),
        ("HOLDCLEAR_HTTP_ADDR", "127.0.0.1:0"),
        ("HOLDCLEAR_LOG_FORMAT", "json"),
        ("RUST_LOG", "trace"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();

    let mut shown: Vec<(String, String)> = Vec::new();
    // Commands that give up: exit 1.
    for args in [
        vec!["migrate"],
        vec!["cases", "list"],
        vec!["bench", "--sections", "1", "--orders", "10"],
        vec!["dlq", "list"],
    ] {
        let (out, text) = cli(&env, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {text}");
        shown.push((format!("holdclear {}", args.join(" ")), text));
    }
    // Commands that wait for the database: stopped once they said so.
    for args in [vec!["run"], vec!["demo"]] {
        let log = dir.path().join(format!("{}.log", args.join("-")));
        let mut child = bin()
            .args(&args)
            .env_clear()
            .envs(&env)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the CLI runs");
        wait_for(
            Duration::from_secs(30),
            "the database reported unreachable",
            || async {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text.contains("Cannot reach the database").then_some(())
            },
        )
        .await;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        shown.push((
            format!("holdclear {}", args.join(" ")),
            std::fs::read_to_string(&log).unwrap(),
        ));
    }

    // The URL is shown, redacted, where a command names its database.
    let run = &shown[4].1;
    assert!(
        run.contains("password=redacted") && run.contains("sslpassword=redacted"),
        "{run}"
    );
    assert!(run.contains("holdclear:redacted@127.0.0.1:1"), "{run}");
    for (what, text) in &shown {
        for secret in secrets {
            assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
        }
    }
}
