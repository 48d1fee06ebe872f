//! Panics: one inside a case's step is that case's failure, counted against
//! its retry budget; a task of the worker that dies stops the worker, and
//! `/healthz` names it meanwhile.

use std::sync::Arc;
use std::time::Duration;

use holdclear::domain::{CaseState, EscalationReason};
use holdclear::engine::Engine;
use holdclear::ops::health::Health;
use holdclear::ops::http;
use holdclear::ops::identity::WorkerIdentity;
use holdclear::store::Store;
use holdclear::worker::{Supervisor, WorkerError};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Misbehaviour, Stub, engine_settings, held, open_case, rules};
use crate::support::wait_for;
use crate::support::worker::http_get;

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
        (r.case.state() == CaseState::Escalated).then_some(r)
    })
    .await;
    let released = wait_for(DEADLINE, "the other case to be released", || async {
        let r = store.case_by_id(fine).await.unwrap().unwrap();
        (r.case.state() == CaseState::Released).then_some(())
    });
    released.await;
    stop.cancel();
    engine.await.unwrap();
    assert_eq!(
        escalated.case.stage.escalation_reason(),
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

/// The worker's supervisor with the real operations server: a task that
/// panics, or one that returns, before the worker was asked to stop, makes
/// `/healthz` answer 503 naming it (with the panic's message) and fires the
/// worker's stop; a task that ends after that is no failure, and the first
/// failure is the one reported.
#[tokio::test]
async fn a_task_that_dies_fails_healthz_naming_it_and_stops_the_worker() {
    for (name, panics) in [("engine", true), ("relay", false)] {
        let health = Health::new();
        let stop = CancellationToken::new();
        let supervisor = Supervisor::new(health.clone(), stop.clone());
        let identity = WorkerIdentity::new();
        let http_stop = CancellationToken::new();
        let (addr, serving) = http::serve(
            "127.0.0.1:0".parse().unwrap(),
            http::router(health.clone(), identity.clone()),
            http_stop.clone(),
        )
        .await
        .unwrap();
        supervisor.spawn("health server", serving);
        let steady = supervisor.spawn("intake", {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        let (status, body) = http_get(addr, "/healthz").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&identity.to_string()), "{body}");

        let (go, gate) = tokio::sync::oneshot::channel::<()>();
        let dying = supervisor.spawn(name, async move {
            let _ = gate.await;
            if panics {
                panic!("the {name} broke");
            }
        });
        go.send(()).unwrap();
        let body = wait_for(DEADLINE, "/healthz to answer 503", || async {
            let (status, body) = http_get(addr, "/healthz").await;
            (status == 503).then_some(body)
        })
        .await;
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["status"], "failing", "{body}");
        assert_eq!(answer["task"], name, "{body}");
        assert_eq!(answer["worker"]["id"], identity.to_string(), "{body}");
        let error = answer["error"].as_str().unwrap();
        if panics {
            assert_eq!(error, format!("it panicked: the {name} broke"));
        } else {
            assert_eq!(error, "it returned");
        }
        assert!(stop.is_cancelled(), "the worker is told to stop");
        assert_eq!(dying.await.unwrap().is_some(), !panics);
        // Told to stop, the others end: no failure of theirs replaces the first.
        assert_eq!(steady.await.unwrap(), Some(()));
        http_stop.cancel();
        assert!(supervisor.wait(DEADLINE).await);
        assert_eq!(health.failure().unwrap().task, name);
        // What `holdclear run` exits with (non-zero, not a usage error).
        let err = WorkerError::TaskFailed(health.failure().unwrap());
        assert!(
            err.to_string()
                .contains(&format!("the {name} task stopped unexpectedly"))
        );
    }
}
