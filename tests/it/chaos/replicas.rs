//! Replicas as containers run them: two `holdclear run` processes on one
//! queue, each PID 1 of a PID namespace of its own (so their PIDs, and
//! their claim counters, start alike), with 1 s leases — and one of them
//! frozen past its lease, again and again, while the other takes its cases
//! over.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Stage, WorkerProcess, check, messages, orders, pid_namespaces};
use crate::support::wait_for;

/// How long a run may take to settle after its last disruption.
const SETTLE: Duration = Duration::from_secs(120);

/// The identity and PID a worker logged on its `Worker starting.` line.
fn started_as(worker: &WorkerProcess) -> Option<(String, u64)> {
    worker
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "Worker starting.")
        .and_then(|v| Some((v["worker"].as_str()?.to_owned(), v["pid"].as_u64()?)))
}

/// The open cases whose lease `worker` holds, with their lease tokens.
async fn leased_by(pool: &PgPool, worker: &str) -> Vec<(Uuid, String)> {
    sqlx::query_as(
        "SELECT case_id, lease_owner FROM case_schedule WHERE lease_owner LIKE $1 || '#%'",
    )
    .bind(worker)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Two workers, 1 s leases, the simulator slowed (100–200 ms a call) so
/// that steps are in flight. Four times, while 400 held orders arrive: wait
/// until one worker holds leases, SIGSTOP it, wait until the other has
/// taken over every case it held, SIGCONT it. Its steps in flight then
/// end in a lease it lost: the fence must refuse them (`Lease lost …`),
/// and the checker finds one outcome and at most one assignment per order.
#[sqlx::test]
async fn frozen_replicas(pool: PgPool) {
    let mut scenario = holdclear::sim::Scenario::demo().expect("the demo scenario is valid");
    scenario.faults.search.latency = Duration::from_millis(200);
    scenario.faults.order.latency = Duration::from_millis(100);
    let mut stage = Stage::new("replicas", pool, scenario).await;
    stage
        .env
        .insert("HOLDCLEAR_ENGINE_LEASE".into(), "1s".into());
    let orders = orders("replicas", 88_000_000, 400);
    let dirs = [stage.dir.path().join("a"), stage.dir.path().join("b")];
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut workers = [
        WorkerProcess::start_isolated(stage.env.clone(), &dirs[0]),
        WorkerProcess::start_isolated(stage.env.clone(), &dirs[1]),
    ];
    stage.wait_consumers(2).await;
    let mut ids = Vec::new();
    for w in &workers {
        let (id, pid) = wait_for(Duration::from_secs(30), "the start line", || async {
            started_as(w)
        })
        .await;
        if pid_namespaces() {
            assert_eq!(pid, 1, "a replica in its own PID namespace is PID 1");
        }
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "each replica has an identity of its own");

    for round in 0..4 {
        stage
            .rabbit
            .publish(&messages(&orders[round * 100..(round + 1) * 100]))
            .await;
        let (frozen, other) = (round % 2, (round + 1) % 2);
        let held = wait_for(
            Duration::from_secs(30),
            "the worker to freeze to hold leases",
            || async {
                let held = leased_by(&stage.pool, &ids[frozen]).await;
                (!held.is_empty()).then_some(held)
            },
        )
        .await;
        workers[frozen].signal(Signal::SIGSTOP);
        let frozen_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(&stage.pool)
            .await
            .unwrap();
        // Its leases run out; the other worker claims its cases: none is
        // still under the frozen worker's lease, and the other worker holds
        // one of them now or has written a step of one since the freeze (a
        // case it stepped and gave back, or closed, holds no lease).
        let held: HashSet<(Uuid, String)> = held.into_iter().collect();
        let held_ids: Vec<Uuid> = held.iter().map(|(id, _)| *id).collect();
        wait_for(
            Duration::from_secs(30),
            "the other worker to take the frozen one's cases over",
            || async {
                let now: Vec<(Uuid, Option<String>)> = sqlx::query_as(
                    "SELECT c.id, s.lease_owner \
                         FROM cases c LEFT JOIN case_schedule s ON s.case_id = c.id \
                         WHERE c.id = ANY($1)",
                )
                .bind(&held_ids)
                .fetch_all(&stage.pool)
                .await
                .unwrap();
                let taken = now.iter().filter(|(id, owner)| {
                    !held.contains(&(*id, owner.clone().unwrap_or_default()))
                });
                let stepped: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM case_history \
                         WHERE case_id = ANY($1) AND at > $2 \
                           AND detail->>'worker' LIKE $3 || '#%')",
                )
                .bind(&held_ids)
                .bind(frozen_at)
                .bind(&ids[other])
                .fetch_one(&stage.pool)
                .await
                .unwrap();
                let by_other = stepped
                    || now.iter().any(|(_, owner)| {
                        owner
                            .as_deref()
                            .is_some_and(|o| o.starts_with(ids[other].as_str()))
                    });
                (taken.count() == now.len() && by_other).then_some(())
            },
        )
        .await;
        workers[frozen].signal(Signal::SIGCONT);
    }
    let over = Instant::now();
    let report = check(&stage, "frozen_replicas", &orders, &[], over, SETTLE).await;
    let logs: String = workers.iter().map(WorkerProcess::logs).collect();
    assert!(
        logs.contains("Lease lost"),
        "a thawed worker's stale step was fenced out at least once"
    );
    for w in &mut workers {
        assert!(w.running(), "{}", w.tail());
        w.stops_cleanly().await;
    }
    report.assert_clean();
}
