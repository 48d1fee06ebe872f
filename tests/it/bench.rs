//! `holdclear bench` as a user runs it, small: every section, `--json`.
//! It loads the whole machine, so it runs in the `chaos` nextest profile.
//! Not a timed test: it checks the report's shape and that every order got
//! through, never a speed.

use serde_json::Value;

use crate::support::{amqp_url, bin, disruptive_tests_allowed};

#[tokio::test]
async fn a_small_bench_reports_every_section_and_every_order_arrives() {
    if !disruptive_tests_allowed(
        "bench::a_small_bench_reports_every_section_and_every_order_arrives",
    ) {
        return;
    }
    let orders = 300;
    let child = bin()
        .args(["bench", "--json", "--workers", "2", "--watching", "10000"])
        .args(["--orders", &orders.to_string()])
        .args(["--flow-orders", &orders.to_string()])
        .env("HOLDCLEAR_AMQP_URL", amqp_url())
        .env(
            "HOLDCLEAR_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/holdclear",
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let r: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));

    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1, "{r:#}");
    assert!(
        r["machine"]["postgresql"]
            .as_str()
            .unwrap()
            .starts_with("1")
    );

    let s1 = &r["intakeVsBroker"];
    assert_eq!(s1["orders"], orders);
    for key in ["publishPerSec", "brokerPerSec", "intakePerSec", "ratio"] {
        assert!(s1[key].as_f64().unwrap() > 0.0, "{key}: {s1:#}");
    }
    let s2 = &r["intakeVsDatabase"];
    assert_eq!(s2["orders"], orders);
    assert!(s2["databasePerSec"].as_f64().unwrap() > 0.0, "{s2:#}");
    assert!(s2["ratio"].as_f64().unwrap() > 0.0, "{s2:#}");

    let every_order_released = |f: &Value, workers: u64| {
        assert_eq!(f["workers"], workers, "{f:#}");
        assert_eq!(f["orders"], orders, "{f:#}");
        assert_eq!(f["released"], orders, "{f:#}");
        assert_eq!(f["escalated"], 0, "{f:#}");
        assert_eq!(f["latencyMs"]["samples"], orders, "{f:#}");
        let l = &f["latencyMs"];
        assert!(
            l["p50"].as_f64().unwrap() <= l["p99"].as_f64().unwrap(),
            "{f:#}"
        );
        assert_eq!(f["peakRssMib"].as_array().unwrap().len() as u64, workers);
        assert!(f["apiCallsPerOrder"].as_f64().unwrap() >= 2.0, "{f:#}");
    };
    let calls = &r["callsPerOrder"];
    assert_eq!(calls["orders"], orders, "{calls:#}");
    assert_eq!(calls["cleared"], orders, "{calls:#}");
    for key in [
        "apiCallsPerClearedOrder",
        "clearedPerMinute",
        "floorPerMinute",
    ] {
        assert!(calls[key].as_f64().unwrap() > 0.0, "{key}: {calls:#}");
    }
    assert!(
        calls["apiCallsPerClearedOrder"].as_f64().unwrap() >= 2.0,
        "{calls:#}"
    );
    every_order_released(&r["endToEnd"], 1);
    let runs = r["workers"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{r:#}");
    every_order_released(&runs[0], 1);
    every_order_released(&runs[1], 2);

    let w = &r["watching"];
    assert_eq!(w["small"]["waiting"], 10_000);
    for size in ["small", "large"] {
        assert!(w[size]["claimedPerClaim"].as_f64().unwrap() > 0.0, "{w:#}");
        assert!(w[size]["claimMs"]["p99"].as_f64().unwrap() > 0.0, "{w:#}");
    }
    assert!(!w["plan"].as_array().unwrap().is_empty());

    let m = &r["memory"];
    assert!(m["endToEndPeakRssMib"].as_f64().unwrap() > 0.0, "{m:#}");

    // It cleaned up after itself: its database is gone.
    let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE $1")
        .bind(format!("holdclear_bench_{pid}_%"))
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "the bench left its database behind");
}
