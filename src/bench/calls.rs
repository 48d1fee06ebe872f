//! Section 7: commerce API calls per cleared order, and orders cleared per
//! minute, under the API's rate limit (issue #18).
//!
//! A realistic mix: [`MIX_ORDERS`] held orders over [`CUSTOMERS`] end customers
//! (one in twenty still PENDING) bought through [`PARTNERS`] partners, each
//! with a holding account. Half of the partners keep their customers'
//! licences in their holding account (the rule names it); the other half's
//! rule assigns the end customer's own account and falls back to the
//! partner's holding account while it is not usable.
//!
//! At the real limit, [`REAL_RATE`] calls/s, 20,000 orders take more than an
//! hour. The run keeps the accounts of the mix and scales two things, so
//! that its calls per order stay those of the whole mix:
//! - **time**, compressed by [`TIME_SCALE`]: the simulator's limit and the
//!   client's are × the scale; the resolve cache's TTL, the hold's release
//!   latency, the first look after an assignment and every other engine
//!   duration ÷ the scale. Per-minute figures are reported in real time
//!   (the run's minutes × the scale). The database and CPU costs do not
//!   shrink with the scale: the compressed run is the harder one.
//! - **the order count**, [`ORDERS`] of the mix's [`MIX_ORDERS`]. The
//!   resolve calls of a run are about (accounts × 2) per TTL of real run
//!   time, and the run time grows with the orders, so per order they are
//!   about 2 × accounts × calls per order ÷ (rate × TTL): the same for any
//!   order count, as long as the run lasts at least one TTL in real time
//!   (5,000 orders at 10 calls/s: about 1,000 s against the default 900 s).
//!   The end customers and holding accounts are the mix's own. A
//!   `--flow-orders` below [`ORDERS`] shortens the run (a quick look, as
//!   the bench's own test takes): its calls per order are then not the
//!   mix's.
//!
//! In-process: one engine with the worker's client (resolve cache, the
//! shared rate budget in the run's database) against an in-process
//! simulator; cases are opened with intake's own write, at 1.2 × the floor
//! (the API, not the arrivals, is the limit). Intake and the broker are
//! sections 1 to 3.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Bench, BenchError, load};
use crate::commerce::HttpCommerce;
use crate::config::{CommerceSettings, EngineSettings, EscalationThreshold, RetrySettings};
use crate::domain::{EscalationLevel, HeldOrderEvent};
use crate::engine::Engine;
use crate::ops::identity::WorkerIdentity;
use crate::rules::{Rules, RulesHandle};
use crate::sim::{AccountSpec, Scenario, SimServer, SimStats, VirtualAccountSpec};

/// Held orders of the whole mix.
pub const MIX_ORDERS: u64 = 20_000;
/// Held orders of a run (see the module's documentation).
pub const ORDERS: u64 = 5_000;

/// Held orders of this run: [`ORDERS`], or fewer with a small `--flow-orders`.
fn orders(b: &Bench) -> u64 {
    ORDERS.min(b.bench.flow_orders)
}
/// End customers (every twentieth still PENDING).
pub const CUSTOMERS: u64 = 200;
/// Partners, each with a holding account.
pub const PARTNERS: u64 = 10;
/// The commerce API's real limit, calls per second.
pub const REAL_RATE: f64 = 10.0;
/// Time compression of the run (see the module's documentation).
pub const TIME_SCALE: f64 = 10.0;
/// The fewest calls an order can need: the assignment and one read.
pub const FEWEST_CALLS: f64 = 2.0;
/// Hold release latency after an assignment, in real time.
const RELEASE_AFTER: Duration = Duration::from_secs(20);
/// Orders are opened this much faster than the floor clears them.
const ARRIVAL_OVER_FLOOR: f64 = 1.2;
/// Give up when no case settled for this long (run time).
const STALL: Duration = Duration::from_secs(60);
/// Timeline samples, run time.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// What section 7 measured.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Calls {
    /// Held orders opened.
    pub orders: u64,
    /// End customers and holding accounts of the mix.
    pub end_customers: u64,
    /// Partners (one holding account each).
    pub holding_accounts: u64,
    /// The real limit the run stands for, calls per second.
    pub rate_limit_per_sec: f64,
    /// Time compression (limits × it, durations ÷ it).
    pub time_scale: f64,
    /// The resolve cache's TTL, real time, seconds (0: off).
    pub cache_ttl_sec: f64,
    /// Orders whose hold was released.
    pub cleared: u64,
    /// Orders escalated (the PENDING customers without a fallback: none).
    pub escalated: u64,
    /// API calls the simulator answered (token requests excluded).
    pub api_calls: u64,
    /// API calls per endpoint.
    pub calls_by_endpoint: BTreeMap<String, u64>,
    /// The bar's measure: API calls per cleared order.
    pub api_calls_per_cleared_order: f64,
    /// Reads of the order per cleared order (watching, and web-id lookups).
    pub order_reads_per_cleared_order: f64,
    /// Answers 429 (the client kept under the limit: none expected).
    pub rate_limited: u64,
    /// Orders cleared per minute, real time.
    pub cleared_per_minute: f64,
    /// The floor: the rate ÷ the fewest calls an order can need, per minute.
    pub floor_per_minute: f64,
    /// `clearedPerMinute` ÷ `floorPerMinute`.
    pub of_floor: f64,
    /// Run time, seconds (real time: × the scale).
    pub seconds: f64,
    /// Orders cleared by then: (real seconds, cleared), for the plot.
    pub timeline: Vec<(f64, u64)>,
}

/// Bars of section 7.
pub const MAX_CALLS_PER_ORDER: f64 = 2.2;
/// Cleared per minute, at least this share of the floor.
pub const MIN_OF_FLOOR: f64 = 0.9;

fn scaled(d: Duration) -> Duration {
    d.div_f64(TIME_SCALE)
}

fn customer(i: u64) -> String {
    format!("c{i:03}.example")
}

fn holding(k: u64) -> String {
    format!("p{k:02}-holding.example")
}

/// Partner `k` (1-based) keeps its customers' licences in its holding account.
fn keeps_in_holding(k: u64) -> bool {
    k > PARTNERS / 2
}

fn scenario() -> Scenario {
    let va = |name: &str| VirtualAccountSpec {
        name: name.into(),
        description: String::new(),
        is_default: true,
        commerce_access_level: "PUBLIC".into(),
    };
    let mut accounts: Vec<AccountSpec> = (0..CUSTOMERS)
        .map(|i| AccountSpec {
            id: None,
            domain: customer(i),
            name: format!("Customer {i}"),
            email: None,
            account_type: "CUSTOMER".into(),
            status: if i % 20 == 2 { "PENDING" } else { "ACTIVE" }.into(),
            virtual_accounts: vec![va("DEFAULT")],
        })
        .collect();
    accounts.extend((1..=PARTNERS).map(|k| AccountSpec {
        id: None,
        domain: holding(k),
        name: format!("Partner {k} holding"),
        email: None,
        account_type: "HOLDING".into(),
        status: "ACTIVE".into(),
        virtual_accounts: vec![va("Holding")],
    }));
    let mut s = Scenario {
        accounts,
        rate_limit: Some(REAL_RATE * TIME_SCALE),
        ..Scenario::default()
    };
    s.defaults.release_after_reads = 0;
    s.defaults.release_after = scaled(RELEASE_AFTER);
    s.defaults.max_orders = usize::try_from(ORDERS * 2).unwrap_or(usize::MAX);
    s
}

/// One rule per partner: its holding account, or the end customer's own
/// account falling back to it.
fn rules_text() -> String {
    let mut text = String::new();
    for k in 1..=PARTNERS {
        let when = format!("[rule.when]\npartner_id = [\"P-{k}\"]\n");
        if keeps_in_holding(k) {
            text.push_str(&format!(
                "[[rule]]\nname = \"partner-{k}-holding\"\n{when}[rule.assign]\n\
                 smart_account = {{ domain = \"{}\" }}\naccount_type = \"HOLDING\"\n\
                 virtual_account = \"Holding\"\n\n",
                holding(k)
            ));
        } else {
            text.push_str(&format!(
                "[[rule]]\nname = \"partner-{k}-customer\"\n{when}[rule.assign]\n\
                 smart_account = {{ from = \"end_customer_domain\" }}\naccount_type = \"CUSTOMER\"\n\
                 [rule.fallback]\nsmart_account = {{ domain = \"{}\" }}\n\
                 account_type = \"HOLDING\"\nvirtual_account = \"Holding\"\n\n",
                holding(k)
            ));
        }
    }
    text
}

/// Order `n` of the mix: customer `n % CUSTOMERS`, who buys through one partner.
fn event(run: &str, n: u64) -> Result<HeldOrderEvent, BenchError> {
    let i = n % CUSTOMERS;
    let partner = i % PARTNERS + 1;
    let now = Utc::now().to_rfc3339();
    let body = json!({
        "specversion": "1.0",
        "type": "commerce.order.held.v1",
        "source": "/commerce/orders",
        "id": format!("bench-{run}-{n}"),
        "time": now,
        "data": {
            "salesOrderNumber": (5_000_000_000 + n).to_string(),
            "holdReason": "NO_SMART_ACCOUNT",
            "heldAt": now,
            "orderType": "STANDARD",
            "partner": {"id": format!("P-{partner}"), "name": format!("Partner {partner}")},
            "endCustomer": {"name": format!("Customer {i}"), "country": "US",
                            "email": format!("it@{}", customer(i))},
            "lines": [{"lineNumber": "1.1", "sku": "C9300-48P-E", "productFamily": "C9300"}],
        },
    });
    load::decoded(body.to_string().as_bytes())
}

fn engine_settings() -> EngineSettings {
    EngineSettings {
        poll_interval: scaled(Duration::from_secs(30)),
        poll_max_interval: scaled(Duration::from_secs(15 * 60)),
        escalation: vec![EscalationThreshold {
            after: scaled(Duration::from_secs(4 * 3600)),
            level: EscalationLevel::Warning,
        }],
        retry: RetrySettings {
            initial: scaled(Duration::from_secs(1)),
            max_interval: scaled(Duration::from_secs(300)),
            max_elapsed: scaled(Duration::from_secs(3600)),
            multiplier: 2.0,
            randomization: 0.2,
        },
        concurrency: 64,
        batch_size: 64,
        lease: Duration::from_secs(30),
        idle_poll: Duration::from_millis(100),
    }
}

/// Runs section 7.
pub async fn run(b: &Bench) -> Result<Calls, BenchError> {
    b.tables().truncate().await?;
    let sim = SimServer::start(([127, 0, 0, 1], 0).into(), scenario()).await?;
    let commerce = CommerceSettings {
        base_url: sim.base_url().parse().map_err(|e| bad_setup(&e))?,
        token_url: sim.token_url().parse().map_err(|e| bad_setup(&e))?,
        client_id: crate::config::DEMO_CLIENT_ID.to_owned(),
        client_secret: crate::config::Secret::new(crate::config::DEMO_CLIENT_SECRET),
        rate_limit: REAL_RATE * TIME_SCALE,
        request_timeout: Duration::from_secs(5),
        cache_ttl: scaled(b.settings.commerce.cache_ttl),
        cache_entries: b.settings.commerce.cache_entries,
        tls_ca: None,
    };
    let client = HttpCommerce::new(&commerce).map_err(|e| BenchError::BadEvent(e.to_string()))?;
    client.share_budget(Arc::new(b.store.clone()));
    let rules = Rules::parse(
        &rules_text(),
        std::path::Path::new("bench-calls-rules.toml"),
    )
    .map_err(|e| BenchError::BadEvent(e.to_string()))?;
    let (wake, relay_wake) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let engine = Engine::new(
        b.store.clone(),
        Arc::new(client),
        Arc::new(RulesHandle::new(rules)),
        engine_settings(),
        WorkerIdentity::new(),
        Arc::clone(&wake),
        relay_wake,
    );
    let cancel = CancellationToken::new();
    let running = tokio::spawn(engine.run(cancel.clone()));
    let result = drive(b, &wake).await;
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), running).await;
    let stats = sim.stats();
    sim.shutdown().await.ok();
    let (seconds, timeline, (cleared, escalated)) = result?;
    Ok(report(b, &stats, seconds, timeline, cleared, escalated))
}

fn bad_setup(e: &dyn std::fmt::Display) -> BenchError {
    BenchError::BadEvent(format!("the simulator's address: {e}"))
}

type Driven = (f64, Vec<(f64, u64)>, (u64, u64));

/// Opens the orders at 1.2 × the floor and samples the cleared count until
/// every order settled.
async fn drive(b: &Bench, wake: &Notify) -> Result<Driven, BenchError> {
    let run = format!("calls{}", Utc::now().timestamp_millis());
    let per_sec = REAL_RATE * TIME_SCALE / FEWEST_CALLS * ARRIVAL_OVER_FLOOR;
    let total = orders(b);
    let bar = b.bar(total, "7. calls per order: held → released");
    let started = Instant::now();
    let (mut opened, mut timeline) = (0u64, Vec::new());
    let (mut last_change, mut settled) = (Instant::now(), (0u64, 0u64));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut next_sample = Instant::now();
    loop {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * per_sec) as u64).min(total);
        if due > opened {
            let events = (opened..due)
                .map(|n| event(&run, n))
                .collect::<Result<Vec<_>, _>>()?;
            b.store.record_held(&events).await?;
            opened = due;
            wake.notify_one();
        }
        if Instant::now() < next_sample {
            continue;
        }
        next_sample += SAMPLE_EVERY;
        let now = counts(b).await?;
        let t = started.elapsed().as_secs_f64();
        timeline.push((t * TIME_SCALE, now.0));
        bar.set_position(now.0 + now.1);
        if now != settled {
            settled = now;
            last_change = Instant::now();
        }
        if now.0 + now.1 >= total {
            bar.finish_and_clear();
            return Ok((t, timeline, now));
        }
        if last_change.elapsed() > STALL {
            bar.finish_and_clear();
            return Err(BenchError::Stalled {
                what: "cleared orders (section 7)",
                done: now.0 + now.1,
                expected: total,
                waited: STALL,
            });
        }
    }
}

/// Released and escalated cases so far.
async fn counts(b: &Bench) -> Result<(u64, u64), BenchError> {
    let snapshot = b.store.ops_snapshot().await?;
    let of = |state: &str| {
        (snapshot.cases_by_state.iter())
            .find(|(s, _)| s == state)
            .map_or(0, |(_, n)| u64::try_from(*n).unwrap_or(0))
    };
    Ok((of("released"), of("escalated")))
}

fn report(
    b: &Bench,
    stats: &SimStats,
    seconds: f64,
    timeline: Vec<(f64, u64)>,
    cleared: u64,
    escalated: u64,
) -> Calls {
    let calls_by_endpoint: BTreeMap<String, u64> = (stats.calls.iter())
        .filter(|(e, _)| e.as_str() != "token")
        .map(|(e, n)| (e.clone(), *n))
        .collect();
    let api_calls: u64 = calls_by_endpoint.values().sum();
    let per_cleared = |n: u64| n as f64 / cleared.max(1) as f64;
    let reads = calls_by_endpoint.get("order").copied().unwrap_or(0);
    let rate_limited = (stats.responses.values())
        .filter_map(|by| by.get("429"))
        .sum();
    let cleared_per_minute = cleared as f64 / (seconds * TIME_SCALE).max(f64::MIN_POSITIVE) * 60.0;
    let floor_per_minute = REAL_RATE / FEWEST_CALLS * 60.0;
    Calls {
        orders: orders(b),
        end_customers: CUSTOMERS,
        holding_accounts: PARTNERS,
        rate_limit_per_sec: REAL_RATE,
        time_scale: TIME_SCALE,
        cache_ttl_sec: b.settings.commerce.cache_ttl.as_secs_f64(),
        cleared,
        escalated,
        api_calls,
        calls_by_endpoint,
        api_calls_per_cleared_order: per_cleared(api_calls),
        order_reads_per_cleared_order: per_cleared(reads),
        rate_limited,
        cleared_per_minute,
        floor_per_minute,
        of_floor: cleared_per_minute / floor_per_minute,
        seconds: seconds * TIME_SCALE,
        timeline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_valid_and_its_rules_compile() {
        scenario().validate().expect("a valid scenario");
        let rules = Rules::parse(&rules_text(), std::path::Path::new("r.toml")).unwrap();
        assert_eq!(rules.len(), PARTNERS as usize);
        let pending = (0..CUSTOMERS).filter(|i| i % 20 == 2).count();
        assert_eq!(pending, 10);
        // The PENDING customers buy through a partner that falls back.
        assert!(
            (0..CUSTOMERS)
                .filter(|i| i % 20 == 2)
                .all(|i| !keeps_in_holding(i % PARTNERS + 1))
        );
        event("t", 7).expect("a valid event");
    }
}
