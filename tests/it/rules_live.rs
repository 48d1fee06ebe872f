//! The rules as a running worker uses them, end to end: `holdclear run`
//! processes against the simulator over HTTP and RabbitMQ, each case made
//! by the engine; then `holdclear rules …` as an operator runs it against
//! the worker's database.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::broker::{Rabbit, held_event};
use crate::support::events::{EventQueue, Received};
use crate::support::worker::Process;
use crate::support::{bin, database_url, repo_path, sim, topology, unique, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

/// `holdclear ARGS` against the database `db`, from the repository root.
fn run(args: &[&str], db: &str) -> Output {
    let mut cmd = bin();
    cmd.current_dir(repo_path(""))
        .args(args)
        .env_remove("HOLDCLEAR_RULES")
        .env_remove("HOLDCLEAR_CONFIG")
        .env("HOLDCLEAR_DATABASE_URL", db);
    cmd.output().expect("the binary runs")
}

fn json_of(args: &[&str], db: &str) -> Value {
    let out = run(args, db);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn sha256_of(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// A worker process of one test, with its topology, events queue and
/// simulator.
struct Live {
    rabbit: Rabbit,
    events: EventQueue,
    worker: Process,
    sim: holdclear::sim::SimHandle,
}

impl Live {
    async fn start(
        pool: &PgPool,
        scenario: holdclear::sim::Scenario,
        dir: &Path,
        extra: &[(&str, &str)],
    ) -> Self {
        let sim = sim::start(scenario).await;
        let prefix = unique("rules-live");
        let rabbit = Rabbit::new(&prefix).await;
        let events = EventQueue::bind(&topology(&prefix)).await;
        let (base, token) = (sim.base_url(), sim.token_url());
        let mut env = vec![
            ("HOLDCLEAR_COMMERCE_BASE_URL", base.as_str()),
            ("HOLDCLEAR_COMMERCE_TOKEN_URL", token.as_str()),
            ("HOLDCLEAR_POLL_INTERVAL", "200ms"),
            ("HOLDCLEAR_POLL_MAX_INTERVAL", "500ms"),
        ];
        env.extend_from_slice(extra);
        let worker = Process::spawn(&database_url(pool).await, &prefix, dir, &env);
        Self {
            rabbit,
            events,
            worker,
            sim,
        }
    }

    /// Publishes a held event for order `so` (partner P-100, it-admin@acme.com, US).
    async fn hold(&self, so: &str, edit: impl FnOnce(&mut Value)) {
        let mut ev = held_event(&unique("ev"), so);
        edit(&mut ev);
        self.rabbit.publish_events(&[ev]).await;
    }

    /// Waits for the event `routing_key` of order `so` and returns it.
    async fn event(&mut self, so: &str, routing_key: &str) -> Received {
        let logs = self.worker.logs();
        let seen = self
            .events
            .until(DEADLINE, &format!("{routing_key} of {so}"), |s| {
                s.iter()
                    .any(|e| e.order() == so && e.routing_key == routing_key)
            })
            .await;
        let found = seen
            .iter()
            .find(|e| e.order() == so && e.routing_key == routing_key);
        found.cloned().unwrap_or_else(|| panic!("{logs}"))
    }

    /// Sends SIGHUP until the worker logs a reload with `shadow_hash`.
    async fn reload(&mut self, shadow_hash: &str) {
        let start = Instant::now();
        let mut last_hup: Option<Instant> = None;
        loop {
            let reloaded = self
                .worker
                .logs()
                .lines()
                .any(|l| l.contains("Rules reloaded.") && l.contains(shadow_hash));
            if reloaded {
                return;
            }
            assert!(self.worker.running(), "{}", self.worker.logs());
            assert!(
                start.elapsed() < DEADLINE,
                "no reload within {DEADLINE:?}:\n{}",
                self.worker.logs()
            );
            if last_hup.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
                self.worker.signal(nix::sys::signal::Signal::SIGHUP);
                last_hup = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The rules in force in these tests: acme's orders to acme.com.
const LIVE: &str = r#"
[[rule]]
name = "acme"
[rule.when]
end_customer_domain = ["acme.com"]
[rule.assign]
smart_account = { domain = "acme.com" }
account_type = "CUSTOMER"
virtual_account = "DEFAULT"
"#;

/// A first shadow file: acme's orders to the partner's holding account.
const SHADOW_HOLDING: &str = r#"
[[rule]]
name = "acme"
[rule.when]
end_customer_domain = ["acme.com"]
[rule.assign]
smart_account = { domain = "globex-holding.com" }
account_type = "HOLDING"
"#;

/// The second shadow file: a rule only Japanese orders match.
const SHADOW_JAPAN: &str = r#"
[[rule]]
name = "japan"
[rule.when]
country = ["JP"]
[rule.assign]
smart_account = { domain = "jp.example" }
account_type = "CUSTOMER"
"#;

/// Shadow rules decide nothing: each case is assigned by the rules in
/// force, and what the shadow rules would have decided is recorded; after
/// a SIGHUP with a new shadow file, the next cases are compared with it.
/// `rules diff --shadow` reports each order with the shadow file that saw
/// it.
#[sqlx::test]
async fn shadow_rules_are_recorded_never_acted_on_and_follow_a_reload(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(dir.path(), "rules.toml", LIVE);
    let shadow = write(dir.path(), "shadow.toml", SHADOW_HOLDING);
    let demo = holdclear::sim::Scenario::demo().unwrap();
    let mut live = Live::start(
        &pool,
        demo,
        dir.path(),
        &[
            ("HOLDCLEAR_RULES", &rules),
            ("HOLDCLEAR_RULES_SHADOW_FILE", &shadow),
        ],
    )
    .await;

    live.hold("700001", |_| {}).await;
    let released = live.event("700001", "order.hold_released").await;
    assert_eq!(released.data("smartAccountDomain"), &json!("acme.com"));
    assert_eq!(released.data("rule"), &json!("acme"));

    std::fs::write(&shadow, SHADOW_JAPAN).unwrap();
    live.reload(&sha256_of(SHADOW_JAPAN)).await;
    live.hold("700002", |_| {}).await;
    let released = live.event("700002", "order.hold_released").await;
    assert_eq!(released.data("smartAccountDomain"), &json!("acme.com"));

    let db = database_url(&pool).await;
    let d = json_of(&["rules", "diff", "--shadow", "--json"], &db);
    let r = &d["report"];
    assert_eq!(r["replayed"], 2, "{d:#}");
    assert_eq!(r["unchanged"], 0, "{d:#}");
    let changes = r["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2, "{d:#}");
    assert_eq!(changes[0]["order"], "700001");
    assert_eq!(changes[0]["kind"], "target");
    assert_eq!(
        changes[0]["old"]["target"]["account"]["domain"], "acme.com",
        "{d:#}"
    );
    assert_eq!(
        changes[0]["new"]["target"]["account"]["domain"], "globex-holding.com",
        "{d:#}"
    );
    assert_eq!(changes[1]["order"], "700002");
    assert_eq!(changes[1]["kind"], "newly_unmatched");
    assert_eq!(changes[1]["new"], Value::Null);
    let files: Vec<(&str, i64)> = (d["shadow"].as_array().unwrap().iter())
        .map(|f| {
            (
                f["rules_hash"].as_str().unwrap(),
                f["orders"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut want = [(sha256_of(SHADOW_HOLDING), 1), (sha256_of(SHADOW_JAPAN), 1)];
    want.sort();
    let want: Vec<(&str, i64)> = want.iter().map(|(h, n)| (h.as_str(), *n)).collect();
    assert_eq!(files, want, "{d:#}");

    let out = run(&["rules", "diff", "--shadow"], &db);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("0 unchanged, 2 would change."), "{text}");
    assert!(
        text.contains("1  target changes: \"acme\" → \"acme\""),
        "{text}"
    );
    assert!(text.contains("Newly unmatched (1): 700002"), "{text}");

    let out = run(&["cases", "show", "700002"], &db);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "shadow rules (sha256 {}…) would decide no rule; the rules in force decided \"acme\"",
            &sha256_of(SHADOW_JAPAN)[..12]
        )),
        "{text}"
    );

    // Nothing was acted on: both cases carry the live rule's account.
    let targets: Vec<String> =
        sqlx::query_scalar("SELECT target->>'smart_account_domain' FROM cases ORDER BY order_key")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(targets, ["acme.com", "acme.com"]);
    live.worker.terminate();
}

/// A shadow file that does not validate stops the worker at start, exit 64,
/// naming the file, the rule and the key.
#[sqlx::test]
async fn a_bad_shadow_file_stops_the_start_naming_file_rule_and_key(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(dir.path(), "rules.toml", LIVE);
    let shadow = write(
        dir.path(),
        "shadow.toml",
        "[[rule]]\nname = \"typo\"\n[rule.when]\ncontry = [\"US\"]\n[rule.assign]\nsmart_account = { domain = \"a.example\" }\naccount_type = \"CUSTOMER\"\n",
    );
    let demo = holdclear::sim::Scenario::demo().unwrap();
    let mut live = Live::start(
        &pool,
        demo,
        dir.path(),
        &[
            ("HOLDCLEAR_RULES", &rules),
            ("HOLDCLEAR_RULES_SHADOW_FILE", &shadow),
        ],
    )
    .await;
    let status = live.worker.wait_exit(DEADLINE).await;
    let logs = live.worker.logs();
    assert_eq!(status.code(), Some(64), "{logs}");
    assert!(
        logs.contains(&format!(
            "{shadow}:4: rule #1 \"typo\": unknown key `when.contry`"
        )),
        "{logs}"
    );
}

/// A held order of partner `partner` for an end customer at `domain` in `country`.
fn order_of(partner: &str, domain: &str, country: &str) -> impl FnOnce(&mut Value) {
    let (partner, domain, country) = (partner.to_owned(), domain.to_owned(), country.to_owned());
    move |ev: &mut Value| {
        ev["data"]["partner"]["id"] = json!(partner);
        ev["data"]["endCustomer"]["email"] = json!(format!("it@{domain}"));
        ev["data"]["endCustomer"]["country"] = json!(country);
    }
}

/// Escalated orders watched slowly: the simulator plays the person who
/// assigns an account by hand in the portal; the worker emits
/// `order.hold_released` (no second escalation) and records the account;
/// `rules suggest` proposes the rule those fixes agree on, as TOML that
/// `rules check` accepts, with what `rules diff` says it would change.
#[sqlx::test]
async fn hand_fixes_of_escalated_orders_are_seen_and_become_a_suggested_rule(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(dir.path(), "rules.toml", LIVE);
    let demo = holdclear::sim::Scenario::demo().unwrap();
    let mut live = Live::start(
        &pool,
        demo,
        dir.path(),
        &[
            ("HOLDCLEAR_RULES", &rules),
            ("HOLDCLEAR_ESCALATED_WATCH_INTERVAL", "1s"),
        ],
    )
    .await;
    let db = database_url(&pool).await;
    // Three orders no rule matches: two of partner P-500 for umbrella.example
    // (DE), fixed alike by hand; one of P-600, fixed once.
    let fixed = [
        ("710001", "P-500", "umbrella.example", "globex-holding.com"),
        ("710002", "P-500", "umbrella.example", "globex-holding.com"),
        ("710003", "P-600", "acme-partner.example", "acme.com"),
    ];
    for (so, partner, domain, _) in fixed {
        live.hold(so, order_of(partner, domain, "DE")).await;
        let escalated = live.event(so, "order.hold_escalated").await;
        assert_eq!(escalated.data("reason"), &json!("NO_RULE_MATCHED"));
    }
    for (so, _, _, account) in fixed {
        // The watch's first look makes the order known to the simulator.
        let sim = &live.sim;
        wait_for(DEADLINE, "the watch's first look", || async move {
            sim.order(so)
        })
        .await;
        live.sim
            .assign_by_hand(so, account, "Holding")
            .expect("the simulator assigns by hand");
    }
    for (so, _, _, account) in fixed {
        let released = live.event(so, "order.hold_released").await;
        assert_eq!(released.data("smartAccountDomain"), &json!(account));
        assert_eq!(released.data("rule"), &Value::Null);
    }
    live.events.assert_quiet(Duration::from_millis(1500)).await;
    for (so, ..) in fixed {
        let escalations = (live.events.seen.iter())
            .filter(|e| e.order() == so && e.routing_key == "order.hold_escalated")
            .count();
        assert_eq!(escalations, 1, "order {so}: no second escalation");
    }
    let recorded: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT c.order_key, w.outcome, w.smart_account_domain, w.virtual_account_name
         FROM hand_watches w JOIN cases c ON c.id = w.case_id ORDER BY c.order_key",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected: Vec<(String, String, String, String)> = (fixed.iter())
        .map(|(so, _, _, a)| {
            (
                so.to_string(),
                "released".into(),
                a.to_string(),
                "Holding".into(),
            )
        })
        .collect();
    assert_eq!(recorded, expected);
    live.worker.terminate();

    let s = json_of(&["rules", "suggest", "--rules", &rules, "--json"], &db);
    assert_eq!(s["fixes"], 3, "{s:#}");
    let suggestions = s["suggestions"].as_array().unwrap();
    assert_eq!(suggestions.len(), 1, "{s:#}");
    let one = &suggestions[0]["suggestion"];
    assert_eq!(one["name"], "learned-p-500-umbrella-example-de", "{s:#}");
    assert_eq!(one["fixes"], 2);
    assert_eq!(one["orders"], json!(["710001", "710002"]));
    assert_eq!(one["account_type"], "HOLDING");
    assert_eq!(
        one["evidence"],
        "partner P-500, end customer domain umbrella.example, country DE were assigned by hand \
         to Smart Account globex-holding.com (virtual account Holding) 2 times, never otherwise"
    );
    let diff = &suggestions[0]["diff"];
    assert_eq!(diff["replayed"], 3, "{s:#}");
    assert_eq!(diff["unchanged"], 1, "{s:#}");
    assert_eq!(diff["counts"][0]["kind"], "newly_matched", "{s:#}");
    assert_eq!(diff["counts"][0]["orders"], 2, "{s:#}");
    assert_eq!(s["too_few"][0]["fixes"], 1, "{s:#}");
    assert_eq!(s["too_few"][0]["when"]["partner_id"], "P-600", "{s:#}");

    // Pasted into the rules file, the suggestion passes `rules check`, and
    // decides those orders as the person did.
    let toml = one["toml"].as_str().unwrap();
    let pasted = write(dir.path(), "pasted.toml", &format!("{LIVE}\n{toml}"));
    let out = run(&["rules", "check", &pasted], &db);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{toml}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = json_of(
        &["rules", "diff", "--rules", &rules, "--json", &pasted],
        &db,
    );
    let newly: Vec<&str> = (d["report"]["changes"].as_array().unwrap().iter())
        .filter(|c| c["kind"] == "newly_matched")
        .map(|c| c["order"].as_str().unwrap())
        .collect();
    assert_eq!(newly, ["710001", "710002"], "{d:#}");

    let out = run(&["rules", "suggest", "--rules", &rules], &db);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 hand fixes since"), "{text}");
    assert!(text.contains("2 times, never otherwise."), "{text}");
    assert!(
        text.contains("[[rule]]\nname = \"learned-p-500-umbrella-example-de\""),
        "{text}"
    );
}

/// A window without hand fixes says so.
#[sqlx::test]
async fn suggest_without_hand_fixes_says_so(pool: PgPool) {
    let db = database_url(&pool).await;
    let out = run(
        &["rules", "suggest", "--rules", "deploy/config/rules.toml"],
        &db,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("No escalated order was released by hand since ")
            && text.contains("(--since 30days): nothing to learn from."),
        "{text}"
    );
}

/// The rules in force of the stats and diff test: `japan` never matches.
const IN_FORCE: &str = r#"
[[rule]]
name = "acme"
[rule.when]
end_customer_domain = ["acme.com"]
[rule.assign]
smart_account = { domain = "acme.com" }
account_type = "CUSTOMER"
virtual_account = "DEFAULT"

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

/// The new rules: acme's Virtual Account changes (target), `germany` takes
/// partner-200's German orders (rule), its other orders match nothing
/// (newly unmatched), `france` takes an order that matched nothing (newly
/// matched).
const NEW: &str = r#"
[[rule]]
name = "acme"
[rule.when]
end_customer_domain = ["acme.com"]
[rule.assign]
smart_account = { domain = "acme.com" }
account_type = "CUSTOMER"
virtual_account = "Network"

[[rule]]
name = "germany"
[rule.when]
country = ["DE"]
[rule.assign]
smart_account = { domain = "de.example" }
account_type = "HOLDING"

[[rule]]
name = "france"
[rule.when]
country = ["FR"]
[rule.assign]
smart_account = { domain = "fr.example" }
account_type = "HOLDING"
"#;

/// Cases decided by a running engine: `rules stats` counts each rule's
/// decisions, names the rule that never matched and groups the orders no
/// rule matched; `/metrics` has the decisions per rule; `rules diff` shows
/// each kind of change.
#[sqlx::test]
async fn stats_metrics_and_diff_of_cases_the_engine_decided(pool: PgPool) {
    use crate::support::worker::{http_get, start};
    let dir = tempfile::tempdir().unwrap();
    let rules = write(dir.path(), "rules.toml", IN_FORCE);
    let new = write(dir.path(), "new.toml", NEW);
    let sim = sim::start(holdclear::sim::Scenario::demo().unwrap()).await;
    let prefix = unique("rules-stats");
    let rabbit = Rabbit::new(&prefix).await;
    let mut events = EventQueue::bind(&topology(&prefix)).await;
    let db = database_url(&pool).await;
    let (base, token) = (sim.base_url(), sim.token_url());
    let settings = crate::support::settings(
        &db,
        &prefix,
        &[
            ("HOLDCLEAR_RULES", &rules),
            ("HOLDCLEAR_COMMERCE_BASE_URL", &base),
            ("HOLDCLEAR_COMMERCE_TOKEN_URL", &token),
            ("HOLDCLEAR_POLL_INTERVAL", "200ms"),
            ("HOLDCLEAR_POLL_MAX_INTERVAL", "500ms"),
        ],
    );
    let worker = start(settings).await;
    let orders = [
        ("720001", "P-100", "acme.com", "US", "order.hold_released"),
        (
            "720002",
            "P-200",
            "globex.example",
            "DE",
            "order.hold_escalated",
        ),
        (
            "720003",
            "P-200",
            "initech.example",
            "US",
            "order.hold_escalated",
        ),
        (
            "720004",
            "P-300",
            "nomatch.example",
            "FR",
            "order.hold_escalated",
        ),
    ];
    let mut published = Vec::new();
    for (so, partner, domain, country, _) in orders {
        let mut ev = held_event(&unique("ev"), so);
        order_of(partner, domain, country)(&mut ev);
        published.push(ev);
    }
    rabbit.publish_events(&published).await;
    events
        .until(DEADLINE, "every order's outcome", |seen| {
            orders.iter().all(|(so, .., key)| {
                seen.iter()
                    .any(|e| e.order() == *so && e.routing_key == *key)
            })
        })
        .await;

    let s = json_of(&["rules", "stats", "--rules", &rules, "--json"], &db);
    assert_eq!(s["cases"], 4, "{s:#}");
    let hits: Vec<(&str, i64)> = (s["hits"].as_array().unwrap().iter())
        .map(|h| (h["rule"].as_str().unwrap(), h["decided"].as_i64().unwrap()))
        .collect();
    assert_eq!(hits, [("partner-200", 2), ("acme", 1)], "{s:#}");
    assert_eq!(s["never_matched"], json!(["japan"]), "{s:#}");
    assert_eq!(s["no_rule_matched"]["orders"], 1, "{s:#}");
    let group = &s["no_rule_matched"]["groups"][0];
    assert_eq!(
        (
            &group["partner_id"],
            &group["end_customer_domain"],
            &group["country"]
        ),
        (&json!("P-300"), &json!("nomatch.example"), &json!("FR")),
        "{s:#}"
    );

    let (status, metrics) = http_get(worker.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "holdclear_rule_decisions_total{rule=\"acme\"} 1",
        "holdclear_rule_decisions_total{rule=\"partner-200\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
    worker.shutdown().await.unwrap();

    let d = json_of(&["rules", "diff", "--rules", &rules, "--json", &new], &db);
    let kinds: Vec<(&str, &str)> = (d["report"]["changes"].as_array().unwrap().iter())
        .map(|c| (c["order"].as_str().unwrap(), c["kind"].as_str().unwrap()))
        .collect();
    let mut kinds = kinds;
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("720001", "target"),
            ("720002", "rule"),
            ("720003", "newly_unmatched"),
            ("720004", "newly_matched"),
        ],
        "{d:#}"
    );
    assert_eq!(d["report"]["unchanged"], 0, "{d:#}");
    assert_eq!(d["report"]["unreadable"], json!([]), "{d:#}");
}

/// A held event for an order whose escalated case is being watched: the
/// same hold announced again joins that case (`held_again`) and the watch
/// goes on; a new hold (applied after the escalation) opens a new case,
/// which works the order: the watch ends `superseded`, and the order's
/// release is the new case's alone (one `order.hold_released`, its rule).
#[sqlx::test]
async fn a_new_held_event_supersedes_the_watch_of_an_escalated_case(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(dir.path(), "rules.toml", LIVE);
    let demo = holdclear::sim::Scenario::demo().unwrap();
    let mut live = Live::start(
        &pool,
        demo,
        dir.path(),
        &[
            ("HOLDCLEAR_RULES", &rules),
            ("HOLDCLEAR_ESCALATED_WATCH_INTERVAL", "1s"),
        ],
    )
    .await;
    let so = "730001";
    live.hold(so, order_of("P-500", "umbrella.example", "DE"))
        .await;
    live.event(so, "order.hold_escalated").await;
    let sim = &live.sim;
    wait_for(DEADLINE, "the watch's first look", || async move {
        sim.order(so)
    })
    .await;
    // The same hold announced again (held before the escalation) joins the
    // escalated case, which stays watched.
    live.hold(so, order_of("P-500", "umbrella.example", "DE"))
        .await;
    wait_for(DEADLINE, "the held_again line", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM case_history WHERE kind = 'held_again' HAVING count(*) > 0",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await;
    let watching: i64 =
        sqlx::query_scalar("SELECT count(*) FROM hand_watches WHERE ended_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(watching, 1);
    // A new hold (applied after the escalation), now with acme as its end
    // customer: a new case.
    live.hold(so, |ev| {
        ev["data"]["heldAt"] = json!(chrono::Utc::now().to_rfc3339());
    })
    .await;
    let released = live.event(so, "order.hold_released").await;
    assert_eq!(released.data("rule"), &json!("acme"));
    let watch = wait_for(DEADLINE, "the watch to end", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT outcome FROM hand_watches WHERE ended_at IS NOT NULL",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await;
    assert_eq!(watch, "superseded");
    live.events.assert_quiet(Duration::from_millis(2500)).await;
    let releases = (live.events.seen.iter())
        .filter(|e| e.routing_key == "order.hold_released")
        .count();
    assert_eq!(releases, 1, "{:#?}", live.events.seen);
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM cases WHERE order_key = $1 ORDER BY created_at")
            .bind(so)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(states, ["escalated", "released"]);
    live.worker.terminate();
}

/// `cases retry` re-opens a watched escalated case: that watch ends, and
/// when the re-run escalates again the case is watched in its new
/// generation; a person's release then ends it as for any other.
#[sqlx::test]
async fn a_retried_case_is_watched_again_in_its_new_generation(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(dir.path(), "rules.toml", LIVE);
    let demo = holdclear::sim::Scenario::demo().unwrap();
    let mut live = Live::start(
        &pool,
        demo,
        dir.path(),
        &[
            ("HOLDCLEAR_RULES", &rules),
            ("HOLDCLEAR_ESCALATED_WATCH_INTERVAL", "1s"),
        ],
    )
    .await;
    let db = database_url(&pool).await;
    let so = "740001";
    live.hold(so, order_of("P-500", "umbrella.example", "DE"))
        .await;
    live.event(so, "order.hold_escalated").await;
    let watch_of = |generation: i32| {
        let pool = pool.clone();
        move || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i32>(
                    "SELECT generation FROM hand_watches WHERE ended_at IS NULL AND generation = $1",
                )
                .bind(generation)
                .fetch_optional(&pool)
                .await
                .unwrap()
            }
        }
    };
    wait_for(DEADLINE, "the watch of generation 0", watch_of(0)).await;
    let out = run(&["cases", "retry", so], &db);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(DEADLINE, "the watch of generation 1", watch_of(1)).await;
    let sim = &live.sim;
    wait_for(
        DEADLINE,
        "a look at the order",
        || async move { sim.order(so) },
    )
    .await;
    live.sim
        .assign_by_hand(so, "globex-holding.com", "Holding")
        .unwrap();
    let released = live.event(so, "order.hold_released").await;
    assert_eq!(
        released.data("smartAccountDomain"),
        &json!("globex-holding.com")
    );
    let (generation, outcome): (i32, String) =
        sqlx::query_as("SELECT generation, outcome FROM hand_watches")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((generation, outcome.as_str()), (1, "released"));
    live.worker.terminate();
}
