//! `holdclear demo`, the README's first command, run as a newcomer runs it.

use crate::support::{amqp_url, bin};

/// `holdclear demo` with `args`, on the local RabbitMQ and PostgreSQL.
fn demo(args: &[&str]) -> std::process::Command {
    let mut demo = bin();
    demo.arg("demo")
        .args(args)
        .env("HOLDCLEAR_AMQP_URL", amqp_url())
        .env(
            "HOLDCLEAR_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/holdclear",
        );
    demo
}

/// Sends `signal` to the demo and waits (30 s at most) for it to end.
async fn stop(
    child: &mut std::process::Child,
    signal: nix::sys::signal::Signal,
) -> std::process::ExitStatus {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    let stopped = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            stopped.elapsed() < std::time::Duration::from_secs(30),
            "the demo did not end after {signal}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_demo_ends_with_every_order_accounted_for() {
    let child = demo(&[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let row = |order: &str| {
        stdout
            .lines()
            .find(|l| l.contains(order))
            .unwrap_or_else(|| panic!("no row for {order}:\n{stdout}"))
            .to_owned()
    };
    let acme = row("104233871");
    assert!(
        acme.contains("acme-direct")
            && acme.contains("acme.com (CUSTOMER, DEFAULT)")
            && acme.contains("released"),
        "{acme}"
    );
    let pending = row("104233872");
    assert!(
        pending.contains("globex-holding.com (HOLDING, Holding)") && pending.contains("released"),
        "{pending}"
    );
    assert!(row("104233873").contains("HOLD_PERSISTS (warning)"));
    assert!(row("104233876").contains("ASSIGNMENT_LOCKED"));
    assert!(row("104233880").contains("NO_RULE_MATCHED"));
    assert!(row("104233881").contains("SMART_ACCOUNT_NOT_FOUND"));
    assert!(row("104233882").contains("SMART_ACCOUNT_NOT_ACTIVE"));
    // Two ACTIVE accounts named "Umbrella Corporation": never the first one.
    let umbrella = row("104233883");
    assert!(
        umbrella.contains("umbrella-by-name")
            && umbrella.contains("AMBIGUOUS_MATCH (critical)")
            && !umbrella.contains("umbrella.com"),
        "{umbrella}"
    );
    // It ends with the dead-letter groups and a replay operation's report:
    // the malformed message, replayed as it is, failed again.
    assert!(
        stdout.contains("Dead letters (holdclear dlq groups)") && stdout.contains("MALFORMED_JSON"),
        "{stdout}"
    );
    assert!(
        stdout.contains("failed again")
            && stdout.contains("sent 1; became cases 0; failed again 1"),
        "{stdout}"
    );
    // It ends with `rules stats` of its run: each rule's decisions, the
    // rules that never matched, the orders no rule matched.
    let stats = stdout
        .split("Rules (holdclear rules stats --since 24h)")
        .nth(1)
        .unwrap_or_else(|| panic!("no rules stats at the end:\n{stdout}"));
    assert!(
        stats.contains("Decided per rule:")
            && stats.contains("acme-direct")
            && stats.contains("Never matched in the window")
            && stats.contains("No rule matched (NO_RULE_MATCHED): 1 orders"),
        "{stats}"
    );
    // It cleaned up after itself: its database is gone.
    let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE $1")
        .bind(format!("holdclear_demo_{pid}_%"))
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "the demo left its database behind");
}

/// `holdclear demo --console` prints the console's address and a sign-in
/// token, serves the demo's cases (sign-in works, the escalations show)
/// until ctrl-c, then ends cleanly.
#[tokio::test]
async fn the_demo_serves_the_console_until_ctrl_c() {
    use std::io::BufRead;
    let mut child = demo(&["--console"])
        .env("HOLDCLEAR_CONSOLE_ADDR", "127.0.0.1:0")
        .env_remove("HOLDCLEAR_CONSOLE_OPERATOR_TOKENS")
        .env_remove("HOLDCLEAR_CONSOLE_VIEWER_TOKENS")
        .env_remove("HOLDCLEAR_CONSOLE_TRUSTED_HEADER")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the demo prints the console's address");
        if line.starts_with("The console is on http://") {
            break line;
        }
    };
    let base = line
        .trim_start_matches("The console is on ")
        .split(' ')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    let token = line
        .split("sign in with the demo token ")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .expect("a demo token")
        .to_owned();
    let browser = crate::console::Browser::sign_in(&base, &token).await;
    let (status, page) = browser.get("/").await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("SMART_ACCOUNT_NOT_ACTIVE"), "{page}");
    assert!(page.contains("MALFORMED_JSON"), "{page}");
    let status = stop(&mut child, nix::sys::signal::Signal::SIGINT).await;
    assert!(status.success(), "{status:?}");
}

/// A demo stopped half-way, by ctrl-c or by SIGTERM (a terminal closed, a
/// `timeout`, a container stopped), still removes what it made: its
/// database and its exchanges and queues.
#[tokio::test]
async fn the_demo_interrupted_removes_its_database_and_queues() {
    use std::io::BufRead;

    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    use nix::sys::signal::Signal;

    let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let broker = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut child = demo(&[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Its first line names the run: "… prefixed holdclear-demo-<run>."
        // The rest is read to the end, so that the demo never writes into
        // a closed pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                tx.send(line).ok();
            }
        });
        let first = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the demo says what it made");
        let prefix = first
            .split("prefixed ")
            .nth(1)
            .unwrap_or_else(|| panic!("{first}"))
            .trim_end_matches('.')
            .to_owned();
        let run = prefix.trim_start_matches("holdclear-demo-").to_owned();
        let topology = holdclear::config::Topology::prefixed(&format!("{prefix}."));
        let queues = || async {
            let mut left = Vec::new();
            for queue in [&topology.held_queue, &topology.dead_letter_queue] {
                // A passive declare of a missing queue closes its channel.
                let ch = broker.create_channel().await.unwrap();
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                if ch
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                    .await
                    .is_ok()
                {
                    left.push(queue.clone());
                }
            }
            left
        };
        let databases = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_database WHERE datname = $1")
                .bind(format!("holdclear_demo_{run}"))
                .fetch_one(&admin)
                .await
                .unwrap()
        };
        // Interrupted once its database and queues are there: under way.
        let started = std::time::Instant::now();
        while databases().await == 0 || queues().await.len() < 2 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the demo made no database or queues"
            );
            assert!(child.try_wait().unwrap().is_none(), "the demo ended early");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let status = stop(&mut child, signal).await;
        assert!(!status.success(), "an interrupted demo says so: {status:?}");
        assert_eq!(databases().await, 0, "{signal}: the demo left its database");
        assert_eq!(
            queues().await,
            Vec::<String>::new(),
            "{signal}: the demo left its queues"
        );
    }
}
