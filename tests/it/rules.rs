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

// ---- rules stats / rules diff over the cases of a window ---------------------

mod window {
    use std::path::Path;

    use chrono::Utc;
    use holdclear::domain::HeldOrderEvent;
    use holdclear::store::{Recorded, Store};
    use serde_json::{Value, json};
    use sqlx::PgPool;
    use uuid::Uuid;

    use super::{run, stderr, stdout};
    use crate::support::database_url;

    /// The rules in force: `acme` (with a fallback), `partner-200`, and
    /// `japan`, which no order of these tests matches.
    const IN_FORCE: &str = r#"
[[rule]]
name = "acme"
[rule.when]
end_customer_domain = ["acme.com"]
[rule.assign]
smart_account = { domain = "acme.com" }
account_type = "CUSTOMER"
virtual_account = "DEFAULT"
[rule.fallback]
smart_account = { domain = "globex-holding.com" }
account_type = "HOLDING"
virtual_account = "Holding"

[[rule]]
name = "partner-200"
[rule.when]
partner_id = ["P-200"]
[rule.assign]
smart_account = { from = "end_customer_domain" }
account_type = "CUSTOMER"

[[rule]]
name = "japan"
[rule.when]
country = ["JP"]
[rule.assign]
smart_account = { domain = "jp.example" }
account_type = "CUSTOMER"
"#;

    /// The new rules: `acme` assigns VA `Network` (a target change),
    /// `partner-200` is gone and `germany` takes its German orders (a rule
    /// change; its other orders match nothing).
    const NEW: &str = r#"
[[rule]]
name = "acme"
[rule.when]
end_customer_domain = ["acme.com"]
[rule.assign]
smart_account = { domain = "acme.com" }
account_type = "CUSTOMER"
virtual_account = "Network"
[rule.fallback]
smart_account = { domain = "globex-holding.com" }
account_type = "HOLDING"
virtual_account = "Holding"

[[rule]]
name = "germany"
[rule.when]
country = ["DE"]
[rule.assign]
smart_account = { domain = "de.example" }
account_type = "HOLDING"
"#;

    /// Opens a case with intake's own write.
    async fn open(pool: &PgPool, so: &str, partner: &str, domain: &str, country: &str) -> Uuid {
        let v = json!({
            "specversion": "1.0", "type": "commerce.order.held.v1",
            "source": "/commerce/orders", "id": Uuid::new_v4().to_string(),
            "time": Utc::now().to_rfc3339(),
            "data": {
                "salesOrderNumber": so, "holdReason": "NO_SMART_ACCOUNT",
                "orderType": "STANDARD",
                "partner": {"id": partner, "name": "Partner"},
                "endCustomer": {"name": "Customer", "email": format!("it@{domain}"), "country": country},
                "lines": [{"lineNumber": "1.1", "sku": "C9300-48P-E", "productFamily": "C9300"}]
            }
        });
        let ev = HeldOrderEvent::decode(&serde_json::to_vec(&v).unwrap(), 256 * 1024).unwrap();
        let recorded = Store::from_pool(pool.clone())
            .record_held(&[ev])
            .await
            .unwrap();
        match recorded.as_slice() {
            [Recorded::Opened { case_id }] => *case_id,
            other => panic!("no case opened: {other:?}"),
        }
    }

    /// The columns the engine writes when a rule decided and the target
    /// was resolved (released).
    async fn decided(pool: &PgPool, case: Uuid, rule: &str, hash: &str, via_fallback: bool) {
        sqlx::query(
            "WITH c AS (
                 UPDATE cases SET state = 'released', rule_name = $2, rules_hash = $3,
                    target = jsonb_build_object('smart_account_domain', 'acme.com',
                        'account_type', 'CUSTOMER', 'virtual_account_name', 'DEFAULT',
                        'via_fallback', $4::boolean)
                 WHERE id = $1 RETURNING id)
             DELETE FROM case_schedule WHERE case_id IN (SELECT id FROM c)",
        )
        .bind(case)
        .bind(rule)
        .bind(hash)
        .bind(via_fallback)
        .execute(pool)
        .await
        .unwrap();
    }

    /// The columns the engine writes when no rule matched.
    async fn no_rule(pool: &PgPool, case: Uuid) {
        sqlx::query(
            "WITH c AS (
                 UPDATE cases SET state = 'escalated', escalation_reason = 'NO_RULE_MATCHED',
                    escalation_level = 1 WHERE id = $1 RETURNING id)
             DELETE FROM case_schedule WHERE case_id IN (SELECT id FROM c)",
        )
        .bind(case)
        .execute(pool)
        .await
        .unwrap();
    }

    /// Two acme orders (one via the fallback), two of partner P-200 (DE,
    /// US), three unmatched, and one decided by `japan` 30 days ago.
    async fn cases(pool: &PgPool, hash: &str) {
        let a1 = open(pool, "100001", "P-100", "acme.com", "US").await;
        decided(pool, a1, "acme", hash, false).await;
        let a2 = open(pool, "100002", "P-100", "acme.com", "CA").await;
        decided(pool, a2, "acme", hash, true).await;
        let b1 = open(pool, "100003", "P-200", "globex.com", "DE").await;
        decided(pool, b1, "partner-200", hash, false).await;
        let b2 = open(pool, "100004", "P-200", "initech.com", "US").await;
        decided(pool, b2, "partner-200", "0ldf11e", false).await;
        for (so, domain) in [
            ("100005", "nomatch.example"),
            ("100006", "nomatch.example"),
            ("100007", "other.example"),
        ] {
            let n = open(pool, so, "P-300", domain, "FR").await;
            no_rule(pool, n).await;
        }
        let old = open(pool, "100008", "P-400", "jp.example", "JP").await;
        decided(pool, old, "japan", hash, false).await;
        sqlx::query("UPDATE cases SET created_at = now() - interval '30 days' WHERE id = $1")
            .bind(old)
            .execute(pool)
            .await
            .unwrap();
    }

    fn write(dir: &Path, name: &str, text: &str) -> (String, String) {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let hash = super::sha256_hex(&path);
        (path.to_str().unwrap().to_owned(), hash)
    }

    fn json_of(args: &[&str], db: &str) -> Value {
        let out = run(args, &[("HOLDCLEAR_DATABASE_URL", db)]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("JSON")
    }

    #[sqlx::test]
    async fn stats_counts_hits_fallbacks_never_hit_rules_and_unmatched_groups(pool: PgPool) {
        let dir = tempfile::tempdir().unwrap();
        let (rules, hash) = write(dir.path(), "rules.toml", IN_FORCE);
        cases(&pool, &hash).await;
        let db = database_url(&pool).await;

        let s = json_of(&["rules", "stats", "--rules", &rules, "--json"], &db);
        assert_eq!(s["cases"], 7, "{s:#}");
        let hits = s["hits"].as_array().unwrap();
        let hit = |rule: &str, h: &str| {
            hits.iter()
                .find(|x| x["rule"] == rule && x["rules_hash"] == h)
                .unwrap_or_else(|| panic!("no hit {rule} {h}: {s:#}"))
                .clone()
        };
        let acme = hit("acme", &hash);
        assert_eq!(
            (acme["decided"].clone(), acme["via_fallback"].clone()),
            (json!(2), json!(1))
        );
        assert_eq!(acme["in_force"], true);
        assert_eq!(hit("partner-200", &hash)["decided"], 1);
        assert_eq!(hit("partner-200", "0ldf11e")["in_force"], false);
        assert_eq!(hits.len(), 3, "japan's case is outside the window: {s:#}");
        assert_eq!(s["never_matched"], json!(["japan"]));
        assert_eq!(s["no_rule_matched"]["orders"], 3);
        assert_eq!(
            s["no_rule_matched"]["groups"],
            json!([
                {"partner_id": "P-300", "end_customer_domain": "nomatch.example", "country": "FR", "orders": 2},
                {"partner_id": "P-300", "end_customer_domain": "other.example", "country": "FR", "orders": 1},
            ])
        );

        // The text says the same; 60 days reach the old case.
        let out = run(
            &["rules", "stats", "--rules", &rules, "--since", "60d"],
            &[("HOLDCLEAR_DATABASE_URL", &db)],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("8 cases opened since"), "{text}");
        assert!(text.contains("Never matched in the window (0)"), "{text}");
        assert!(
            text.contains("No rule matched (NO_RULE_MATCHED): 3 orders"),
            "{text}"
        );
        assert!(
            text.contains("partner_id P-300  end_customer_domain nomatch.example  country FR"),
            "{text}"
        );
    }

    #[sqlx::test]
    async fn stats_of_an_empty_window_says_so(pool: PgPool) {
        let dir = tempfile::tempdir().unwrap();
        let (rules, _) = write(dir.path(), "rules.toml", IN_FORCE);
        let db = database_url(&pool).await;
        let out = run(
            &["rules", "stats", "--rules", &rules, "--since", "1h"],
            &[("HOLDCLEAR_DATABASE_URL", &db)],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(
            stdout(&out).starts_with("No case was opened since ")
                && stdout(&out).contains("nothing to count"),
            "{}",
            stdout(&out)
        );
        let s = json_of(&["rules", "stats", "--rules", &rules, "--json"], &db);
        assert_eq!(s["cases"], 0);
        assert_eq!(s["never_matched"], json!(["acme", "partner-200", "japan"]));
    }

    #[sqlx::test]
    async fn diff_reports_rule_and_target_changes_newly_unmatched_and_unreadable_events(
        pool: PgPool,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (rules, hash) = write(dir.path(), "rules.toml", IN_FORCE);
        let (new, _) = write(dir.path(), "new.toml", NEW);
        cases(&pool, &hash).await;
        // An event stored by an older version, in a shape the decoder no longer reads.
        let odd = open(&pool, "100009", "P-100", "acme.com", "US").await;
        sqlx::query("UPDATE cases SET event = '{\"orderNo\": 100009}' WHERE id = $1")
            .bind(odd)
            .execute(&pool)
            .await
            .unwrap();
        let before: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT state, rule_name FROM cases ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        let db = database_url(&pool).await;

        let d = json_of(&["rules", "diff", "--rules", &rules, "--json", &new], &db);
        let r = &d["report"];
        assert_eq!(
            (r["replayed"].clone(), r["unchanged"].clone()),
            (json!(7), json!(3)),
            "{d:#}"
        );
        let change = |so: &str| {
            r["changes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["order"] == so)
                .unwrap_or_else(|| panic!("no change for {so}: {d:#}"))
                .clone()
        };
        for so in ["100001", "100002"] {
            let c = change(so);
            assert_eq!(c["kind"], "target");
            assert_eq!(
                (c["old"]["rule"].clone(), c["new"]["rule"].clone()),
                (json!("acme"), json!("acme"))
            );
            assert_eq!(
                c["old"]["target"]["virtual_account"],
                json!({"named": "DEFAULT"}),
                "{c:#}"
            );
            assert_eq!(
                c["new"]["target"]["virtual_account"],
                json!({"named": "Network"}),
                "{c:#}"
            );
        }
        let c = change("100003");
        assert_eq!(c["kind"], "rule");
        assert_eq!(
            (c["old"]["rule"].clone(), c["new"]["rule"].clone()),
            (json!("partner-200"), json!("germany"))
        );
        assert_eq!(
            c["old"]["target"]["account"],
            json!({"domain": "globex.com"}),
            "{c:#}"
        );
        let c = change("100004");
        assert_eq!(c["kind"], "newly_unmatched");
        assert_eq!(c["new"], Value::Null);
        assert_eq!(r["changes"].as_array().unwrap().len(), 4);
        assert_eq!(
            r["counts"],
            json!([
                {"kind": "target", "old_rule": "acme", "new_rule": "acme", "orders": 2},
                {"kind": "rule", "old_rule": "partner-200", "new_rule": "germany", "orders": 1},
                {"kind": "newly_unmatched", "old_rule": "partner-200", "new_rule": null, "orders": 1},
            ])
        );
        let unreadable = r["unreadable"].as_array().unwrap();
        assert_eq!(unreadable.len(), 1, "{d:#}");
        assert_eq!(unreadable[0]["order"], "100009");
        assert_eq!(unreadable[0]["case_id"], odd.to_string());

        let out = run(
            &["rules", "diff", "--rules", &rules, &new],
            &[("HOLDCLEAR_DATABASE_URL", &db)],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = stdout(&out);
        for line in [
            "3 unchanged, 4 would change.",
            "2  target changes: \"acme\" → \"acme\"",
            "1  rule changes: \"partner-200\" → \"germany\"",
            "1  newly unmatched: \"partner-200\" → (no rule)",
            "Newly unmatched (1): 100004",
            "Stored events the current decoder cannot read, not replayed (1):",
            "100009 (case ",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }

        // Read-only: no case changed.
        let after: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT state, rule_name FROM cases ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(before, after);
    }

    #[sqlx::test]
    async fn diff_refuses_an_invalid_new_file_like_check(pool: PgPool) {
        let dir = tempfile::tempdir().unwrap();
        let (rules, _) = write(dir.path(), "rules.toml", IN_FORCE);
        let (bad, _) = write(
            dir.path(),
            "bad.toml",
            "[[rule]]\nname = \"one\"\n[rule.assign]\nsmart_account = { domain = \"acme.com\" }\naccount_type = \"CUSTOMER\"\n\
             [[rule]]\nname = \"two\"\n[rule.when]\ncountry = [\"US\"]\nhold_reson = [\"NO_SMART_ACCOUNT\"]\n",
        );
        let db = database_url(&pool).await;
        let out = run(
            &["rules", "diff", "--rules", &rules, &bad],
            &[("HOLDCLEAR_DATABASE_URL", &db)],
        );
        assert_eq!(out.status.code(), Some(64), "{}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "{bad}:10: rule #2 \"two\": unknown key `when.hold_reson`"
            )),
            "{err}"
        );
        assert!(stdout(&out).is_empty());
    }
}
