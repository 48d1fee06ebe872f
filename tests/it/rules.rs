//! `holdclear rules check` and `holdclear rules explain` as an operator runs
//! them: the example rules file, sample events, output and exit codes.

use std::path::Path;
use std::process::Output;

use crate::support::{bin, repo_path};

const EXAMPLE: &str = "deploy/config/rules.toml";

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = bin();
    cmd.current_dir(repo_path("")).args(args);
    cmd.env_remove("HOLDCLEAR_RULES")
        .env_remove("HOLDCLEAR_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).expect("readable")))
}

#[test]
fn check_accepts_the_example_file_by_default_and_by_name() {
    let hash = sha256_hex(&repo_path(EXAMPLE));
    let expected = format!("{EXAMPLE}: 3 rules OK (sha256 {hash})\n");
    for args in [&["rules", "check"][..], &["rules", "check", EXAMPLE][..]] {
        let out = run(args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), expected, "{args:?}");
    }
}

#[test]
fn check_follows_holdclear_rules_and_names_the_mistake() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nname = \"one\"\n[rule.assign]\nsmart_account = { domain = \"acme.com\" }\naccount_type = \"CUSTOMER\"\n\
         [[rule]]\nname = \"two\"\n[rule.when]\ncountry = [\"US\"]\nhold_reson = [\"NO_SMART_ACCOUNT\"]\n",
    )
    .expect("write");
    let bad_str = bad.to_str().expect("a UTF-8 path");
    for out in [
        run(&["rules", "check"], &[("HOLDCLEAR_RULES", bad_str)]),
        run(&["rules", "check", bad_str], &[]),
    ] {
        assert_eq!(out.status.code(), Some(64), "{}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "{bad_str}:10: rule #2 \"two\": unknown key `when.hold_reson`"
            )),
            "{err}"
        );
        assert!(stdout(&out).is_empty());
    }

    let out = run(&["rules", "check", "no/such/rules.toml"], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("no/such/rules.toml: cannot read the rules file"),
        "{}",
        stderr(&out)
    );

    // A bad setting is still exit 64 naming it, when the settings are needed.
    let out = run(&["rules", "check"], &[("HOLDCLEAR_POLL_INTERVAL", "soon")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("HOLDCLEAR_POLL_INTERVAL"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn explain_shows_each_rule_and_the_decision() {
    let out = run(&["rules", "explain", "tests/data/held-initech.json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "Rules: deploy/config/rules.toml (3 rules, sha256 ",
        "Order: 104233902",
        "end_customer_domain  initech.com",
        "#1 acme-direct (line ",
        "when.end_customer_domain: wants one of acme.com, *.acme.com; the order has initech.com",
        "#2 globex-partner-holding (line ",
        "): MATCHED",
        "#3 any-end-customer (line ",
        "not tried (an earlier rule matched)",
        "Decision: rule \"globex-partner-holding\"",
        "assign    domain initech.com (CUSTOMER, virtual account (account default))",
        "fallback  domain globex-holding.com (HOLDING, virtual account Holding)",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in\n{text}");
    }

    let out = run(
        &[
            "rules",
            "explain",
            "--rules",
            EXAMPLE,
            "tests/data/held-no-email.json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("no end-customer e-mail"), "{text}");
    assert!(
        text.contains("Decision: no rule matched; the order escalates NO_RULE_MATCHED"),
        "{text}"
    );
}

#[test]
fn explain_json_is_for_machines() {
    let out = run(
        &["rules", "explain", "--json", "tests/data/held-acme.json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["rules_hash"], sha256_hex(&repo_path(EXAMPLE)));
    assert_eq!(v["order"]["order"], "104233871");
    assert_eq!(v["rules"][0]["name"], "acme-direct");
    assert_eq!(v["rules"][0]["outcome"], "matched");
    assert_eq!(v["rules"][1]["outcome"], "not_tried");
    assert_eq!(v["decision"]["rule"], "acme-direct");
    assert_eq!(v["decision"]["target"]["account"]["domain"], "acme.com");
    assert_eq!(v["decision"]["target"]["account_type"], "CUSTOMER");
    assert!(v["decision"]["fallback"].is_null());

    let out = run(
        &[
            "rules",
            "explain",
            "--json",
            "tests/data/held-no-email.json",
        ],
        &[],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(v["decision"].is_null());
    assert_eq!(
        v["rules"][2]["failures"][0]["key"],
        "assign.smart_account.from"
    );
}

#[test]
fn explain_refuses_a_bad_event_or_bad_rules_with_64() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let bad_event = dir.path().join("event.json");
    std::fs::write(&bad_event, r#"{"specversion":"1.0","type":"commerce.order.held.v1","id":"x","source":"/s","data":{"salesOrderNumber":"1","holdReason":"CREDIT"}}"#)
        .expect("write");
    let bad_str = bad_event.to_str().expect("a UTF-8 path");
    let out = run(&["rules", "explain", bad_str], &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert!(
        err.contains("not a held-order event: INVALID_EVENT"),
        "{err}"
    );
    assert!(err.contains("CREDIT"), "{err}");

    std::fs::write(&bad_event, "not json").expect("write");
    let out = run(&["rules", "explain", bad_str], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("MALFORMED_JSON"), "{}", stderr(&out));

    let out = run(&["rules", "explain", "tests/data/no-such-event.json"], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("no-such-event.json: cannot read the event"),
        "{}",
        stderr(&out)
    );

    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"x\"\n").expect("write");
    let rules_str = rules.to_str().expect("a UTF-8 path");
    let out = run(
        &[
            "rules",
            "explain",
            "--rules",
            rules_str,
            "tests/data/held-acme.json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("rule #1 \"x\": `assign` is missing"),
        "{}",
        stderr(&out)
    );
}
