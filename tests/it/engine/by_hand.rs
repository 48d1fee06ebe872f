//! A person acts in Cisco's portal while holdclear works the order: the
//! hold released by hand, the order cancelled. The case ends as the order
//! now stands; nothing is assigned where nothing can be, and an order that
//! takes no assignment any more is not watched on.

use holdclear::sim::{OrderSpec, SimEndpoint};

use super::e2e::{demo, events_until_settled, routing_keys, start};
use super::*;
use crate::support::sim::stats_over_http;

/// The demo scenario plus `order` (its sales order number and web order
/// id set), and the event that names it by its web order id alone.
fn named_by_web_order_id(
    so: &str,
    web: &str,
    order: OrderSpec,
) -> (holdclear::sim::Scenario, HeldOrderEvent) {
    let mut scenario = demo();
    scenario.orders.push(OrderSpec {
        sales_order_number: so.into(),
        web_order_id: Some(web.into()),
        ..order
    });
    (scenario, held_by_web_order_id(web, "acme.com"))
}

/// A person assigned acme.com and released the hold by hand before
/// holdclear read the order: the first read (for the sales order number)
/// shows it, and the case ends released like a watched hold (the account
/// as the order shows it, no rule), with no account searched or assigned.
#[sqlx::test]
async fn a_hold_released_by_hand_before_holdclear_acted_is_released_without_an_assignment(
    pool: PgPool,
) {
    let by_hand = OrderSpec {
        smart_account: Some("acme.com".into()),
        virtual_account: Some("DEFAULT".into()),
        ..OrderSpec::default()
    };
    let (scenario, ev) = named_by_web_order_id("500070", "70000070", by_hand);
    let (sim, mut w) = start(pool, scenario, 1, fast_settings()).await;
    assert!(sim.release_hold("500070"), "the simulator's order was held");
    let id = w.open(&ev).await;
    let events = events_until_settled(&mut w, id).await;
    assert_eq!(
        routing_keys(&events),
        ["order.hold_released"],
        "{events:#?}"
    );
    let released = &events[0];
    assert_eq!(released.data("salesOrderNumber"), "500070");
    assert_eq!(released.data("webOrderId"), "70000070");
    assert_eq!(released.data("smartAccountDomain"), "acme.com");
    assert_eq!(released.data("rule"), &Value::Null, "no rule decided");
    w.events.assert_quiet(Duration::from_millis(300)).await;
    let r = w.case(id).await;
    assert_eq!(r.case.state(), CaseState::Released);
    assert_eq!(r.case.next_action_at, None);
    let stats = stats_over_http(&sim).await;
    assert_eq!(stats.calls(SimEndpoint::Assign), 0, "{stats:?}");
    assert_eq!(stats.calls(SimEndpoint::Search), 0, "{stats:?}");
    w.stop().await;
}

/// The order was cancelled, its hold still on, before holdclear read it:
/// `ASSIGNMENT_LOCKED` (what the commerce API answers an assignment past
/// BOOKED) with the status in the detail, and no assignment call at all.
#[sqlx::test]
async fn a_cancelled_order_is_locked_without_an_assignment_call(pool: PgPool) {
    let cancelled = OrderSpec {
        status: Some("CANCELLED".into()),
        ..OrderSpec::default()
    };
    let (scenario, ev) = named_by_web_order_id("500071", "70000071", cancelled);
    let (sim, mut w) = start(pool, scenario, 1, fast_settings()).await;
    let id = w.open(&ev).await;
    let events = events_until_settled(&mut w, id).await;
    assert_eq!(
        routing_keys(&events),
        ["order.hold_escalated"],
        "{events:#?}"
    );
    let e = &events[0];
    assert_eq!(e.data("reason"), "ASSIGNMENT_LOCKED");
    assert_eq!(e.data("level"), "critical");
    assert_eq!(e.data("salesOrderNumber"), "500071");
    let detail = e.data("detail").as_str().unwrap_or_default();
    assert!(detail.contains("CANCELLED"), "{detail}");
    let stats = stats_over_http(&sim).await;
    assert_eq!(stats.calls(SimEndpoint::Assign), 0, "{stats:?}");
    assert_eq!(w.case(id).await.case.state(), CaseState::Escalated);
    w.stop().await;
}

/// The order is cancelled while its hold is watched (the demo's order whose
/// hold never lifts): the next look escalates `ASSIGNMENT_LOCKED` and the
/// case is no longer watched (no escalation thresholds here, so only the
/// cancellation can end the watch).
#[sqlx::test]
async fn an_order_cancelled_while_watched_escalates_and_is_no_longer_watched(pool: PgPool) {
    let settings = EngineSettings {
        escalation: Vec::new(),
        ..fast_settings()
    };
    let (sim, mut w) = start(pool, demo(), 1, settings).await;
    let id = w.open(&held("104233873", "acme.com", |_| {})).await;
    w.wait_state(id, CaseState::Watching).await;
    assert!(sim.set_order_status("104233873", "CANCELLED"));
    let events = events_until_settled(&mut w, id).await;
    assert_eq!(
        routing_keys(&events),
        ["order.smart_account_assigned", "order.hold_escalated"],
        "{events:#?}"
    );
    let e = &events[1];
    assert_eq!(e.data("reason"), "ASSIGNMENT_LOCKED");
    assert_eq!(e.data("level"), "critical");
    assert_eq!(
        e.data("action"),
        EscalationReason::AssignmentLocked.action()
    );
    let detail = e.data("detail").as_str().unwrap_or_default();
    assert!(detail.contains("CANCELLED"), "{detail}");
    let r = w.case(id).await;
    assert_eq!(r.case.state(), CaseState::Escalated);
    assert_eq!(r.case.next_action_at, None, "no next look");
    let reads = sim.stats().calls(SimEndpoint::Order);
    w.events.assert_quiet(Duration::from_millis(500)).await;
    assert_eq!(
        sim.stats().calls(SimEndpoint::Order),
        reads,
        "no more looks"
    );
    assert_eq!(sim.stats().assignments_of("104233873"), 1);
    w.stop().await;
}
