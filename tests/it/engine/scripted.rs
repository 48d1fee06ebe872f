//! Whole cases through a scripted in-process commerce API: every escalation
//! reason in one table (the simulator cannot refuse a valid assignment with
//! a 400, so `ASSIGNMENT_REJECTED` is shown here), a pending account that
//! turned ACTIVE (nothing to assign), a step longer than its lease,
//! `cases retry` refusing while another case is open, and shutdown.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use holdclear::commerce::{
    AccountStatus, Assignment, AssignmentReceipt, CommerceError, ErrorCode, Hold, Order,
    SMART_ACCOUNT_HOLD, SmartAccount, VirtualAccount,
};
use holdclear::domain::{OrderId, SalesOrderNumber};

use super::*;

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
    /// The assignment call takes this long.
    assign_delay: Duration,
}

#[derive(Debug, Default)]
struct OrderState {
    script: Script,
    assigned: bool,
    reads_since: u32,
    released: bool,
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

/// An in-process commerce API with per-order scripts and idempotency keys.
#[derive(Debug, Default)]
struct Fake {
    state: Mutex<FakeState>,
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
        let holds = vec![Hold {
            code: SMART_ACCOUNT_HOLD.into(),
            applied_at: Some(Utc::now()),
            released_at: o.released.then(Utc::now),
        }];
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
        let receipt = AssignmentReceipt {
            assignment_id: format!("ASG-{n}"),
            status: "SUBMITTED".into(),
        };
        s.keys.insert(idempotency_key.to_owned(), receipt.clone());
        *s.assignments.entry(order.to_string()).or_default() += 1;
        Ok(receipt)
    }
}

#[sqlx::test]
async fn every_escalation_reason_with_a_scripted_api(pool: PgPool) {
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
    let mut w = World::start(pool, vec![fake.clone()], settings).await;
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
            r.case.stage.escalation_reason().map(|r| r.as_str()),
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
    assert_eq!(w.case(persists).await.case.state(), CaseState::Watching);
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
    fake.account(HOLDING, AccountStatus::Active);
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
    let mut w = World::start(pool, vec![fake.clone()], fast_settings()).await;
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
    let target = a.case.stage.progress().target.unwrap();
    assert_eq!(target.smart_account_domain, HOLDING);
    assert_eq!(target.account_type, AccountType::Holding);
    assert!(target.via_fallback);
    assert_eq!(fake.assignments("8001"), 1);
    assert_eq!(b.case.stage.progress().assignment.map(|a| a.id), None);
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
    assert_eq!(assigned.data("smartAccountDomain"), &json!(HOLDING));
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
    let w = World::start(pool, vec![fake.clone(), fake.clone()], settings).await;
    let id = w.open(&held("15001", "acme.example", |_| {})).await;
    w.wait_state(id, CaseState::Released).await;
    assert_eq!(fake.assign_calls(), 1, "no other engine took the case over");
    assert_eq!(fake.assignments("15001"), 1);
    w.stop().await;
}

#[sqlx::test]
async fn retry_refuses_while_another_case_of_the_order_is_open(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    let w = World::start(pool.clone(), vec![fake.clone()], fast_settings()).await;
    let first = w.open(&held("14001", "nomatch.example", |_| {})).await;
    w.wait_state(first, CaseState::Escalated).await;
    w.cancel.cancel();
    // A new hold on the same order (applied after the escalation) opens a
    // second case, not yet stepped.
    open_case(
        &pool,
        &held("14001", "acme.example", |v| {
            v["data"]["heldAt"] = json!(Utc::now().to_rfc3339());
        }),
    )
    .await;
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

#[sqlx::test]
async fn shutdown_finishes_the_step_in_flight_and_gives_the_case_back(pool: PgPool) {
    let fake = Arc::new(Fake::default());
    fake.account("acme.example", AccountStatus::Active);
    fake.order(
        "16001",
        Script {
            releases_after_reads: 1,
            assign_delay: Duration::from_millis(800),
            ..Script::default()
        },
    );
    let w = World::start(pool, vec![fake.clone()], fast_settings()).await;
    let id = w.open(&held("16001", "acme.example", |_| {})).await;
    wait_for(DEADLINE, "the assignment call", || async {
        (fake.assign_calls() == 1).then_some(())
    })
    .await;
    let store = w.store.clone();
    let started = std::time::Instant::now();
    w.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let r = store.case_by_id(id).await.unwrap().unwrap();
    assert_eq!(
        r.case.state(),
        CaseState::Watching,
        "the accepted assignment was committed"
    );
    assert_eq!(r.lease_owner, None, "the case was given back");
    assert_eq!(fake.assignments("16001"), 1);
}
