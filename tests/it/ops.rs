//! What operators scrape and probe: `/metrics` after real work, `/readyz`
//! following the database.

use std::time::Duration;

use crate::support::broker::{Rabbit, held_event};
use crate::support::events::EventQueue;
use crate::support::worker::{http_get, start};
use crate::support::{database_url, settings, sim, unique, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

#[sqlx::test]
async fn metrics_describe_a_real_run_and_readiness_follows_the_database(pool: sqlx::PgPool) {
    let prefix = unique("ops");
    let db = database_url(&pool).await;
    let simulator = sim::start_demo().await;
    let mut s = settings(&db, &prefix, &[("HOLDCLEAR_POLL_INTERVAL", "50ms")]);
    s.commerce = sim::settings(&simulator);
    let rabbit = Rabbit::new(&prefix).await;
    let mut events = EventQueue::bind(&rabbit.topology).await;
    let worker = start(s).await;
    let addr = worker.http_addr;

    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    wait_for(DEADLINE, "/readyz to answer 200", || async {
        (http_get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;

    rabbit
        .publish_events(&[held_event(&unique("e"), "990001")])
        .await;
    rabbit
        .publish(&[holdclear::broker::OutgoingMessage {
            routing_key: "order.held".into(),
            message_id: "bad".into(),
            content_type: "application/json".into(),
            body: b"not json".to_vec(),
            timestamp: None,
            headers: vec![],
        }])
        .await;
    events
        .until(DEADLINE, "the order to be released", |seen| {
            seen.iter().any(|e| e.routing_key == "order.hold_released")
        })
        .await;

    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "holdclear_events_consumed_total",
        "holdclear_dead_letters_total{code=\"MALFORMED_JSON\"}",
        "holdclear_commerce_calls_total",
        "holdclear_commerce_call_seconds_bucket",
        "holdclear_cases_stepped_total",
        "holdclear_engine_commit_batch_size_bucket",
        "holdclear_events_published_total",
        "holdclear_cases{state=\"released\"} 1",
        "holdclear_outbox_backlog",
        "holdclear_outbox_oldest_unsent_seconds",
        "holdclear_oldest_open_hold_seconds",
        "holdclear_ready 1",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(
        !text.contains("holdclear-demo-secret"),
        "a secret in /metrics"
    );

    // The database goes away: not ready, and /readyz says why.
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let set = |allow: bool| {
        sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS {allow}"
        ))
    };
    sqlx::query(set(false)).execute(&admin).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&name)
        .execute(&admin)
        .await
        .unwrap();
    let body = wait_for(DEADLINE, "/readyz to answer 503", || async {
        let (status, body) = http_get(addr, "/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("database"), "{body}");
    sqlx::query(set(true)).execute(&admin).await.unwrap();
    wait_for(DEADLINE, "/readyz to answer 200 again", || async {
        (http_get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;

    worker.shutdown().await.unwrap();
    events.close().await;
    drop(rabbit);
}

/// A busy pool is not a database that is down: with two connections, both
/// held by statements waiting behind another session's lock on `cases`
/// and `case_schedule`,
/// the probe cannot get a connection for as long as the lock lasts, and
/// `/readyz` keeps answering 200 (it flapped to 503 before).
#[sqlx::test]
async fn readiness_holds_while_the_pool_is_busy(pool: sqlx::PgPool) {
    let prefix = unique("busy");
    let db = database_url(&pool).await;
    let simulator = sim::start_demo().await;
    let mut s = settings(
        &db,
        &prefix,
        &[
            ("HOLDCLEAR_POLL_INTERVAL", "50ms"),
            ("HOLDCLEAR_DATABASE_MAX_CONNECTIONS", "2"),
            ("HOLDCLEAR_DATABASE_ACQUIRE_TIMEOUT", "500ms"),
            ("HOLDCLEAR_DATABASE_LOCK_TIMEOUT", "30s"),
            ("HOLDCLEAR_DATABASE_STATEMENT_TIMEOUT", "30s"),
        ],
    );
    s.commerce = sim::settings(&simulator);
    let rabbit = Rabbit::new(&prefix).await;
    let mut events = EventQueue::bind(&rabbit.topology).await;
    let worker = start(s).await;
    let addr = worker.http_addr;
    let body = wait_for(DEADLINE, "/readyz to answer 200", || async {
        let (status, body) = http_get(addr, "/readyz").await;
        (status == 200).then_some(body)
    })
    .await;
    assert!(
        body.contains(&worker.identity.to_string()),
        "/readyz names the worker: {body}"
    );

    let mut locker = pool.begin().await.unwrap();
    // Intake waits on `cases`, the engine's claim on `case_schedule`.
    sqlx::query("LOCK TABLE cases, case_schedule IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    rabbit
        .publish_events(&[held_event(&unique("busy-ev"), "990101")])
        .await;
    wait_for(DEADLINE, "both connections to wait on the lock", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'holdclear' AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (n >= 2).then_some(())
    })
    .await;
    let busy = std::time::Instant::now();
    let mut answers = Vec::new();
    while busy.elapsed() < Duration::from_secs(4) {
        let (status, body) = http_get(addr, "/readyz").await;
        if status != 200 {
            answers.push(body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    locker.rollback().await.unwrap();
    assert!(answers.is_empty(), "/readyz flapped: {answers:?}");

    events
        .until(DEADLINE, "the order to be released", |seen| {
            seen.iter().any(|e| e.routing_key == "order.hold_released")
        })
        .await;
    worker.shutdown().await.unwrap();
    events.close().await;
    drop(rabbit);
}
