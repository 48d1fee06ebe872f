//! The case engine against real PostgreSQL and RabbitMQ: claims and leases,
//! step commits, the outbox relay, and whole cases driven through a scripted
//! in-process commerce API (the simulator's end-to-end tests come with it).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use holdclear::broker::Broker;
use holdclear::commerce::{
    AccountStatus, Assignment, AssignmentReceipt, CommerceApi, CommerceError, ErrorCode, Hold,
    Order, SMART_ACCOUNT_HOLD, SmartAccount, VirtualAccount,
};
use holdclear::config::{EngineSettings, EscalationThreshold, RetrySettings, SecretUrl, Topology};
use holdclear::domain::{
    AccountSelector, AccountType, CaseState, Domain, EscalationLevel, EscalationReason, HeldOrder,
    HeldOrderEvent, OrderId, SalesOrderNumber, Target, VirtualAccountChoice,
};
use holdclear::engine::machine::HistoryEntry;
use holdclear::engine::{DecisionSource, Engine};
use holdclear::outbox::{OutboundEvent, Relay, RelaySettings};
use holdclear::rules::Decision;
use holdclear::store::{CaseRecord, Store};
use lapin::options::{ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::events::{EventQueue, Received, assert_contract, of_order};
use crate::support::{amqp_url, bin, database_url, topology, unique, wait_for};

const DEADLINE: Duration = Duration::from_secs(20);

// ---- a scripted commerce API ----------------------------------------------

/// How one order behaves in the fake commerce API.
#[derive(Clone, Debug, Default)]
struct Script {
    web: Option<String>,
    /// Reads after the assignment (or, with `active_already`, at all) until
    /// the hold shows released.
    releases_after_reads: u32,
    /// The hold never lifts (until `release` is called).
    never_release: bool,
    /// The hold lifts without an assignment (the pending account turned ACTIVE).
    active_already: bool,
    /// The assignment is refused with this code.
    assign_error: Option<ErrorCode>,
    /// Reads are refused with this code.
    read_error: Option<ErrorCode>,
    /// Every call about this order fails transiently.
    always_down: bool,
    /// The first accepted assignment's response is lost (a transient error).
    lose_first_response: bool,
    /// Another hold stays on the order.
    credit_hold: bool,
    /// The assignment call takes this long.
    assign_delay: Duration,
}

#[derive(Debug, Default)]
struct OrderState {
    script: Script,
    assigned: bool,
    reads_since: u32,
    released: bool,
    lost_one: bool,
}

#[derive(Debug, Default)]
struct FakeState {
    accounts: HashMap<String, AccountStatus>,
    orders: HashMap<String, OrderState>,
    keys: HashMap<String, AssignmentReceipt>,
    /// Distinct accepted assignments per sales order number.
    assignments: HashMap<String, u32>,
    assign_calls: u64,
}

/// An in-process commerce API with per-order scripts, idempotency keys and
/// an optional share of transient failures on every call.
#[derive(Debug, Default)]
struct Fake {
    state: Mutex<FakeState>,
    /// Percentage of calls that fail transiently (5xx or 429).
    flaky_percent: AtomicU64,
    calls: AtomicU64,
}

impl Fake {
    fn account(&self, domain: &str, status: AccountStatus) {
        self.state
            .lock()
            .unwrap()
            .accounts
            .insert(domain.to_owned(), status);
    }

    fn order(&self, so: &str, script: Script) {
        self.state.lock().unwrap().orders.insert(
            so.to_owned(),
            OrderState {
                script,
                ..OrderState::default()
            },
        );
    }

    fn release(&self, so: &str) {
        let mut s = self.state.lock().unwrap();
        let o = s.orders.get_mut(so).unwrap();
        o.script.never_release = false;
        o.released = true;
    }

    fn assignments(&self, so: &str) -> u32 {
        let s = self.state.lock().unwrap();
        s.assignments.get(so).copied().unwrap_or_default()
    }

    fn assign_calls(&self) -> u64 {
        self.state.lock().unwrap().assign_calls
    }

    fn total_assignments(&self) -> (usize, u32) {
        let s = self.state.lock().unwrap();
        (s.assignments.len(), s.assignments.values().sum())
    }

    /// Decides whether this call fails transiently (deterministic spread).
    fn flaky(&self) -> Option<CommerceError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let p = self.flaky_percent.load(Ordering::Relaxed);
        if p > 0 && (n.wrapping_mul(7919) % 100) < p {
            return Some(if n.is_multiple_of(3) {
                CommerceError::Transient {
                    retry_after: Some(Duration::from_millis(15)),
                    detail: "HTTP 429".into(),
                }
            } else {
                CommerceError::Transient {
                    retry_after: None,
                    detail: "HTTP 503".into(),
                }
            });
        }
        None
    }

    fn down() -> CommerceError {
        CommerceError::Transient {
            retry_after: None,
            detail: "connection refused".into(),
        }
    }

    fn key_of(order: &OrderId, s: &FakeState) -> Option<String> {
        if let Some(so) = &order.sales_order_number {
            return Some(so.to_string());
        }
        let web = order.web_order_id.as_ref()?.to_string();
        s.orders
            .iter()
            .find(|(_, o)| o.script.web.as_deref() == Some(web.as_str()))
            .map(|(k, _)| k.clone())
    }
}

fn not_found(code: ErrorCode) -> CommerceError {
    CommerceError::Permanent {
        code,
        detail: "refused by the fake".into(),
    }
}

#[async_trait]
impl CommerceApi for Fake {
    async fn find_account(
        &self,
        selector: &AccountSelector,
        account_type: Option<AccountType>,
    ) -> Result<Option<SmartAccount>, CommerceError> {
        if let Some(e) = self.flaky() {
            return Err(e);
        }
        let AccountSelector::Domain(d) = selector else {
            return Ok(None);
        };
        let s = self.state.lock().unwrap();
        Ok(s.accounts.get(d.as_str()).map(|status| SmartAccount {
            id: format!("SA-{}", d.as_str().len()),
            domain: d.to_string(),
            name: d.to_string(),
            account_type: account_type.unwrap_or(AccountType::Customer).to_string(),
            status: status.clone(),
        }))
    }

    async fn virtual_accounts(
        &self,
        domain: &Domain,
    ) -> Result<Vec<VirtualAccount>, CommerceError> {
        if let Some(e) = self.flaky() {
            return Err(e);
        }
        let s = self.state.lock().unwrap();
        if !s.accounts.contains_key(domain.as_str()) {
            return Err(not_found(ErrorCode::SmartAccountNotFound));
        }
        Ok(vec![
            VirtualAccount {
                name: "DEFAULT".into(),
                is_default: true,
                public: true,
            },
            VirtualAccount {
                name: "Holding".into(),
                is_default: false,
                public: true,
            },
            VirtualAccount {
                name: "Private".into(),
                is_default: false,
                public: false,
            },
        ])
    }

    async fn order(&self, order: &OrderId) -> Result<Order, CommerceError> {
        if let Some(e) = self.flaky() {
            return Err(e);
        }
        let mut s = self.state.lock().unwrap();
        let key = Self::key_of(order, &s).ok_or_else(|| not_found(ErrorCode::OrderNotFound))?;
        let o = s
            .orders
            .get_mut(&key)
            .ok_or_else(|| not_found(ErrorCode::OrderNotFound))?;
        if o.script.always_down {
            return Err(Self::down());
        }
        if let Some(code) = &o.script.read_error {
            return Err(not_found(code.clone()));
        }
        if o.assigned || o.script.active_already {
            o.reads_since += 1;
            if !o.script.never_release && o.reads_since >= o.script.releases_after_reads {
                o.released = true;
            }
        }
        let mut holds = vec![Hold {
            code: SMART_ACCOUNT_HOLD.into(),
            applied_at: Some(Utc::now()),
            released_at: o.released.then(Utc::now),
        }];
        if o.script.credit_hold {
            holds.push(Hold {
                code: "CREDIT_HOLD".into(),
                applied_at: Some(Utc::now()),
                released_at: None,
            });
        }
        Ok(Order {
            sales_order_number: SalesOrderNumber::parse(&key).unwrap(),
            web_order_id: o.script.web.clone(),
            status: "BOOKED".into(),
            holds,
            smart_account_domain: None,
            smart_account_status: None,
            virtual_account_name: None,
        })
    }

    async fn assign(
        &self,
        order: &SalesOrderNumber,
        assignment: &Assignment,
        idempotency_key: &str,
    ) -> Result<AssignmentReceipt, CommerceError> {
        if let Some(e) = self.flaky() {
            return Err(e);
        }
        let delay = {
            let mut s = self.state.lock().unwrap();
            s.assign_calls += 1;
            s.orders
                .get(order.as_str())
                .map(|o| o.script.assign_delay)
                .unwrap_or_default()
        };
        tokio::time::sleep(delay).await;
        let mut s = self.state.lock().unwrap();
        if let Some(receipt) = s.keys.get(idempotency_key) {
            return Ok(receipt.clone());
        }
        let active = s
            .accounts
            .get(&assignment.smart_account_domain)
            .is_some_and(|st| *st == AccountStatus::Active);
        let n = s.keys.len() + 1;
        let o = s
            .orders
            .get_mut(order.as_str())
            .ok_or_else(|| not_found(ErrorCode::OrderNotFound))?;
        if o.script.always_down {
            return Err(Self::down());
        }
        if let Some(code) = &o.script.assign_error {
            return Err(not_found(code.clone()));
        }
        if !active {
            return Err(not_found(ErrorCode::SmartAccountNotActive));
        }
        o.assigned = true;
        let lose = o.script.lose_first_response && !o.lost_one;
        o.lost_one = true;
        let receipt = AssignmentReceipt {
            assignment_id: format!("ASG-{n}"),
            status: "SUBMITTED".into(),
        };
        s.keys.insert(idempotency_key.to_owned(), receipt.clone());
        *s.assignments.entry(order.to_string()).or_default() += 1;
        if lose {
            return Err(CommerceError::Transient {
                retry_after: None,
                detail: "timed out reading the response".into(),
            });
        }
        Ok(receipt)
    }
}

// ---- rules, events, cases ---------------------------------------------------

/// Test rules: the end customer's domain as a CUSTOMER account with VA
/// DEFAULT (VA `Missing` for `badva.*` domains), falling back to
/// `holding.example` (HOLDING, VA `Holding`) for partner `P-FB`; no rule
/// for `nomatch.example`.
fn rules() -> Arc<dyn DecisionSource> {
    Arc::new(|order: &HeldOrder| -> Option<Decision> {
        let domain = order.end_customer_domain()?;
        if domain.as_str() == "nomatch.example" {
            return None;
        }
        let va = if domain.as_str().starts_with("badva") {
            "Missing"
        } else {
            "DEFAULT"
        };
        let with_fallback = order
            .partner
            .as_ref()
            .and_then(|p| p.id.as_deref())
            .is_some_and(|id| id == "P-FB");
        Some(Decision {
            rule: "by-domain".into(),
            rules_hash: "0123abcd".into(),
            target: Target {
                account: AccountSelector::Domain(domain),
                account_type: AccountType::Customer,
                virtual_account: VirtualAccountChoice::Named(va.into()),
            },
            fallback: with_fallback.then(|| Target {
                account: AccountSelector::Domain(Domain::parse("holding.example").unwrap()),
                account_type: AccountType::Holding,
                virtual_account: VirtualAccountChoice::Named("Holding".into()),
            }),
        })
    })
}

/// A held-order event as upstream sends it, decoded by the real decoder.
fn held(so: &str, domain: &str, tweak: impl FnOnce(&mut Value)) -> HeldOrderEvent {
    let mut v = json!({
        "specversion": "1.0",
        "type": "commerce.order.held.v1",
        "source": "/commerce/orders",
        "id": Uuid::new_v4().to_string(),
        "time": Utc::now().to_rfc3339(),
        "data": {
            "salesOrderNumber": so,
            "webOrderId": format!("W{so}"),
            "holdReason": "NO_SMART_ACCOUNT",
            "heldAt": (Utc::now() - chrono::Duration::seconds(30)).to_rfc3339(),
            "orderType": "STANDARD",
            "partner": {"id": "P-100", "name": "Globex"},
            "endCustomer": {"name": "Customer", "email": format!("it@{domain}"), "country": "US"},
            "smartAccount": null,
            "lines": [{"lineNumber": "1.1", "sku": "C9300-48P-E", "productFamily": "C9300"}]
        }
    });
    tweak(&mut v);
    HeldOrderEvent::decode(&serde_json::to_vec(&v).unwrap(), 256 * 1024).expect("valid event")
}

/// Opens a case in `deciding` as intake does (one row, one history line).
async fn open_case(pool: &PgPool, ev: &HeldOrderEvent) -> Uuid {
    let id = Uuid::new_v4();
    let order = &ev.data.order;
    sqlx::query(
        "INSERT INTO cases (id, order_key, sales_order_number, web_order_id, state, event_id, \
                            event, hold_reason, held_at) \
         VALUES ($1, $2, $3, $4, 'deciding', $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(order.key())
    .bind(order.sales_order_number.as_ref().map(|s| s.to_string()))
    .bind(order.web_order_id.as_ref().map(|s| s.to_string()))
    .bind(ev.id.as_str())
    .bind(serde_json::to_value(ev).unwrap())
    .bind(ev.data.hold_reason.as_str())
    .bind(ev.data.held_at.unwrap_or_else(Utc::now))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO case_history (case_id, kind, state) VALUES ($1, 'opened', 'deciding')",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
    id
}

fn fast_settings() -> EngineSettings {
    EngineSettings {
        poll_interval: Duration::from_millis(50),
        poll_max_interval: Duration::from_millis(200),
        escalation: vec![
            EscalationThreshold {
                after: Duration::from_millis(600),
                level: EscalationLevel::Warning,
            },
            EscalationThreshold {
                after: Duration::from_millis(1200),
                level: EscalationLevel::Critical,
            },
        ],
        retry: RetrySettings {
            initial: Duration::from_millis(20),
            max_interval: Duration::from_millis(100),
            max_elapsed: Duration::from_secs(10),
            multiplier: 2.0,
            randomization: 0.2,
        },
        concurrency: 16,
        batch_size: 32,
        lease: Duration::from_secs(5),
        idle_poll: Duration::from_millis(100),
    }
}

/// One engine-and-relay setup of a test.
struct World {
    pool: PgPool,
    store: Store,
    topology: Topology,
    events: EventQueue,
    wake: Arc<Notify>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl World {
    async fn start(
        pool: PgPool,
        fake: Arc<Fake>,
        engines: usize,
        settings: EngineSettings,
    ) -> Self {
        let prefix = unique("engine");
        let topology = topology(&prefix);
        let events = EventQueue::bind(&topology).await;
        let store = Store::from_pool(pool.clone());
        let wake = Arc::new(Notify::new());
        let relay_wake = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        for n in 0..engines {
            let engine = Engine::new(
                store.clone(),
                fake.clone(),
                rules(),
                settings.clone(),
                format!("{prefix}-w{n}"),
                wake.clone(),
                relay_wake.clone(),
            );
            tasks.push(tokio::spawn(engine.run(cancel.clone())));
        }
        let broker = Broker::new(SecretUrl::parse("amqp", &amqp_url()).unwrap(), prefix);
        let relay = Relay::new(store.clone(), broker, topology.clone(), relay_wake).with_settings(
            RelaySettings {
                idle_poll: Duration::from_millis(50),
                ..RelaySettings::default()
            },
        );
        tasks.push(tokio::spawn(relay.run(cancel.clone())));
        Self {
            pool,
            store,
            topology,
            events,
            wake,
            cancel,
            tasks,
        }
    }

    async fn open(&self, ev: &HeldOrderEvent) -> Uuid {
        let id = open_case(&self.pool, ev).await;
        self.wake.notify_one();
        id
    }

    async fn case(&self, id: Uuid) -> CaseRecord {
        self.store.case_by_id(id).await.unwrap().unwrap()
    }

    async fn wait_state(&self, id: Uuid, state: CaseState) -> CaseRecord {
        wait_for(DEADLINE, &format!("case {id} to be {state}"), || async {
            let r = self.case(id).await;
            (r.case.state == state).then_some(r)
        })
        .await
    }

    async fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("engine and relay stop on cancel")
                .unwrap();
        }
        let ch = events_channel().await;
        ch.exchange_delete(
            self.topology.events_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
        self.events.close().await;
    }
}

fn reasons(seen: &[Received], order: &str) -> Vec<(String, String)> {
    of_order(seen, order)
        .iter()
        .map(|r| {
            (
                r.routing_key.clone(),
                r.data("reason").as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn kinds(history: &[holdclear::store::HistoryRow]) -> Vec<&str> {
    history.iter().map(|h| h.kind.as_str()).collect()
}

// ---- claims and leases ------------------------------------------------------

#[sqlx::test]
async fn two_claimers_never_get_the_same_case(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    for n in 0..40 {
        open_case(&pool, &held(&format!("1000{n}"), "acme.example", |_| {})).await;
    }
    let (a, b) = tokio::join!(
        store.claim_due("a#1", Duration::from_secs(30), 30),
        store.claim_due("b#1", Duration::from_secs(30), 30)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.len() + b.len(), 40, "every due case claimed once");
    let ids_a: std::collections::HashSet<Uuid> = a.iter().map(|c| c.id).collect();
    assert!(b.iter().all(|c| !ids_a.contains(&c.id)), "disjoint claims");
    assert!(a.iter().chain(&b).all(|c| c.case.is_ok()));
    // Leased cases are not due.
    assert!(
        store
            .claim_due("c#1", Duration::from_secs(30), 100)
            .await
            .unwrap()
            .is_empty()
    );
    let owners: Vec<(String, i64)> = sqlx::query_as(
        "SELECT lease_owner, count(*) FROM cases GROUP BY lease_owner ORDER BY lease_owner",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        owners,
        vec![
            ("a#1".into(), a.len() as i64),
            ("b#1".into(), b.len() as i64)
        ]
    );
}

#[sqlx::test]
async fn an_expired_lease_is_claimed_again_and_a_renewed_one_is_not(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let kept = open_case(&pool, &held("2001", "acme.example", |_| {})).await;
    let dropped = open_case(&pool, &held("2002", "acme.example", |_| {})).await;
    let lease = Duration::from_millis(400);
    let claimed = store.claim_due("dead#1", lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 2);
    // The living worker renews one lease; the dead one renews nothing.
    let renewer = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                assert!(store.renew_lease(kept, "dead#1", lease).await.unwrap());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let again = wait_for(DEADLINE, "the expired lease to be claimable", || async {
        let c = store.claim_due("next#1", lease, 10).await.unwrap();
        (!c.is_empty()).then_some(c)
    })
    .await;
    assert_eq!(
        again.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![dropped]
    );
    renewer.await.unwrap();
    // The dead owner's lease on the re-claimed case is gone.
    assert!(!store.renew_lease(dropped, "dead#1", lease).await.unwrap());
}

#[sqlx::test]
async fn a_commit_after_the_lease_was_lost_changes_nothing(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let id = open_case(&pool, &held("3001", "acme.example", |_| {})).await;
    let mut first = store
        .claim_due("slow#1", Duration::from_millis(100), 1)
        .await
        .unwrap();
    let case = first.pop().unwrap().case.unwrap();
    let second = wait_for(DEADLINE, "the lease to expire", || async {
        let c = store
            .claim_due("fast#1", Duration::from_secs(30), 1)
            .await
            .unwrap();
        (!c.is_empty()).then_some(c)
    })
    .await;
    assert_eq!(second[0].id, id);

    // The slow worker finishes its step and tries to commit it.
    let mut stepped = case.clone();
    stepped.state = CaseState::Escalated;
    stepped.escalation_reason = Some(EscalationReason::NoRuleMatched);
    stepped.next_action_at = None;
    let event = OutboundEvent::HoldEscalated {
        reason: EscalationReason::NoRuleMatched,
        level: EscalationLevel::Critical,
        held_seconds: 1,
        detail: "x".into(),
        threshold: None,
    };
    let envelope = event.envelope(id, 0, &case.order, Utc::now());
    let entry = HistoryEntry {
        at: Utc::now(),
        kind: "escalated",
        state: CaseState::Escalated,
        detail: json!({}),
    };
    let committed = store
        .commit_step(
            "slow#1",
            &stepped,
            std::slice::from_ref(&entry),
            std::slice::from_ref(&envelope),
            None,
        )
        .await
        .unwrap();
    assert!(!committed, "fenced out");
    let after = store.case_by_id(id).await.unwrap().unwrap();
    assert_eq!(after.case.state, CaseState::Deciding);
    assert_eq!(after.lease_owner.as_deref(), Some("fast#1"));
    assert!(store.outbox_of_case(id).await.unwrap().is_empty());
    assert_eq!(
        kinds(&store.case_history(id, 100).await.unwrap()),
        vec!["opened"]
    );

    // The owner's commit goes through, all three parts together.
    assert!(
        store
            .commit_step(
                "fast#1",
                &stepped,
                &[entry],
                std::slice::from_ref(&envelope),
                None
            )
            .await
            .unwrap()
    );
    let after = store.case_by_id(id).await.unwrap().unwrap();
    assert_eq!(after.case.state, CaseState::Escalated);
    assert_eq!(after.lease_owner, None);
    let outbox = store.outbox_of_case(id).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].envelope_id, envelope.id);
    assert_eq!(
        kinds(&store.case_history(id, 100).await.unwrap()),
        vec!["opened", "escalated"]
    );
}

// ---- the relay ----------------------------------------------------------------

/// Writes one event for a fresh case through a real step commit.
async fn case_with_event(store: &Store, pool: &PgPool, so: &str) -> (Uuid, Uuid) {
    let id = open_case(pool, &held(so, "acme.example", |_| {})).await;
    let case = store
        .claim_due("writer#1", Duration::from_secs(30), 1)
        .await
        .unwrap()
        .pop()
        .unwrap()
        .case
        .unwrap();
    let mut next = case.clone();
    next.state = CaseState::Escalated;
    next.escalation_reason = Some(EscalationReason::NoRuleMatched);
    next.next_action_at = None;
    let env = OutboundEvent::HoldEscalated {
        reason: EscalationReason::NoRuleMatched,
        level: EscalationLevel::Critical,
        held_seconds: 30,
        detail: "no default rule matches the order".into(),
        threshold: None,
    }
    .envelope(id, 0, &case.order, Utc::now());
    assert!(
        store
            .commit_step("writer#1", &next, &[], std::slice::from_ref(&env), None)
            .await
            .unwrap()
    );
    (id, env.id)
}

fn relay(store: &Store, topology: &Topology, prefix: &str, wake: Arc<Notify>) -> Relay {
    let broker = Broker::new(
        SecretUrl::parse("amqp", &amqp_url()).unwrap(),
        prefix.to_owned(),
    );
    Relay::new(store.clone(), broker, topology.clone(), wake).with_settings(RelaySettings {
        idle_poll: Duration::from_millis(50),
        retry: RetrySettings {
            initial: Duration::from_millis(50),
            max_interval: Duration::from_millis(200),
            max_elapsed: Duration::MAX,
            multiplier: 2.0,
            randomization: 0.0,
        },
        ..RelaySettings::default()
    })
}

#[sqlx::test]
async fn the_relay_publishes_contract_events_and_marks_them_sent(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let prefix = unique("relay");
    let topo = topology(&prefix);
    let mut events = EventQueue::bind(&topo).await;
    let (case_id, envelope_id) = case_with_event(&store, &pool, "4001").await;
    let wake = Arc::new(Notify::new());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(relay(&store, &topo, &prefix, wake.clone()).run(cancel.clone()));
    wake.notify_one();
    let got = events.next(DEADLINE).await.expect("the event is published");
    assert_contract(&got);
    assert_eq!(got.routing_key, "order.hold_escalated");
    assert_eq!(got.message_id, Some(envelope_id.to_string()));
    assert_eq!(got.data("caseId"), &json!(case_id.to_string()));
    assert_eq!(got.data("salesOrderNumber"), &json!("4001"));
    assert_eq!(got.data("webOrderId"), &json!("W4001"));
    assert_eq!(got.data("reason"), &json!("NO_RULE_MATCHED"));
    wait_for(DEADLINE, "the row to be marked sent", || async {
        let rows = store.outbox_of_case(case_id).await.unwrap();
        rows[0].sent_at.map(|_| ())
    })
    .await;
    events.assert_quiet(Duration::from_millis(300)).await;
    cancel.cancel();
    task.await.unwrap();
    let ch = events_channel().await;
    ch.exchange_delete(
        topo.events_exchange.as_str().into(),
        ExchangeDeleteOptions::default(),
    )
    .await
    .unwrap();
    events.close().await;
}

async fn events_channel() -> lapin::Channel {
    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    conn.create_channel().await.unwrap()
}

async fn declare_and_bind(ch: &lapin::Channel, topo: &Topology, queue: &str) {
    ch.exchange_declare(
        topo.events_exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        topo.events_exchange.as_str().into(),
        "order.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn queue_depth(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// An unbound exchange (the broker returns the message) and a missing
/// exchange (the broker closes the channel): the row stays unsent, with its
/// attempts and error, and goes out once a queue is bound.
#[sqlx::test]
async fn unroutable_events_stay_in_the_outbox_until_a_queue_is_bound(pool: PgPool) {
    for exchange_exists in [true, false] {
        let store = Store::from_pool(pool.clone());
        let prefix = unique("relay-unbound");
        let topo = topology(&prefix);
        let ch = events_channel().await;
        if exchange_exists {
            ch.exchange_declare(
                topo.events_exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        }
        let so = if exchange_exists { "5001" } else { "5002" };
        let (case_id, _) = case_with_event(&store, &pool, so).await;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            relay(&store, &topo, &prefix, Arc::new(Notify::new())).run(cancel.clone()),
        );
        let row = wait_for(DEADLINE, "failed publishing attempts", || async {
            let rows = store.outbox_of_case(case_id).await.unwrap();
            (rows[0].attempts >= 2).then(|| rows[0].clone())
        })
        .await;
        assert_eq!(row.sent_at, None, "exchange exists: {exchange_exists}");
        let error = row.last_error.unwrap();
        if exchange_exists {
            assert!(error.contains("unroutable"), "{error}");
        }

        let queue = format!("{prefix}.late");
        declare_and_bind(&ch, &topo, &queue).await;
        wait_for(DEADLINE, "the event to be published once bound", || async {
            let rows = store.outbox_of_case(case_id).await.unwrap();
            rows[0].sent_at.map(|_| ())
        })
        .await;
        assert_eq!(queue_depth(&ch, &queue).await, 1, "published exactly once");
        cancel.cancel();
        task.await.unwrap();
        ch.exchange_delete(
            topo.events_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    }
}

// ---- whole cases ----------------------------------------------------------------

#[sqlx::test]
async fn a_held_order_is_assigned_then_released(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    fake.account("acme.example", AccountStatus::Active);
    fake.order(
        "6001",
        Script {
            web: Some("W6001".into()),
            releases_after_reads: 3,
            credit_hold: true,
            ..Script::default()
        },
    );
    let mut w = World::start(pool, fake.clone(), 1, fast_settings()).await;
    let id = w.open(&held("6001", "acme.example", |_| {})).await;
    let done = w.wait_state(id, CaseState::Released).await;
    let seen = w
        .events
        .until(DEADLINE, "assigned and released", |s| s.len() >= 2)
        .await
        .to_vec();
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
    assert_eq!(assigned.data("smartAccountDomain"), &json!("acme.example"));
    assert_eq!(assigned.data("accountType"), &json!("CUSTOMER"));
    assert_eq!(assigned.data("virtualAccountName"), &json!("DEFAULT"));
    assert_eq!(assigned.data("rule"), &json!("by-domain"));
    assert_eq!(assigned.data("attempts"), &json!(1));
    assert_eq!(released.data("otherHolds"), &json!(["CREDIT_HOLD"]));
    assert!(released.data("heldSeconds").as_i64().unwrap() >= 30);
    assert_eq!(released.data("caseId"), &json!(id.to_string()));
    assert_eq!(fake.assignments("6001"), 1);
    assert!(done.case.polls >= 2, "released on the third look");
    assert_eq!(done.lease_owner, None);

    let history = w.store.case_history(id, 100).await.unwrap();
    let k = kinds(&history);
    for expected in [
        "opened",
        "call",
        "decided",
        "resolved",
        "assigned",
        "still_held",
        "released",
        "event",
    ] {
        assert!(k.contains(&expected), "{expected} missing from {k:?}");
    }
    let calls: Vec<&str> = history
        .iter()
        .filter(|h| h.kind == "call")
        .map(|h| h.detail["call"].as_str().unwrap())
        .collect();
    assert_eq!(
        &calls[..4],
        ["rules.decide", "find_account", "virtual_accounts", "assign"]
    );
    assert_eq!(calls.iter().filter(|c| **c == "assign").count(), 1);
    w.events.assert_quiet(Duration::from_millis(300)).await;
    w.stop().await;
}

#[sqlx::test]
async fn every_escalation_reason(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    for d in ["active.example", "badva.example"] {
        fake.account(d, AccountStatus::Active);
    }
    fake.account("pending.example", AccountStatus::Pending);
    let order = |so: &str, script: Script| fake.order(so, script);
    for so in ["7001", "7002", "7003", "7004", "7006", "7010"] {
        order(so, Script::default());
    }
    order(
        "7005",
        Script {
            read_error: Some(ErrorCode::OrderAccessDenied),
            ..Script::default()
        },
    );
    order(
        "7007",
        Script {
            assign_error: Some(ErrorCode::AssignmentLocked),
            ..Script::default()
        },
    );
    order(
        "7008",
        Script {
            assign_error: Some(ErrorCode::TncError),
            ..Script::default()
        },
    );
    order(
        "7009",
        Script {
            always_down: true,
            ..Script::default()
        },
    );
    order(
        "7011",
        Script {
            never_release: true,
            ..Script::default()
        },
    );
    // Order 7012 does not exist on the commerce side: the assignment gets 404.

    let mut settings = fast_settings();
    settings.retry.max_elapsed = Duration::from_millis(500);
    let mut w = World::start(pool, fake.clone(), 1, settings).await;
    let stocking = |v: &mut Value| v["data"]["orderType"] = json!("STOCKING");
    let table: Vec<(&str, HeldOrderEvent, &str)> = vec![
        (
            "7001",
            held("7001", "nomatch.example", |_| {}),
            "NO_RULE_MATCHED",
        ),
        (
            "7002",
            held("7002", "unknown.example", |_| {}),
            "SMART_ACCOUNT_NOT_FOUND",
        ),
        (
            "7003",
            held("7003", "pending.example", |_| {}),
            "SMART_ACCOUNT_NOT_ACTIVE",
        ),
        (
            "7004",
            held("7004", "badva.example", |_| {}),
            "VIRTUAL_ACCOUNT_NOT_FOUND",
        ),
        (
            "7005",
            held("7005", "active.example", |_| {}),
            "ORDER_NOT_ACCESSIBLE",
        ),
        (
            "7006",
            held("7006", "active.example", stocking),
            "ASSIGNMENT_LOCKED",
        ),
        (
            "7007",
            held("7007", "active.example", |_| {}),
            "ASSIGNMENT_LOCKED",
        ),
        (
            "7008",
            held("7008", "active.example", |_| {}),
            "ASSIGNMENT_REJECTED",
        ),
        (
            "7009",
            held("7009", "active.example", |_| {}),
            "RETRIES_EXHAUSTED",
        ),
        (
            "7012",
            held("7012", "active.example", |_| {}),
            "ORDER_NOT_ACCESSIBLE",
        ),
    ];
    let mut ids = Vec::new();
    for (so, ev, _) in &table {
        ids.push((*so, w.open(ev).await));
    }
    let persists = w.open(&held("7011", "active.example", |_| {})).await;

    for ((so, _, reason), (_, id)) in table.iter().zip(&ids) {
        let r = w.wait_state(*id, CaseState::Escalated).await;
        assert_eq!(
            r.case.escalation_reason.map(|r| r.as_str()),
            Some(*reason),
            "order {so}"
        );
    }
    // HOLD_PERSISTS: warning, then critical, still watching; released later.
    let seen = w
        .events
        .until(DEADLINE, "both HOLD_PERSISTS levels", |s| {
            reasons(s, "7011")
                .iter()
                .filter(|(_, r)| r == "HOLD_PERSISTS")
                .count()
                == 2
        })
        .await
        .to_vec();
    let levels: Vec<&Value> = of_order(&seen, "7011")
        .into_iter()
        .filter(|e| e.data("reason") == "HOLD_PERSISTS")
        .map(|e| e.data("level"))
        .collect();
    assert_eq!(levels, [&json!("warning"), &json!("critical")]);
    assert_eq!(w.case(persists).await.case.state, CaseState::Watching);
    fake.release("7011");
    w.wait_state(persists, CaseState::Released).await;

    let seen = w
        .events
        .until(DEADLINE, "an escalation event per order", |s| {
            table.iter().all(|(so, _, _)| {
                reasons(s, so)
                    .iter()
                    .any(|(k, _)| k == "order.hold_escalated")
            }) && reasons(s, "7011")
                .iter()
                .any(|(k, _)| k == "order.hold_released")
        })
        .await
        .to_vec();
    for e in &seen {
        assert_contract(e);
    }
    for (so, _, reason) in &table {
        let escalations: Vec<&Received> = of_order(&seen, so)
            .into_iter()
            .filter(|e| e.routing_key == "order.hold_escalated")
            .collect();
        assert_eq!(escalations.len(), 1, "order {so}: one escalation");
        let e = escalations[0];
        assert_eq!(e.data("reason"), &json!(reason), "order {so}");
        assert_eq!(e.data("level"), &json!("critical"), "order {so}");
        let expected = EscalationReason::parse(reason).unwrap().action();
        assert_eq!(e.data("action"), &json!(expected), "order {so}");
        assert!(!e.data("detail").as_str().unwrap().is_empty(), "order {so}");
    }
    // Nothing was assigned where something was refused before the call.
    for so in [
        "7001", "7002", "7003", "7004", "7006", "7007", "7008", "7009",
    ] {
        assert_eq!(fake.assignments(so), 0, "order {so}");
    }
    w.stop().await;
}

#[sqlx::test]
async fn pending_accounts_fall_back_or_are_watched_without_an_assignment(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    fake.account("pending.example", AccountStatus::Pending);
    fake.account("activated.example", AccountStatus::Active);
    fake.account("holding.example", AccountStatus::Active);
    fake.order(
        "8001",
        Script {
            releases_after_reads: 2,
            ..Script::default()
        },
    );
    fake.order(
        "8002",
        Script {
            active_already: true,
            releases_after_reads: 1,
            ..Script::default()
        },
    );
    let mut w = World::start(pool, fake.clone(), 1, fast_settings()).await;
    let pending = |domain: &'static str| {
        move |v: &mut Value| {
            v["data"]["holdReason"] = json!("PENDING_SMART_ACCOUNT");
            v["data"]["smartAccount"] = json!({"domain": domain, "status": "PENDING"});
            v["data"]["partner"]["id"] = json!("P-FB");
        }
    };
    let fallback = w
        .open(&held("8001", "pending.example", pending("pending.example")))
        .await;
    let activated = w
        .open(&held(
            "8002",
            "activated.example",
            pending("activated.example"),
        ))
        .await;
    let a = w.wait_state(fallback, CaseState::Released).await;
    let b = w.wait_state(activated, CaseState::Released).await;
    let target = a.case.target.unwrap();
    assert_eq!(target.smart_account_domain, "holding.example");
    assert_eq!(target.account_type, AccountType::Holding);
    assert!(target.via_fallback);
    assert_eq!(fake.assignments("8001"), 1);
    assert_eq!(b.case.assignment_id, None);
    assert_eq!(
        fake.assignments("8002"),
        0,
        "the pending account is never assigned again"
    );

    let seen = w
        .events
        .until(DEADLINE, "both releases", |s| {
            s.iter()
                .filter(|e| e.routing_key == "order.hold_released")
                .count()
                == 2
        })
        .await
        .to_vec();
    for e in &seen {
        assert_contract(e);
    }
    assert_eq!(
        reasons(&seen, "8001")
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        ["order.smart_account_assigned", "order.hold_released"]
    );
    let assigned = of_order(&seen, "8001")[0];
    assert_eq!(
        assigned.data("smartAccountDomain"),
        &json!("holding.example")
    );
    assert_eq!(assigned.data("accountType"), &json!("HOLDING"));
    assert_eq!(assigned.data("virtualAccountName"), &json!("Holding"));
    let released = of_order(&seen, "8002");
    assert_eq!(released.len(), 1);
    assert_eq!(
        released[0].data("smartAccountDomain"),
        &json!("activated.example")
    );
    w.stop().await;
}

#[sqlx::test]
async fn transient_failures_and_a_lost_response_end_in_one_assignment(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    fake.account("acme.example", AccountStatus::Active);
    fake.flaky_percent.store(40, Ordering::Relaxed);
    let orders: Vec<String> = (0..20).map(|n| format!("90{n:02}")).collect();
    for (n, so) in orders.iter().enumerate() {
        fake.order(
            so,
            Script {
                releases_after_reads: 2,
                lose_first_response: n % 2 == 0,
                ..Script::default()
            },
        );
    }
    let mut w = World::start(pool, fake.clone(), 1, fast_settings()).await;
    let mut ids = Vec::new();
    for so in &orders {
        ids.push(w.open(&held(so, "acme.example", |_| {})).await);
    }
    for id in &ids {
        w.wait_state(*id, CaseState::Released).await;
    }
    for so in &orders {
        assert_eq!(
            fake.assignments(so),
            1,
            "order {so}: exactly one assignment"
        );
    }
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
    let assigned: Vec<&Received> = seen
        .iter()
        .filter(|e| e.routing_key == "order.smart_account_assigned")
        .collect();
    assert_eq!(assigned.len(), orders.len(), "one assigned event per order");
    assert!(
        assigned
            .iter()
            .any(|e| e.data("attempts").as_u64().unwrap() > 1),
        "some assignments took several attempts"
    );
    let retries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM case_history WHERE kind = 'retry_scheduled'")
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert!(retries > 0);
    w.stop().await;
}

#[sqlx::test]
async fn two_engines_assign_each_of_500_orders_once(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    fake.account("acme.example", AccountStatus::Active);
    fake.flaky_percent.store(10, Ordering::Relaxed);
    let orders: Vec<String> = (0..500).map(|n| format!("11{n:04}")).collect();
    for so in &orders {
        fake.order(
            so,
            Script {
                releases_after_reads: 1,
                ..Script::default()
            },
        );
    }
    let mut settings = fast_settings();
    settings.batch_size = 16;
    let mut w = World::start(pool.clone(), fake.clone(), 2, settings).await;
    for so in &orders {
        open_case(&pool, &held(so, "acme.example", |_| {})).await;
    }
    w.wake.notify_one();
    wait_for(Duration::from_secs(60), "500 released cases", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM cases WHERE state = 'released'")
            .fetch_one(&pool)
            .await
            .unwrap();
        (n == 500).then_some(())
    })
    .await;
    assert_eq!(
        fake.total_assignments(),
        (500, 500),
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
    assert_eq!(ids.len(), seen.len(), "no duplicate envelope ids");
    let workers: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT split_part(detail->>'worker', '#', 1) FROM case_history \
         WHERE kind = 'call' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(workers.len(), 2, "both engines stepped cases: {workers:?}");
    w.stop().await;
}

#[sqlx::test]
async fn a_long_step_keeps_its_lease(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    fake.account("acme.example", AccountStatus::Active);
    fake.order(
        "15001",
        Script {
            releases_after_reads: 1,
            assign_delay: Duration::from_millis(2500),
            ..Script::default()
        },
    );
    let mut settings = fast_settings();
    settings.lease = Duration::from_millis(1000);
    let w = World::start(pool, fake.clone(), 2, settings).await;
    let id = w.open(&held("15001", "acme.example", |_| {})).await;
    w.wait_state(id, CaseState::Released).await;
    assert_eq!(fake.assign_calls(), 1, "no other engine took the case over");
    assert_eq!(fake.assignments("15001"), 1);
    w.stop().await;
}

#[sqlx::test]
async fn a_dead_workers_case_resumes_when_its_lease_runs_out(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    fake.account("acme.example", AccountStatus::Active);
    fake.order(
        "12001",
        Script {
            releases_after_reads: 1,
            ..Script::default()
        },
    );
    let store = Store::from_pool(pool.clone());
    let id = open_case(&pool, &held("12001", "acme.example", |_| {})).await;
    // A worker claims the case and dies.
    assert_eq!(
        store
            .claim_due("dead#1", Duration::from_millis(500), 1)
            .await
            .unwrap()
            .len(),
        1
    );
    let started = std::time::Instant::now();
    let w = World::start(pool, fake.clone(), 1, fast_settings()).await;
    w.wait_state(id, CaseState::Released).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not before the lease ran out"
    );
    assert_eq!(fake.assignments("12001"), 1);
    w.stop().await;
}

#[sqlx::test]
async fn cases_cli_lists_shows_and_retries(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    fake.account("later.example", AccountStatus::Pending);
    fake.order(
        "13001",
        Script {
            releases_after_reads: 1,
            ..Script::default()
        },
    );
    let w = World::start(pool.clone(), fake.clone(), 1, fast_settings()).await;
    let id = w.open(&held("13001", "later.example", |_| {})).await;
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
    assert_eq!(rows[0]["order"], "13001");
    assert_eq!(rows[0]["state"], "escalated");
    assert_eq!(rows[0]["escalationReason"], "SMART_ACCOUNT_NOT_ACTIVE");
    let (code, out, _) = run(&["list", "--state", "escalated"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("13001") && out.contains("SMART_ACCOUNT_NOT_ACTIVE"),
        "{out}"
    );
    let (code, _, err) = run(&["list", "--state", "sleeping"]);
    assert_ne!(code, Some(0), "an unknown state is refused");
    assert!(err.contains("deciding, resolving"), "{err}");

    let (code, out, err) = run(&["show", "13001"]);
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        "by-domain",
        "find_account",
        "SMART_ACCOUNT_NOT_ACTIVE",
        "order.hold_escalated",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
    let (code, out, _) = run(&["show", "13001", "--json"]);
    assert_eq!(code, Some(0));
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["case"]["state"], "escalated");
    assert!(shown["history"].as_array().unwrap().len() >= 4);
    assert_eq!(shown["events"][0]["routingKey"], "order.hold_escalated");
    let (code, _, err) = run(&["show", "99999"]);
    assert_eq!(code, Some(64), "{err}");

    // The customer activates the account; the operator re-runs the case.
    fake.account("later.example", AccountStatus::Active);
    let (code, out, err) = run(&["retry", "13001"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deciding"), "{out}");
    w.wake.notify_one();
    let done = w.wait_state(id, CaseState::Released).await;
    assert_eq!(done.case.generation, 1);
    assert_eq!(fake.assignments("13001"), 1);
    // Released now: a second retry is refused with exit 64.
    let (code, _, err) = run(&["retry", "13001"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("not escalated"), "{err}");
    // Events of the second run have their own ids.
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

#[sqlx::test]
async fn retry_refuses_while_another_case_of_the_order_is_open(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    let w = World::start(pool.clone(), fake.clone(), 1, fast_settings()).await;
    let first = w.open(&held("14001", "nomatch.example", |_| {})).await;
    w.wait_state(first, CaseState::Escalated).await;
    w.cancel.cancel();
    // A new hold on the same order opens a second case, not yet stepped.
    open_case(&pool, &held("14001", "acme.example", |_| {})).await;
    let err = holdclear::engine::retry_case(&w.store, "14001")
        .await
        .unwrap_err();
    assert!(
        matches!(err, holdclear::engine::EngineError::NotEscalated { .. }),
        "the latest case is the open one: {err}"
    );
    // Retrying the escalated one by its own order key is refused too.
    sqlx::query("UPDATE cases SET created_at = created_at - interval '1 day' WHERE id <> $1")
        .bind(first)
        .execute(&pool)
        .await
        .unwrap();
    let err = holdclear::engine::retry_case(&w.store, "14001")
        .await
        .unwrap_err();
    assert!(
        matches!(err, holdclear::engine::EngineError::OtherOpen { .. }),
        "{err}"
    );
    w.stop().await;
}
