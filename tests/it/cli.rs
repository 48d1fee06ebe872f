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
