//! `holdclear demo`, the README's first command, run as a newcomer runs it.

use crate::support::{amqp_url, bin};

#[tokio::test]
async fn the_demo_ends_with_every_order_accounted_for() {
    let child = bin()
        .arg("demo")
        .env("HOLDCLEAR_AMQP_URL", amqp_url())
        .env(
            "HOLDCLEAR_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/holdclear",
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let row = |order: &str| {
        stdout
            .lines()
            .find(|l| l.contains(order))
            .unwrap_or_else(|| panic!("no row for {order}:\n{stdout}"))
            .to_owned()
    };
    let acme = row("104233871");
    assert!(
        acme.contains("acme-direct")
            && acme.contains("acme.com (CUSTOMER, DEFAULT)")
            && acme.contains("released"),
        "{acme}"
    );
    let pending = row("104233872");
    assert!(
        pending.contains("globex-holding.com (HOLDING, Holding)") && pending.contains("released"),
        "{pending}"
    );
    assert!(row("104233873").contains("HOLD_PERSISTS (warning)"));
    assert!(row("104233876").contains("ASSIGNMENT_LOCKED"));
    assert!(row("104233880").contains("NO_RULE_MATCHED"));
    assert!(row("104233881").contains("SMART_ACCOUNT_NOT_FOUND"));
    assert!(row("104233882").contains("SMART_ACCOUNT_NOT_ACTIVE"));
    // Two ACTIVE accounts named "Umbrella Corporation": never the first one.
    let umbrella = row("104233883");
    assert!(
        umbrella.contains("umbrella-by-name")
            && umbrella.contains("AMBIGUOUS_MATCH (critical)")
            && !umbrella.contains("umbrella.com"),
        "{umbrella}"
    );
    // It ends with the dead-letter groups and a replay operation's report:
    // the malformed message, replayed as it is, failed again.
    assert!(
        stdout.contains("Dead letters (holdclear dlq groups)") && stdout.contains("MALFORMED_JSON"),
        "{stdout}"
    );
    assert!(
        stdout.contains("failed again")
            && stdout.contains("sent 1; became cases 0; failed again 1"),
        "{stdout}"
    );
    // It ends with `rules stats` of its run: each rule's decisions, the
    // rules that never matched, the orders no rule matched.
    let stats = stdout
        .split("Rules (holdclear rules stats --since 24h)")
        .nth(1)
        .unwrap_or_else(|| panic!("no rules stats at the end:\n{stdout}"));
    assert!(
        stats.contains("Decided per rule:")
            && stats.contains("acme-direct")
            && stats.contains("Never matched in the window")
            && stats.contains("No rule matched (NO_RULE_MATCHED): 1 orders"),
        "{stats}"
    );
    // It cleaned up after itself: its database is gone.
    let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE $1")
        .bind(format!("holdclear_demo_{pid}_%"))
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "the demo left its database behind");
}
