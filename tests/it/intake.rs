//! Intake against the real RabbitMQ and PostgreSQL: held orders become
//! cases, bad messages become dead letters, outages of either are survived,
//! and `holdclear run` stops cleanly on SIGTERM.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use holdclear::domain::HeldOrderEvent;
use holdclear::store::{Recorded, Store};
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::support::broker::{Rabbit, close_connection, connections_named, held_event, message};
use crate::support::worker::{Process, http_get, start};
use crate::support::{database_url, settings, unique, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

fn event(v: &Value) -> HeldOrderEvent {
    HeldOrderEvent::decode(&serde_json::to_vec(v).unwrap(), 1 << 20).unwrap()
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn count_cases(pool: &PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT count(*) FROM cases")
        .fetch_one(pool)
        .await
        .ok()
}

async fn wait_ready(addr: std::net::SocketAddr) {
    wait_for(DEADLINE, "/readyz to answer 200", || async {
        (http_get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
}

// ── The store: one transaction per batch ────────────────────────────────

#[sqlx::test]
async fn a_batch_resolves_duplicates_and_orders_within_itself(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let mut no_held_at = held_event("e-4", "400");
    no_held_at["data"].as_object_mut().unwrap().remove("heldAt");
    let mut web_only = held_event("e-5", "500");
    for key in ["heldAt", "salesOrderNumber"] {
        web_only["data"].as_object_mut().unwrap().remove(key);
    }
    web_only.as_object_mut().unwrap().remove("time");
    let batch: Vec<HeldOrderEvent> = [
        held_event("e-1", "100"),
        held_event("e-1", "100"),
        held_event("e-2", "100"),
        no_held_at,
        web_only,
    ]
    .iter()
    .map(event)
    .collect();

    let before = chrono::Utc::now();
    let got = store.record_held(&batch).await.unwrap();
    let Recorded::Opened { case_id: case_100 } = got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(got[1], Recorded::Duplicate);
    assert_eq!(got[2], Recorded::HeldAgain { case_id: case_100 });
    assert!(matches!(got[3], Recorded::Opened { .. }), "{got:?}");
    assert!(matches!(got[4], Recorded::Opened { .. }), "{got:?}");

    let rows = sqlx::query("SELECT order_key, held_at, web_order_id FROM cases ORDER BY order_key")
        .fetch_all(&pool)
        .await
        .unwrap();
    let held: HashMap<String, chrono::DateTime<chrono::Utc>> = rows
        .iter()
        .map(|r| (r.get("order_key"), r.get("held_at")))
        .collect();
    assert_eq!(held.len(), 3);
    assert_eq!(
        held["100"].to_rfc3339(),
        "2026-11-23T09:10:00+00:00",
        "data.heldAt"
    );
    assert_eq!(
        held["400"].to_rfc3339(),
        "2026-11-23T09:12:44+00:00",
        "envelope time"
    );
    assert!(held["web:W500"] >= before, "now, when neither is given");
    let kinds: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT kind, case_id FROM case_history ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    // A new case's row is its opened line: intake writes no history row for it.
    assert_eq!(kinds.iter().filter(|(k, _)| k == "opened").count(), 0);
    assert_eq!(kinds.iter().filter(|(k, _)| k == "held_again").count(), 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM inbox").await, 4);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM cases c JOIN case_schedule s ON s.case_id = c.id \
             WHERE c.state = 'deciding' AND s.due_at <= now() \
             AND s.lease_owner IS NULL AND c.attempt = 0"
        )
        .await,
        3,
        "new cases are deciding and due at once"
    );

    // Later batches: a seen id is a duplicate; the open case collects the
    // next hold; once the case is closed a new hold opens a new case.
    let got = store
        .record_held(&[
            event(&held_event("e-1", "100")),
            event(&held_event("e-6", "100")),
        ])
        .await
        .unwrap();
    assert_eq!(
        got,
        [
            Recorded::Duplicate,
            Recorded::HeldAgain { case_id: case_100 }
        ]
    );
    // Closed as the engine closes a case: no longer scheduled.
    sqlx::query(
        "WITH c AS (UPDATE cases SET state = 'released' WHERE id = $1 RETURNING id) \
         DELETE FROM case_schedule WHERE case_id IN (SELECT id FROM c)",
    )
    .bind(case_100)
    .execute(&pool)
    .await
    .unwrap();
    let got = store
        .record_held(&[event(&held_event("e-7", "100"))])
        .await
        .unwrap();
    let Recorded::Opened { case_id } = got[0] else {
        panic!("{got:?}")
    };
    assert_ne!(case_id, case_100);
    let inbox_case: Uuid = sqlx::query_scalar("SELECT case_id FROM inbox WHERE event_id = 'e-6'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        inbox_case, case_100,
        "the inbox names the case the event went to"
    );
}

/// A `cases` table that grew since PostgreSQL last analysed it (a new
/// deployment's first burst, a backlog after an outage) must not be read
/// whole for every batch: intake looks its orders up by index whatever the
/// statistics say.
#[sqlx::test]
async fn intake_looks_orders_up_by_index_on_a_table_grown_since_its_last_analyze(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let tables = holdclear::store::bench::BenchTables::new(&store);
    let seeded = held_event("seed", "1");
    let now = chrono::Utc::now();
    let hour = Duration::from_secs(3600);
    tables
        .seed_watching(0, 20_000, &seeded, now, hour, hour)
        .await
        .unwrap();
    let batch: Vec<HeldOrderEvent> = (0..256)
        .map(|i| event(&held_event(&format!("e-{i}"), &format!("{}", 900_000 + i))))
        .collect();
    let plan = tables.explain_intake(&batch).await.unwrap();
    let scans: Vec<&String> = plan
        .iter()
        .filter(|line| line.contains("Seq Scan on cases"))
        .collect();
    assert!(
        scans.is_empty(),
        "intake's plan reads every case: {scans:?}\n{}",
        plan.join("\n")
    );
}

/// A late event of a hold whose case ended joins that case, even when
/// newer cases of the order were merged away since (intake looks at each
/// id's most recent cases, and merged ones are not among them).
#[sqlx::test]
async fn a_late_event_joins_the_ended_case_behind_merged_ones(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let first = store
        .record_held(&[event(&held_event("e-1", "8100"))])
        .await
        .unwrap();
    let [Recorded::Opened { case_id }] = first[..] else {
        panic!("{first:?}");
    };
    // The hold was released after the events below were sent (heldAt 09:10).
    sqlx::query(
        "UPDATE cases SET state = 'released', released_at = '2026-11-23T10:00:00Z', \
         closed_at = '2026-11-23T10:00:00Z' WHERE id = $1",
    )
    .bind(case_id)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM case_schedule WHERE case_id = $1")
        .bind(case_id)
        .execute(&pool)
        .await
        .unwrap();
    // Three newer cases of the order, merged into it.
    for i in 0..3 {
        sqlx::query(
            "INSERT INTO cases (id, order_key, sales_order_number, web_order_id, state, \
             merged_into, event_id, event, hold_reason, held_at, closed_at, created_at) \
             SELECT $1, order_key, sales_order_number, web_order_id, 'merged', id, $2, event, \
             hold_reason, held_at, now(), now() + make_interval(secs => $3) FROM cases WHERE id = $4",
        )
        .bind(Uuid::new_v4())
        .bind(format!("merged-{i}"))
        .bind(f64::from(i + 1))
        .bind(case_id)
        .execute(&pool)
        .await
        .unwrap();
    }
    let late = store
        .record_held(&[event(&held_event("e-2", "8100"))])
        .await
        .unwrap();
    assert_eq!(late, [Recorded::HeldAgain { case_id }]);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM cases WHERE state <> 'merged'").await,
        1,
        "no second case for the released hold"
    );
}

#[sqlx::test]
async fn an_order_opened_by_another_writer_mid_batch_is_held_again(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    // Another writer opens order 7001's case and has not committed yet.
    let mut other = pool.begin().await.unwrap();
    let theirs = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO cases (id, order_key, state, event_id, event, hold_reason, held_at) \
         VALUES ($1, '7001', 'deciding', 'other', '{}', 'NO_SMART_ACCOUNT', now())",
    )
    .bind(theirs)
    .execute(&mut *other)
    .await
    .unwrap();
    let batch = vec![
        event(&held_event("mine-1", "7001")),
        event(&held_event("mine-2", "7002")),
        event(&held_event("mine-3", "7001")),
    ];
    let writing = tokio::spawn(async move { store.record_held(&batch).await });
    // Our batch waits on their uncommitted case …
    wait_for(
        DEADLINE,
        "the batch to wait on the other writer",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (waiting > 0).then_some(())
        },
    )
    .await;
    // … which commits first: our events join their case.
    other.commit().await.unwrap();
    let got = writing.await.unwrap().unwrap();
    assert_eq!(got[0], Recorded::HeldAgain { case_id: theirs });
    assert!(matches!(got[1], Recorded::Opened { .. }), "{got:?}");
    assert_eq!(got[2], Recorded::HeldAgain { case_id: theirs });
    assert_eq!(count(&pool, "SELECT count(*) FROM cases").await, 2);
    let inbox: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT event_id, case_id FROM inbox WHERE event_id <> 'mine-2' ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        inbox,
        [("mine-1".to_owned(), theirs), ("mine-3".to_owned(), theirs)]
    );
    let history: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT kind, case_id FROM case_history ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    // The two held again; the case mine-2 opened has its row, no history row.
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(
        history
            .iter()
            .filter(|(k, c)| k == "held_again" && *c == theirs)
            .count(),
        2
    );
}

#[sqlx::test]
async fn parallel_writers_open_one_case_per_order(pool: PgPool) {
    let url = database_url(&pool).await;
    let secret = holdclear::config::SecretUrl::parse("db", &url).unwrap();
    let (a_store, b_store) = (
        Store::connect(&secret, None, 2).await.unwrap(),
        Store::connect(&secret, None, 2).await.unwrap(),
    );
    let orders: Vec<String> = (0..200).map(|n| format!("{}", 7000 + n)).collect();
    let a: Vec<_> = orders
        .iter()
        .map(|o| event(&held_event(&format!("a-{o}"), o)))
        .collect();
    let b: Vec<_> = orders
        .iter()
        .rev()
        .map(|o| event(&held_event(&format!("b-{o}"), o)))
        .collect();
    let (ra, rb) = tokio::join!(a_store.record_held(&a), b_store.record_held(&b));
    let all: Vec<Recorded> = ra.unwrap().into_iter().chain(rb.unwrap()).collect();
    let opened = all
        .iter()
        .filter(|r| matches!(r, Recorded::Opened { .. }))
        .count();
    let again = all
        .iter()
        .filter(|r| matches!(r, Recorded::HeldAgain { .. }))
        .count();
    assert_eq!((opened, again), (200, 200));
    assert_eq!(count(&pool, "SELECT count(*) FROM cases").await, 200);
    assert_eq!(count(&pool, "SELECT count(*) FROM inbox").await, 400);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM inbox i LEFT JOIN cases c ON c.id = i.case_id WHERE c.id IS NULL"
        )
        .await,
        0,
        "every inbox row names an existing case"
    );
    // One held_again row per event that found its order's case; a new
    // case's row is its opened line.
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM case_history WHERE kind = 'held_again'"
        )
        .await,
        200
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM case_history").await, 200);
}

// ── The worker: RabbitMQ in, cases out ──────────────────────────────────

#[sqlx::test]
async fn a_held_order_becomes_one_case_once(pool: PgPool) {
    let prefix = unique("intake-one");
    let rabbit = Rabbit::new(&prefix).await;
    let worker = start(settings(&database_url(&pool).await, &prefix, &[])).await;
    assert_eq!(http_get(worker.http_addr, "/healthz").await.0, 200);
    wait_ready(worker.http_addr).await;

    let first = held_event(&Uuid::new_v4().to_string(), "104233871");
    rabbit.publish_events(std::slice::from_ref(&first)).await;
    wait_for(DEADLINE, "the case", || async {
        (count_cases(&pool).await == Some(1)).then_some(())
    })
    .await;
    let row = sqlx::query(
        "SELECT id, state, order_key, sales_order_number, web_order_id, event_id, event, \
         hold_reason, held_at FROM cases",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let case_id: Uuid = row.get("id");
    // The case engine runs beside intake: the case may already be a step further.
    let state: String = row.get("state");
    assert!(
        ["deciding", "resolving"].contains(&state.as_str()),
        "{state}"
    );
    assert_eq!(row.get::<String, _>("order_key"), "104233871");
    assert_eq!(
        row.get::<Option<String>, _>("sales_order_number")
            .as_deref(),
        Some("104233871")
    );
    assert_eq!(
        row.get::<Option<String>, _>("web_order_id").as_deref(),
        Some("W104233871")
    );
    assert_eq!(
        row.get::<String, _>("event_id"),
        first["id"].as_str().unwrap()
    );
    assert_eq!(row.get::<String, _>("hold_reason"), "NO_SMART_ACCOUNT");
    assert_eq!(
        row.get::<chrono::DateTime<chrono::Utc>, _>("held_at")
            .to_rfc3339(),
        "2026-11-23T09:10:00+00:00"
    );
    let stored: Value = row.get("event");
    assert_eq!(
        serde_json::from_value::<HeldOrderEvent>(stored).unwrap(),
        event(&first),
        "the stored event is the validated event"
    );
    // The history as `cases show` and the console read it: opened first,
    // from the case row.
    let history: Vec<(String, String)> = holdclear::store::Store::from_pool(pool.clone())
        .case_history(case_id, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.kind, h.state))
        .collect();
    assert_eq!(history[0], ("opened".to_owned(), "deciding".to_owned()));
    assert_eq!(
        history.iter().filter(|(kind, _)| kind == "opened").count(),
        1
    );

    // The same event again, then a second hold of the same order: in queue
    // order, so once the second hold is recorded the duplicate was handled.
    let again = held_event(&Uuid::new_v4().to_string(), "104233871");
    rabbit.publish_events(&[first.clone(), again]).await;
    wait_for(DEADLINE, "the held_again row", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM case_history WHERE kind = 'held_again'")
                .fetch_one(&pool)
                .await
                .ok()?;
        (n == 1).then_some(())
    })
    .await;
    assert_eq!(count(&pool, "SELECT count(*) FROM cases").await, 1);
    // Intake's rows: one held again (the opened line is the case row; the
    // engine adds its own).
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM case_history WHERE kind IN ('opened', 'held_again')"
        )
        .await,
        1
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM inbox").await, 2);

    worker.shutdown().await.unwrap();
    assert_eq!(
        rabbit.depth(&rabbit.topology.held_queue).await,
        0,
        "all acked"
    );
    assert_eq!(rabbit.depth(&rabbit.topology.dead_letter_queue).await, 0);
}

#[sqlx::test]
async fn a_thousand_events_become_a_thousand_cases(pool: PgPool) {
    let prefix = unique("intake-1k");
    let rabbit = Rabbit::new(&prefix).await;
    let worker = start(settings(&database_url(&pool).await, &prefix, &[])).await;
    let events: Vec<Value> = (0..1000)
        .map(|n| held_event(&format!("{prefix}-{n}"), &format!("{}", 1_000_000 + n)))
        .collect();
    rabbit.publish_events(&events).await;
    wait_for(DEADLINE, "1,000 cases", || async {
        (count_cases(&pool).await == Some(1000)).then_some(())
    })
    .await;
    worker.shutdown().await.unwrap();
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM inbox i JOIN cases c ON c.id = i.case_id AND c.event_id = i.event_id"
        )
        .await,
        1000,
        "each event opened its own case"
    );
    assert_eq!(rabbit.depth(&rabbit.topology.held_queue).await, 0);
}

#[sqlx::test]
async fn bad_messages_are_dead_lettered_once_with_their_reason(pool: PgPool) {
    let prefix = unique("intake-dlq");
    let rabbit = Rabbit::new(&prefix).await;
    let limit = 4096;
    let worker = start(settings(
        &database_url(&pool).await,
        &prefix,
        &[("HOLDCLEAR_MAX_PAYLOAD_BYTES", &limit.to_string())],
    ))
    .await;

    let with = |id: &str, edit: &dyn Fn(&mut Value)| {
        let mut v = held_event(id, "55501");
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("too-large", vec![b' '; limit + 1], "PAYLOAD_TOO_LARGE"),
        ("not-utf8", vec![b'{', 0xff, 0xfe, b'}'], "MALFORMED_JSON"),
        ("not-json", b"{\"specversion\": ".to_vec(), "MALFORMED_JSON"),
        ("too-deep", deep.into_bytes(), "MALFORMED_JSON"),
        (
            "specversion",
            with("sv", &|v| v["specversion"] = json!("0.3")),
            "UNSUPPORTED_EVENT_TYPE",
        ),
        (
            "type",
            with("ty", &|v| v["type"] = json!("commerce.order.shipped.v1")),
            "UNSUPPORTED_EVENT_TYPE",
        ),
        (
            "missing-field",
            with("mf", &|v| {
                v["data"].as_object_mut().unwrap().remove("holdReason");
            }),
            "INVALID_EVENT",
        ),
        (
            "nul-char",
            with("nul", &|v| v["source"] = json!("/commerce\u{0}orders")),
            "INVALID_EVENT",
        ),
    ];
    let mut msgs: Vec<_> = cases
        .iter()
        .map(|(id, body, _)| {
            let mut m = message(&json!({"id": format!("bad-{id}")}));
            m.body = body.clone();
            m.headers = vec![
                ("x-trace-id".into(), format!("trace-{id}")),
                ("x-origin".into(), "upstream".into()),
            ];
            m
        })
        .collect();
    // A valid event in the same stream is still recorded.
    msgs.insert(3, message(&held_event("good-1", "55502")));
    rabbit.publish(&msgs).await;

    let dlq = rabbit.topology.dead_letter_queue.clone();
    wait_for(DEADLINE, "the dead letters", || async {
        (rabbit.depth(&dlq).await as usize == cases.len()).then_some(())
    })
    .await;
    wait_for(DEADLINE, "the valid event's case", || async {
        (count_cases(&pool).await == Some(1)).then_some(())
    })
    .await;
    worker.shutdown().await.unwrap();

    let got: HashMap<String, _> = rabbit
        .drain(&dlq)
        .await
        .into_iter()
        .map(|m| (m.message_id().unwrap(), m))
        .collect();
    assert_eq!(got.len(), cases.len(), "each bad message exactly once");
    for (id, body, code) in &cases {
        let m = &got[&format!("bad-{id}")];
        assert_eq!(
            m.header("x-holdclear-error-code").as_deref(),
            Some(*code),
            "{id}"
        );
        assert_eq!(&m.body, body, "{id}: the original body");
        let detail = m.header("x-holdclear-error-detail").unwrap();
        assert!(
            !detail.is_empty() && !detail.contains('\n'),
            "{id}: {detail:?}"
        );
        let at = m.header("x-holdclear-failed-at").unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(&at).is_ok(),
            "{id}: {at}"
        );
        assert_eq!(
            m.header("x-holdclear-original-exchange").as_deref(),
            Some(rabbit.topology.orders_exchange.as_str())
        );
        assert_eq!(
            m.header("x-holdclear-original-routing-key").as_deref(),
            Some("order.held")
        );
        assert_eq!(m.header("x-trace-id"), Some(format!("trace-{id}")), "{id}");
        assert_eq!(m.header("x-origin").as_deref(), Some("upstream"));
        assert_eq!(
            m.properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/cloudevents+json")
        );
        assert_eq!(*m.properties.timestamp(), Some(1_795_000_000));
        assert_eq!(*m.properties.delivery_mode(), Some(2));
    }
    let missing = &got["bad-missing-field"];
    assert!(
        missing
            .header("x-holdclear-error-detail")
            .unwrap()
            .contains("data.holdReason"),
        "the detail names the field"
    );
    assert_eq!(
        rabbit.depth(&rabbit.topology.held_queue).await,
        0,
        "held queue empty"
    );
}

/// Makes the test's own database refuse connections and drops its sessions.
async fn database_outage(db_url: &str, down: bool) {
    let url = url::Url::parse(db_url).unwrap();
    let name = url.path().trim_start_matches('/').to_owned();
    let mut admin_url = url.clone();
    admin_url.set_path("/postgres");
    let admin = PgPool::connect(admin_url.as_str()).await.unwrap();
    let sql = format!(
        "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS {}",
        if down { "false" } else { "true" }
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&admin)
        .await
        .unwrap();
    if down {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&name)
        .execute(&admin)
        .await
        .unwrap();
    }
    admin.close().await;
}

#[sqlx::test]
async fn a_database_outage_holds_the_batch_until_it_is_back(pool: PgPool) {
    let prefix = unique("intake-dbdown");
    let rabbit = Rabbit::new(&prefix).await;
    let db_url = database_url(&pool).await;
    let worker = start(settings(&db_url, &prefix, &[])).await;
    wait_ready(worker.http_addr).await;
    let events: Vec<Value> = (0..300)
        .map(|n| held_event(&format!("{prefix}-{n}"), &format!("{}", 2_000_000 + n)))
        .collect();
    rabbit.publish_events(&events[..100]).await;
    wait_for(DEADLINE, "the first 100 cases", || async {
        (count_cases(&pool).await == Some(100)).then_some(())
    })
    .await;

    database_outage(&db_url, true).await;
    rabbit.publish_events(&events[100..]).await;
    let body = wait_for(DEADLINE, "/readyz to answer 503", || async {
        let (status, body) = http_get(worker.http_addr, "/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("database"), "{body}");
    // The batch is held, not dead-lettered, while the database is away.
    wait_for(
        DEADLINE,
        "the new events to be taken from the queue",
        || async { (rabbit.depth(&rabbit.topology.held_queue).await == 0).then_some(()) },
    )
    .await;
    assert_eq!(rabbit.depth(&rabbit.topology.dead_letter_queue).await, 0);

    database_outage(&db_url, false).await;
    wait_for(DEADLINE, "all 300 cases", || async {
        (count_cases(&pool).await == Some(300)).then_some(())
    })
    .await;
    wait_ready(worker.http_addr).await;
    worker.shutdown().await.unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM inbox").await, 300);
    assert_eq!(rabbit.depth(&rabbit.topology.held_queue).await, 0);
    assert_eq!(rabbit.depth(&rabbit.topology.dead_letter_queue).await, 0);
}

#[sqlx::test]
async fn the_consumer_comes_back_after_its_connection_is_closed(pool: PgPool) {
    let prefix = unique("intake-reconnect");
    let rabbit = Rabbit::new(&prefix).await;
    let worker = start(settings(&database_url(&pool).await, &prefix, &[])).await;
    wait_ready(worker.http_addr).await;
    let needle = format!("queue={} intake", rabbit.topology.held_queue);
    let before = wait_for(DEADLINE, "the worker's connection", || async {
        let pids = connections_named(&needle);
        (pids.len() == 1).then_some(pids)
    })
    .await;
    rabbit
        .publish_events(&[held_event(&format!("{prefix}-1"), "3000001")])
        .await;
    wait_for(DEADLINE, "the first case", || async {
        (count_cases(&pool).await == Some(1)).then_some(())
    })
    .await;

    close_connection(&before[0]);
    wait_for(DEADLINE, "a new connection", || async {
        let pids = connections_named(&needle);
        (pids.len() == 1 && pids != before).then_some(())
    })
    .await;
    let later: Vec<Value> = (2..=50)
        .map(|n| held_event(&format!("{prefix}-{n}"), &format!("{}", 3_000_000 + n)))
        .collect();
    rabbit.publish_events(&later).await;
    wait_for(DEADLINE, "the later cases", || async {
        (count_cases(&pool).await == Some(50)).then_some(())
    })
    .await;
    wait_ready(worker.http_addr).await;
    worker.shutdown().await.unwrap();
    assert_eq!(rabbit.depth(&rabbit.topology.held_queue).await, 0);
}

#[sqlx::test]
async fn a_conflicting_queue_keeps_the_worker_unready_until_it_is_fixed(pool: PgPool) {
    let prefix = unique("intake-conflict");
    let rabbit = Rabbit::new(&prefix).await;
    rabbit.break_held_queue(true).await;
    let worker = start(settings(&database_url(&pool).await, &prefix, &[])).await;
    wait_for(DEADLINE, "/readyz to name the broker alone", || async {
        let (status, body) = http_get(worker.http_addr, "/readyz").await;
        let body: Value = serde_json::from_str(&body).unwrap_or_default();
        (status == 503
            && body["down"] == serde_json::json!(["broker"])
            && body["status"] == "not ready")
            .then_some(())
    })
    .await;
    assert_eq!(http_get(worker.http_addr, "/healthz").await.0, 200);

    // Once the operator removes the conflicting queue, the worker declares
    // its own and consumes.
    rabbit.break_held_queue(false).await;
    wait_ready(worker.http_addr).await;
    rabbit
        .publish_events(&[held_event(&format!("{prefix}-1"), "5000001")])
        .await;
    wait_for(DEADLINE, "the case", || async {
        (count_cases(&pool).await == Some(1)).then_some(())
    })
    .await;
    worker.shutdown().await.unwrap();
}

#[sqlx::test]
async fn sigterm_stops_run_with_everything_taken_committed_and_acked(pool: PgPool) {
    let prefix = unique("intake-sigterm");
    let rabbit = Rabbit::new(&prefix).await;
    let dir = tempfile::tempdir().unwrap();
    let mut process = Process::spawn(&database_url(&pool).await, &prefix, dir.path(), &[]);
    let queue = rabbit.topology.held_queue.clone();
    wait_for(DEADLINE, "the worker to consume", || async {
        (rabbit.consumers(&queue).await == 1).then_some(())
    })
    .await;

    let total = 3000;
    let events: Vec<Value> = (0..total)
        .map(|n| held_event(&format!("{prefix}-{n}"), &format!("{}", 4_000_000 + n)))
        .collect();
    rabbit.publish_events(&events).await;
    wait_for(DEADLINE, "the first cases", || async {
        (count_cases(&pool).await? > 0).then_some(())
    })
    .await;
    process.terminate();
    let status = process.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", process.logs());

    // Nothing lost, nothing twice: what was acked has its case, and every
    // other message is back in the queue.
    let cases = count_cases(&pool).await.unwrap();
    let left = i64::from(rabbit.depth(&queue).await);
    assert_eq!(cases + left, total as i64, "cases {cases} + left {left}");
    assert_eq!(rabbit.consumers(&queue).await, 0);
    let logs = process.logs();
    assert!(logs.contains("Worker stopped."), "{logs}");

    // A second run takes the rest.
    let mut again = Process::spawn(&database_url(&pool).await, &prefix, dir.path(), &[]);
    // Running (its SIGTERM handler in place) even when the first run had
    // taken everything already.
    wait_for(DEADLINE, "the second worker to consume", || async {
        (rabbit.consumers(&queue).await == 1).then_some(())
    })
    .await;
    wait_for(DEADLINE, "all cases", || async {
        (count_cases(&pool).await == Some(total as i64)).then_some(())
    })
    .await;
    again.terminate();
    assert_eq!(again.wait_exit(DEADLINE).await.code(), Some(0));
    assert_eq!(rabbit.depth(&queue).await, 0, "queue empty");
    let distinct: HashSet<String> = sqlx::query_scalar("SELECT event_id FROM inbox")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(distinct.len(), total);
}

/// A session caches a statement's generic plan after five runs, made from
/// the statistics of that moment, and keeps it while the tables grow: on a
/// new deployment (or a table truncated since its last `ANALYZE`) that
/// moment is an empty table. The reads of the statements run per event and
/// per step must look cases up by index even then, or each batch reads
/// every case written since (a batch of intake took 577 ms after 100,000
/// orders). The rows an `UPDATE` or `DELETE` changes are not held to this
/// (docs/performance.md says why).
#[sqlx::test]
async fn hot_statements_read_by_index_in_a_generic_plan_made_on_empty_tables(pool: PgPool) {
    use holdclear::store::bench::{BenchTables, Hot};
    let store = Store::from_pool(pool.clone());
    let tables = BenchTables::new(&store);
    let mut seq_scans = Vec::new();
    for statement in Hot::ALL {
        let plan = tables.explain_generic(statement).await.unwrap();
        // `Update on cases c_7` names the rows the statement changes.
        let targets: Vec<String> = plan
            .iter()
            .filter_map(|line| {
                let line = line.trim_start().trim_start_matches("->  ");
                let rest = line
                    .strip_prefix("Update on ")
                    .or_else(|| line.strip_prefix("Delete on "))?;
                Some(rest.split("  (").next()?.to_owned())
            })
            .collect();
        for line in &plan {
            let Some(scan) = line.split("Seq Scan on ").nth(1) else {
                continue;
            };
            let relation = scan.split("  (").next().unwrap_or(scan);
            let hot = ["cases ", "case_schedule ", "outbox "]
                .iter()
                .any(|table| relation.starts_with(table) || relation == table.trim_end());
            if hot && !targets.iter().any(|t| t == relation) {
                seq_scans.push(format!("{statement:?}: {}", line.trim()));
            }
        }
    }
    assert!(
        seq_scans.is_empty(),
        "generic plans that read every row: {seq_scans:#?}"
    );
}
