//! Commerce API calls per order (issue #18): the resolve cache shared by
//! the cases of a worker, and one rate budget for the whole deployment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use holdclear::commerce::{CommerceApi, HttpCommerce};
use holdclear::config::CommerceSettings;
use holdclear::domain::{CaseState, EscalationReason};
use holdclear::sim::{Scenario, SimEndpoint, SimHandle, SimStats};
use holdclear::store::{CaseRecord, Store};
use serde_json::json;
use sqlx::PgPool;

use super::{World, fast_settings, held};
use crate::support::{database_url, sim};

/// A client of `sim` whose resolve cache keeps answers for a minute.
fn caching(sim: &SimHandle) -> HttpCommerce {
    HttpCommerce::new(&CommerceSettings {
        cache_ttl: Duration::from_secs(60),
        cache_entries: 100,
        ..sim::settings(sim)
    })
    .expect("the client builds")
}

fn demo() -> Scenario {
    Scenario::demo().expect("the demo scenario is valid")
}

/// Opens a case of acme.com for order `so` of `partner` and waits until
/// it is in `state`; returns the case and the domain of the account the
/// simulator shows on the order ("" when none).
async fn settle(
    w: &World,
    sim: &SimHandle,
    so: &str,
    partner: &str,
    state: CaseState,
) -> (CaseRecord, String) {
    let ev = held(so, "acme.com", |v| {
        v["data"]["partner"]["id"] = json!(partner)
    });
    let id = w.open(&ev).await;
    let case = w.wait_state(id, state).await;
    let order = sim.order(so).expect("the simulator knows the order");
    let domain = order["smartAccount"]["domain"].as_str().unwrap_or_default();
    (case, domain.to_owned())
}

/// A cached ACTIVE account that turned INACTIVE: the assignment is
/// refused, the case resolves again from fresh reads (the fallback, or
/// the escalation), and nothing is ever assigned to the stale target.
#[sqlx::test]
async fn a_cached_account_gone_inactive_is_resolved_again_never_assigned(pool: PgPool) {
    let sim = sim::start(demo()).await;
    let w = World::start(pool, vec![Arc::new(caching(&sim))], fast_settings()).await;

    // Two orders of one customer: one search, one Virtual Account list.
    for so in ["710001", "710002"] {
        let (_, got) = settle(&w, &sim, so, "P-100", CaseState::Released).await;
        assert_eq!(got, "acme.com");
    }
    let stats = sim.stats();
    assert_eq!(stats.calls(SimEndpoint::Search), 1, "{stats:?}");
    assert_eq!(stats.calls(SimEndpoint::VirtualAccounts), 1, "{stats:?}");

    // Deactivated while cached; this order has a fallback.
    assert!(sim.set_account_status("acme.com", "INACTIVE"));
    let (_, got) = settle(&w, &sim, "710003", "P-FB", CaseState::Released).await;
    assert_eq!(got, super::HOLDING, "assigned to the fallback");
    let stats = sim.stats();
    assert_eq!(stats.assignments_of("710003"), 1, "{stats:?}");
    assert_eq!(
        stats.responses(SimEndpoint::Assign, 422),
        1,
        "acme.com refused once: {stats:?}"
    );

    // Active again, cached again, then deactivated; no fallback this time.
    assert!(sim.set_account_status("acme.com", "ACTIVE"));
    settle(&w, &sim, "710004", "P-100", CaseState::Released).await;
    assert!(sim.set_account_status("acme.com", "INACTIVE"));
    let searches = sim.stats().calls(SimEndpoint::Search);
    let (case, got) = settle(&w, &sim, "710005", "P-100", CaseState::Escalated).await;
    assert_eq!(got, "", "nothing assigned");
    let stats = sim.stats();
    assert_eq!(stats.assignments_of("710005"), 0, "{stats:?}");
    assert_eq!(stats.responses(SimEndpoint::Assign, 422), 2, "{stats:?}");
    assert_eq!(
        stats.calls(SimEndpoint::Search),
        searches + 1,
        "resolved again from a fresh search: {stats:?}"
    );
    assert_eq!(
        case.case.stage.escalation_reason(),
        Some(EscalationReason::SmartAccountNotActive)
    );
    w.stop().await;
}

/// Thirty cases of one customer at once: one search and one list.
#[sqlx::test]
async fn cases_of_one_customer_at_once_search_once(pool: PgPool) {
    let sim = sim::start(demo()).await;
    let w = World::start(pool, vec![Arc::new(caching(&sim))], fast_settings()).await;
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(
            w.open(&held(&format!("72{n:04}"), "acme.com", |_| {}))
                .await,
        );
    }
    for id in ids {
        w.wait_state(id, CaseState::Released).await;
    }
    let stats = sim.stats();
    assert_eq!(stats.calls(SimEndpoint::Search), 1, "{stats:?}");
    assert_eq!(stats.calls(SimEndpoint::VirtualAccounts), 1, "{stats:?}");
    assert_eq!(stats.total_assignments(), 30, "{stats:?}");
    w.stop().await;
}

/// API calls (token requests excluded) and 429 answers so far.
fn api_calls(stats: &SimStats) -> (u64, u64) {
    let all: u64 = stats.calls.values().sum();
    let limited: u64 = SimEndpoint::ALL
        .iter()
        .map(|e| stats.responses(*e, 429))
        .sum();
    (all - stats.token_requests, limited)
}

/// Three engines, each with its own client and its own pool for the
/// shared budget, all set to the simulator's own limit: past the first
/// second no call is refused with 429, and at least 90 % of the budget is
/// used.
#[sqlx::test]
async fn three_workers_keep_to_one_rate_budget(pool: PgPool) {
    const RATE: f64 = 20.0;
    let mut scenario = demo();
    scenario.rate_limit = Some(RATE);
    let sim = sim::start(scenario).await;
    let url = database_url(&pool).await;
    let mut apis: Vec<Arc<dyn CommerceApi>> = Vec::new();
    for _ in 0..3 {
        let client = HttpCommerce::new(&CommerceSettings {
            rate_limit: RATE,
            request_timeout: Duration::from_secs(2),
            ..sim::settings(&sim)
        })
        .expect("the client builds");
        let own = PgPool::connect(&url).await.expect("a pool of its own");
        client.share_budget(Arc::new(Store::from_pool(own)));
        apis.push(Arc::new(client));
    }
    let w = World::start(pool, apis, fast_settings()).await;
    // About 4 calls each: far more work than 6 s of budget.
    for n in 0..200 {
        w.open(&held(&format!("73{n:04}"), "acme.com", |_| {}))
            .await;
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (calls_1s, limited_1s) = api_calls(&sim.stats());
    let window = Duration::from_secs(5);
    tokio::time::sleep_until((start + Duration::from_secs(1) + window).into()).await;
    let (calls_end, limited_end) = api_calls(&sim.stats());
    w.stop().await;
    let used = (calls_end - calls_1s) as f64 / (RATE * window.as_secs_f64());
    eprintln!(
        "Budget used {used:.3}; 429s in the first second {limited_1s}, after it {}.",
        limited_end - limited_1s
    );
    assert_eq!(
        limited_end - limited_1s,
        0,
        "429s after the first second ({limited_1s} in it); budget used {used:.2}"
    );
    assert!(
        used >= 0.9,
        "budget used {used:.2} ({} calls in {window:?})",
        calls_end - calls_1s
    );
}
