//! A crash loop: a consumer of the held queue that dies with every delivery
//! unacknowledged (a worker version that crashes on start, say), again and
//! again, until RabbitMQ's delivery limit moves the messages to the
//! dead-letter queue itself (`x-death`, no `x-holdclear-*` headers). Then a
//! sound worker runs and the operator replays the `DELIVERY_LIMIT` dead
//! letters: every order gets its outcome, none twice.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use sqlx::PgPool;

use super::scenarios::{SETTLE, demo, feed};
use super::{Order, Stage, check, orders};
use crate::support::{amqp_url, bin, wait_for};

/// Takes every ready message of `queue` and closes the connection without
/// an ack: each goes back with one more delivery counted.
async fn crash_once(queue: &str, expect: usize) {
    let conn = Connection::connect(
        &amqp_url(),
        ConnectionProperties::default().with_connection_name("chaos crash-looping consumer".into()),
    )
    .await
    .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "crash-loop".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = 0;
    let start = Instant::now();
    while got < expect && start.elapsed() < Duration::from_secs(5) {
        match tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
            Ok(Some(Ok(_))) => got += 1,
            _ => break,
        }
    }
    // The crash: the connection goes with every delivery unacknowledged.
    let _ = conn.close(320, "crashed".into()).await;
}

/// Publishes `orders` and crash-loops on the held queue until the broker
/// has dead-lettered every one of them on its own (`DELIVERY_LIMIT`).
pub(super) async fn crash_until_dead_lettered(stage: &Stage, orders: &[Order]) {
    let held = stage.rabbit.topology.held_queue.clone();
    let dlq = stage.rabbit.topology.dead_letter_queue.clone();
    feed(stage, orders, 0, 1).await;
    wait_for(
        Duration::from_secs(120),
        "the broker to dead-letter every message past its delivery limit",
        || async {
            let ready = stage.rabbit.depth(&held).await as usize;
            if ready > 0 {
                crash_once(&held, ready).await;
            }
            (stage.rabbit.depth(&dlq).await as usize == orders.len()).then_some(())
        },
    )
    .await;
    assert_eq!(stage.rabbit.depth(&held).await, 0);
}

#[sqlx::test]
async fn crash_loop_dead_letters_replayed(pool: PgPool) {
    let mut stage = Stage::new("loop", pool, demo()).await;
    let orders = orders("loop", 88_000_000, 120);
    crash_until_dead_lettered(&stage, &orders).await;

    // A sound worker, which keeps the dead letters in PostgreSQL, then the
    // operator's replay of what the broker moved.
    stage
        .env
        .insert("HOLDCLEAR_DLQ_INGEST".into(), "true".into());
    let mut worker = stage.worker().await;
    wait_for(
        Duration::from_secs(60),
        "every dead letter stored",
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM dead_letters WHERE code = 'DELIVERY_LIMIT'",
            )
            .fetch_one(&stage.pool)
            .await
            .ok()?;
            (n as usize == orders.len()).then_some(())
        },
    )
    .await;
    let mut cmd = bin();
    cmd.args([
        "dlq",
        "replay",
        "--code",
        "DELIVERY_LIMIT",
        "--rate",
        "1000",
    ])
    .env_clear()
    .envs(&stage.env);
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    let out = cmd.output().expect("the CLI runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dlq replay: {text}");
    let over = Instant::now();
    let report = check(
        &stage,
        "crash_loop_dead_letters_replayed",
        &orders,
        &[],
        over,
        SETTLE,
    )
    .await;
    assert!(worker.running(), "{}", worker.tail());
    worker.stops_cleanly().await;
    report.assert_clean();
}
