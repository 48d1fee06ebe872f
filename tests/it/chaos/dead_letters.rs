//! The dead-letter store under fire: a worker SIGKILLed while it ingests
//! the dead-letter queue into PostgreSQL, and a replay killed half-way
//! (the CLI and the worker together) then resumed. Nothing is lost, nothing
//! is stored twice, and every replayed order gets exactly one outcome.

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use uuid::Uuid;

use super::crash_loop::crash_until_dead_lettered;
use super::poison::malformed_message;
use super::scenarios::{SETTLE, demo};
use super::{Stage, check, orders};
use crate::support::{bin, wait_for};

/// Malformed messages to ingest: enough that a kill lands while the
/// worker is still taking them from the queue.
const DEAD: usize = 3_000;

async fn stored(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// `holdclear ARGS` with the stage's settings, not waited for.
fn spawn_cli(env: &HashMap<String, String>, args: &[&str]) -> Child {
    let mut cmd = bin();
    cmd.args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    cmd.spawn().expect("the CLI starts")
}

/// `holdclear ARGS` run to its end: its exit status and everything it printed.
fn run_cli(env: &HashMap<String, String>, args: &[&str]) -> (bool, String) {
    let out = spawn_cli(env, args)
        .wait_with_output()
        .expect("the CLI runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// 3,000 malformed messages dead-lettered by a worker that does not
/// ingest; then a worker that does is SIGKILLed each time it has stored a
/// little more, five times. Every message ends in `dead_letters` once,
/// with one sighting (a message stored but not acked before the kill comes
/// back as the same sighting), with the code it was dead-lettered with,
/// and the queue ends empty.
#[sqlx::test]
async fn worker_killed_during_dead_letter_ingest(pool: PgPool) {
    let mut stage = Stage::new("dl-ingest", pool, demo()).await;
    let dlq = stage.rabbit.topology.dead_letter_queue.clone();
    let mut expected: HashMap<&'static str, i64> = HashMap::new();
    let messages: Vec<_> = (0..DEAD)
        .map(|i| {
            let (message, code) = malformed_message(i, &format!("dl-ingest-{i}"));
            *expected.entry(code).or_default() += 1;
            message
        })
        .collect();
    let mut dead_lettering = stage.worker().await;
    stage.rabbit.publish(&messages).await;
    wait_for(
        Duration::from_secs(120),
        "every malformed message in the dead-letter queue",
        || async { (stage.rabbit.depth(&dlq).await as usize == DEAD).then_some(()) },
    )
    .await;
    dead_lettering.stops_cleanly().await;

    stage
        .env
        .insert("HOLDCLEAR_DLQ_INGEST".into(), "true".into());
    let mut worker = super::WorkerProcess::start(stage.env.clone(), stage.dir.path());
    let mut killed_mid_ingest = 0;
    let mut last = 0;
    for _ in 0..5 {
        let now = wait_for(Duration::from_secs(60), "ingest to progress", || async {
            let n = stored(&stage.pool).await;
            (n > last || n == DEAD as i64).then_some(n)
        })
        .await;
        if now == DEAD as i64 {
            break;
        }
        worker.kill_and_restart();
        killed_mid_ingest += 1;
        last = stored(&stage.pool).await;
    }
    wait_for(
        Duration::from_secs(120),
        "every dead letter stored and the queue empty",
        || async {
            (stored(&stage.pool).await == DEAD as i64 && stage.rabbit.depth(&dlq).await == 0)
                .then_some(())
        },
    )
    .await;

    assert!(
        killed_mid_ingest > 0,
        "no kill landed while ingesting: the scenario proved nothing"
    );
    let codes: Vec<(String, i64)> =
        sqlx::query_as("SELECT code, count(*) FROM dead_letters GROUP BY code")
            .fetch_all(&stage.pool)
            .await
            .unwrap();
    let codes: HashMap<&str, i64> = codes.iter().map(|(c, n)| (c.as_str(), *n)).collect();
    assert_eq!(codes, expected, "each message stored with its own code");
    let sightings: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letter_sightings")
        .fetch_one(&stage.pool)
        .await
        .unwrap();
    assert_eq!(sightings, DEAD as i64, "one sighting per message");
    let recounted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE seen_count <> 1")
            .fetch_one(&stage.pool)
            .await
            .unwrap();
    assert_eq!(
        recounted, 0,
        "a redelivery after a kill is not a new sighting"
    );
    assert!(worker.running(), "{}", worker.tail());
    eprintln!("{DEAD} dead letters stored once across {killed_mid_ingest} kills");
    worker.stops_cleanly().await;
}

/// The id of the replay operation the CLI created, once it exists.
async fn replay_operation(pool: &PgPool) -> Uuid {
    wait_for(Duration::from_secs(30), "the replay operation", || async {
        sqlx::query_scalar("SELECT id FROM operations WHERE kind = 'replay'")
            .fetch_optional(pool)
            .await
            .ok()
            .flatten()
    })
    .await
}

async fn sent(pool: &PgPool, operation: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM operation_items WHERE operation_id = $1 AND sent_at IS NOT NULL",
    )
    .bind(operation)
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

/// 120 held orders dead-lettered by the broker (a crash-looping consumer
/// past the delivery limit) and kept by a worker; then a replay at 20
/// messages/s is SIGKILLed together with the worker once part of it is
/// sent. The worker starts again, the operator resumes the operation, and
/// every order gets exactly one outcome, no dead letter is stored again,
/// and the operation ends done with every item sent.
#[sqlx::test]
async fn worker_and_replay_killed_during_replay(pool: PgPool) {
    let mut stage = Stage::new("dl-replay", pool, demo()).await;
    let orders = orders("dl-replay", 89_000_000, 120);
    crash_until_dead_lettered(&stage, &orders).await;
    stage
        .env
        .insert("HOLDCLEAR_DLQ_INGEST".into(), "true".into());
    let mut worker = stage.worker().await;
    wait_for(
        Duration::from_secs(60),
        "every dead letter stored",
        || async { (stored(&stage.pool).await as usize == orders.len()).then_some(()) },
    )
    .await;

    let mut replay = spawn_cli(
        &stage.env,
        &[
            "dlq",
            "replay",
            "--code",
            "DELIVERY_LIMIT",
            "--rate",
            "20",
            "--batch",
            "10",
        ],
    );
    let operation = replay_operation(&stage.pool).await;
    let at_kill = wait_for(
        Duration::from_secs(60),
        "part of the replay sent",
        || async {
            let n = sent(&stage.pool, operation).await;
            (n >= 20).then_some(n)
        },
    )
    .await;
    let _ = replay.kill();
    let _ = replay.wait();
    worker.kill_and_restart();
    assert!(
        (at_kill as usize) < orders.len(),
        "the replay was killed half-way ({at_kill} of {} sent)",
        orders.len()
    );

    let (ok, text) = run_cli(
        &stage.env,
        &["dlq", "replay", "--resume", &operation.to_string()],
    );
    assert!(ok, "dlq replay --resume: {text}");
    let over = Instant::now();
    let report = check(
        &stage,
        "worker_and_replay_killed_during_replay",
        &orders,
        &[],
        over,
        SETTLE,
    )
    .await;
    assert_eq!(
        sent(&stage.pool, operation).await as usize,
        orders.len(),
        "every item of the operation sent"
    );
    let status: String = sqlx::query_scalar("SELECT status FROM operations WHERE id = $1")
        .bind(operation)
        .fetch_one(&stage.pool)
        .await
        .unwrap();
    assert_eq!(status, "done");
    assert_eq!(
        stored(&stage.pool).await as usize,
        orders.len(),
        "no dead letter stored again"
    );
    let cases: i64 = sqlx::query_scalar("SELECT count(*) FROM cases")
        .fetch_one(&stage.pool)
        .await
        .unwrap();
    assert_eq!(cases as usize, orders.len(), "one case per order");
    assert!(worker.running(), "{}", worker.tail());
    worker.stops_cleanly().await;
    report.assert_clean();
}
