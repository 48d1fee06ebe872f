//! The binary as an operator runs it: exit codes and messages.

use crate::support::bin;

#[test]
fn a_bad_setting_exits_64_naming_it() {
    let out = bin()
        .arg("migrate")
        .env("HOLDCLEAR_POLL_INTERVAL", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HOLDCLEAR_POLL_INTERVAL"), "{stderr}");
}

#[test]
fn a_secret_in_a_bad_setting_is_not_echoed() {
    let out = bin()
        .arg("migrate")
        .env(
            "HOLDCLEAR_DATABASE_URL",
            "postgres://u:topsecret-pw@[broken",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("HOLDCLEAR_DATABASE_URL"), "{all}");
    assert!(!all.contains("topsecret-pw"), "{all}");
}

#[tokio::test]
async fn migrate_creates_the_database_and_is_idempotent() {
    let name = crate::support::unique("hc_migrate").replace('-', "_");
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    for _ in 0..2 {
        let out = bin()
            .arg("migrate")
            .env("HOLDCLEAR_DATABASE_URL", &url)
            .env("HOLDCLEAR_LOG_FORMAT", "json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('inbox','cases','case_history','outbox')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 4);
    pool.close().await;
    let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{name}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
}

/// Runs `holdclear ARGS` with `env` (JSON logs, no `RUST_LOG`): the exit
/// code and the non-empty lines of stderr.
fn failing(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, Vec<String>) {
    let mut cmd = bin();
    cmd.args(args)
        .env("HOLDCLEAR_LOG_FORMAT", "json")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let lines = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    (out.status.code(), lines)
}

/// One line, no log lines of libraries, no cause said twice.
fn one_clear_line(lines: &[String]) -> &str {
    assert_eq!(lines.len(), 1, "one line: {lines:#?}");
    let line = lines[0].as_str();
    assert!(line.starts_with("error: "), "{line}");
    assert!(!line.contains('{'), "no JSON: {line}");
    line
}

#[test]
fn an_unreachable_database_is_one_line_saying_what_to_do() {
    for args in [&["cases", "list"][..], &["migrate"]] {
        let (code, lines) = failing(
            args,
            &[(
                "HOLDCLEAR_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5433/holdclear",
            )],
        );
        assert_eq!(code, Some(1), "{args:?}: {lines:?}");
        let line = one_clear_line(&lines);
        assert!(
            line.contains("cannot connect to PostgreSQL at 127.0.0.1:5433 (connection refused)")
                && line.contains("is it running?")
                && line.contains("HOLDCLEAR_DATABASE_URL"),
            "{args:?}: {line}"
        );
    }
}

/// A broker that refuses the login, or is not there: one line too,
/// without the client library's own log lines (lapin logs a refused login
/// at ERROR three times; the wording of the line is the broker module's).
#[test]
fn a_broker_failure_is_one_line_without_library_logs() {
    for url in [
        "amqp://guest:wrong-pw-not-shown@127.0.0.1:5672/%2f",
        "amqp://guest:guest@127.0.0.1:5673/%2f",
    ] {
        let (code, lines) = failing(&["dlq", "queue"], &[("HOLDCLEAR_AMQP_URL", url)]);
        assert_eq!(code, Some(1), "{lines:?}");
        let line = one_clear_line(&lines);
        assert!(!line.contains("wrong-pw-not-shown"), "{line}");
    }
}

#[test]
fn a_database_user_postgresql_refuses_is_named() {
    let (code, lines) = failing(
        &["cases", "list"],
        &[(
            "HOLDCLEAR_DATABASE_URL",
            "postgres://nobody_hc:pw-not-shown@127.0.0.1:5432/holdclear",
        )],
    );
    assert_eq!(code, Some(1), "{lines:?}");
    let line = one_clear_line(&lines);
    assert!(
        line.contains("PostgreSQL at 127.0.0.1:5432 refused user \"nobody_hc\"")
            && line.contains("HOLDCLEAR_DATABASE_URL"),
        "{line}"
    );
    assert!(!line.contains("pw-not-shown"), "{line}");
}

#[tokio::test]
async fn a_missing_database_is_named_and_not_created_by_cases() {
    let name = crate::support::unique("hc_missing").replace('-', "_");
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let (code, lines) = failing(&["cases", "list"], &[("HOLDCLEAR_DATABASE_URL", &url)]);
    assert_eq!(code, Some(1), "{lines:?}");
    let line = one_clear_line(&lines);
    assert!(
        line.contains(&format!("the database \"{name}\" does not exist"))
            && line.contains("holdclear migrate")
            && line.contains("HOLDCLEAR_DATABASE_URL"),
        "{line}"
    );
    let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&admin)
            .await
            .unwrap();
    if exists {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE \"{name}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
    assert!(!exists, "`cases list` created the database {name}");
}

/// The commerce API refuses the client credentials: `holdclear run` stops
/// at once with one line naming the settings to check (exit 64), instead of
/// running and retrying every case until its budget is spent.
#[tokio::test]
async fn refused_commerce_credentials_stop_the_worker_with_one_line() {
    let simulator = crate::support::sim::start_demo().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = crate::support::unique("badcreds");
    let mut worker = crate::support::worker::Process::spawn(
        "postgres://postgres@127.0.0.1:1/holdclear_nowhere",
        &prefix,
        dir.path(),
        &[
            ("HOLDCLEAR_COMMERCE_BASE_URL", &simulator.base_url()),
            ("HOLDCLEAR_COMMERCE_TOKEN_URL", &simulator.token_url()),
            ("HOLDCLEAR_COMMERCE_CLIENT_SECRET", "wrong-secret-not-shown"),
        ],
    );
    let status = worker.wait_exit(std::time::Duration::from_secs(30)).await;
    let logs = worker.logs();
    assert_eq!(status.code(), Some(64), "{logs}");
    let last = logs.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains("refused")
            && last.contains("holdclear-demo")
            && last.contains("HOLDCLEAR_COMMERCE_CLIENT_ID")
            && last.contains("HOLDCLEAR_COMMERCE_CLIENT_SECRET"),
        "{logs}"
    );
    assert!(!logs.contains("wrong-secret-not-shown"), "{logs}");
    let errors = logs.lines().filter(|l| l.starts_with("error: ")).count();
    assert_eq!(errors, 1, "{logs}");
}
