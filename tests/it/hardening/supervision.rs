//! Panics: one inside a case's step is that case's failure, counted against
//! its retry budget; a task of the worker that dies stops the worker, and
//! `/healthz` names it meanwhile.

use std::sync::Arc;
use std::time::Duration;

use holdclear::domain::{CaseState, EscalationReason};
use holdclear::engine::Engine;
use holdclear::ops::identity::WorkerIdentity;
use holdclear::store::Store;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Misbehaviour, Stub, engine_settings, held, open_case, rules};
use crate::support::wait_for;

const DEADLINE: Duration = Duration::from_secs(30);

/// Every account search for one order's domain panics (the commerce
/// double at the trait's boundary). The case is retried with backoff like any transient failure,
/// each panic in its history, and escalates `RETRIES_EXHAUSTED` when its
/// budget (1 s) is spent; a second case beside it, whose searches do not
/// panic, is released by the same engine.
#[sqlx::test]
async fn a_panicking_step_counts_against_its_case_retry_budget(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    let doomed = open_case(&store, &held("62000001", "panic.example")).await;
    let fine = open_case(&store, &held("62000002", "acme.example")).await;
    let settings = engine_settings(Duration::from_secs(2), Duration::from_secs(1));
    let stop = CancellationToken::new();
    let engine = tokio::spawn(
        Engine::new(
            store.clone(),
            Arc::new(Stub::new(Misbehaviour::PanicOnSearchFor("panic.example"))),
            rules(),
            settings,
            WorkerIdentity::new(),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
        )
        .with_drain_timeout(Duration::from_secs(2))
        .run(stop.clone()),
    );
    let escalated = wait_for(DEADLINE, "the case to escalate", || async {
        let r = store.case_by_id(doomed).await.unwrap().unwrap();
        (r.case.state == CaseState::Escalated).then_some(r)
    })
    .await;
    let released = wait_for(DEADLINE, "the other case to be released", || async {
        let r = store.case_by_id(fine).await.unwrap().unwrap();
        (r.case.state == CaseState::Released).then_some(())
    });
    released.await;
    stop.cancel();
    engine.await.unwrap();
    assert_eq!(
        escalated.case.escalation_reason,
        Some(EscalationReason::RetriesExhausted)
    );
    let history = store.case_history(doomed, 1000).await.unwrap();
    let retries: Vec<_> = history
        .iter()
        .filter(|h| h.kind == "retry_scheduled")
        .collect();
    assert!(!retries.is_empty(), "{history:?}");
    for r in &retries {
        let detail = r.detail["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("panicked"), "{detail}");
        assert!(
            detail.contains("the commerce double panics on a search for panic.example"),
            "{detail}"
        );
    }
}
