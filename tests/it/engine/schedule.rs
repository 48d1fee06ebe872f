//! The scheduler's narrow row (`case_schedule`, issue #18): one per open
//! case, written by claims, renewals, give-backs and steps; none for a
//! closed case; moved from the case rows of an existing deployment by its
//! migration.

use chrono::DateTime;
use holdclear::store::MIGRATOR;

use super::*;

/// The case's schedule row: due time, lease owner, lease expiry.
async fn schedule(
    pool: &PgPool,
    id: Uuid,
) -> Option<(DateTime<Utc>, Option<String>, Option<DateTime<Utc>>)> {
    sqlx::query_as(
        "SELECT due_at, lease_owner, lease_expires_at FROM case_schedule WHERE case_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// Opened due now and unleased; a claim leases it and moves it past the
/// lease; a step that goes on keeps the lease; one that gives it back
/// leaves it due at its next action, unleased; the step that closes it
/// deletes the row; `cases retry` schedules it again, due at once.
#[sqlx::test]
async fn the_schedule_row_follows_the_case_from_claim_to_close(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let id = open_case(&pool, &held("5101", "acme.example", |_| {})).await;
    let (due, owner, expires) = schedule(&pool, id).await.expect("scheduled at intake");
    assert!(due <= Utc::now() && owner.is_none() && expires.is_none());

    let before = Utc::now();
    let claimed = store
        .claim_due("a#1", Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let (due, owner, expires) = schedule(&pool, id).await.unwrap();
    assert_eq!(owner.as_deref(), Some("a#1"));
    assert!(due >= before + chrono::Duration::seconds(59), "{due}");
    assert_eq!(Some(due), expires, "not due before the lease runs out");
    let record = store.case_by_id(id).await.unwrap().unwrap();
    assert_eq!(record.lease_owner.as_deref(), Some("a#1"));
    assert_eq!(record.case.next_action_at, Some(due));

    // A step that goes on: the lease is kept and extended.
    let case = claimed[0].case.as_ref().unwrap().clone();
    let hold = Duration::from_secs(600);
    assert!(
        store
            .commit_step("a#1", &case, &[], &[], Some(hold))
            .await
            .unwrap()
    );
    let (due, owner, _) = schedule(&pool, id).await.unwrap();
    assert_eq!(owner.as_deref(), Some("a#1"));
    assert!(due >= before + chrono::Duration::seconds(599), "{due}");

    // A step that gives the lease back: due at its next action.
    let mut later = case.clone();
    let next = Utc::now() + chrono::Duration::hours(1);
    later.next_action_at = Some(next);
    assert!(
        store
            .commit_step("a#1", &later, &[], &[], None)
            .await
            .unwrap()
    );
    let (due, owner, expires) = schedule(&pool, id).await.unwrap();
    assert_eq!((owner, expires), (None, None));
    assert!((due - next).num_milliseconds().abs() < 1, "{due} vs {next}");
    assert!(
        store
            .claim_due("b#1", Duration::from_secs(60), 10)
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );

    // Made due, claimed by another, and closed: no row left.
    assert!(
        !store.release_case(id, "a#1", Duration::ZERO).await.unwrap(),
        "given back"
    );
    sqlx::query("UPDATE case_schedule SET due_at = now() WHERE case_id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let claimed = store
        .claim_due("b#1", Duration::from_secs(60), 10)
        .await
        .unwrap();
    let (closed, envelope) = escalated_no_rule(claimed[0].case.as_ref().unwrap());
    assert!(
        !store
            .commit_step("a#1", &closed, &[], std::slice::from_ref(&envelope), None)
            .await
            .unwrap()
    );
    assert!(
        schedule(&pool, id).await.is_some(),
        "a lost lease writes nothing"
    );
    assert!(
        store
            .commit_step("b#1", &closed, &[], &[envelope], None)
            .await
            .unwrap()
    );
    assert_eq!(
        schedule(&pool, id).await,
        None,
        "a closed case is not scheduled"
    );
    let record = store.case_by_id(id).await.unwrap().unwrap();
    assert_eq!(record.case.state(), CaseState::Escalated);
    assert_eq!(
        (record.lease_owner, record.case.next_action_at),
        (None, None)
    );
    assert!(!store.renew_lease(id, "b#1", hold).await.unwrap());

    // Re-opened by a person: scheduled again, due at once.
    holdclear::engine::retry_case(&store, "5101").await.unwrap();
    let (due, owner, _) = schedule(&pool, id).await.expect("scheduled again");
    assert!(due <= Utc::now() && owner.is_none());
    let claimed = store
        .claim_due("c#1", Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), vec![id]);

    // Deleting a case (the pruner's way) takes its row along: no orphan.
    sqlx::query("DELETE FROM cases WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(schedule(&pool, id).await, None);
}

/// Claimers racing on many due cases, several claims each, get every case
/// exactly once between them.
#[sqlx::test]
async fn racing_claimers_share_the_due_cases_without_overlap(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let events: Vec<HeldOrderEvent> = (0..300)
        .map(|n| held(&format!("52{n:04}"), "acme.example", |_| {}))
        .collect();
    store.record_held(&events).await.unwrap();
    let claimers = (0..4).map(|w| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            for n in 0..20 {
                let owner = format!("w{w}#{n}");
                let claimed = store
                    .claim_due(&owner, Duration::from_secs(60), 7)
                    .await
                    .unwrap();
                got.extend(claimed.into_iter().map(|c| (c.id, owner.clone())));
            }
            got
        })
    });
    let mut all = Vec::new();
    for c in claimers {
        all.extend(c.await.unwrap());
    }
    let ids: std::collections::HashSet<Uuid> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), all.len(), "no case claimed twice");
    assert_eq!(all.len(), 300, "every due case claimed");
    for (id, owner) in all {
        let (_, stored, _) = schedule(&pool, id).await.unwrap();
        assert_eq!(stored.as_deref(), Some(owner.as_str()));
    }
}

/// The migration moves an existing deployment's open cases, with their due
/// times and leases, and schedules no closed case.
#[sqlx::test(migrations = false)]
async fn the_migration_moves_open_cases_with_their_leases(pool: PgPool) {
    const SCHEDULE: i64 = 20261211000001;
    let mut conn = pool.acquire().await.unwrap();
    for m in MIGRATOR.iter().filter(|m| m.version < SCHEDULE) {
        let sql = sqlx::AssertSqlSafe(m.sql.as_str().to_owned());
        sqlx::raw_sql(sql).execute(&mut *conn).await.unwrap();
    }
    let (open, leased, closed) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    sqlx::query(
        "INSERT INTO cases (id, order_key, sales_order_number, state, event_id, event, \
             hold_reason, held_at, next_action_at, lease_owner, lease_expires_at, closed_at) \
         VALUES ($1, '1', '1', 'watching', 'e1', '{}', 'H', now(), \
                 '2030-01-01T00:00:00Z', NULL, NULL, NULL), \
                ($2, '2', '2', 'deciding', 'e2', '{}', 'H', now(), \
                 '2030-01-02T00:00:00Z', 'w#1', '2030-01-02T00:00:00Z', NULL), \
                ($3, '3', '3', 'released', 'e3', '{}', 'H', now(), \
                 now(), NULL, NULL, now())",
    )
    .bind(open)
    .bind(leased)
    .bind(closed)
    .execute(&mut *conn)
    .await
    .unwrap();
    for m in MIGRATOR.iter().filter(|m| m.version >= SCHEDULE) {
        let sql = sqlx::AssertSqlSafe(m.sql.as_str().to_owned());
        sqlx::raw_sql(sql).execute(&mut *conn).await.unwrap();
    }
    let at = |s: &str| Some(s.parse::<DateTime<Utc>>().unwrap());
    let row = |id| schedule(&pool, id);
    let (due, owner, expires) = row(open).await.unwrap();
    assert_eq!(
        (Some(due), owner, expires),
        (at("2030-01-01T00:00:00Z"), None, None)
    );
    let (due, owner, expires) = row(leased).await.unwrap();
    assert_eq!(
        (Some(due), owner.as_deref(), expires),
        (
            at("2030-01-02T00:00:00Z"),
            Some("w#1"),
            at("2030-01-02T00:00:00Z")
        )
    );
    assert_eq!(row(closed).await, None);
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'cases' \
         AND column_name IN ('next_action_at', 'lease_owner', 'lease_expires_at')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "one source of truth");
}

/// `holdclear bench`'s section 4 times claims of the watched cases it
/// seeds: they must be cases the engine can step (a watched case with its
/// decision, target and assignment), or the bench times the path of a
/// corrupt row instead of a claim.
#[sqlx::test]
async fn the_benchs_watched_cases_are_cases_the_engine_steps(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let tables = holdclear::store::bench::BenchTables::new(&store);
    let event = serde_json::to_value(held("5301", "acme.example", |_| {})).unwrap();
    let hour = Duration::from_secs(3600);
    tables
        .seed_watching(0, 50, &event, Utc::now(), hour, hour)
        .await
        .unwrap();
    assert_eq!(tables.make_due(20).await.unwrap(), 20);
    let claimed = store
        .claim_due("bench#1", Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 20);
    for c in claimed {
        let case = c
            .case
            .unwrap_or_else(|e| panic!("case {} does not decode: {e}", c.id));
        assert!(
            matches!(
                case.stage,
                Stage::Watching {
                    decision: Some(_),
                    assignment: Some(_),
                    key: Some(_),
                    ..
                }
            ),
            "{:?}",
            case.stage
        );
    }
}
