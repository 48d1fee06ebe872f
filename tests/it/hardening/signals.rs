//! Signals while `holdclear run` is still starting: a SIGHUP (an operator
//! reloading the rules, a terminal closing) must not kill it.

use std::time::{Duration, Instant};

use crate::support::unique;
use crate::support::wait_for;
use crate::support::worker::Process;

const DEADLINE: Duration = Duration::from_secs(30);

/// The worker waits for a database that refuses connections (a port
/// nothing listens on), so it stays in its start-up. It gets a SIGHUP as
/// soon as it has written its first log line: it reloads the rules, goes on
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
    wait_for(DEADLINE, "the first log line", || async {
        (!worker.logs().is_empty()).then_some(())
    })
    .await;
    worker.signal(nix::sys::signal::Signal::SIGHUP);
    let start = Instant::now();
    let mut last_hup = Instant::now();
    while !worker.logs().contains("Rules reloaded.") {
        // A SIGHUP that came before the reload task listened is not lost
        // work (the rules were just read); under load, ask again.
        if last_hup.elapsed() > Duration::from_secs(2) {
            worker.signal(nix::sys::signal::Signal::SIGHUP);
            last_hup = Instant::now();
        }
        assert!(
            worker.running(),
            "a SIGHUP killed the starting worker:\n{}",
            worker.logs()
        );
        assert!(
            start.elapsed() < DEADLINE,
            "no reload within {DEADLINE:?}:\n{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(worker.running(), "{}", worker.logs());
    worker.terminate();
    let status = worker.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "{}", worker.logs());
}
