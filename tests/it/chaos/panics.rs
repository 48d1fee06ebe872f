//! Panics inside steps while held orders flow. No input a worker process
//! can be sent makes a step panic any more, so this scenario runs the
//! worker in the test process (`Worker::start_with`), with the real broker,
//! database and simulator, and a commerce client that panics at the
//! trait's boundary for one customer's account.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use holdclear::commerce::{
    Assignment, AssignmentReceipt, CommerceApi, CommerceError, HttpCommerce, Order, SmartAccount,
    VirtualAccount,
};
use holdclear::config::Settings;
use holdclear::domain::{AccountSelector, AccountType, Domain, OrderId, SalesOrderNumber};
use holdclear::worker::Worker;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Expect, Stage, check, messages, orders};
use crate::support::worker::http_get;

/// How long a run may take to settle after its last disruption.
const SETTLE: Duration = Duration::from_secs(120);

/// The simulator's API, except that every search for `domain` panics.
struct PanicsOn {
    api: HttpCommerce,
    domain: &'static str,
}

#[async_trait]
impl CommerceApi for PanicsOn {
    async fn find_account(
        &self,
        selector: &AccountSelector,
        account_type: Option<AccountType>,
    ) -> Result<Option<SmartAccount>, CommerceError> {
        if let AccountSelector::Domain(d) = selector
            && d.as_str() == self.domain
        {
            panic!("the commerce client panics on {}", self.domain);
        }
        self.api.find_account(selector, account_type).await
    }

    async fn virtual_accounts(
        &self,
        domain: &Domain,
    ) -> Result<Vec<VirtualAccount>, CommerceError> {
        self.api.virtual_accounts(domain).await
    }

    async fn order(&self, order: &OrderId) -> Result<Order, CommerceError> {
        self.api.order(order).await
    }

    async fn assign(
        &self,
        order: &SalesOrderNumber,
        assignment: &Assignment,
        idempotency_key: &str,
    ) -> Result<AssignmentReceipt, CommerceError> {
        self.api.assign(order, assignment, idempotency_key).await
    }
}

/// 300 held orders; every step that looks up hooli.com's account panics
/// (one order in eight). Those cases are retried with backoff and escalate
/// `RETRIES_EXHAUSTED` when their 3 s budget is spent; every other order
/// gets its usual outcome, and the worker never stops: `/healthz` stays
/// 200 and no task fails.
#[sqlx::test]
async fn panicking_steps(pool: PgPool) {
    let mut stage = Stage::new(
        "panics",
        pool,
        holdclear::sim::Scenario::demo().expect("the demo scenario is valid"),
    )
    .await;
    stage
        .env
        .insert("HOLDCLEAR_RETRY_MAX_ELAPSED".into(), "3s".into());
    let mut orders = orders("panics", 89_000_000, 300);
    for o in &mut orders {
        if o.expect == Expect::Escalated("SMART_ACCOUNT_NOT_ACTIVE") {
            o.expect = Expect::Escalated("RETRIES_EXHAUSTED");
        }
    }
    let settings = Settings::from_sources(None, &stage.env).expect("the stage's settings");
    let api = PanicsOn {
        api: HttpCommerce::new(&settings.commerce).unwrap(),
        domain: "hooli.com",
    };
    let worker = Worker::start_with(settings, CancellationToken::new(), Arc::new(api))
        .await
        .expect("the worker starts");
    stage.wait_consumers(1).await;
    for chunk in orders.chunks(100) {
        stage.rabbit.publish(&messages(chunk)).await;
        let (status, body) = http_get(worker.http_addr, "/healthz").await;
        assert_eq!(status, 200, "{body}");
    }
    let over = Instant::now();
    let report = check(&stage, "panicking_steps", &orders, &[], over, SETTLE).await;
    let (status, body) = http_get(worker.http_addr, "/healthz").await;
    assert_eq!(status, 200, "the worker survives its steps' panics: {body}");
    assert_eq!(worker.health.failure(), None);
    let panicked: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT case_id) FROM case_history \
         WHERE kind = 'retry_scheduled' AND detail->>'detail' LIKE 'find_account panicked: %'",
    )
    .fetch_one(&stage.pool)
    .await
    .unwrap();
    let doomed = orders
        .iter()
        .filter(|o| o.expect == Expect::Escalated("RETRIES_EXHAUSTED"))
        .count();
    assert_eq!(
        panicked as usize, doomed,
        "each panic is in its case's history"
    );
    worker.shutdown().await.unwrap();
    report.assert_clean();
}
