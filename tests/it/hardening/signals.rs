//! Signals while `holdclear run` is still starting: a SIGHUP (an operator
//! reloading the rules, a terminal closing) must not kill it, and must not
//! be lost either.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::unique;
use crate::support::wait_for;
use crate::support::worker::Process;

const DEADLINE: Duration = Duration::from_secs(30);

/// The worker waits for a database that refuses connections (a port
/// nothing listens on), so it stays in its start-up. It gets one SIGHUP as
/// soon as it can take one (its handler is installed: before its settings,
/// its rules and its reload task): that SIGHUP is a reload, it goes on
/// waiting, and stops cleanly on SIGTERM.
#[tokio::test]
async fn a_sighup_during_start_up_reloads_the_rules_and_does_not_kill() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("sighup");
    let mut worker = Process::spawn(
        "postgres://postgres@127.0.0.1:1/holdclear_nowhere",
        &prefix,
        dir.path(),
        &[],
    );
    // No pause between looks: the handler is installed milliseconds before
    // the rules are read, and the SIGHUP must come in between.
    let start = Instant::now();
    while !worker.catches(Signal::SIGHUP) {
        assert!(worker.running(), "exited at start:\n{}", worker.logs());
        assert!(
            start.elapsed() < DEADLINE,
            "no SIGHUP handler within {DEADLINE:?}"
        );
        tokio::task::yield_now().await;
    }
    worker.signal(Signal::SIGHUP);
    wait_for(DEADLINE, "the reload that one SIGHUP asked for", || {
        let logs = worker.logs();
        let running = worker.running();
        async move {
            assert!(running, "a SIGHUP killed the starting worker:\n{logs}");
            logs.contains("Rules reloaded.").then_some(())
        }
    })
    .await;
    assert!(worker.running(), "{}", worker.logs());
    worker.terminate();
    let status = worker.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "{}", worker.logs());
}
