//! The scenarios: a worker process, held orders fed in chunks, and one kind
//! of trouble while they flow. Each ends with the checker's report.

use std::time::{Duration, Instant};

use holdclear::broker::OutgoingMessage;
use holdclear::sim::{EndpointFaults, OrderSpec, Scenario, SimEndpoint};
use serde_json::json;
use sqlx::PgPool;

use super::{Order, Stage, check, messages, orders, worker_connections};
use crate::support::broker::close_connection;
use crate::support::wait_for;

/// How long a run may take to settle after its last disruption.
pub(super) const SETTLE: Duration = Duration::from_secs(120);

pub(super) fn demo() -> Scenario {
    Scenario::demo().expect("the demo scenario is valid")
}

/// Publishes chunk `i` of `n` of the orders.
pub(super) async fn feed(stage: &Stage, orders: &[Order], i: usize, n: usize) {
    let size = orders.len().div_ceil(n);
    let chunk = &orders[(i * size).min(orders.len())..((i + 1) * size).min(orders.len())];
    stage.rabbit.publish(&messages(chunk)).await;
}

/// The worker SIGKILLed every 2 s, five times, and started again each time,
/// while 600 held orders arrive.
#[sqlx::test]
async fn kill_worker(pool: PgPool) {
    let stage = Stage::new("kill", pool, demo()).await;
    let orders = orders("kill", 81_000_000, 600);
    let mut worker = stage.worker().await;
    for i in 0..5 {
        feed(&stage, &orders, i, 5).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        worker.kill_and_restart();
    }
    let over = Instant::now();
    let report = check(&stage, "kill_worker", &orders, &[], over, SETTLE).await;
    assert_eq!(worker.starts, 6, "killed and restarted five times");
    assert!(worker.running(), "the last worker runs:\n{}", worker.tail());
    report.assert_clean();
}

/// The worker's own broker connections (consumer and relay) closed by the
/// broker twice while 400 held orders arrive.
#[sqlx::test]
async fn broker_connections_closed(pool: PgPool) {
    let stage = Stage::new("conns", pool, demo()).await;
    let orders = orders("conns", 82_000_000, 400);
    let topology = stage.rabbit.topology.clone();
    let mut worker = stage.worker().await;
    let mut closed = Vec::new();
    for i in 0..2 {
        feed(&stage, &orders, i, 3).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pids = wait_for(
            Duration::from_secs(30),
            "the worker's two connections (consumer, relay)",
            || async {
                let pids = worker_connections(&topology);
                (pids.len() >= 2 && pids.iter().all(|p| !closed.contains(p))).then_some(pids)
            },
        )
        .await;
        for pid in &pids {
            close_connection(pid);
        }
        closed.extend(pids);
    }
    let over = Instant::now();
    feed(&stage, &orders, 2, 3).await;
    let report = check(
        &stage,
        "broker_connections_closed",
        &orders,
        &[],
        over,
        SETTLE,
    )
    .await;
    assert!(
        worker.running(),
        "the worker survives its connections closing:\n{}",
        worker.tail()
    );
    assert!(closed.len() >= 4, "closed {closed:?}");
    stage.wait_consumers(1).await;
    report.assert_clean();
}

/// The test's own database, administered from the `postgres` database:
/// its sessions terminated, connections refused and allowed again.
/// Dropping it allows connections again, even after a failure.
struct DbGate {
    admin: PgPool,
    admin_url: String,
    name: String,
}

impl DbGate {
    async fn new(database_url: &str) -> Self {
        let url = url::Url::parse(database_url).unwrap();
        let name = url.path().trim_start_matches('/').to_owned();
        let mut admin_url = url.clone();
        admin_url.set_path("/postgres");
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(admin_url.as_str())
            .await
            .unwrap();
        Self {
            admin,
            admin_url: admin_url.to_string(),
            name,
        }
    }

    /// Terminates every session of the test's database; how many there were.
    async fn terminate_backends(&self) -> u64 {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .execute(&self.admin)
        .await
        .unwrap()
        .rows_affected()
    }

    async fn allow(&self, allow: bool) {
        let sql = format!(
            "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS {allow}",
            self.name
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&self.admin)
            .await
            .unwrap();
    }
}

impl Drop for DbGate {
    /// Runs on a thread of its own with its own connection: the pool's
    /// connections belong to the test's runtime, which is blocked here, so
    /// using them would never finish.
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let sql = format!(
            "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS true",
            self.name
        );
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let allow = async {
                use sqlx::Connection;
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut admin)
                        .await;
                    let _ = admin.close().await;
                }
            };
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), allow).await;
            });
        })
        .join();
    }
}

/// The database's sessions terminated once a second for 10 s, then the
/// database refusing connections for 15 s, while 400 held orders arrive.
#[sqlx::test]
async fn database_outage(pool: PgPool) {
    let stage = Stage::new("db", pool, demo()).await;
    let orders = orders("db", 83_000_000, 400);
    let gate = DbGate::new(&stage.database_url).await;
    let mut worker = stage.worker().await;
    let mut terminated = 0;
    for i in 0..10 {
        if i % 3 == 0 {
            feed(&stage, &orders, i / 3, 5).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        terminated += gate.terminate_backends().await;
    }
    gate.allow(false).await;
    terminated += gate.terminate_backends().await;
    let down = Instant::now();
    feed(&stage, &orders, 4, 5).await;
    while down.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Nothing gets in while it is down.
        terminated += gate.terminate_backends().await;
    }
    gate.allow(true).await;
    let over = Instant::now();
    let report = check(&stage, "database_outage", &orders, &[], over, SETTLE).await;
    assert!(terminated > 10, "sessions were terminated: {terminated}");
    assert!(
        worker.running(),
        "the worker survives the outage:\n{}",
        worker.tail()
    );
    worker.stops_cleanly().await;
    report.assert_clean();
}

/// The commerce API failing throughout: 30 % 503, 10 % timeouts (the
/// simulator hangs 6 s, the worker gives up after 3 s), 429 bursts with
/// Retry-After, 10 % of assignments taking effect with the answer lost,
/// 2 s latency on the token and virtual-account calls, tokens expiring
/// every 3 s. 150 held orders.
#[sqlx::test]
async fn commerce_faults(pool: PgPool) {
    let mut scenario = demo();
    scenario.token_ttl = Duration::from_secs(3);
    let flaky = EndpointFaults {
        error_rate: 0.3,
        timeout_rate: 0.1,
        hang: Duration::from_secs(6),
        throttle_rate: 0.01,
        retry_after_secs: 2,
        ..EndpointFaults::default()
    };
    for endpoint in SimEndpoint::API {
        *scenario.faults.get_mut(endpoint) = flaky.clone();
    }
    scenario.faults.assign.lost_response_rate = 0.1;
    scenario.faults.virtual_accounts.latency = Duration::from_secs(2);
    scenario.faults.token.latency = Duration::from_secs(2);
    let stage = Stage::new("faults", pool, scenario).await;
    let orders = orders("faults", 84_000_000, 150);
    let _worker = stage.worker().await;
    for i in 0..3 {
        feed(&stage, &orders, i, 3).await;
    }
    let over = Instant::now();
    let report = check(&stage, "commerce_faults", &orders, &[], over, SETTLE).await;
    let stats = stage.sim.stats();
    let count = |status: u16| -> u64 {
        SimEndpoint::API
            .iter()
            .map(|e| stats.responses(*e, status))
            .sum()
    };
    // A call the worker gave up on is never answered.
    let unanswered: u64 = SimEndpoint::API
        .iter()
        .map(|e| {
            let answered: u64 = stats
                .responses
                .get(e.as_str())
                .map(|by| by.values().sum())
                .unwrap_or(0);
            stats.calls(*e) - answered
        })
        .sum();
    assert!(
        count(503) > 0 && count(429) > 0 && count(502) > 0 && unanswered > 0,
        "{stats:?}"
    );
    assert!(stats.tokens_issued > 1, "tokens expired: {stats:?}");
    report.assert_clean();
}

/// The test's events exchange deleted for 8 s (publishes fail; once the
/// worker declares it again, unroutable ones come back as mandatory
/// returns), then declared and bound again: every event still arrives.
#[sqlx::test]
async fn publisher_confirms(pool: PgPool) {
    let stage = Stage::new("confirms", pool, demo()).await;
    let orders = orders("confirms", 85_000_000, 300);
    let _worker = stage.worker().await;
    feed(&stage, &orders, 0, 3).await;
    wait_for(Duration::from_secs(60), "the first outcomes", || async {
        (stage.events.terminal_orders() > 10).then_some(())
    })
    .await;
    stage.events.delete_exchange().await;
    let gone = Instant::now();
    feed(&stage, &orders, 1, 3).await;
    while gone.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let refused: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE last_error IS NOT NULL")
            .fetch_one(&stage.pool)
            .await
            .unwrap();
    stage.events.declare_and_bind().await;
    let over = Instant::now();
    feed(&stage, &orders, 2, 3).await;
    let report = check(&stage, "publisher_confirms", &orders, &[], over, SETTLE).await;
    assert!(refused > 0, "publishing failed while the exchange was gone");
    report.assert_clean();
}

/// Each order announced three times with three event ids: by web order id
/// alone, by sales order number alone and by both, the three in shuffled
/// chunks, while the worker is SIGKILLed every 2 s, four times: one case
/// per order (the others merged into it), one assignment, never to another
/// order. The simulator knows each order by both ids.
#[sqlx::test]
async fn one_order_under_both_ids_while_killed(pool: PgPool) {
    let orders = orders("ids", 87_000_000, 240);
    let mut scenario = demo();
    scenario.orders.extend(orders.iter().map(|o| OrderSpec {
        sales_order_number: o.number.clone(),
        web_order_id: Some(format!("W{}", o.number)),
        order_type: o.event["data"]["orderType"].as_str().map(str::to_owned),
        ..OrderSpec::default()
    }));
    let stage = Stage::new("ids", pool, scenario).await;
    // The three namings of every order, interleaved: W, S, both; S, both, W; …
    let mut namings: Vec<OutgoingMessage> = Vec::new();
    for (i, o) in orders.iter().enumerate() {
        let by = |tag: &str, keep_so: bool, keep_web: bool| {
            let mut ev = o.event.clone();
            ev["id"] = json!(format!("{}-{tag}", o.event["id"].as_str().unwrap()));
            let data = ev["data"].as_object_mut().unwrap();
            if !keep_so {
                data.remove("salesOrderNumber");
            }
            if !keep_web {
                data.remove("webOrderId");
            }
            crate::support::broker::message(&ev)
        };
        let mut three = vec![
            by("web", false, true),
            by("so", true, false),
            by("both", true, true),
        ];
        three.rotate_left(i % 3);
        namings.extend(three);
    }
    let mut worker = stage.worker().await;
    let chunk = namings.len().div_ceil(4);
    for (i, part) in namings.chunks(chunk).enumerate() {
        stage.rabbit.publish(part).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        if i < 3 {
            worker.kill_and_restart();
        }
    }
    worker.kill_and_restart();
    let over = Instant::now();
    let report = check(
        &stage,
        "one_order_under_both_ids_while_killed",
        &orders,
        &[],
        over,
        SETTLE,
    )
    .await;
    let merged: i64 = sqlx::query_scalar("SELECT count(*) FROM cases WHERE state = 'merged'")
        .fetch_one(&stage.pool)
        .await
        .unwrap();
    eprintln!("cases merged into their order's case: {merged}");
    report.assert_clean();
}
