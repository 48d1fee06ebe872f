//! A commerce-API simulator per test, on a free port over real HTTP, and a
//! client pointed at it.

use std::time::Duration;

use holdclear::commerce::HttpCommerce;
use holdclear::config::{CommerceSettings, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, Secret};
use holdclear::sim::{Scenario, SimHandle, SimServer, SimStats};

/// Starts a simulator with `scenario` on 127.0.0.1 and a free port; it
/// stops when the handle is dropped.
pub async fn start(scenario: Scenario) -> SimHandle {
    SimServer::start("127.0.0.1:0".parse().expect("an address"), scenario)
        .await
        .expect("the simulator starts")
}

/// Starts a simulator with the shipped demo scenario (acme.com, the decoy
/// notacme.com, initech.com PENDING, globex-holding.com, hooli.com INACTIVE
/// and one seeded order per behaviour).
pub async fn start_demo() -> SimHandle {
    start(Scenario::demo().expect("the demo scenario is valid")).await
}

/// Client settings for `sim`: the demo credentials, a generous rate limit
/// and a short timeout, so that tests stay fast.
pub fn settings(sim: &SimHandle) -> CommerceSettings {
    CommerceSettings {
        base_url: sim.base_url().parse().expect("a URL"),
        token_url: sim.token_url().parse().expect("a URL"),
        client_id: DEMO_CLIENT_ID.to_owned(),
        client_secret: Secret::new(DEMO_CLIENT_SECRET),
        rate_limit: 1000.0,
        request_timeout: Duration::from_millis(500),
        // Off: the client's tests count the calls each answer takes.
        cache_ttl: Duration::ZERO,
        cache_entries: 1,
        tls_ca: None,
    }
}

/// A client for `sim` with [`settings`].
pub fn client(sim: &SimHandle) -> HttpCommerce {
    HttpCommerce::new(&settings(sim)).expect("the client builds")
}

/// A plain reqwest client for talking to the simulator directly.
pub fn raw_http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a reqwest client")
}

/// `GET /_sim/stats` over HTTP.
pub async fn stats_over_http(sim: &SimHandle) -> SimStats {
    raw_http()
        .get(format!("{}/_sim/stats", sim.base_url()))
        .send()
        .await
        .expect("stats answer")
        .json()
        .await
        .expect("stats are JSON")
}
