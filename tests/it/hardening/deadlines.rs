//! Deadlines on waits for PostgreSQL: a statement stuck behind a lock
//! gives up after `HOLDCLEAR_DATABASE_LOCK_TIMEOUT` and is tried again;
//! nothing is lost meanwhile.

use std::time::{Duration, Instant};

use crate::support::broker::{Rabbit, held_event};
use crate::support::events::EventQueue;
use crate::support::worker::{http_get, start};
use crate::support::{database_url, settings, sim, unique, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);

/// The worker's sessions waiting on a lock: how many, and the longest
/// wait so far in seconds.
async fn waiting_on_locks(pool: &sqlx::PgPool) -> (i64, f64) {
    sqlx::query_as(
        "SELECT count(*), coalesce(max(extract(epoch FROM clock_timestamp() - query_start)), 0)::float8 \
         FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'holdclear' \
           AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Another session holds `cases` in ACCESS EXCLUSIVE mode for 4 s while 20
/// held orders arrive: intake's writes and the engine's claims wait on the
/// lock, each for at most the lock timeout (300 ms), and are tried again;
/// once the lock is gone every order is released, once.
#[sqlx::test]
async fn a_locked_table_times_statements_out_and_they_succeed_after(pool: sqlx::PgPool) {
    let prefix = unique("locked");
    let db = database_url(&pool).await;
    let simulator = sim::start_demo().await;
    let mut s = settings(
        &db,
        &prefix,
        &[
            ("HOLDCLEAR_POLL_INTERVAL", "50ms"),
            ("HOLDCLEAR_RETRY_INITIAL", "100ms"),
            ("HOLDCLEAR_ENGINE_LEASE", "3s"),
            ("HOLDCLEAR_DATABASE_LOCK_TIMEOUT", "300ms"),
            ("HOLDCLEAR_DATABASE_STATEMENT_TIMEOUT", "2s"),
        ],
    );
    s.commerce = sim::settings(&simulator);
    let rabbit = Rabbit::new(&prefix).await;
    let mut events = EventQueue::bind(&rabbit.topology).await;
    let worker = start(s).await;
    let addr = worker.http_addr;
    wait_for(DEADLINE, "/readyz to answer 200", || async {
        (http_get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;

    let mut locker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE cases IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let orders: Vec<String> = (0..20).map(|i| format!("{}", 63_000_000 + i)).collect();
    let held: Vec<_> = orders
        .iter()
        .map(|o| held_event(&unique("locked-ev"), o))
        .collect();
    rabbit.publish_events(&held).await;
    let locked = Instant::now();
    let (mut waited, mut longest) = (0, 0.0_f64);
    while locked.elapsed() < Duration::from_secs(4) {
        let (n, wait) = waiting_on_locks(&pool).await;
        waited = waited.max(n);
        longest = longest.max(wait);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    locker.rollback().await.unwrap();
    assert!(waited > 0, "the worker's statements waited on the lock");
    assert!(
        longest < 1.5,
        "a statement of the worker waited {longest:.1} s on the lock (lock timeout 300 ms)"
    );

    let seen = events
        .until(DEADLINE, "every order to be released", |seen| {
            orders.iter().all(|o| {
                seen.iter()
                    .any(|e| e.routing_key == "order.hold_released" && e.order() == o)
            })
        })
        .await
        .to_vec();
    for o in &orders {
        let released = seen
            .iter()
            .filter(|e| e.routing_key == "order.hold_released" && e.order() == o)
            .count();
        assert_eq!(released, 1, "order {o}");
    }
    let (cases, open): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state NOT IN ('released', 'escalated')) FROM cases",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((cases, open), (20, 0));
    worker.shutdown().await.unwrap();
    events.close().await;
    drop(rabbit);
}
