//! Two replicas of the worker in containers: the same PID (1), the same
//! queue, claim counters that both start at 0 — everything alike but the
//! identity each made at start. A replica that stands still past its lease
//! must be fenced out when it wakes up, whoever claimed its case meanwhile.
//! (Before each worker had a [`WorkerIdentity`], the lease token was
//! `holdclear pid=<pid> queue=<queue>#<claim>`: both replicas' first claims
//! were the same token, and the stale replica's commits passed the fence.)

use std::sync::Arc;
use std::time::Duration;

use holdclear::engine::Engine;
use holdclear::ops::identity::WorkerIdentity;
use holdclear::store::Store;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Misbehaviour, Stub, engine_settings, held, history_kinds, open_case, rules};
use crate::support::{database_url, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

/// Replica A claims the case and freezes (its whole runtime) for 3 s inside
/// its first call, with a lease of 1 s. Once A's lease has run out,
/// replica B starts, claims the case (its first claim, as A's was) and takes
/// 4 s over its own first call, renewing its lease. A wakes up meanwhile
/// and tries to commit its step: the fence must refuse it, so A never gets
/// as far as assigning. One decision, one resolution, one assignment: B's.
#[sqlx::test]
async fn a_replica_that_wakes_after_its_lease_is_fenced_out(pool: PgPool) {
    let url = database_url(&pool).await;
    let store = Store::from_pool(pool.clone());
    let case = open_case(&store, &held("61000001", "acme.example")).await;
    let lease = Duration::from_secs(1);
    let settings = engine_settings(lease, Duration::from_secs(60));

    let (id_a, id_b) = (WorkerIdentity::new(), WorkerIdentity::new());
    assert_eq!(id_a.pid(), id_b.pid(), "one PID, as in containers");

    // Replica A, on a runtime (and a pool) of its own, frozen in its first call.
    let stop_a = CancellationToken::new();
    let stub_a = Arc::new(Stub::new(Misbehaviour::FreezeFirstSearch(
        Duration::from_secs(3),
    )));
    let replica_a = {
        let (stop, stub, settings, url, id) = (
            stop_a.clone(),
            stub_a.clone(),
            settings.clone(),
            url.clone(),
            id_a.clone(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let pool = PgPool::connect(&url).await.unwrap();
                Engine::new(
                    Store::from_pool(pool),
                    stub,
                    rules(),
                    settings,
                    id,
                    Arc::new(Notify::new()),
                    Arc::new(Notify::new()),
                )
                .with_drain_timeout(Duration::from_secs(2))
                .run(stop)
                .await;
            });
        })
    };
    wait_for(DEADLINE, "replica A's lease to run out", || async {
        let expired: Option<bool> = sqlx::query_scalar(
            "SELECT lease_expires_at < now() FROM case_schedule \
             WHERE case_id = $1 AND lease_owner IS NOT NULL",
        )
        .bind(case)
        .fetch_optional(&pool)
        .await
        .unwrap();
        (expired == Some(true) && stub_a.searches() == 1).then_some(())
    })
    .await;

    // Replica B: same PID, same queue, its claims counted from 0 too.
    let stop_b = CancellationToken::new();
    let stub_b = Arc::new(Stub::new(Misbehaviour::SlowFirstSearch(
        Duration::from_secs(4),
    )));
    let replica_b = tokio::spawn(
        Engine::new(
            store.clone(),
            stub_b.clone(),
            rules(),
            settings,
            id_b.clone(),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
        )
        .with_drain_timeout(Duration::from_secs(2))
        .run(stop_b.clone()),
    );

    let released = wait_for(DEADLINE, "the case to end", || async {
        let r = store.case_by_id(case).await.unwrap().unwrap();
        r.case.state().is_terminal().then_some(r)
    })
    .await;
    stop_a.cancel();
    stop_b.cancel();
    replica_b.await.unwrap();
    tokio::task::spawn_blocking(move || replica_a.join().unwrap())
        .await
        .unwrap();

    let kinds = history_kinds(&store, case).await;
    let count = |kind: &str| kinds.iter().filter(|k| *k == kind).count();
    assert_eq!(
        (count("decided"), count("resolved"), count("assigned")),
        (1, 1, 1),
        "one replica's steps only: {kinds:?}"
    );
    assert_eq!(released.case.state().as_str(), "released", "{kinds:?}");
    // The claim A made before it froze wrote nothing; later claims of
    // either replica may have watched the order.
    let history = store.case_history(case, 1000).await.unwrap();
    let stale = id_a.lease_owner(0);
    assert!(
        history
            .iter()
            .all(|h| h.detail.get("worker") != Some(&serde_json::json!(stale))),
        "a line written under A's lost lease: {history:#?}"
    );
    let last = history
        .iter()
        .rev()
        .find_map(|h| h.detail.get("worker")?.as_str())
        .map(|w| WorkerIdentity::of_lease_owner(w).to_owned())
        .unwrap();
    assert!(last == id_a.to_string() || last == id_b.to_string());
    // `cases show` names the worker that last held the case.
    let out = crate::support::bin()
        .args(["cases", "show", "61000001", "--json"])
        .env("HOLDCLEAR_DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        shown["lastWorker"]["worker"],
        serde_json::json!(last),
        "{shown}"
    );
    let out = crate::support::bin()
        .args(["cases", "show", "61000001"])
        .env("HOLDCLEAR_DATABASE_URL", &url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Last worker") && text.contains(&last),
        "{text}"
    );
    assert_eq!(
        (
            stub_a.assignments("61000001"),
            stub_b.assignments("61000001")
        ),
        (0, 1),
        "the replica whose lease ran out assigns nothing; the one holding the lease does: {kinds:?}"
    );
}
