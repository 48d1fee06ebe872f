//! Whole cases end to end: the engine and the relay against the
//! commerce-API simulator over real HTTP (the project's client), with the
//! events read off the events exchange and checked against the contract.
//! One test per escalation reason the simulator can produce
//! (`ASSIGNMENT_REJECTED`: see `scripted.rs`).

use holdclear::commerce::HttpCommerce;
use holdclear::config::CommerceSettings;
use holdclear::sim::{EndpointFaults, HoldsField, OrderSpec, Scenario, SimEndpoint, SimHandle};

use super::*;
use crate::support::sim::stats_over_http;
use crate::support::{bin, database_url, sim};

/// The demo scenario (acme.com, the decoy notacme.com, initech.com PENDING,
/// globex-holding.com HOLDING, hooli.com INACTIVE, one order per behaviour).
pub(super) fn demo() -> Scenario {
    Scenario::demo().expect("the demo scenario is valid")
}

fn client(sim: &SimHandle, timeout: Duration) -> Arc<dyn CommerceApi> {
    let settings = CommerceSettings {
        request_timeout: timeout,
        ..sim::settings(sim)
    };
    Arc::new(HttpCommerce::new(&settings).expect("the client builds"))
}

/// A simulator with `scenario` and `engines` engines (one client each).
pub(super) async fn start(
    pool: PgPool,
    scenario: Scenario,
    engines: usize,
    settings: EngineSettings,
) -> (SimHandle, World) {
    let sim = sim::start(scenario).await;
    let apis = (0..engines)
        .map(|_| client(&sim, Duration::from_millis(500)))
        .collect();
    let world = World::start(pool, apis, settings).await;
    (sim, world)
}

/// Opens one case, waits for its escalation and checks the event: one
/// `order.hold_escalated`, the reason, level `critical`, the operator's
/// action, the detail, the ids.
async fn escalates(
    pool: PgPool,
    scenario: Scenario,
    settings: EngineSettings,
    ev: HeldOrderEvent,
    reason: EscalationReason,
) -> SimHandle {
    let (sim, mut w) = start(pool, scenario, 1, settings).await;
    let so = ev.data.order.key();
    let id = w.open(&ev).await;
    let r = w.wait_state(id, CaseState::Escalated).await;
    assert_eq!(r.case.stage.escalation_reason(), Some(reason), "order {so}");
    let seen = w
        .events
        .until(DEADLINE, "the escalation event", |s| {
            of_order(s, &so)
                .iter()
                .any(|e| e.routing_key == "order.hold_escalated")
        })
        .await
        .to_vec();
    w.events.assert_quiet(Duration::from_millis(300)).await;
    for e in &w.events.seen {
        assert_contract(e);
    }
    let escalations: Vec<&Received> = of_order(&seen, &so)
        .into_iter()
        .filter(|e| e.routing_key == "order.hold_escalated")
        .collect();
    assert_eq!(escalations.len(), 1, "{seen:#?}");
    let e = escalations[0];
    assert_eq!(e.data("reason"), &json!(reason.as_str()));
    assert_eq!(e.data("level"), &json!("critical"));
    assert_eq!(e.data("action"), &json!(reason.action()));
    assert_eq!(e.data("caseId"), &json!(id.to_string()));
    assert_eq!(e.body["subject"], json!(so));
    assert!(!e.data("detail").as_str().unwrap_or_default().is_empty());
    w.stop().await;
    sim
}

/// The events of case `id` up to its terminal one (a release, or an
/// escalation other than `HOLD_PERSISTS`), each checked against the contract.
pub(super) async fn events_until_settled(w: &mut World, id: Uuid) -> Vec<Received> {
    let case = id.to_string();
    let settles = |e: &Received| {
        e.data("caseId") == case.as_str()
            && (e.routing_key == "order.hold_released"
                || (e.routing_key == "order.hold_escalated" && e.data("reason") != "HOLD_PERSISTS"))
    };
    let seen = w
        .events
        .until(DEADLINE, "the case's terminal event", |s| {
            s.iter().any(settles)
        })
        .await
        .to_vec();
    let mine: Vec<Received> = seen
        .into_iter()
        .filter(|e| e.data("caseId") == case.as_str())
        .collect();
    for e in &mine {
        assert_contract(e);
    }
    mine
}

pub(super) fn routing_keys(events: &[Received]) -> Vec<&str> {
    events.iter().map(|e| e.routing_key.as_str()).collect()
}

/// An event naming only a web order id: Cisco's search answers every order
/// whose web order id *contains* it. Here no order carries exactly this
/// one, so the order is not found; the order that merely contains it
/// (104233871, web order id 98765432) is never assigned.
#[sqlx::test]
async fn a_web_order_id_found_only_inside_another_ones_is_not_found(pool: PgPool) {
    let mut scenario = demo();
    scenario.defaults.create_unknown = false;
    let (sim, mut w) = start(pool, scenario, 1, fast_settings()).await;
    let ev = held_by_web_order_id("8765432", "acme.com");
    let id = w.open(&ev).await;
    let events = events_until_settled(&mut w, id).await;
    assert_eq!(
        routing_keys(&events),
        ["order.hold_escalated"],
        "{events:#?}"
    );
    assert_eq!(events[0].data("reason"), "ORDER_NOT_ACCESSIBLE");
    assert_eq!(events[0].data("level"), "critical");
    assert_eq!(events[0].data("webOrderId"), "8765432");
    assert_eq!(
        events[0].data("salesOrderNumber"),
        &Value::Null,
        "no sales order number was taken from another order"
    );
    let stats = stats_over_http(&sim).await;
    assert_eq!(stats.assignments_of("104233871"), 0, "{stats:?}");
    assert_eq!(stats.total_assignments(), 0, "{stats:?}");
    w.stop().await;
}

/// Two orders carry exactly the web order id the event names: the worker
/// cannot tell which is the held one and escalates `AMBIGUOUS_MATCH` with
/// both in the detail, assigning neither.
#[sqlx::test]
async fn two_orders_with_the_events_web_order_id_are_ambiguous(pool: PgPool) {
    let mut scenario = demo();
    scenario.orders.push(OrderSpec {
        sales_order_number: "500051".into(),
        web_order_id: Some("98765432".into()),
        ..OrderSpec::default()
    });
    let (sim, mut w) = start(pool, scenario, 1, fast_settings()).await;
    let ev = held_by_web_order_id("98765432", "acme.com");
    let id = w.open(&ev).await;
    let events = events_until_settled(&mut w, id).await;
    assert_eq!(
        routing_keys(&events),
        ["order.hold_escalated"],
        "{events:#?}"
    );
    let e = &events[0];
    assert_eq!(e.data("reason"), "AMBIGUOUS_MATCH");
    assert_eq!(e.data("level"), "critical");
    let detail = e.data("detail").as_str().unwrap_or_default();
    assert!(
        detail.contains("104233871") && detail.contains("500051"),
        "the candidates are listed: {detail}"
    );
    let r = w.case(id).await;
    assert_eq!(
        r.case.stage.escalation_reason().map(|r| r.as_str()),
        Some("AMBIGUOUS_MATCH")
    );
    let stats = stats_over_http(&sim).await;
    assert_eq!(stats.total_assignments(), 0, "{stats:?}");
    w.stop().await;
}

/// A rule naming the account by name, and two ACTIVE accounts of exactly
/// that name (the demo's Umbrella Corporation): `AMBIGUOUS_MATCH` with both
/// candidates, never the first of them.
#[sqlx::test]
async fn two_active_accounts_of_the_rules_name_are_ambiguous(pool: PgPool) {
    let sim = sim::start(demo()).await;
    let by_name = Arc::new(|_: &HeldOrder| -> Option<Decision> {
        Some(Decision {
            rule: "by-name".into(),
            rules_hash: "0123abcd".into(),
            target: Target {
                account: AccountSelector::Name("Umbrella Corporation".into()),
                account_type: AccountType::Customer,
                virtual_account: VirtualAccountChoice::AccountDefault,
            },
            fallback: Some(Target {
                account: AccountSelector::Domain(Domain::parse(HOLDING).unwrap()),
                account_type: AccountType::Holding,
                virtual_account: VirtualAccountChoice::Named("Holding".into()),
            }),
        })
    });
    let mut w = World::start_with(
        pool,
        vec![client(&sim, Duration::from_millis(500))],
        by_name,
        fast_settings(),
        crate::support::topology(&unique("engine")),
    )
    .await;
    let id = w.open(&held("500052", "umbrella.com", |_| {})).await;
    let events = events_until_settled(&mut w, id).await;
    assert_eq!(
        routing_keys(&events),
        ["order.hold_escalated"],
        "{events:#?}"
    );
    let e = &events[0];
    assert_eq!(e.data("reason"), "AMBIGUOUS_MATCH");
    assert_eq!(e.data("level"), "critical");
    let detail = e.data("detail").as_str().unwrap_or_default();
    assert!(
        detail.contains("SA-300001") && detail.contains("SA-300002"),
        "the candidates are listed: {detail}"
    );
    let stats = stats_over_http(&sim).await;
    assert_eq!(
        stats.calls(SimEndpoint::Assign),
        0,
        "neither the first match nor the fallback: {stats:?}"
    );
    w.stop().await;
}

/// An order answer without `holds` (or with `holds: null`) says nothing
/// about the hold. The watch retries it as an unreadable answer and, since
/// it stays so, ends in `RETRIES_EXHAUSTED` naming the missing holds; it is
/// never reported released.
#[sqlx::test]
async fn an_order_answer_without_holds_is_never_a_release(pool: PgPool) {
    let mut scenario = demo();
    for (so, field) in [
        ("500060", HoldsField::Missing),
        ("500061", HoldsField::Null),
    ] {
        scenario.orders.push(OrderSpec {
            sales_order_number: so.into(),
            holds_field: Some(field),
            ..OrderSpec::default()
        });
    }
    let mut settings = fast_settings();
    settings.retry.max_elapsed = Duration::from_millis(800);
    let (sim, mut w) = start(pool, scenario, 1, settings).await;
    for so in ["500060", "500061"] {
        let id = w.open(&held(so, "acme.com", |_| {})).await;
        let events = events_until_settled(&mut w, id).await;
        assert_eq!(
            routing_keys(&events),
            ["order.smart_account_assigned", "order.hold_escalated"],
            "order {so}: {events:#?}"
        );
        let e = &events[1];
        assert_eq!(e.data("reason"), "RETRIES_EXHAUSTED", "order {so}");
        let detail = e.data("detail").as_str().unwrap_or_default();
        assert!(detail.contains("holds"), "order {so}: {detail}");
        let r = w.case(id).await;
        assert_eq!(r.case.state(), CaseState::Escalated, "order {so}");
        assert_eq!(r.case.stage.released_at(), None, "order {so}");
        let stats = stats_over_http(&sim).await;
        assert_eq!(stats.assignments_of(so), 1, "order {so}: {stats:?}");
    }
    let stats = stats_over_http(&sim).await;
    assert!(
        stats.calls(SimEndpoint::Order) > 4,
        "the unreadable answers were retried: {stats:?}"
    );
    w.stop().await;
}

#[sqlx::test]
async fn a_held_order_is_assigned_then_released(pool: PgPool) {
    let (sim, mut w) = start(pool, demo(), 1, fast_settings()).await;
    // The contract's example order: a credit hold too, released on the second read.
    let id = w.open(&held("104233871", "acme.com", |_| {})).await;
    let done = w.wait_state(id, CaseState::Released).await;
    let seen = w
        .events
        .until(DEADLINE, "assigned and released", |s| s.len() >= 2)
        .await
        .to_vec();
    w.events.assert_quiet(Duration::from_millis(300)).await;
    for e in &seen {
        assert_contract(e);
    }
    assert_eq!(
        seen.iter()
            .map(|e| e.routing_key.as_str())
            .collect::<Vec<_>>(),
        ["order.smart_account_assigned", "order.hold_released"]
    );
    let (assigned, released) = (&seen[0], &seen[1]);
    assert_eq!(assigned.data("salesOrderNumber"), &json!("104233871"));
    assert_eq!(assigned.data("webOrderId"), &json!("W104233871"));
    assert_eq!(
        assigned.data("smartAccountDomain"),
        &json!("acme.com"),
        "the exact match, not the decoy notacme.com"
    );
    assert_eq!(assigned.data("accountType"), &json!("CUSTOMER"));
    assert_eq!(assigned.data("virtualAccountName"), &json!("DEFAULT"));
    assert_eq!(assigned.data("rule"), &json!("by-domain"));
    assert_eq!(assigned.data("attempts"), &json!(1));
    assert!(
        assigned
            .data("assignmentId")
            .as_str()
            .is_some_and(|a| !a.is_empty()),
        "{assigned:#?}"
    );
    assert_eq!(released.data("otherHolds"), &json!(["CREDIT_HOLD"]));
    assert_eq!(released.data("smartAccountDomain"), &json!("acme.com"));
    // Held 30 s before the event; the simulator reports whole seconds.
    assert!(released.data("heldSeconds").as_i64().unwrap() >= 29);
    assert_ne!(assigned.message_id, released.message_id);
    let stats = sim.stats();
    assert_eq!(stats.assignments_of("104233871"), 1);
    assert_eq!(
        done.case
            .stage
            .progress()
            .assignment
            .map(|a| a.id)
            .as_deref(),
        assigned.data("assignmentId").as_str()
    );
    let history = w.store.case_history(id, 100).await.unwrap();
    let calls: Vec<&str> = history
        .iter()
        .filter(|h| h.kind == "call")
        .map(|h| h.detail["call"].as_str().unwrap())
        .collect();
    assert_eq!(
        calls,
        [
            "rules.decide",
            "find_account",
            "virtual_accounts",
            "assign",
            "read_order",
            "read_order"
        ]
    );
    w.stop().await;
}

#[sqlx::test]
async fn a_pending_account_falls_back_to_the_holding_account(pool: PgPool) {
    let (sim, mut w) = start(pool, demo(), 1, fast_settings()).await;
    // On hold because initech.com is PENDING; the partner's rule falls back.
    let ev = held("104233872", "initech.com", |v| {
        v["data"]["holdReason"] = json!("PENDING_SMART_ACCOUNT");
        v["data"]["smartAccount"] = json!({"domain": "initech.com", "status": "PENDING"});
        v["data"]["partner"]["id"] = json!("P-FB");
    });
    let id = w.open(&ev).await;
    let done = w.wait_state(id, CaseState::Released).await;
    let target = done.case.stage.progress().target.unwrap();
    assert_eq!(
        (
            target.smart_account_domain.as_str(),
            target.account_type,
            target.via_fallback
        ),
        (HOLDING, AccountType::Holding, true)
    );
    let seen = w
        .events
        .until(DEADLINE, "assigned and released", |s| s.len() >= 2)
        .await
        .to_vec();
    for e in &seen {
        assert_contract(e);
    }
    let assigned = &seen[0];
    assert_eq!(assigned.routing_key, "order.smart_account_assigned");
    assert_eq!(assigned.data("smartAccountDomain"), &json!(HOLDING));
    assert_eq!(assigned.data("accountType"), &json!("HOLDING"));
    assert_eq!(assigned.data("virtualAccountName"), &json!("Holding"));
    assert_eq!(seen[1].routing_key, "order.hold_released");
    assert_eq!(seen[1].data("smartAccountDomain"), &json!(HOLDING));
    assert_eq!(sim.stats().assignments_of("104233872"), 1);
    w.stop().await;
}

#[sqlx::test]
async fn the_hold_is_released_after_several_reads(pool: PgPool) {
    let mut scenario = demo();
    scenario.orders.push(OrderSpec {
        sales_order_number: "500010".into(),
        release_after_reads: Some(4),
        ..OrderSpec::default()
    });
    let (sim, mut w) = start(pool, scenario, 1, fast_settings()).await;
    let id = w.open(&held("500010", "acme.com", |_| {})).await;
    let done = w.wait_state(id, CaseState::Released).await;
    assert_eq!(
        done.case.polls, 3,
        "three looks found the hold on, the fourth released"
    );
    let stats = sim.stats();
    assert_eq!(stats.assignments_of("500010"), 1);
    assert_eq!(stats.calls(SimEndpoint::Order), 4);
    w.events
        .until(DEADLINE, "the release", |s| {
            s.iter().any(|e| e.routing_key == "order.hold_released")
        })
        .await;
    w.stop().await;
}

#[sqlx::test]
async fn no_rule_matched(pool: PgPool) {
    let ev = held("500001", "nomatch.example", |_| {});
    let sim = escalates(
        pool,
        demo(),
        fast_settings(),
        ev,
        EscalationReason::NoRuleMatched,
    )
    .await;
    assert_eq!(
        sim.stats().calls(SimEndpoint::Search),
        0,
        "nothing was called"
    );
}

#[sqlx::test]
async fn smart_account_not_found(pool: PgPool) {
    // "cme.com" is a substring of acme.com and notacme.com: the search finds
    // both, neither is an exact match.
    let ev = held("500002", "cme.com", |_| {});
    let sim = escalates(
        pool,
        demo(),
        fast_settings(),
        ev,
        EscalationReason::SmartAccountNotFound,
    )
    .await;
    assert_eq!(sim.stats().calls(SimEndpoint::Assign), 0);
}

#[sqlx::test]
async fn smart_account_not_active(pool: PgPool) {
    let ev = held("500003", "hooli.com", |_| {});
    let sim = escalates(
        pool,
        demo(),
        fast_settings(),
        ev,
        EscalationReason::SmartAccountNotActive,
    )
    .await;
    assert_eq!(sim.stats().calls(SimEndpoint::Assign), 0);
}

#[sqlx::test]
async fn virtual_account_not_found(pool: PgPool) {
    // The rule names acme.com's "Network" virtual account, which is PRIVATE.
    let ev = held("500004", "acme.com", |v| {
        v["data"]["partner"]["id"] = json!("P-VA-NETWORK");
    });
    let sim = escalates(
        pool,
        demo(),
        fast_settings(),
        ev,
        EscalationReason::VirtualAccountNotFound,
    )
    .await;
    assert_eq!(sim.stats().calls(SimEndpoint::Assign), 0);
}

#[sqlx::test]
async fn order_not_accessible(pool: PgPool) {
    // The demo's order the API user may not see: 403 ORDER_ACCESS_DENIED.
    let ev = held("104233874", "acme.com", |_| {});
    let sim = escalates(
        pool,
        demo(),
        fast_settings(),
        ev,
        EscalationReason::OrderNotAccessible,
    )
    .await;
    assert_eq!(sim.stats().assignments_of("104233874"), 0);
}

#[sqlx::test]
async fn assignment_locked(pool: PgPool) {
    // The demo's locked order: 409 ASSIGNMENT_LOCKED.
    let ev = held("104233876", "acme.com", |_| {});
    let sim = escalates(
        pool,
        demo(),
        fast_settings(),
        ev,
        EscalationReason::AssignmentLocked,
    )
    .await;
    assert_eq!(sim.stats().calls(SimEndpoint::Assign), 1);
}

#[sqlx::test]
async fn a_stocking_order_is_locked_without_a_call(pool: PgPool) {
    let ev = held("104233877", "acme.com", |v| {
        v["data"]["orderType"] = json!("STOCKING");
    });
    let sim = escalates(
        pool,
        demo(),
        fast_settings(),
        ev,
        EscalationReason::AssignmentLocked,
    )
    .await;
    let stats = sim.stats();
    for endpoint in SimEndpoint::API {
        assert_eq!(stats.calls(endpoint), 0, "{endpoint}");
    }
}

#[sqlx::test]
async fn retries_exhausted(pool: PgPool) {
    let mut scenario = demo();
    scenario.faults.assign = EndpointFaults {
        error_rate: 1.0,
        ..EndpointFaults::default()
    };
    let mut settings = fast_settings();
    settings.retry.max_elapsed = Duration::from_millis(800);
    let ev = held("500008", "acme.com", |_| {});
    let sim = escalates(
        pool,
        scenario,
        settings,
        ev,
        EscalationReason::RetriesExhausted,
    )
    .await;
    let stats = sim.stats();
    assert!(stats.calls(SimEndpoint::Assign) > 1, "{stats:?}");
    assert_eq!(stats.assignments_of("500008"), 0);
}

#[sqlx::test]
async fn hold_persists(pool: PgPool) {
    // The demo's order whose hold never lifts after a valid assignment.
    let (sim, mut w) = start(pool, demo(), 1, fast_settings()).await;
    let id = w.open(&held("104233873", "acme.com", |_| {})).await;
    let seen = w
        .events
        .until(DEADLINE, "both HOLD_PERSISTS levels", |s| {
            s.iter()
                .filter(|e| e.data("reason") == "HOLD_PERSISTS")
                .count()
                == 2
        })
        .await
        .to_vec();
    for e in &seen {
        assert_contract(e);
    }
    let persists: Vec<&Received> = seen
        .iter()
        .filter(|e| e.data("reason") == "HOLD_PERSISTS")
        .collect();
    assert_eq!(persists[0].data("level"), &json!("warning"));
    assert_eq!(persists[1].data("level"), &json!("critical"));
    assert_eq!(
        persists[0].data("action"),
        &json!(EscalationReason::HoldPersists.action())
    );
    assert_ne!(persists[0].message_id, persists[1].message_id);
    assert_eq!(seen[0].routing_key, "order.smart_account_assigned");
    let r = w.case(id).await;
    assert_eq!(r.case.state(), CaseState::Watching, "still watched");
    assert_eq!(r.case.escalation_level, 2);
    // No further escalation: each level once.
    w.events.assert_quiet(Duration::from_millis(600)).await;
    assert_eq!(sim.stats().assignments_of("104233873"), 1);
    w.stop().await;
}

#[sqlx::test]
async fn transient_faults_end_in_one_assignment_per_order(pool: PgPool) {
    let mut scenario = demo();
    let flaky = EndpointFaults {
        error_rate: 0.2,
        timeout_rate: 0.05,
        hang: Duration::from_millis(800),
        throttle_rate: 0.02,
        retry_after_secs: 1,
        ..EndpointFaults::default()
    };
    for endpoint in SimEndpoint::API {
        *scenario.faults.get_mut(endpoint) = flaky.clone();
    }
    scenario.faults.assign.lost_response_rate = 0.3;
    let (sim, mut w) = start(pool, scenario, 1, fast_settings()).await;
    let orders: Vec<String> = (0..30).map(|n| format!("6000{n:02}")).collect();
    let mut ids = Vec::new();
    for so in &orders {
        ids.push(w.open(&held(so, "acme.com", |_| {})).await);
    }
    for id in &ids {
        wait_for(Duration::from_secs(60), "every case released", || async {
            let r = w.case(*id).await;
            assert_ne!(r.case.state(), CaseState::Escalated, "{r:?}");
            (r.case.state() == CaseState::Released).then_some(())
        })
        .await;
    }
    let stats = sim.stats();
    for so in &orders {
        assert_eq!(
            stats.assignments_of(so),
            1,
            "order {so}: exactly one assignment"
        );
    }
    let failures: u64 = SimEndpoint::API
        .iter()
        .map(|e| {
            stats.responses(*e, 503)
                + stats.responses(*e, 502)
                + stats.responses(*e, 504)
                + stats.responses(*e, 429)
        })
        .sum();
    assert!(failures > 0, "faults were injected: {stats:?}");
    let seen = w
        .events
        .until(DEADLINE, "every release", |s| {
            s.iter()
                .filter(|e| e.routing_key == "order.hold_released")
                .count()
                == orders.len()
        })
        .await
        .to_vec();
    let assigned = seen
        .iter()
        .filter(|e| e.routing_key == "order.smart_account_assigned")
        .count();
    assert_eq!(assigned, orders.len(), "one assigned event per order");
    w.stop().await;
}

#[sqlx::test]
async fn two_engines_assign_each_of_500_orders_once(pool: PgPool) {
    let mut settings = fast_settings();
    settings.batch_size = 16;
    let (sim, mut w) = start(pool.clone(), demo(), 2, settings).await;
    let orders: Vec<String> = (0..500).map(|n| format!("7{n:05}")).collect();
    let started = std::time::Instant::now();
    for so in &orders {
        open_case(&pool, &held(so, "acme.com", |_| {})).await;
    }
    w.wake.notify_one();
    wait_for(Duration::from_secs(90), "500 released cases", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM cases WHERE state = 'released'")
            .fetch_one(&pool)
            .await
            .unwrap();
        (n == 500).then_some(())
    })
    .await;
    let took = started.elapsed();
    let stats = sim.stats();
    assert_eq!(stats.assignments.len(), 500);
    assert!(
        stats.assignments.values().all(|n| *n == 1),
        "each order assigned once"
    );
    let seen = w
        .events
        .until(Duration::from_secs(60), "1000 events", |s| s.len() >= 1000)
        .await
        .to_vec();
    let ids: std::collections::HashSet<&str> = seen
        .iter()
        .filter_map(|e| e.message_id.as_deref())
        .collect();
    assert_eq!(ids.len(), 1000, "no duplicate envelope ids");
    for e in seen.iter().step_by(50) {
        assert_contract(e);
    }
    let workers: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT split_part(detail->>'worker', '#', 1) FROM case_history \
         WHERE kind = 'call' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(workers.len(), 2, "both engines stepped cases: {workers:?}");
    eprintln!(
        "500 orders through two engines and the simulator: {:.1} s, {:.0} cases/s",
        took.as_secs_f64(),
        500.0 / took.as_secs_f64()
    );
    w.stop().await;
}

#[sqlx::test]
async fn a_dead_workers_case_resumes_when_its_lease_runs_out(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let id = open_case(&pool, &held("500020", "acme.com", |_| {})).await;
    // A worker claims the case and dies.
    let claimed = store
        .claim_due("dead#1", Duration::from_millis(500), 1)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let started = std::time::Instant::now();
    let (sim, w) = start(pool, demo(), 1, fast_settings()).await;
    w.wait_state(id, CaseState::Released).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not before the lease ran out"
    );
    assert_eq!(sim.stats().assignments_of("500020"), 1);
    w.stop().await;
}

#[sqlx::test]
async fn cases_cli_lists_shows_and_retries(pool: PgPool) {
    let (sim, w) = start(pool.clone(), demo(), 1, fast_settings()).await;
    // initech.com is PENDING and the rule has no fallback for this partner.
    let id = w.open(&held("500030", "initech.com", |_| {})).await;
    w.wait_state(id, CaseState::Escalated).await;
    let url = database_url(&pool).await;
    let run = |args: &[&str]| {
        let out = bin()
            .arg("cases")
            .args(args)
            .env("HOLDCLEAR_DATABASE_URL", &url)
            .env("HOLDCLEAR_LOG_FORMAT", "json")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, out, err) = run(&["list", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let rows: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["order"], "500030");
    assert_eq!(rows[0]["state"], "escalated");
    assert_eq!(rows[0]["escalationReason"], "SMART_ACCOUNT_NOT_ACTIVE");
    let (code, out, _) = run(&["list", "--state", "escalated"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("500030") && out.contains("SMART_ACCOUNT_NOT_ACTIVE"),
        "{out}"
    );
    let (code, out, _) = run(&["list", "--state", "released"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("No cases."), "{out}");
    let (code, _, err) = run(&["list", "--state", "sleeping"]);
    assert_ne!(code, Some(0), "an unknown state is refused");
    assert!(err.contains("deciding, resolving"), "{err}");

    let (code, out, err) = run(&["show", "500030"]);
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        "by-domain",
        "find_account",
        "PENDING",
        "SMART_ACCOUNT_NOT_ACTIVE",
        "order.hold_escalated",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
    let (code, out, _) = run(&["show", "500030", "--json"]);
    assert_eq!(code, Some(0));
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["case"]["state"], "escalated");
    assert_eq!(shown["case"]["decision"]["rule"], "by-domain");
    assert!(shown["history"].as_array().unwrap().len() >= 4);
    assert_eq!(shown["events"][0]["routingKey"], "order.hold_escalated");
    let (code, _, err) = run(&["show", "99999"]);
    assert_eq!(code, Some(64), "{err}");
    let (code, _, err) = run(&["retry", "99999"]);
    assert_eq!(code, Some(64), "{err}");

    // The customer activates the account; the operator re-runs the case.
    let mut activated = demo();
    for a in &mut activated.accounts {
        if a.domain == "initech.com" {
            a.status = "ACTIVE".into();
        }
    }
    sim.reset(activated).unwrap();
    let (code, out, err) = run(&["retry", "500030"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deciding"), "{out}");
    w.wake.notify_one();
    let done = w.wait_state(id, CaseState::Released).await;
    assert_eq!(done.case.generation, 1);
    assert_eq!(sim.stats().assignments_of("500030"), 1);
    // Released now: a second retry is refused with exit 64.
    let (code, _, err) = run(&["retry", "500030"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("not escalated"), "{err}");
    // The re-run's events have ids of their own.
    let ids: Vec<Uuid> = w
        .store
        .outbox_of_case(id)
        .await
        .unwrap()
        .iter()
        .map(|r| r.envelope_id)
        .collect();
    let distinct: std::collections::HashSet<&Uuid> = ids.iter().collect();
    assert_eq!(ids.len(), 3, "escalated, assigned, released");
    assert_eq!(distinct.len(), 3);
    w.stop().await;
}

/// The whole path: held-order events published to RabbitMQ, taken by the
/// worker's consumer and intake, decided by the shipped rules file, assigned
/// through the simulator, published on the events exchange. A second engine
/// and relay run beside the in-process worker's own, on the same database,
/// as a second replica's would.
#[sqlx::test]
async fn through_rabbitmq_intake_and_the_shipped_rules(pool: PgPool) {
    use holdclear::rules::{Rules, RulesHandle};

    use crate::support::broker::{Rabbit, held_event};
    use crate::support::{repo_path, settings as worker_settings, worker};

    let prefix = unique("e2e");
    let rabbit = Rabbit::new(&prefix).await;
    let sim = sim::start(demo()).await;
    let rules = Rules::load(&repo_path("deploy/config/rules.toml")).expect("the shipped rules");
    let hash = rules.hash().to_owned();
    let url = database_url(&pool).await;
    // The worker's own engine steps cases too: against the same simulator,
    // at the same pace as the engine beside it.
    let mut settings = worker_settings(&url, &prefix, &[]);
    settings.commerce = sim::settings(&sim);
    settings.engine = fast_settings();
    let worker = worker::start(settings).await;
    let mut w = World::start_with(
        pool.clone(),
        vec![client(&sim, Duration::from_millis(500))],
        Arc::new(RulesHandle::new(rules)),
        fast_settings(),
        rabbit.topology.clone(),
    )
    .await;

    // The contract's sample (acme.com), sent twice; initech.com's pending
    // account with the partner's holding fallback; hooli.com, inactive.
    let acme = held_event(&Uuid::new_v4().to_string(), "104233871");
    let mut initech = held_event(&Uuid::new_v4().to_string(), "104233872");
    initech["data"]["holdReason"] = json!("PENDING_SMART_ACCOUNT");
    initech["data"]["smartAccount"] = json!({"domain": "initech.com", "status": "PENDING"});
    initech["data"]["endCustomer"]["email"] = json!("it@initech.com");
    let mut hooli = held_event(&Uuid::new_v4().to_string(), "500040");
    hooli["data"]["endCustomer"]["email"] = json!("it@hooli.com");
    hooli["data"]["partner"]["id"] = json!("P-200");
    rabbit
        .publish_events(&[acme.clone(), initech, hooli, acme])
        .await;

    let seen = w
        .events
        .until(
            Duration::from_secs(30),
            "two releases and an escalation",
            |s| {
                s.iter()
                    .filter(|e| e.routing_key == "order.hold_released")
                    .count()
                    == 2
                    && s.iter().any(|e| e.routing_key == "order.hold_escalated")
            },
        )
        .await
        .to_vec();
    w.events.assert_quiet(Duration::from_millis(500)).await;
    for e in &seen {
        assert_contract(e);
    }
    let keys = |so: &str| -> Vec<String> {
        of_order(&seen, so)
            .iter()
            .map(|e| e.routing_key.clone())
            .collect()
    };
    assert_eq!(
        keys("104233871"),
        ["order.smart_account_assigned", "order.hold_released"]
    );
    assert_eq!(
        keys("104233872"),
        ["order.smart_account_assigned", "order.hold_released"]
    );
    assert_eq!(keys("500040"), ["order.hold_escalated"]);
    let acme_assigned = of_order(&seen, "104233871")[0];
    assert_eq!(acme_assigned.data("rule"), &json!("acme-direct"));
    assert_eq!(acme_assigned.data("smartAccountDomain"), &json!("acme.com"));
    let initech_assigned = of_order(&seen, "104233872")[0];
    assert_eq!(
        initech_assigned.data("rule"),
        &json!("globex-partner-holding")
    );
    assert_eq!(initech_assigned.data("smartAccountDomain"), &json!(HOLDING));
    assert_eq!(initech_assigned.data("accountType"), &json!("HOLDING"));
    let hooli_escalated = of_order(&seen, "500040")[0];
    assert_eq!(
        hooli_escalated.data("reason"),
        &json!("SMART_ACCOUNT_NOT_ACTIVE")
    );

    let stats = sim.stats();
    assert_eq!(
        stats.assignments_of("104233871"),
        1,
        "the duplicate event assigned nothing"
    );
    assert_eq!(stats.assignments_of("104233872"), 1);
    let case = w.store.latest_case("104233871").await.unwrap().unwrap();
    assert_eq!(
        case.case.stage.decision().cloned().map(|d| d.rules_hash),
        Some(hash),
        "the case records the rules file it was decided with"
    );
    let cases: i64 = sqlx::query_scalar("SELECT count(*) FROM cases")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(cases, 3, "one case per order");
    w.stop().await;
    worker.shutdown().await.unwrap();
}

/// The commerce API of `inner`, looking into the store at each assignment
/// call: what the case's committed row says at that moment.
struct WatchesAssignments {
    inner: Arc<dyn CommerceApi>,
    store: Store,
    seen: std::sync::Mutex<Vec<AtAssignment>>,
}

/// The committed case row when an assignment call went out.
#[derive(Clone, Debug)]
struct AtAssignment {
    state: String,
    key: Option<String>,
    same_key: bool,
    decided: bool,
}

#[async_trait::async_trait]
impl CommerceApi for WatchesAssignments {
    async fn find_account(
        &self,
        selector: &holdclear::domain::AccountSelector,
        account_type: Option<holdclear::domain::AccountType>,
    ) -> Result<Option<holdclear::commerce::SmartAccount>, holdclear::commerce::CommerceError> {
        self.inner.find_account(selector, account_type).await
    }

    async fn virtual_accounts(
        &self,
        domain: &holdclear::domain::Domain,
    ) -> Result<Vec<holdclear::commerce::VirtualAccount>, holdclear::commerce::CommerceError> {
        self.inner.virtual_accounts(domain).await
    }

    async fn order(
        &self,
        order: &holdclear::domain::OrderId,
    ) -> Result<holdclear::commerce::Order, holdclear::commerce::CommerceError> {
        self.inner.order(order).await
    }

    async fn assign(
        &self,
        order: &holdclear::domain::SalesOrderNumber,
        assignment: &holdclear::commerce::Assignment,
        idempotency_key: &str,
    ) -> Result<holdclear::commerce::AssignmentReceipt, holdclear::commerce::CommerceError> {
        let key = order.to_string();
        let rows = self
            .store
            .list_cases(&holdclear::store::CaseFilter {
                order: Some(key.clone()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        let row = self.store.case_by_id(rows[0].id).await.unwrap().unwrap();
        self.seen.lock().unwrap().push(AtAssignment {
            state: row.case.state().as_str().to_owned(),
            key: row.case.stage.progress().idempotency_key,
            same_key: row.case.stage.progress().idempotency_key.as_deref() == Some(idempotency_key),
            decided: row.case.stage.decision().cloned().is_some()
                && row.case.stage.progress().target.is_some(),
        });
        self.inner.assign(order, assignment, idempotency_key).await
    }
}

/// Decide and resolve may share a commit, but never one with the
/// assignment: when the assignment call goes out, the case's row already
/// holds the decision, the target and the very Idempotency-Key of the call,
/// so a crash right after the call repeats it with the same key.
#[sqlx::test]
async fn the_target_and_key_are_committed_before_the_assignment_call(pool: PgPool) {
    let sim = sim::start(demo()).await;
    let api = Arc::new(WatchesAssignments {
        inner: client(&sim, Duration::from_millis(500)),
        store: Store::from_pool(pool.clone()),
        seen: Default::default(),
    });
    let w = World::start(
        pool,
        vec![api.clone() as Arc<dyn CommerceApi>],
        fast_settings(),
    )
    .await;
    let id = w.open(&held("104233871", "acme.com", |_| {})).await;
    w.wait_state(id, CaseState::Released).await;
    let seen = api.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let at = &seen[0];
    assert_eq!(at.state, "assigning");
    assert!(at.key.is_some(), "{seen:?}");
    assert!(at.same_key, "the committed key is the call's: {seen:?}");
    assert!(at.decided, "decision and target committed: {seen:?}");
    w.stop().await;
}
