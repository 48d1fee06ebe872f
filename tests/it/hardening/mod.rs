//! Production hardening (issue #13, the process half): worker identity in
//! leases, deadlines on every wait, supervised tasks and panicking steps,
//! start-up signals, readiness under load, the token cache's clamp.
//!
//! What these tests share: an in-process commerce API double whose calls
//! can freeze their thread, take long or panic (a legitimate double of the
//! `CommerceApi` trait at the boundary), test rules, held events decoded by
//! the real decoder, and cases opened with intake's own store write.

mod deadlines;
mod identity;
mod signals;
mod supervision;
mod token;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use holdclear::commerce::{
    AccountStatus, Assignment, AssignmentReceipt, CommerceApi, CommerceError, Hold, Order,
    SMART_ACCOUNT_HOLD, SmartAccount, VirtualAccount,
};
use holdclear::config::{EngineSettings, EscalationThreshold, RetrySettings};
use holdclear::domain::{
    AccountSelector, AccountType, Domain, EscalationLevel, HeldOrder, HeldOrderEvent, OrderId,
    SalesOrderNumber, Target, VirtualAccountChoice,
};
use holdclear::engine::DecisionSource;
use holdclear::rules::Decision;
use holdclear::store::{Recorded, Store};
use serde_json::json;
use uuid::Uuid;

/// What a call of the [`Stub`] does besides answering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Answers at once.
    #[default]
    None,
    /// The first account search blocks its thread this long (with the
    /// engine on a runtime of its own, the whole worker stands still: a
    /// stopped container, a long pause, a starved CPU).
    FreezeFirstSearch(Duration),
    /// The first account search takes this long (asynchronously: the
    /// worker's lease renewals go on).
    SlowFirstSearch(Duration),
    /// Every search for this domain panics.
    PanicOnSearchFor(&'static str),
}

/// An in-process commerce API: every domain is an ACTIVE account with a
/// public `DEFAULT` Virtual Account; an assignment is accepted (once per
/// idempotency key) and the hold shows released on the next read.
#[derive(Debug, Default)]
pub struct Stub {
    misbehaviour: Misbehaviour,
    searches: AtomicU32,
    state: Mutex<StubState>,
}

#[derive(Debug, Default)]
struct StubState {
    /// Accepted assignments by sales order number.
    assigned: HashMap<String, u32>,
    keys: HashMap<String, AssignmentReceipt>,
}

impl Stub {
    /// A stub that misbehaves as said.
    pub fn new(misbehaviour: Misbehaviour) -> Self {
        Self {
            misbehaviour,
            ..Self::default()
        }
    }

    /// Account searches so far.
    pub fn searches(&self) -> u32 {
        self.searches.load(Ordering::SeqCst)
    }

    /// Distinct accepted assignments of an order.
    pub fn assignments(&self, so: &str) -> u32 {
        let s = self.state.lock().unwrap();
        s.assigned.get(so).copied().unwrap_or_default()
    }
}

#[async_trait]
impl CommerceApi for Stub {
    async fn find_account(
        &self,
        selector: &AccountSelector,
        account_type: Option<AccountType>,
    ) -> Result<Option<SmartAccount>, CommerceError> {
        let first = self.searches.fetch_add(1, Ordering::SeqCst) == 0;
        match self.misbehaviour {
            Misbehaviour::FreezeFirstSearch(d) if first => std::thread::sleep(d),
            Misbehaviour::SlowFirstSearch(d) if first => tokio::time::sleep(d).await,
            _ => {}
        }
        let AccountSelector::Domain(d) = selector else {
            return Ok(None);
        };
        if let Misbehaviour::PanicOnSearchFor(domain) = self.misbehaviour
            && d.as_str() == domain
        {
            panic!("the commerce double panics on a search for {domain}");
        }
        Ok(Some(SmartAccount {
            id: "SA-1".into(),
            domain: d.to_string(),
            name: d.to_string(),
            account_type: account_type.unwrap_or(AccountType::Customer).to_string(),
            status: AccountStatus::Active,
        }))
    }

    async fn virtual_accounts(
        &self,
        _domain: &Domain,
    ) -> Result<Vec<VirtualAccount>, CommerceError> {
        Ok(vec![VirtualAccount {
            name: "DEFAULT".into(),
            is_default: true,
            public: true,
        }])
    }

    async fn order(&self, order: &OrderId) -> Result<Order, CommerceError> {
        let so = order
            .sales_order_number
            .clone()
            .expect("the test orders have a sales order number");
        let released = self.assignments(so.as_str()) > 0;
        Ok(Order {
            sales_order_number: so,
            web_order_id: None,
            status: "BOOKED".into(),
            holds: vec![Hold {
                code: SMART_ACCOUNT_HOLD.into(),
                applied_at: Some(Utc::now()),
                released_at: released.then(Utc::now),
            }],
            smart_account_domain: None,
            smart_account_status: None,
            virtual_account_name: None,
        })
    }

    async fn assign(
        &self,
        order: &SalesOrderNumber,
        _assignment: &Assignment,
        idempotency_key: &str,
    ) -> Result<AssignmentReceipt, CommerceError> {
        let mut s = self.state.lock().unwrap();
        if let Some(receipt) = s.keys.get(idempotency_key) {
            return Ok(receipt.clone());
        }
        let receipt = AssignmentReceipt {
            assignment_id: format!("ASG-{}", s.keys.len() + 1),
            status: "SUBMITTED".into(),
        };
        s.keys.insert(idempotency_key.to_owned(), receipt.clone());
        *s.assigned.entry(order.to_string()).or_default() += 1;
        Ok(receipt)
    }
}

/// Test rules: the end customer's domain, as a CUSTOMER account, VA `DEFAULT`.
pub fn rules() -> std::sync::Arc<dyn DecisionSource> {
    std::sync::Arc::new(|order: &HeldOrder| -> Option<Decision> {
        let domain = order.end_customer_domain()?;
        Some(Decision {
            rule: "by-domain".into(),
            rules_hash: "0123abcd".into(),
            target: Target {
                account: AccountSelector::Domain(domain),
                account_type: AccountType::Customer,
                virtual_account: VirtualAccountChoice::Named("DEFAULT".into()),
            },
            fallback: None,
        })
    })
}

/// A held-order event of order `so` for an end customer at `domain`.
pub fn held(so: &str, domain: &str) -> HeldOrderEvent {
    let v = json!({
        "specversion": "1.0",
        "type": "commerce.order.held.v1",
        "source": "/commerce/orders",
        "id": Uuid::new_v4().to_string(),
        "time": Utc::now().to_rfc3339(),
        "data": {
            "salesOrderNumber": so,
            "holdReason": "NO_SMART_ACCOUNT",
            "heldAt": (Utc::now() - chrono::Duration::seconds(30)).to_rfc3339(),
            "orderType": "STANDARD",
            "partner": {"id": "P-100", "name": "Globex"},
            "endCustomer": {"name": "Customer", "email": format!("it@{domain}"), "country": "US"},
            "smartAccount": null,
            "lines": [{"lineNumber": "1.1", "sku": "C9300-48P-E", "productFamily": "C9300"}]
        }
    });
    HeldOrderEvent::decode(&serde_json::to_vec(&v).unwrap(), 256 * 1024).expect("valid event")
}

/// Opens a case in `deciding` with intake's own write.
pub async fn open_case(store: &Store, ev: &HeldOrderEvent) -> Uuid {
    let recorded = store
        .record_held(std::slice::from_ref(ev))
        .await
        .expect("intake records the event");
    match recorded.as_slice() {
        [Recorded::Opened { case_id }] => *case_id,
        other => panic!("the event opened no case: {other:?}"),
    }
}

/// Quick engine settings with the given lease and retry budget.
pub fn engine_settings(lease: Duration, retry_budget: Duration) -> EngineSettings {
    EngineSettings {
        poll_interval: Duration::from_millis(50),
        poll_max_interval: Duration::from_millis(200),
        escalation: vec![EscalationThreshold {
            after: Duration::from_secs(600),
            level: EscalationLevel::Warning,
        }],
        retry: RetrySettings {
            initial: Duration::from_millis(50),
            max_interval: Duration::from_millis(200),
            max_elapsed: retry_budget,
            multiplier: 2.0,
            randomization: 0.0,
        },
        concurrency: 8,
        batch_size: 8,
        lease,
        idle_poll: Duration::from_millis(100),
    }
}

/// History kinds of a case, oldest first.
pub async fn history_kinds(store: &Store, case: Uuid) -> Vec<String> {
    store
        .case_history(case, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.kind)
        .collect()
}
