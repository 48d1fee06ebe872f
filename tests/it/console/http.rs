//! The console over HTTP: sign-in, roles, CSRF, CSP, escaping, and every
//! action changing the store and leaving an operation behind.

use sqlx::PgPool;

use super::{Browser, DEADLINE, OPERATOR_TOKEN, Stage, VIEWER_TOKEN, client};
use crate::support::{bin, wait_for};

/// `holdclear console` with no token and no trusted header does not start:
/// exit 64 naming the setting; a short token is refused without being shown.
#[tokio::test]
async fn console_refuses_to_start_without_a_credential() {
    let out = bin()
        .arg("console")
        .env("HOLDCLEAR_CONSOLE_ADDR", "127.0.0.1:0")
        .env_remove("HOLDCLEAR_CONSOLE_OPERATOR_TOKENS")
        .env_remove("HOLDCLEAR_CONSOLE_VIEWER_TOKENS")
        .env_remove("HOLDCLEAR_CONSOLE_TRUSTED_HEADER")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("HOLDCLEAR_CONSOLE_OPERATOR_TOKENS"), "{err}");
    assert!(err.contains("anonymous"), "{err}");

    let out = bin()
        .arg("console")
        .env("HOLDCLEAR_CONSOLE_OPERATOR_TOKENS", "ann:short-secret")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("HOLDCLEAR_CONSOLE_OPERATOR_TOKENS"), "{err}");
    assert!(!err.contains("short-secret"), "the token is shown: {err}");
}

/// No page without signing in (302 to the sign-in page; 401 for a post);
/// a wrong token is refused; the session cookie is HttpOnly and
/// SameSite=Strict; every answer carries the CSP.
#[sqlx::test]
async fn console_requires_sign_in_and_sends_a_strict_csp(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let c = client();
    let res = c
        .get(format!("{}/escalations", stage.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 302);
    assert_eq!(res.headers()["location"], "/login?next=/escalations");
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    let res = c
        .post(format!(
            "{}/cases/00000000-0000-0000-0000-000000000000/claim",
            stage.base
        ))
        .form(&[("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // A wrong token: 401 and the sign-in page again.
    let page = c.get(format!("{}/login", stage.base)).send().await.unwrap();
    let cookie = page.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let csrf = super::csrf_of(&page.text().await.unwrap());
    let res = c
        .post(format!("{}/login", stage.base))
        .header("cookie", &pair)
        .form(&[("token", "not-a-token-of-anyone"), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // The right token without the form's CSRF token: refused.
    let res = c
        .post(format!("{}/login", stage.base))
        .header("cookie", &pair)
        .form(&[("token", OPERATOR_TOKEN), ("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);

    let olga = Browser::sign_in(&stage.base, OPERATOR_TOKEN).await;
    let (status, body) = olga.get("/").await;
    assert_eq!(status, 200);
    assert!(body.contains("olga · operator"), "{body}");
    stage.stop().await;
}

/// A viewer sees every action disabled, and the server refuses each one
/// (403) with a valid CSRF token: nothing changes, no operation is written.
#[sqlx::test]
async fn console_viewers_cannot_act(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let case = stage.escalated("905000001").await;
    let letter = stage
        .dead_letter(
            "dl-viewer",
            "DELIVERY_LIMIT",
            "delivery limit reached",
            b"{}",
        )
        .await;
    let victor = stage.sign_in(VIEWER_TOKEN).await;
    let (status, page) = victor.get(&format!("/cases/{case}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("victor · viewer"));
    let buttons = page.matches("<button type=\"submit\">").count();
    let disabled = page
        .matches("disabled title=\"viewers cannot act\"")
        .count();
    assert_eq!(
        disabled, 4,
        "retry, close, claim, note are disabled: {page}"
    );
    assert_eq!(buttons, 0, "no enabled action button: {page}");

    let csrf = victor.csrf().await;
    let group: String = sqlx::query_scalar("SELECT group_key FROM dead_letters WHERE id = $1")
        .bind(letter)
        .fetch_one(&pool)
        .await
        .unwrap();
    let id = letter.to_string();
    let posts: Vec<(String, Vec<(&str, &str)>)> = vec![
        (format!("/cases/{case}/retry"), vec![]),
        (
            format!("/cases/{case}/close"),
            vec![("note", "done by hand")],
        ),
        (format!("/cases/{case}/claim"), vec![]),
        (format!("/cases/{case}/note"), vec![("text", "a note")]),
        (
            format!("/dead-letters/{letter}/note"),
            vec![("text", "a note")],
        ),
        ("/dead-letters/claim".into(), vec![("ids", id.as_str())]),
        (
            "/dead-letters/archive".into(),
            vec![("group", group.as_str())],
        ),
        (
            "/replay".into(),
            vec![("group", group.as_str()), ("rate", "10")],
        ),
    ];
    for (path, mut form) in posts {
        form.push(("csrf", &csrf));
        let (status, body) = victor.post(&path, &form).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("viewers cannot act"), "{path}: {body}");
    }
    let ops: i64 = sqlx::query_scalar("SELECT count(*) FROM operations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(ops, 0);
    let state: String = sqlx::query_scalar("SELECT state FROM cases WHERE id = $1")
        .bind(case)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "escalated");
    stage.stop().await;
}

/// An operator's form without its CSRF token, or with another session's,
/// is refused (403) and changes nothing.
#[sqlx::test]
async fn console_forms_need_the_sessions_csrf_token(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let case = stage.escalated("905000002").await;
    let olga = stage.sign_in(OPERATOR_TOKEN).await;
    let other = stage.sign_in(OPERATOR_TOKEN).await.csrf().await;
    let path = format!("/cases/{case}/claim");
    let (status, _) = olga.post(&path, &[]).await;
    assert_eq!(status, 403);
    let (status, body) = olga.post(&path, &[("csrf", &other)]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    assert_eq!(stage.operations("case claim", "olga").await, 0);
    let (status, to) = olga.post(&path, &[("csrf", &olga.csrf().await)]).await;
    assert_eq!(
        (status, to.starts_with(&format!("/cases/{case}?done="))),
        (303, true)
    );
    assert_eq!(stage.operations("case claim", "olga").await, 1);
    stage.stop().await;
}

/// A dead letter whose body is HTML is shown as text, never as markup.
#[sqlx::test]
async fn console_shows_an_html_body_escaped(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let body = b"<script>alert(1)</script><img src=x onerror=alert(2)>";
    let id = stage
        .dead_letter("dl-html", "MALFORMED_JSON", "<b>not JSON</b>", body)
        .await;
    let olga = stage.sign_in(OPERATOR_TOKEN).await;
    let (status, page) = olga.get(&format!("/dead-letters/{id}")).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"),
        "{page}"
    );
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(!page.contains("<img src=x"), "{page}");
    assert!(page.contains("&lt;b&gt;not JSON&lt;/b&gt;"), "{page}");
    let (_, list) = olga.get("/dead-letters").await;
    assert!(!list.contains("<b>not JSON"), "{list}");
    stage.stop().await;
}

/// Claim, note, retry and close from the console change the case and
/// write an operation naming the operator; the overview and the case page
/// show the escalation with what to do, and the timeline.
#[sqlx::test]
async fn console_case_actions_change_the_store_and_are_audited(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let case = stage.escalated("905000003").await;
    let olga = stage.sign_in(OPERATOR_TOKEN).await;
    let (_, overview) = olga.get("/").await;
    assert!(overview.contains("SMART_ACCOUNT_NOT_ACTIVE"), "{overview}");
    assert!(
        overview.contains("Ask the customer to activate their Smart Account"),
        "{overview}"
    );
    let (_, list) = olga
        .get("/escalations/list?reason=SMART_ACCOUNT_NOT_ACTIVE&domain=hooli.com")
        .await;
    assert!(list.contains(&format!("/cases/{case}")), "{list}");
    let (_, page) = olga.get(&format!("/cases/{case}")).await;
    for part in [
        "Timeline",
        "find_account",
        "order.hold_escalated",
        "any-end-customer",
        "Why this rule",
    ] {
        assert!(page.contains(part), "{part}: {page}");
    }
    let csrf = olga.csrf().await;
    let post = |path: String, form: Vec<(&'static str, String)>| {
        let olga = &olga;
        let csrf = csrf.clone();
        async move {
            let mut form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            form.push(("csrf", &csrf));
            let (status, to) = olga.post(&path, &form).await;
            assert_eq!(status, 303, "{path}: {to}");
        }
    };
    post(format!("/cases/{case}/claim"), vec![]).await;
    post(
        format!("/cases/{case}/note"),
        vec![
            ("text", "customer called".into()),
            ("ticket", "INC-7".into()),
        ],
    )
    .await;
    let (claimed, note): (Option<String>, String) = sqlx::query_as(
        "SELECT c.claimed_by, n.text || ' ' || n.ticket FROM cases c JOIN case_notes n ON n.case_id = c.id WHERE c.id = $1",
    )
    .bind(case)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (claimed.as_deref(), note.as_str()),
        (Some("olga"), "customer called INC-7")
    );

    // Retry with the account still INACTIVE: re-opened, and escalated again.
    post(format!("/cases/{case}/retry"), vec![]).await;
    assert_eq!(stage.operations("case retry", "olga").await, 1);
    wait_for(
        super::DEADLINE,
        "the retried case to escalate again",
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM case_history WHERE case_id = $1 AND kind = 'escalated'",
            )
            .bind(case)
            .fetch_one(&pool)
            .await
            .unwrap();
            (n >= 2).then_some(())
        },
    )
    .await;
    stage.case_in("905000003", "escalated").await;

    // Closed by hand: gone from the escalation lists, kept in the store.
    post(
        format!("/cases/{case}/close"),
        vec![("note", "assigned in CCW by hand".into())],
    )
    .await;
    assert_eq!(stage.operations("case close", "olga").await, 1);
    let (handled_by, kinds): (Option<String>, Vec<String>) = sqlx::query_as(
        "SELECT handled_by, (SELECT array_agg(kind ORDER BY id) FROM case_history WHERE case_id = $1)
         FROM cases WHERE id = $1",
    )
    .bind(case)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(handled_by.as_deref(), Some("olga"));
    assert_eq!(kinds.last().map(String::as_str), Some("closed"));
    let (_, list) = olga
        .get("/escalations/list?reason=SMART_ACCOUNT_NOT_ACTIVE")
        .await;
    assert!(!list.contains(&format!("/cases/{case}")), "{list}");
    let (_, rules) = olga.get("/rules").await;
    assert!(
        rules.contains("any-end-customer") && rules.contains("acme-direct"),
        "{rules}"
    );
    let (_, ops) = olga.get("/operations").await;
    for kind in ["case claim", "case note", "case retry", "case close"] {
        assert!(ops.contains(kind), "{kind}: {ops}");
    }
    stage.stop().await;
}

/// A replay of a dead-letter group: the dry run says how many and which
/// orders; the replay sends them (an operation by the operator), the event
/// becomes a case, and the report says so. Claim and archive are audited.
#[sqlx::test]
async fn console_replays_a_group_after_a_dry_run(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let event = crate::support::broker::held_event("evt-replay-1", "905000004");
    let body = serde_json::to_vec(&event).unwrap();
    let id = stage
        .dead_letter(
            "dl-replay",
            "DELIVERY_LIMIT",
            "delivery limit 20 reached",
            &body,
        )
        .await;
    let group: String = sqlx::query_scalar("SELECT group_key FROM dead_letters WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let olga = stage.sign_in(OPERATOR_TOKEN).await;
    let (_, overview) = olga.get("/").await;
    assert!(overview.contains("DELIVERY_LIMIT"), "{overview}");
    let (status, dry) = olga.get(&format!("/replay?group={group}")).await;
    assert_eq!(status, 200, "{dry}");
    assert!(
        dry.contains("<strong>1</strong> message(s) would be replayed"),
        "{dry}"
    );
    assert!(dry.contains("905000004"), "{dry}");
    assert_eq!(
        stage.operations("replay", "olga").await,
        0,
        "a dry run sends nothing"
    );

    let csrf = olga.csrf().await;
    let (status, to) = olga
        .post(
            "/replay",
            &[
                ("group", &group),
                ("rate", "50"),
                ("batch", "10"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(status, 303, "{to}");
    assert!(to.starts_with("/operations/"), "{to}");
    wait_for(
        super::DEADLINE,
        "the replayed event to become a case",
        || async {
            let (_, report) = olga.get(&to).await;
            report
                .contains("became cases <strong>1</strong>")
                .then_some(())
        },
    )
    .await;
    assert_eq!(stage.operations("replay", "olga").await, 1);

    let (status, _) = olga
        .post("/dead-letters/claim", &[("group", &group), ("csrf", &csrf)])
        .await;
    assert_eq!(status, 303);
    let (status, _) = olga
        .post(
            "/dead-letters/archive",
            &[("group", &group), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(status, 303);
    let (claimed, archived): (Option<String>, bool) = sqlx::query_as(
        "SELECT claimed_by, archived_at IS NOT NULL FROM dead_letters WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((claimed.as_deref(), archived), (Some("olga"), true));
    assert_eq!(stage.operations("claim", "olga").await, 1);
    assert_eq!(stage.operations("archive", "olga").await, 1);
    stage.stop().await;
}

/// A slow replay is cancelled from the console: it stops, `cancelled`.
#[sqlx::test]
async fn console_cancels_a_running_replay(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let mut group = String::new();
    for n in 0..3 {
        let event =
            crate::support::broker::held_event(&format!("evt-slow-{n}"), &format!("90500010{n}"));
        let id = stage
            .dead_letter(
                &format!("dl-slow-{n}"),
                "DELIVERY_LIMIT",
                "delivery limit 20 reached",
                &serde_json::to_vec(&event).unwrap(),
            )
            .await;
        group = sqlx::query_scalar("SELECT group_key FROM dead_letters WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    }
    let olga = stage.sign_in(OPERATOR_TOKEN).await;
    let csrf = olga.csrf().await;
    let (_, to) = olga
        .post(
            "/replay",
            &[
                ("group", &group),
                ("rate", "0.2"),
                ("batch", "1"),
                ("csrf", &csrf),
            ],
        )
        .await;
    let (status, _) = olga.post(&format!("{to}/cancel"), &[("csrf", &csrf)]).await;
    assert_eq!(status, 303);
    let operation: uuid::Uuid = to.trim_start_matches("/operations/").parse().unwrap();
    wait_for(super::DEADLINE, "the replay to stop", || async {
        let status: String = sqlx::query_scalar("SELECT status FROM operations WHERE id = $1")
            .bind(operation)
            .fetch_one(&pool)
            .await
            .unwrap();
        (status == "cancelled").then_some(())
    })
    .await;
    let sent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operation_items WHERE operation_id = $1 AND sent_at IS NOT NULL",
    )
    .bind(operation)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(sent < 3, "a cancelled replay sent everything");
    assert_eq!(stage.operations("cancel", "olga").await, 1);
    stage.stop().await;
}

/// The CLI acts on cases as the console does, through the same code:
/// claim, note, close by hand, each an operation naming the operator.
#[sqlx::test]
async fn the_cases_cli_claims_notes_and_closes_like_the_console(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let case = stage.escalated("905000009").await;
    let db = crate::support::database_url(&pool).await;
    let cases = |args: &[&str]| {
        let out = bin()
            .arg("cases")
            .args(args)
            .env("HOLDCLEAR_DATABASE_URL", &db)
            .env("USER", "carla")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = cases(&["claim", "905000009"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("claimed by carla"), "{out}");
    let (code, out) = cases(&[
        "note",
        "905000009",
        "--text",
        "called them",
        "--ticket",
        "INC-9",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = cases(&["close", "905000009", "--note", " "]);
    assert_eq!(code, Some(64), "an empty note is refused: {out}");
    let (code, out) = cases(&["close", "905000009", "--note", "assigned by hand"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = cases(&["close", "905000999", "--note", "x"]);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("no case for order 905000999"), "{out}");
    for kind in ["case claim", "case note", "case close"] {
        assert_eq!(stage.operations(kind, "carla").await, 1, "{kind}");
    }
    let olga = stage.sign_in(OPERATOR_TOKEN).await;
    let (_, page) = olga.get(&format!("/cases/{case}")).await;
    for part in [
        "Claimed by",
        "carla",
        "called them [ticket INC-9]",
        "Closed by hand",
        "assigned by hand",
    ] {
        assert!(page.contains(part), "{part}: {page}");
    }
    stage.stop().await;
}

/// The overview's workers come from their heartbeats: a running worker is
/// up (with its host and version), a worker stopped gracefully says so, and
/// one that stopped beating without a stop (SIGKILL, a lost network) is
/// lost, whether or not any of them holds a lease.
#[sqlx::test]
async fn console_lists_workers_from_their_heartbeats(pool: PgPool) {
    let mut stage = Stage::new(&pool).await;
    let id = stage.worker.as_ref().unwrap().identity.to_string();
    // What a worker killed two minutes ago left behind.
    let killed = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO workers (id, host, pid, version, started_at, last_beat, ready)
         VALUES ($1, 'pod-killed', 1, '0.0.9', now() - interval '1 hour',
                 now() - interval '2 minutes', true)",
    )
    .bind(killed)
    .execute(&pool)
    .await
    .unwrap();
    let victor = stage.sign_in(VIEWER_TOKEN).await;
    let row_of = |page: &str, worker: &str| -> String {
        let at = page
            .find(worker)
            .unwrap_or_else(|| panic!("{worker} listed: {page}"));
        let end = page[at..].find("</tr>").map_or(page.len(), |e| at + e);
        page[at..end].to_owned()
    };
    wait_for(DEADLINE, "the worker up on the overview", || async {
        let (_, page) = victor.get("/").await;
        (page.contains(&id) && row_of(&page, &id).contains(">up<")).then_some(())
    })
    .await;
    let (_, page) = victor.get("/").await;
    let up = row_of(&page, &id);
    assert!(up.contains(env!("CARGO_PKG_VERSION")), "{up}");
    let lost = row_of(&page, &killed.to_string());
    assert!(
        lost.contains(">lost<") && lost.contains("pod-killed"),
        "{lost}"
    );

    stage.worker.take().unwrap().shutdown().await.unwrap();
    let (_, page) = victor.get("/").await;
    let stopped = row_of(&page, &id);
    assert!(stopped.contains(">stopped<"), "{stopped}");
    stage.stop().await;
}
