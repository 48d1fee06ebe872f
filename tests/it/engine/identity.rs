//! One order, one case, one assignment: an order named by its web order id,
//! by its sales order number or by both, in any order, in one intake batch
//! or in batches written at once, is worked by one case and assigned once.
//! Against real PostgreSQL and RabbitMQ and the simulator over HTTP.

use std::collections::BTreeMap;

use holdclear::commerce::HttpCommerce;
use holdclear::sim::{OrderSpec, Scenario, SimHandle};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

use super::*;
use crate::support::{bin, database_url, sim};

/// How an event names its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Naming {
    SalesOrder,
    WebOrder,
    Both,
}

/// One order of these tests: its sales order number and its web order id.
#[derive(Clone, Debug)]
struct TestOrder {
    so: String,
    web: String,
}

impl TestOrder {
    fn new(n: u64) -> Self {
        Self {
            so: format!("{n}"),
            web: format!("W{n}"),
        }
    }

    /// A held-order event for acme.com naming the order as `naming` says.
    fn event(&self, naming: Naming) -> HeldOrderEvent {
        let web = self.web.clone();
        held(&self.so, "acme.com", |v| {
            let data = &mut v["data"];
            data["webOrderId"] = json!(web);
            match naming {
                Naming::SalesOrder => {
                    data.as_object_mut().unwrap().remove("webOrderId");
                }
                Naming::WebOrder => {
                    data.as_object_mut().unwrap().remove("salesOrderNumber");
                }
                Naming::Both => {}
            }
        })
    }

    /// The simulator's order: both ids known; released on the second read
    /// after the assignment.
    fn spec(&self) -> OrderSpec {
        OrderSpec {
            sales_order_number: self.so.clone(),
            web_order_id: Some(self.web.clone()),
            ..OrderSpec::default()
        }
    }
}

fn scenario(orders: &[TestOrder]) -> Scenario {
    let mut s = Scenario::demo().expect("the demo scenario is valid");
    s.orders.extend(orders.iter().map(TestOrder::spec));
    s
}

async fn world(pool: PgPool, sim: &SimHandle, engines: usize) -> World {
    let apis = (0..engines)
        .map(|_| {
            Arc::new(HttpCommerce::new(&sim::settings(sim)).expect("the client builds"))
                as Arc<dyn CommerceApi>
        })
        .collect();
    World::start(pool, apis, fast_settings()).await
}

/// Every case of these orders, by order (its sales order number, or the
/// web order id a case that never learned it holds), with its state.
async fn cases_of(pool: &PgPool, orders: &[TestOrder]) -> BTreeMap<String, Vec<(Uuid, String)>> {
    let mut by_order: BTreeMap<String, Vec<(Uuid, String)>> = BTreeMap::new();
    for o in orders {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, state FROM cases WHERE sales_order_number = $1 OR web_order_id = $2 \
             ORDER BY created_at",
        )
        .bind(&o.so)
        .bind(&o.web)
        .fetch_all(pool)
        .await
        .unwrap();
        by_order.insert(o.so.clone(), rows);
    }
    by_order
}

/// Waits until every case of `orders` is terminal; returns them.
async fn settled(pool: &PgPool, orders: &[TestOrder]) -> BTreeMap<String, Vec<(Uuid, String)>> {
    wait_for(DEADLINE, "every case of the orders terminal", || async {
        let cases = cases_of(pool, orders).await;
        cases
            .values()
            .flatten()
            .all(|(_, state)| CaseState::parse(state).is_some_and(CaseState::is_terminal))
            .then_some(cases)
    })
    .await
}

/// What a user sees for each order: one assignment at the API, one case
/// that ends released (any other case of the order merged into it), one
/// `order.smart_account_assigned` and one `order.hold_released`.
async fn assert_once_each(w: &mut World, sim: &SimHandle, orders: &[TestOrder]) {
    let cases = settled(&w.pool, orders).await;
    let seen = w
        .events
        .until(DEADLINE, "a release per order", |s| {
            orders.iter().all(|o| {
                of_order(s, &o.so)
                    .iter()
                    .any(|e| e.routing_key == "order.hold_released")
            })
        })
        .await
        .to_vec();
    w.events.assert_quiet(Duration::from_millis(300)).await;
    let stats = sim.stats();
    for o in orders {
        assert_eq!(
            stats.assignments_of(&o.so),
            1,
            "order {} assigned once: {cases:#?}",
            o.so
        );
        let states: Vec<&str> = cases[&o.so].iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(
            states.iter().filter(|s| **s == "released").count(),
            1,
            "order {}: one released case, the others merged: {states:?}",
            o.so
        );
        assert!(
            states.iter().all(|s| *s == "released" || *s == "merged"),
            "order {}: {states:?}",
            o.so
        );
        let keys: Vec<&str> = of_order(&seen, &o.so)
            .iter()
            .map(|e| e.routing_key.as_str())
            .collect();
        assert_eq!(
            keys,
            ["order.smart_account_assigned", "order.hold_released"],
            "order {}",
            o.so
        );
    }
}

/// Records `events` as one intake batch.
async fn intake(store: &Store, events: &[HeldOrderEvent]) -> Vec<Recorded> {
    store.record_held(events).await.expect("intake records")
}

#[sqlx::test]
async fn an_order_named_by_web_order_id_then_by_sales_order_number_is_assigned_once(pool: PgPool) {
    let orders: Vec<TestOrder> = (0..5).map(|i| TestOrder::new(71_000_000 + i)).collect();
    let sim = sim::start(scenario(&orders)).await;
    // Both cases exist before the engines start.
    let store = Store::from_pool(pool.clone());
    for o in &orders {
        intake(&store, &[o.event(Naming::WebOrder)]).await;
        intake(&store, &[o.event(Naming::SalesOrder)]).await;
    }
    let mut w = world(pool, &sim, 2).await;
    w.wake.notify_one();
    assert_once_each(&mut w, &sim, &orders).await;
    // What an operator sees of a merged case: the case it joined.
    let cases = cases_of(&w.pool, &orders[..1]).await;
    let (released, merged) = match cases[&orders[0].so].as_slice() {
        [(a, sa), (b, sb)] if sa == "merged" && sb == "released" => (*b, *a),
        [(a, sa), (b, sb)] if sa == "released" && sb == "merged" => (*a, *b),
        other => panic!("two cases, one merged: {other:?}"),
    };
    let url = database_url(&w.pool).await;
    let out = bin()
        .args(["cases", "show", &merged.to_string(), "--json"])
        .env("HOLDCLEAR_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["case"]["state"], "merged");
    assert_eq!(shown["case"]["mergedInto"], json!(released));
    // By its web order id, the order's case is shown (it learned that id).
    let out = bin()
        .args(["cases", "show", &orders[0].web, "--json"])
        .env("HOLDCLEAR_DATABASE_URL", &url)
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["case"]["id"], json!(released));
    assert_eq!(shown["case"]["webOrderId"], json!(orders[0].web));
    w.stop().await;
}

#[sqlx::test]
async fn an_order_named_by_sales_order_number_then_by_web_order_id_is_assigned_once(pool: PgPool) {
    let orders: Vec<TestOrder> = (0..5).map(|i| TestOrder::new(72_000_000 + i)).collect();
    let sim = sim::start(scenario(&orders)).await;
    // Both cases exist before the engines start.
    let store = Store::from_pool(pool.clone());
    for o in &orders {
        intake(&store, &[o.event(Naming::SalesOrder)]).await;
        intake(&store, &[o.event(Naming::WebOrder)]).await;
    }
    let mut w = world(pool, &sim, 2).await;
    w.wake.notify_one();
    assert_once_each(&mut w, &sim, &orders).await;
    w.stop().await;
}

#[sqlx::test]
async fn events_of_one_order_by_different_ids_in_one_batch_open_one_case(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let o = TestOrder::new(73_000_000);
    // Linked only through the third event.
    let recorded = intake(
        &store,
        &[
            o.event(Naming::WebOrder),
            o.event(Naming::SalesOrder),
            o.event(Naming::Both),
        ],
    )
    .await;
    let Recorded::Opened { case_id } = recorded[0] else {
        panic!("{recorded:?}");
    };
    assert_eq!(
        recorded[1..],
        [
            Recorded::HeldAgain { case_id },
            Recorded::HeldAgain { case_id }
        ]
    );
    let case = store.case_by_id(case_id).await.unwrap().unwrap();
    assert_eq!(case.order_key, o.so);
    assert_eq!(
        case.case.order.web_order_id.as_ref().map(|w| w.as_str()),
        Some(o.web.as_str())
    );
}

#[sqlx::test]
async fn a_later_event_with_both_ids_teaches_the_open_case_its_other_id(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let o = TestOrder::new(74_000_000);
    let [Recorded::Opened { case_id }] = intake(&store, &[o.event(Naming::WebOrder)]).await[..]
    else {
        panic!("opened");
    };
    assert_eq!(
        intake(&store, &[o.event(Naming::Both)]).await,
        [Recorded::HeldAgain { case_id }]
    );
    // Known by both ids now: an event naming only the sales order joins it.
    assert_eq!(
        intake(&store, &[o.event(Naming::SalesOrder)]).await,
        [Recorded::HeldAgain { case_id }]
    );
    let case = store.case_by_id(case_id).await.unwrap().unwrap();
    assert_eq!(case.order_key, o.so);
    let history = store.case_history(case_id, 10).await.unwrap();
    assert_eq!(
        history[1].detail["learned"],
        json!({"salesOrderNumber": o.so}),
        "{history:#?}"
    );
}

/// The database refuses two open cases of one sales order number, or of one
/// web order id, whoever writes them.
#[sqlx::test]
async fn the_database_keeps_one_open_case_per_order_id(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let o = TestOrder::new(75_000_000);
    let [Recorded::Opened { case_id }] = intake(&store, &[o.event(Naming::Both)]).await[..] else {
        panic!("opened");
    };
    for (key, so, web) in [
        (o.so.clone(), Some(o.so.clone()), None),
        (format!("web:{}", o.web), None, Some(o.web.clone())),
        // An order key that does not follow from the ids.
        (
            "something-else".to_owned(),
            Some("75000099".to_owned()),
            None,
        ),
    ] {
        let err = sqlx::query(
            "INSERT INTO cases (id, order_key, sales_order_number, web_order_id, state, event_id, \
             event, hold_reason, held_at) \
             SELECT $1, $2, $3, $4, 'deciding', 'e', event, hold_reason, held_at FROM cases WHERE id = $5",
        )
        .bind(Uuid::new_v4())
        .bind(&key)
        .bind(&so)
        .bind(&web)
        .bind(case_id)
        .execute(&pool)
        .await
        .expect_err("refused");
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert!(
            matches!(code.as_deref(), Some("23505" | "23514")),
            "{key}: {err}"
        );
    }
}

/// Three writers at once (as three workers' intake), each with events of the
/// same orders named by other ids, while two engines work the cases: each
/// order ends with one case that is not merged, assigned once.
#[sqlx::test]
async fn three_intake_writers_at_once_give_each_order_one_case_and_one_assignment(pool: PgPool) {
    let orders: Vec<TestOrder> = (0..60).map(|i| TestOrder::new(76_000_000 + i)).collect();
    let sim = sim::start(scenario(&orders)).await;
    let mut w = world(pool.clone(), &sim, 2).await;
    let a: Vec<HeldOrderEvent> = orders.iter().map(|o| o.event(Naming::WebOrder)).collect();
    let b: Vec<HeldOrderEvent> = orders.iter().map(|o| o.event(Naming::Both)).collect();
    let c: Vec<HeldOrderEvent> = orders
        .iter()
        .rev()
        .map(|o| o.event(Naming::SalesOrder))
        .collect();
    let (ra, rb, rc) = tokio::join!(
        w.store.record_held(&a),
        w.store.record_held(&b),
        w.store.record_held(&c)
    );
    ra.unwrap();
    rb.unwrap();
    rc.unwrap();
    w.wake.notify_one();
    assert_once_each(&mut w, &sim, &orders).await;
    w.stop().await;
}

/// One interleaving: events naming one order, in batches, some written at
/// once by two writers, some sent again (redelivered: the same event id).
#[derive(Clone, Debug)]
struct Interleaving {
    /// Each batch: (naming, redelivery of an earlier event of this order?).
    batches: Vec<Vec<(Naming, bool)>>,
    /// Batch `i` is written together with batch `i + 1` when set.
    concurrent: Vec<bool>,
}

fn interleaving() -> impl Strategy<Value = Interleaving> {
    let naming = prop_oneof![
        Just(Naming::SalesOrder),
        Just(Naming::WebOrder),
        Just(Naming::Both)
    ];
    let batch = prop::collection::vec((naming, any::<bool>()), 1..4);
    (
        prop::collection::vec(batch, 1..5),
        prop::collection::vec(any::<bool>(), 5),
    )
        .prop_map(|(batches, concurrent)| Interleaving {
            batches,
            concurrent,
        })
}

/// For any interleaving of events naming one order by sales order number,
/// web order id or both (duplicates and redeliveries included, batches
/// written at once, the engine stepping meanwhile), the order is assigned at
/// most once and every case ends in exactly one terminal state.
#[sqlx::test]
async fn any_interleaving_of_ids_assigns_each_order_once(pool: PgPool) {
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let cases: Vec<Interleaving> = (0..runner.config().cases)
        .map(|_| {
            interleaving()
                .new_tree(&mut runner)
                .expect("a value")
                .current()
        })
        .collect();
    let orders: Vec<TestOrder> = (0..cases.len() as u64)
        .map(|i| TestOrder::new(77_000_000 + i))
        .collect();
    let sim = sim::start(scenario(&orders)).await;
    let w = world(pool.clone(), &sim, 2).await;
    // Every order's interleaving runs at once, beside the engines.
    let mut tasks = Vec::new();
    for (o, plan) in orders.iter().zip(cases.iter()) {
        let (o, plan, store, wake) = (o.clone(), plan.clone(), w.store.clone(), w.wake.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent: Vec<HeldOrderEvent> = Vec::new();
            let mut batches: Vec<Vec<HeldOrderEvent>> = Vec::new();
            for batch in &plan.batches {
                let events: Vec<HeldOrderEvent> = batch
                    .iter()
                    .map(|(naming, again)| match (again, sent.last()) {
                        (true, Some(earlier)) => earlier.clone(),
                        _ => o.event(*naming),
                    })
                    .collect();
                sent.extend(events.iter().cloned());
                batches.push(events);
            }
            let mut i = 0;
            while i < batches.len() {
                if plan.concurrent[i % plan.concurrent.len()] && i + 1 < batches.len() {
                    let (a, b) = tokio::join!(
                        store.record_held(&batches[i]),
                        store.record_held(&batches[i + 1])
                    );
                    a.unwrap();
                    b.unwrap();
                    i += 2;
                } else {
                    store.record_held(&batches[i]).await.unwrap();
                    i += 1;
                }
                wake.notify_one();
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    w.wake.notify_one();
    let settled = settled(&w.pool, &orders).await;
    let stats = sim.stats();
    for (o, plan) in orders.iter().zip(cases.iter()) {
        assert!(
            stats.assignments_of(&o.so) <= 1,
            "order {} assigned {} times for {plan:?}: {:?}",
            o.so,
            stats.assignments_of(&o.so),
            settled[&o.so]
        );
        let states: Vec<&str> = settled[&o.so].iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(
            states.iter().filter(|s| **s != "merged").count(),
            1,
            "order {}: one case that is not merged, for {plan:?}: {states:?}",
            o.so
        );
    }
    w.stop().await;
}

/// The same hold announced again after its case ended is that case's (it
/// starts nothing); a hold applied after the case ended is a new case.
#[sqlx::test]
async fn an_event_of_an_ended_hold_joins_its_case_and_a_new_hold_opens_one(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let o = TestOrder::new(78_000_000);
    let [Recorded::Opened { case_id }] = intake(&store, &[o.event(Naming::Both)]).await[..] else {
        panic!("opened");
    };
    sqlx::query(
        "WITH c AS (UPDATE cases SET state = 'escalated', escalation_reason = 'NO_RULE_MATCHED', \
         closed_at = now() WHERE id = $1 RETURNING id) \
         DELETE FROM case_schedule WHERE case_id IN (SELECT id FROM c)",
    )
    .bind(case_id)
    .execute(&pool)
    .await
    .unwrap();
    // heldAt 30 s ago: before the case ended. By the web order id alone too.
    assert_eq!(
        intake(&store, &[o.event(Naming::WebOrder)]).await,
        [Recorded::HeldAgain { case_id }]
    );
    let later = held(&o.so, "acme.com", |v| {
        v["data"]["heldAt"] = json!((Utc::now() + chrono::Duration::seconds(1)).to_rfc3339());
    });
    let [Recorded::Opened { case_id: new }] = intake(&store, &[later]).await[..] else {
        panic!("a new hold opens a new case");
    };
    assert_ne!(new, case_id);
}

/// An event written while its order's case is being ended (the engine's
/// commit holds the row) joins that case once it has ended: intake reads
/// the case again after the lock, and sees it ended, not gone. Before, the
/// case dropped out of the open ones when the lock came free and was
/// missing from the ended ones too (read before the commit), so the event
/// opened a second case for the same hold, which escalated again.
#[sqlx::test]
async fn an_event_written_while_its_case_ends_joins_that_case(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let o = TestOrder::new(78_100_000);
    let [Recorded::Opened { case_id }] = intake(&store, &[o.event(Naming::SalesOrder)]).await[..]
    else {
        panic!("opened");
    };
    // The engine's escalation, committed only once intake waits on it.
    let mut ending = pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE cases SET state = 'escalated', escalation_reason = 'NO_RULE_MATCHED', \
         closed_at = now() WHERE id = $1",
    )
    .bind(case_id)
    .execute(&mut *ending)
    .await
    .unwrap();
    let writer = {
        let store = store.clone();
        let event = o.event(Naming::Both);
        tokio::spawn(async move { store.record_held(&[event]).await })
    };
    crate::support::wait_for(
        Duration::from_secs(10),
        "intake waiting on the case",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE '%WITH input AS%' \
               AND datname = current_database()",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
    ending.commit().await.unwrap();
    let recorded = writer.await.unwrap().expect("intake records");
    assert_eq!(recorded, [Recorded::HeldAgain { case_id }]);
    let cases: i64 = sqlx::query_scalar("SELECT count(*) FROM cases")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(cases, 1, "one case for one hold");
}
