//! Scenarios that disrupt a service every test shares (RabbitMQ stopped
//! for the whole machine). They run only in the `chaos` nextest profile
//! (`cargo nextest run --profile chaos`), alone, or when
//! `HOLDCLEAR_DISRUPTIVE_TESTS=1` asks for them: never in the default suite a
//! developer runs on a laptop beside their own broker.

use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::scenarios::{SETTLE, demo, feed};
use super::{Collector, Stage, check, orders};
use crate::support::{disruptive_tests_allowed, wait_for};

/// RabbitMQ's application stopped with `rabbitmqctl stop_app`, on the
/// node everything shares, until [`BrokerOutage::end`]. Dropping it starts
/// the application again, even after a failure; and a watchdog process of
/// its own (outside the test's process group) starts it after 90 s should
/// the test process be killed before it could.
struct BrokerOutage {
    stopped: bool,
    watchdog: Option<std::process::Child>,
}

impl BrokerOutage {
    /// Stops the broker's application (the guard exists before it stops).
    async fn begin() -> Self {
        use std::os::unix::process::CommandExt;
        let mut outage = Self {
            stopped: true,
            watchdog: None,
        };
        outage.watchdog = std::process::Command::new("sh")
            .args(["-c", "sleep 90 && rabbitmqctl -q start_app"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
        rabbitmqctl(&["stop_app"]).await;
        outage
    }

    /// Starts the application again and waits until the broker is up.
    async fn end(&mut self) {
        rabbitmqctl(&["start_app"]).await;
        rabbitmqctl(&["await_startup", "--timeout", "60"]).await;
        self.stopped = false;
        self.stop_watchdog();
    }

    fn stop_watchdog(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            // Its group: the shell and its `sleep`.
            let group = nix::unistd::Pid::from_raw(w.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = w.wait();
        }
    }
}

impl Drop for BrokerOutage {
    fn drop(&mut self) {
        if self.stopped {
            let started = [&["start_app"][..], &["await_startup", "--timeout", "60"]]
                .iter()
                .all(|args| {
                    std::process::Command::new("rabbitmqctl")
                        .arg("-q")
                        .args(*args)
                        .status()
                        .is_ok_and(|s| s.success())
                });
            if !started {
                // The watchdog stays: it tries again later.
                return;
            }
        }
        self.stop_watchdog();
    }
}

/// `rabbitmqctl -q ARGS`; panics unless it succeeds.
async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .await
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// RabbitMQ itself stopped (`rabbitmqctl stop_app`) for 5 s and started
/// again while 300 held orders flow: every connection of every client goes
/// down at once; the quorum queues, durable exchanges and their bindings
/// come back with the broker. It disrupts every test that uses RabbitMQ, so
/// it runs alone in the `chaos` profile (`.config/nextest.toml`). The events are collected on a
/// durable queue, so that the collector's own reconnect loses nothing.
#[sqlx::test]
async fn broker_restarted(pool: PgPool) {
    if !disruptive_tests_allowed("chaos::disruptive::broker_restarted") {
        return;
    }
    let mut stage = Stage::new("restart", pool, demo()).await;
    stage.events = Collector::start_durable(&stage.rabbit.topology).await;
    let orders = orders("restart", 86_000_000, 300);
    let mut worker = stage.worker().await;
    feed(&stage, &orders, 0, 3).await;
    wait_for(Duration::from_secs(60), "the first outcomes", || async {
        (stage.events.terminal_orders() > 10).then_some(())
    })
    .await;
    // More orders in flight when the broker goes.
    feed(&stage, &orders, 1, 3).await;
    let mut outage = BrokerOutage::begin().await;
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            worker.running(),
            "the worker survives the broker's absence:\n{}",
            worker.tail()
        );
    }
    outage.end().await;
    let over = Instant::now();
    stage.rabbit.reconnect().await;
    stage.events.reconnect().await;
    // The worker reconnects by itself and consumes again.
    stage.wait_consumers(1).await;
    feed(&stage, &orders, 2, 3).await;
    let report = check(&stage, "broker_restarted", &orders, &[], over, SETTLE).await;
    assert!(
        worker.running(),
        "the worker survives the restart:\n{}",
        worker.tail()
    );
    assert!(
        worker.logs().contains("Lost the held-order consumer"),
        "the worker saw the broker go:\n{}",
        worker.tail()
    );
    worker.stops_cleanly().await;
    report.assert_clean();
}
