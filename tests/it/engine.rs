//! The case engine against real PostgreSQL and RabbitMQ: claims and leases,
//! step commits and the outbox relay here; whole cases through the
//! commerce-API simulator over HTTP in [`e2e`], and through a scripted
//! in-process API (for what the simulator cannot do) in [`scripted`].
//!
//! Cases are opened with intake's store write (`Store::record_held`); the
//! path through RabbitMQ and the worker is in [`e2e`] (`through_the_worker`).

mod by_hand;
mod calls;
mod e2e;
mod identity;
mod schedule;
mod scripted;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use holdclear::broker::Broker;
use holdclear::commerce::CommerceApi;
use holdclear::config::{EngineSettings, EscalationThreshold, RetrySettings, SecretUrl, Topology};
use holdclear::domain::Decision;
use holdclear::domain::HistoryEntry;
use holdclear::domain::{
    AccountSelector, AccountType, CaseState, Domain, EscalationLevel, EscalationReason, HeldOrder,
    HeldOrderEvent, Stage, Target, VirtualAccountChoice,
};
use holdclear::engine::{DecisionSource, Engine};
use holdclear::ops::identity::WorkerIdentity;
use holdclear::outbox::{Relay, RelaySettings};
use holdclear::store::{CaseRecord, Recorded, StepCommit, Store};
use lapin::options::{ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::broker::{close_connection, connections_named};
use crate::support::events::{EventQueue, Received, assert_contract, of_order};
use crate::support::{amqp_url, topology, unique, wait_for};

const DEADLINE: Duration = Duration::from_secs(20);

// ---- rules, events, cases ---------------------------------------------------

/// The fallback account of the test rules (the simulator's holding account).
const HOLDING: &str = "globex-holding.com";

/// Test rules: the end customer's domain as a CUSTOMER account with VA
/// DEFAULT (VA `Network` for partner `P-VA-NETWORK`, VA `Missing` for
/// `badva.*` domains), falling back to `globex-holding.com` (HOLDING, VA
/// `Holding`) for partner `P-FB`; no rule for `nomatch.example`.
fn rules() -> Arc<dyn DecisionSource> {
    Arc::new(|order: &HeldOrder| -> Option<Decision> {
        let domain = order.end_customer_domain()?;
        if domain.as_str() == "nomatch.example" {
            return None;
        }
        let partner = order
            .partner
            .as_ref()
            .and_then(|p| p.id.as_deref())
            .unwrap_or_default();
        let va = if domain.as_str().starts_with("badva") {
            "Missing"
        } else if partner == "P-VA-NETWORK" {
            "Network"
        } else {
            "DEFAULT"
        };
        Some(Decision {
            rule: "by-domain".into(),
            rules_hash: "0123abcd".into(),
            target: Target {
                account: AccountSelector::Domain(domain),
                account_type: AccountType::Customer,
                virtual_account: VirtualAccountChoice::Named(va.into()),
            },
            fallback: (partner == "P-FB").then(|| Target {
                account: AccountSelector::Domain(Domain::parse(HOLDING).unwrap()),
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

/// [`held`] naming the order by web order id `web` alone (no sales order
/// number).
fn held_by_web_order_id(web: &str, domain: &str) -> HeldOrderEvent {
    held("0", domain, |v| {
        v["data"]
            .as_object_mut()
            .unwrap()
            .remove("salesOrderNumber");
        v["data"]["webOrderId"] = json!(web);
    })
}

/// Opens a case in `deciding` with intake's own write.
async fn open_case(pool: &PgPool, ev: &HeldOrderEvent) -> Uuid {
    let recorded = Store::from_pool(pool.clone())
        .record_held(std::slice::from_ref(ev))
        .await
        .expect("intake records the event");
    match recorded.as_slice() {
        [Recorded::Opened { case_id }] => *case_id,
        other => panic!("the event opened no case: {other:?}"),
    }
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
    /// One engine per commerce client, one relay, a queue on the events
    /// exchange; the test rules; a topology of its own.
    async fn start(
        pool: PgPool,
        commerce: Vec<Arc<dyn CommerceApi>>,
        settings: EngineSettings,
    ) -> Self {
        let prefix = unique("engine");
        Self::start_with(pool, commerce, rules(), settings, topology(&prefix)).await
    }

    /// [`World::start`] with the given rules and topology.
    async fn start_with(
        pool: PgPool,
        commerce: Vec<Arc<dyn CommerceApi>>,
        rules: Arc<dyn DecisionSource>,
        settings: EngineSettings,
        topology: Topology,
    ) -> Self {
        let prefix = unique("engine");
        let events = EventQueue::bind(&topology).await;
        let store = Store::from_pool(pool.clone());
        let wake = Arc::new(Notify::new());
        let relay_wake = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        for api in commerce {
            let engine = Engine::new(
                store.clone(),
                api,
                rules.clone(),
                settings.clone(),
                WorkerIdentity::new(),
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
            (r.case.state() == state).then_some(r)
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
        // The test's exchange; another cleanup may have deleted it already.
        let _ = ch
            .exchange_delete(
                self.topology.events_exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
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
        "SELECT lease_owner, count(*) FROM case_schedule GROUP BY lease_owner ORDER BY lease_owner",
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

/// `case` after a step that escalates it `NO_RULE_MATCHED`, and its event.
fn escalated_no_rule(
    case: &holdclear::domain::Case,
) -> (holdclear::domain::Case, holdclear::domain::Envelope) {
    let (next, mut envelopes) = crate::support::store::escalated_no_rule(case, 1);
    (next, envelopes.remove(0))
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
    let (stepped, envelope) = escalated_no_rule(&case);
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
    assert_eq!(after.case.state(), CaseState::Deciding);
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
    assert_eq!(after.case.state(), CaseState::Escalated);
    assert_eq!(after.lease_owner, None);
    let outbox = store.outbox_of_case(id).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].envelope_id, envelope.id);
    assert_eq!(
        kinds(&store.case_history(id, 100).await.unwrap()),
        vec!["opened", "escalated"]
    );
}

/// A row whose stored event no longer reads as an event is handed out as
/// unreadable, naming the column, beside the readable ones; it does not fail
/// the claim.
#[sqlx::test]
async fn an_unreadable_case_is_claimed_as_unreadable_beside_the_others(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let good = open_case(&pool, &held("3201", "acme.example", |_| {})).await;
    let bad = open_case(&pool, &held("3202", "acme.example", |_| {})).await;
    sqlx::query("UPDATE cases SET event = '{\"specversion\": 7}' WHERE id = $1")
        .bind(bad)
        .execute(&pool)
        .await
        .unwrap();
    let claimed = store
        .claim_due("reader#1", Duration::from_secs(30), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    for c in claimed {
        if c.id == good {
            assert!(c.case.is_ok(), "{:?}", c.case.err());
        } else {
            assert_eq!(c.id, bad);
            let err = c.case.unwrap_err().to_string();
            assert!(err.contains("event"), "{err}");
        }
    }
}

/// Steps of several cases share one statement: each is fenced by its own
/// lease, and a case whose lease was lost gets nothing of it (no history,
/// no event), while the others get all of theirs, in order.
#[sqlx::test]
async fn steps_of_several_cases_commit_together_each_fenced_by_its_lease(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let mut ids = Vec::new();
    for so in ["3101", "3102", "3103"] {
        ids.push(open_case(&pool, &held(so, "acme.example", |_| {})).await);
    }
    let claimed = store
        .claim_due("batch#1", Duration::from_secs(30), 3)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    // The second case's lease goes to someone else meanwhile.
    let stolen = claimed[1].id;
    sqlx::query("UPDATE case_schedule SET lease_owner = 'other#1' WHERE case_id = $1")
        .bind(stolen)
        .execute(&pool)
        .await
        .unwrap();
    let mut cases = Vec::new();
    let mut histories = Vec::new();
    let mut outboxes = Vec::new();
    for c in &claimed {
        let case = c.case.as_ref().unwrap();
        let (next, env) = escalated_no_rule(case);
        let history: Vec<HistoryEntry> = ["rules.decide", "escalated"]
            .into_iter()
            .map(|kind| HistoryEntry {
                at: Utc::now(),
                kind,
                state: CaseState::Escalated,
                detail: json!({"case": case.id}),
            })
            .collect();
        cases.push(next);
        histories.push(history);
        outboxes.push(vec![env]);
    }
    let steps: Vec<StepCommit<'_>> = (0..3)
        .map(|i| StepCommit {
            lease_owner: "batch#1",
            case: &cases[i],
            history: &histories[i],
            outbox: &outboxes[i],
            hold: None,
        })
        .collect();
    let written = store.commit_steps(&steps).await.unwrap();
    let expect: Vec<bool> = claimed.iter().map(|c| c.id != stolen).collect();
    assert_eq!(written, expect);
    for c in &claimed {
        let after = store.case_by_id(c.id).await.unwrap().unwrap();
        let rows = store.case_history(c.id, 100).await.unwrap();
        let history = kinds(&rows);
        let outbox = store.outbox_of_case(c.id).await.unwrap();
        if c.id == stolen {
            assert_eq!(after.case.state(), CaseState::Deciding);
            assert_eq!(after.lease_owner.as_deref(), Some("other#1"));
            assert_eq!(history, vec!["opened"]);
            assert!(outbox.is_empty());
        } else {
            assert_eq!(after.case.state(), CaseState::Escalated);
            assert_eq!(after.lease_owner, None);
            assert_eq!(history, vec!["opened", "rules.decide", "escalated"]);
            assert_eq!(outbox.len(), 1);
            assert_eq!(outbox[0].case_id, c.id);
        }
    }
}

// ---- the relay ----------------------------------------------------------------

/// Writes one event for a fresh case through a real step commit.
async fn case_with_event(store: &Store, so: &str) -> (Uuid, Uuid) {
    let event = held(so, "acme.example", |_| {});
    let (id, envelopes) = crate::support::store::escalated_with_events(store, &event, 1).await;
    (id, envelopes[0])
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
async fn the_relay_publishes_contract_events_marks_them_sent_and_reconnects(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let prefix = unique("relay");
    let topo = topology(&prefix);
    let mut events = EventQueue::bind(&topo).await;
    let (case_id, envelope_id) = case_with_event(&store, "4001").await;
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

    // The relay's connection is closed under it: it reconnects by itself.
    let pids = connections_named(&prefix);
    assert_eq!(pids.len(), 1, "the relay's one connection: {pids:?}");
    close_connection(&pids[0]);
    let (_, second) = case_with_event(&store, "4002").await;
    wake.notify_one();
    let got = events
        .next(DEADLINE)
        .await
        .expect("published after reconnecting");
    assert_eq!(got.message_id, Some(second.to_string()));
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
        let (case_id, _) = case_with_event(&store, so).await;
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
