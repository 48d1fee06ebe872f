//! The console in a real browser: Debian's chromium driven through its
//! chromedriver (WebDriver), headless, one chromedriver per test on a free
//! port. Not in the default suite (a laptop may have no chromedriver):
//! `cargo nextest run --profile browser` runs them; `.ci/run` installs
//! `chromium chromium-driver` when missing. They also write the
//! screenshots of docs/console/.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use sqlx::PgPool;

use super::{OPERATOR_TOKEN, Stage, VIEWER_TOKEN};
use crate::support::{repo_path, wait_for};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver of one test (killed when dropped) and its session.
struct Driver {
    child: Child,
    client: Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Driver {
    /// Headless chromium at a laptop's size, or a phone's (375 px wide).
    async fn start(phone: bool) -> Self {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists(),
            "{CHROMEDRIVER} is missing: apt-get install chromium chromium-driver"
        );
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let mut options = json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000"],
        });
        if phone {
            options["mobileEmulation"] =
                json!({"deviceMetrics": {"width": 375, "height": 812, "pixelRatio": 2.0}});
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), options);
        let client = wait_for(Duration::from_secs(20), "chromedriver", || {
            let caps = caps.clone();
            let url = url.clone();
            async move {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                ClientBuilder::new(connector)
                    .capabilities(caps)
                    .connect(&url)
                    .await
                    .ok()
            }
        })
        .await;
        Self { child, client }
    }

    async fn sign_in(&self, base: &str, token: &str) {
        let c = &self.client;
        c.goto(&format!("{base}/")).await.unwrap();
        let field = c.wait().for_element(Locator::Id("token")).await.unwrap();
        field.send_keys(token).await.unwrap();
        c.find(Locator::Css("form button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait()
            .for_element(Locator::Css("header.top .who"))
            .await
            .unwrap();
    }

    async fn text(&self) -> String {
        self.client
            .find(Locator::Css("body"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Reloads until the page's text contains `needle`.
    async fn until_text(&self, needle: &str) -> String {
        wait_for(super::DEADLINE, needle, || async {
            self.client.refresh().await.unwrap();
            let t = self.text().await;
            t.contains(needle).then_some(t)
        })
        .await
    }

    async fn click(&self, css: &str) {
        self.client
            .wait()
            .for_element(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Writes docs/console/NAME.png.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        let dir = repo_path("docs/console");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Ends the browser session (the chromedriver goes when dropped).
    async fn close(self) {
        self.client.clone().close().await.ok();
    }
}

/// Signing in leads to the overview, which shows the seeded escalation
/// (with what to do) and dead-letter group.
#[sqlx::test]
async fn overview_shows_escalations_and_dead_letters(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    stage.escalated("906000001").await;
    stage
        .dead_letter(
            "dl-b1",
            "MALFORMED_JSON",
            "body is not JSON: expected value at line 1",
            b"{oops",
        )
        .await;
    let d = Driver::start(false).await;
    d.sign_in(&stage.base, OPERATOR_TOKEN).await;
    let text = d.text().await;
    assert!(text.contains("SMART_ACCOUNT_NOT_ACTIVE"), "{text}");
    assert!(
        text.contains("Ask the customer to activate their Smart Account"),
        "{text}"
    );
    assert!(text.contains("MALFORMED_JSON"), "{text}");
    assert!(text.contains("olga · operator"), "{text}");
    // The script (allowed by the CSP: same origin) refreshes the live parts.
    wait_for(Duration::from_secs(15), "a live refresh", || async {
        let at = d
            .js("return document.documentElement.dataset.refreshed || null")
            .await;
        (!at.is_null()).then_some(())
    })
    .await;
    d.screenshot("overview").await;
    d.close().await;
    stage.stop().await;
}

/// Open a case from the escalations and see its timeline; fix the cause
/// (the customer activates the account), retry from the page, and see the
/// case released (and `order.hold_released` written).
#[sqlx::test]
async fn a_case_is_retried_after_its_cause_is_fixed(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let case = stage.escalated("906000002").await;
    let d = Driver::start(false).await;
    d.sign_in(&stage.base, OPERATOR_TOKEN).await;
    d.click("a[href='/escalations']").await;
    d.click("td a[href^='/escalations/list']").await;
    d.click(&format!("a[href='/cases/{case}']")).await;
    let text = d.text().await;
    for part in [
        "Timeline",
        "find_account",
        "order.hold_escalated",
        "any-end-customer",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    d.screenshot("case").await;
    stage.activate_hooli();
    d.click(&format!("form[action='/cases/{case}/retry'] button"))
        .await;
    let text = d.until_text("order.hold_released").await;
    assert!(text.contains("Re-opened"), "{text}");
    stage.case_in("906000002", "released").await;
    d.close().await;
    stage.stop().await;
}

/// A dead-letter group replayed: the dry run first, then for real; the
/// report shows the message became a case.
#[sqlx::test]
async fn a_dead_letter_group_is_replayed_after_a_dry_run(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let event = crate::support::broker::held_event("evt-b3", "906000003");
    stage
        .dead_letter(
            "dl-b3",
            "DELIVERY_LIMIT",
            "delivery limit 20 reached",
            &serde_json::to_vec(&event).unwrap(),
        )
        .await;
    let d = Driver::start(false).await;
    d.sign_in(&stage.base, OPERATOR_TOKEN).await;
    d.click("a[href='/dead-letters']").await;
    d.screenshot("dead-letters").await;
    d.click("a.button[href^='/replay?group=']").await;
    let text = d.text().await;
    assert!(
        text.contains("1 message(s) would be replayed; 0 refused."),
        "{text}"
    );
    assert!(text.contains("906000003"), "{text}");
    d.click("form[action='/replay'] button").await;
    let text = d.until_text("became cases 1").await;
    assert!(text.contains("replay"), "{text}");
    d.screenshot("replay-report").await;
    d.close().await;
    stage.stop().await;
}

/// A viewer sees the actions disabled; a form forced past the browser is
/// refused by the server (403) and changes nothing.
#[sqlx::test]
async fn a_viewer_cannot_act(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let case = stage.escalated("906000004").await;
    let d = Driver::start(false).await;
    d.sign_in(&stage.base, VIEWER_TOKEN).await;
    d.client
        .goto(&format!("{}/cases/{case}", stage.base))
        .await
        .unwrap();
    let retry = d
        .client
        .find(Locator::Css(&format!(
            "form[action='/cases/{case}/retry'] button"
        )))
        .await
        .unwrap();
    assert!(!retry.is_enabled().await.unwrap());
    d.js("document.querySelectorAll('button[disabled]').forEach(b => b.disabled = false)")
        .await;
    retry.click().await.unwrap();
    let text = d.until_text("viewers cannot act").await;
    assert!(text.contains("403"), "{text}");
    let state: String = sqlx::query_scalar("SELECT state FROM cases WHERE id = $1")
        .bind(case)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "escalated");
    d.close().await;
    stage.stop().await;
}

/// A dead letter whose body is HTML renders as text: no script runs, no
/// element is made from it.
#[sqlx::test]
async fn an_html_body_renders_inert(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let body = b"<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">";
    let id = stage
        .dead_letter("dl-b5", "MALFORMED_JSON", "not JSON", body)
        .await;
    let d = Driver::start(false).await;
    d.sign_in(&stage.base, OPERATOR_TOKEN).await;
    d.client
        .goto(&format!("{}/dead-letters/{id}", stage.base))
        .await
        .unwrap();
    let shown = d
        .client
        .find(Locator::Css("pre.body"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        shown.contains("<script>window.pwned = 1</script>"),
        "{shown}"
    );
    assert_eq!(d.js("return typeof window.pwned").await, json!("undefined"));
    assert_eq!(
        d.js("return document.querySelectorAll('main img').length")
            .await,
        json!(0)
    );
    d.close().await;
    stage.stop().await;
}

/// At 375 px wide no page scrolls sideways.
#[sqlx::test]
async fn a_phone_sees_no_horizontal_scrolling(pool: PgPool) {
    let stage = Stage::new(&pool).await;
    let case = stage.escalated("906000006").await;
    let id = stage
        .dead_letter(
            "dl-b6",
            "MALFORMED_JSON",
            "a-very-long-detail-without-any-space-".repeat(4).as_str(),
            b"{\"a-very-long-key-without-any-space-at-all-to-wrap\": 1}",
        )
        .await;
    let d = Driver::start(true).await;
    d.sign_in(&stage.base, OPERATOR_TOKEN).await;
    let pages = [
        "/".to_owned(),
        "/escalations".into(),
        "/escalations/list".into(),
        format!("/cases/{case}"),
        "/dead-letters".into(),
        "/dead-letters/list".into(),
        format!("/dead-letters/{id}"),
        "/operations".into(),
        "/rules".into(),
    ];
    for p in &pages {
        d.client.goto(&format!("{}{p}", stage.base)).await.unwrap();
        let (scroll, inner) = (
            d.js("return document.documentElement.scrollWidth").await,
            d.js("return window.innerWidth").await,
        );
        assert_eq!(inner, json!(375), "{p}");
        assert!(scroll.as_u64().unwrap() <= 375, "{p}: scrollWidth {scroll}");
        if p == "/" {
            d.screenshot("overview-phone").await;
        }
    }
    d.close().await;
    stage.stop().await;
}
