//! Built-in retention (#19): each table pruned by its own rule and nothing
//! else, one worker at a time, `holdclear prune` and its dry run, the
//! settings refused at start, and `holdclear run` pruning on its own.

use std::time::Duration;

use holdclear::config::PruneSettings;
use holdclear::domain::DeadLetterMessage;
use holdclear::prune::{Pass, Pruner};
use holdclear::store::{PruneTable, Store};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::worker::{http_get, start};
use crate::support::{bin, database_url, settings, unique, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

/// The defaults, in slices of `slice` with a short pause.
fn quick(slice: u32, pause: Duration) -> PruneSettings {
    PruneSettings {
        slice,
        pause,
        ..PruneSettings::default()
    }
}

/// A case of its own order in `state`, opened three years ago, closed
/// `closed` days ago (open: `None`), last changed `changed` days ago;
/// with two history lines.
async fn case(
    pool: &PgPool,
    state: &str,
    closed: Option<i32>,
    changed: i32,
    merged_into: Option<Uuid>,
) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO cases (id, order_key, sales_order_number, state, event_id, event, \
             hold_reason, held_at, created_at, closed_at, updated_at, merged_into) \
         VALUES ($1, $2, $2, $3, $4, '{}', 'NO_SMART_ACCOUNT', now() - interval '3 years', \
             now() - interval '3 years', now() - make_interval(days => $5), \
             now() - make_interval(days => $6), $7)",
    )
    .bind(id)
    .bind(unique("so"))
    .bind(state)
    .bind(unique("ev"))
    .bind(closed)
    .bind(changed)
    .bind(merged_into)
    .execute(pool)
    .await
    .unwrap();
    for kind in ["opened", state] {
        sqlx::query("INSERT INTO case_history (case_id, kind, state) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(kind)
            .bind(state)
            .execute(pool)
            .await
            .unwrap();
    }
    id
}

/// An outbox row of `case`, written `created` days ago and sent `sent`
/// days ago (`None`: not yet published).
async fn event(pool: &PgPool, case: Uuid, created: i32, sent: Option<i32>) -> Uuid {
    let envelope = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO outbox (envelope_id, case_id, routing_key, body, created_at, sent_at) \
         VALUES ($1, $2, 'order.hold_released', '{}', now() - make_interval(days => $3), \
             now() - make_interval(days => $4))",
    )
    .bind(envelope)
    .bind(case)
    .bind(created)
    .bind(sent)
    .execute(pool)
    .await
    .unwrap();
    envelope
}

/// `n` inbox ids received `days` ago.
async fn inbox(pool: &PgPool, n: usize, days: i32) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|_| unique("in")).collect();
    sqlx::query(
        "INSERT INTO inbox (event_id, case_id, received_at) \
         SELECT id, gen_random_uuid(), now() - make_interval(days => $2) FROM unnest($1::text[]) id",
    )
    .bind(&ids)
    .bind(days)
    .execute(pool)
    .await
    .unwrap();
    ids
}

/// A dead letter first and last seen `seen` days ago, archived and
/// replayed as given (days ago).
async fn dead_letter(
    store: &Store,
    seen: i32,
    archived: Option<i32>,
    replayed: Option<i32>,
) -> i64 {
    let msg = DeadLetterMessage {
        body: unique("body").into_bytes(),
        message_id: Some(unique("m")),
        properties: serde_json::json!({}),
        headers: serde_json::json!({}),
        raw_properties: serde_json::json!({}),
        code: "INVALID_EVENT".into(),
        detail: "x".into(),
        origin_exchange: None,
        origin_routing_key: None,
        failed_at: None,
    };
    let id = store.record_dead_letter(&msg).await.unwrap().id;
    sqlx::query(
        "UPDATE dead_letters SET first_seen = now() - make_interval(days => $2), \
             last_seen = now() - make_interval(days => $2), \
             archived_at = now() - make_interval(days => $3), \
             last_replayed_at = now() - make_interval(days => $4) \
         WHERE id = $1",
    )
    .bind(id)
    .bind(seen)
    .bind(archived)
    .bind(replayed)
    .execute(store.pool())
    .await
    .unwrap();
    id
}

async fn ids<T>(pool: &PgPool, sql: &'static str) -> Vec<T>
where
    (T,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    T: Send + Unpin + Ord,
{
    let mut v: Vec<T> = sqlx::query_scalar(sql).fetch_all(pool).await.unwrap();
    v.sort();
    v
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// The default retentions (outbox 30d, inbox 90d, released and merged
/// cases 365d, escalated 730d since their last change, dead letters 30d),
/// in slices of 2: what each rule deletes, and everything it must not.
#[sqlx::test]
async fn each_table_is_pruned_by_its_rule_and_nothing_else(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    // Cases.
    let open_old = case(&pool, "watching", None, 800, None).await;
    let released_old = case(&pool, "released", Some(400), 400, None).await;
    let released_recent = case(&pool, "released", Some(10), 10, None).await;
    let escalated_old = case(&pool, "escalated", Some(800), 800, None).await;
    let escalated_touched = case(&pool, "escalated", Some(800), 10, None).await;
    let released_unsent = case(&pool, "released", Some(400), 400, None).await;
    let keeper_open = case(&pool, "watching", None, 1, None).await;
    let merged_into_open = case(&pool, "merged", Some(400), 400, Some(keeper_open)).await;
    let keeper_old = case(&pool, "released", Some(400), 400, None).await;
    let merged_into_old = case(&pool, "merged", Some(400), 400, Some(keeper_old)).await;
    // Outbox rows.
    let sent_old = event(&pool, open_old, 41, Some(40)).await;
    let sent_recent = event(&pool, open_old, 11, Some(10)).await;
    let unsent_old = event(&pool, open_old, 40, None).await;
    let with_released_old = event(&pool, released_old, 400, Some(400)).await;
    let unsent_of_closed = event(&pool, released_unsent, 400, None).await;
    // Inbox ids.
    inbox(&pool, 3, 100).await;
    let recent_ids = inbox(&pool, 2, 10).await;
    // Dead letters.
    let archived_old = dead_letter(&store, 60, Some(40), None).await;
    let replayed_old = dead_letter(&store, 60, None, Some(40)).await;
    let replayed_seen_again = dead_letter(&store, 5, None, Some(40)).await;
    let unhandled_old = dead_letter(&store, 400, None, None).await;
    let archived_recent = dead_letter(&store, 60, Some(10), None).await;

    let pruner = Pruner::new(store.clone(), quick(2, Duration::from_millis(1)), "test");
    let mut slices = Vec::new();
    let pass = pruner
        .pass(&CancellationToken::new(), &mut |t, n| slices.push((t, n)))
        .await
        .unwrap();
    assert_eq!(
        pass,
        Pass::Done(vec![
            (PruneTable::Outbox, 2),
            (PruneTable::Inbox, 3),
            (PruneTable::Cases, 4),
            (PruneTable::DeadLetters, 2),
        ])
    );
    assert!(
        slices.iter().all(|(_, n)| *n <= 2),
        "slices of at most 2: {slices:?}"
    );
    let _ = with_released_old;

    assert_eq!(
        ids::<Uuid>(&pool, "SELECT id FROM cases").await,
        sorted(vec![
            open_old,
            released_recent,
            escalated_touched,
            released_unsent,
            keeper_open,
            merged_into_open,
        ]),
        "deleted: released_old, escalated_old, keeper_old and merged_into_old"
    );
    assert!(
        !ids::<Uuid>(&pool, "SELECT id FROM cases")
            .await
            .contains(&merged_into_old)
    );
    assert_eq!(
        ids::<Uuid>(&pool, "SELECT DISTINCT case_id FROM case_history").await,
        ids::<Uuid>(&pool, "SELECT id FROM cases").await,
        "history goes with its case, and only with it"
    );
    assert_eq!(
        ids::<Uuid>(&pool, "SELECT envelope_id FROM outbox").await,
        sorted(vec![sent_recent, unsent_old, unsent_of_closed]),
        "an unsent row is never deleted, nor the case it belongs to"
    );
    assert_eq!(
        ids::<String>(&pool, "SELECT event_id FROM inbox").await,
        sorted(recent_ids)
    );
    assert_eq!(
        ids::<i64>(&pool, "SELECT id FROM dead_letters").await,
        sorted(vec![replayed_seen_again, unhandled_old, archived_recent])
    );
    let _ = (archived_old, replayed_old, escalated_old, sent_old);
    assert!(
        store.last_prune_pass().await.unwrap().is_some(),
        "the pass is recorded"
    );

    // A second pass finds nothing; with every retention off, nothing is
    // even looked at.
    let again = pruner.pass(&CancellationToken::new(), &mut |_, _| {}).await;
    assert_eq!(
        again.unwrap(),
        Pass::Done(PruneTable::ALL.iter().map(|t| (*t, 0)).collect())
    );
    let off = PruneSettings {
        outbox: None,
        inbox: None,
        cases: None,
        escalated_cases: None,
        dead_letters: None,
        ..quick(2, Duration::from_millis(1))
    };
    sqlx::query(
        "UPDATE cases SET closed_at = now() - interval '10 years' WHERE closed_at IS NOT NULL",
    )
    .execute(&pool)
    .await
    .unwrap();
    let kept = Pruner::new(store, off, "test")
        .pass(&CancellationToken::new(), &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(kept, Pass::Done(vec![]));
    assert_eq!(ids::<Uuid>(&pool, "SELECT id FROM cases").await.len(), 6);
}

/// Two workers' pruners on one database: while one is in its pass, the
/// other's turn finds the lock taken and deletes nothing; every row past
/// its retention is deleted once, by the first.
#[sqlx::test]
async fn two_pruners_never_prune_at_once(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    inbox(&pool, 200, 100).await;
    let recent = inbox(&pool, 5, 1).await;
    let a = Pruner::new(store.clone(), quick(10, Duration::from_millis(100)), "a");
    let b = Pruner::new(store.clone(), quick(10, Duration::from_millis(50)), "b");
    let first = tokio::spawn(async move {
        a.pass(&CancellationToken::new(), &mut |_, _| {})
            .await
            .unwrap()
    });
    wait_for(DEADLINE, "the first pass to be under way", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        (left < 205).then_some(())
    })
    .await;
    let mut seen = 0;
    let second = b
        .pass(&CancellationToken::new(), &mut |_, n| seen += n)
        .await
        .unwrap();
    assert_eq!(second, Pass::Busy);
    assert_eq!(seen, 0);
    assert!(!first.is_finished(), "the first pass was still running");
    let first = first.await.unwrap();
    let Pass::Done(deleted) = first else {
        panic!("{first:?}")
    };
    assert!(deleted.contains(&(PruneTable::Inbox, 200)), "{deleted:?}");
    assert_eq!(
        ids::<String>(&pool, "SELECT event_id FROM inbox").await,
        sorted(recent)
    );
    // The lock went with the first pass: the second worker's next turn runs.
    let next = b.pass(&CancellationToken::new(), &mut |_, _| {}).await;
    assert!(matches!(next.unwrap(), Pass::Done(_)));
}

/// Stopped (shutdown, ctrl-c), a pass ends between two slices: what it
/// deleted stays deleted, the pass is not recorded as finished, and the
/// lock is free for the next one.
#[sqlx::test]
async fn a_stopped_pass_ends_between_slices_and_frees_the_lock(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    inbox(&pool, 50, 100).await;
    let pruner = Pruner::new(store.clone(), quick(10, Duration::from_secs(60)), "a");
    let stop = CancellationToken::new();
    stop.cancel();
    let pass = pruner.pass(&stop, &mut |_, _| {}).await.unwrap();
    assert_eq!(
        pass,
        Pass::Stopped(vec![(PruneTable::Outbox, 0), (PruneTable::Inbox, 10)])
    );
    assert_eq!(
        ids::<String>(&pool, "SELECT event_id FROM inbox")
            .await
            .len(),
        40
    );
    assert_eq!(store.last_prune_pass().await.unwrap(), None);
    let next = Pruner::new(store.clone(), quick(100, Duration::ZERO), "b")
        .pass(&CancellationToken::new(), &mut |_, _| {})
        .await
        .unwrap();
    assert!(
        matches!(&next, Pass::Done(d) if d.contains(&(PruneTable::Inbox, 40))),
        "{next:?}"
    );
    assert!(store.last_prune_pass().await.unwrap().is_some());
}

/// `holdclear prune --dry-run` counts per table and deletes nothing;
/// `holdclear prune` deletes exactly that and says so.
#[sqlx::test]
async fn the_prune_command_shows_then_deletes_the_backlog(pool: PgPool) {
    let db = database_url(&pool).await;
    let store = Store::from_pool(pool.clone());
    let old = case(&pool, "released", Some(400), 400, None).await;
    event(&pool, old, 400, Some(400)).await;
    let open = case(&pool, "deciding", None, 400, None).await;
    inbox(&pool, 3, 100).await;
    dead_letter(&store, 60, Some(40), None).await;
    let prune = |args: &[&str]| {
        let out = bin()
            .arg("prune")
            .args(args)
            .env("HOLDCLEAR_DATABASE_URL", &db)
            .env("HOLDCLEAR_LOG_FORMAT", "json")
            .env("HOLDCLEAR_PRUNE_PAUSE", "1ms")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    let dry = prune(&["--dry-run"]);
    let count = |table: &str| -> String {
        let line = dry
            .lines()
            .find(|l| l.split_whitespace().next() == Some(table))
            .unwrap_or_else(|| panic!("no {table} line:\n{dry}"));
        line.split_whitespace().nth(1).unwrap().to_owned()
    };
    for (table, n) in [
        ("outbox", "1"),
        ("inbox", "3"),
        ("cases", "1"),
        ("case_history", "2"),
        ("dead_letters", "1"),
        ("dead_letter_sightings", "1"),
    ] {
        assert_eq!(count(table), n, "{table}:\n{dry}");
    }
    assert!(
        dry.contains("kept 90d (HOLDCLEAR_INBOX_RETENTION)"),
        "{dry}"
    );
    assert_eq!(
        ids::<Uuid>(&pool, "SELECT id FROM cases").await,
        sorted(vec![old, open]),
        "a dry run deletes nothing"
    );

    let done = prune(&[]);
    assert_eq!(
        done.trim(),
        "Deleted: outbox 1, inbox 3, cases 1, dead_letters 1.",
        "{done}"
    );
    assert_eq!(ids::<Uuid>(&pool, "SELECT id FROM cases").await, vec![open]);
    let again = prune(&["--dry-run"]);
    assert!(
        again
            .lines()
            .skip(1)
            .all(|l| l.split_whitespace().nth(1) == Some("0")),
        "{again}"
    );
}

/// A retention under its floor, or not a duration, stops the command
/// with exit 64 naming the setting.
#[test]
fn a_bad_retention_setting_exits_64_naming_it() {
    for (name, value, says) in [
        ("HOLDCLEAR_INBOX_RETENTION", "3d", "floor of 7d"),
        ("HOLDCLEAR_CASE_RETENTION", "soon", "off"),
        ("HOLDCLEAR_DLQ_RETENTION", "-1d", "off"),
        ("HOLDCLEAR_PRUNE_SLICE", "0", "1 to 10000"),
    ] {
        for command in [&["prune", "--dry-run"][..], &["run"]] {
            let out = bin()
                .args(command)
                .env(name, value)
                .env("HOLDCLEAR_LOG_FORMAT", "json")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{name}={value}: {stderr}");
            assert!(
                stderr.contains(name) && stderr.contains(says),
                "{name}={value}: {stderr}"
            );
        }
    }
}

/// `holdclear run` prunes on its own at start, and `/metrics` says what:
/// rows deleted per table, the last successful pass, rows per table.
#[sqlx::test]
async fn the_worker_prunes_and_reports_it_on_metrics(pool: PgPool) {
    let prefix = unique("prune");
    let db = database_url(&pool).await;
    let old = case(&pool, "released", Some(400), 400, None).await;
    let open = case(&pool, "watching", None, 400, None).await;
    inbox(&pool, 4, 100).await;
    sqlx::query("ANALYZE cases").execute(&pool).await.unwrap();
    let worker = start(settings(&db, &prefix, &[])).await;
    wait_for(DEADLINE, "the worker to prune the old case", || async {
        let left = ids::<Uuid>(&pool, "SELECT id FROM cases").await;
        (left == vec![open]).then_some(())
    })
    .await;
    assert!(
        !ids::<Uuid>(&pool, "SELECT id FROM cases")
            .await
            .contains(&old)
    );
    let text = wait_for(DEADLINE, "the pass on /metrics", || async {
        let (_, text) = http_get(worker.http_addr, "/metrics").await;
        text.contains("holdclear_prune_last_success_timestamp_seconds")
            .then_some(text)
    })
    .await;
    for name in [
        "holdclear_prune_deleted_total{table=\"cases\"} 1",
        "holdclear_prune_deleted_total{table=\"inbox\"} 4",
        "holdclear_table_rows{table=\"cases\"}",
        "holdclear_table_rows{table=\"case_history\"}",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    let at = text
        .lines()
        .find(|l| l.starts_with("holdclear_prune_last_success_timestamp_seconds "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((now - at).abs() < 120.0, "{at} vs {now}");
}
