//! The operator console against a real console on an ephemeral port, a
//! real worker, the simulator, RabbitMQ and PostgreSQL: HTTP-level tests
//! here and in [`http`]; browser tests (not in the default suite) in
//! [`browser`].
#![allow(dead_code)]

mod browser;
mod http;

use std::time::Duration;

use holdclear::config::Settings;
use holdclear::console::ConsoleHandle;
use holdclear::sim::{Scenario, SimHandle};
use holdclear::store::Store;
use holdclear::worker::WorkerHandle;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::support::broker::{Rabbit, held_event};
use crate::support::{database_url, settings, unique, wait_for};

/// The operator's sign-in token in these tests.
pub const OPERATOR_TOKEN: &str = "operator-token-0123456789";
/// The viewer's.
pub const VIEWER_TOKEN: &str = "viewer-token-0123456789";
/// How long a test waits for the worker.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A console, a worker, a simulator and the test's topology.
pub struct Stage {
    pub pool: PgPool,
    pub rabbit: Rabbit,
    pub sim: SimHandle,
    pub worker: Option<WorkerHandle>,
    pub console: Option<ConsoleHandle>,
    pub base: String,
    pub settings: Settings,
}

impl Stage {
    /// Everything running: a worker that stores dead letters and works
    /// cases against the demo simulator, and the console.
    pub async fn new(pool: &PgPool) -> Self {
        let prefix = unique("console");
        let sim = crate::support::sim::start_demo().await;
        let db = database_url(pool).await;
        let base_url = sim.base_url();
        let token_url = sim.token_url();
        let settings = settings(
            &db,
            &prefix,
            &[
                ("HOLDCLEAR_COMMERCE_BASE_URL", &base_url),
                ("HOLDCLEAR_COMMERCE_TOKEN_URL", &token_url),
                ("HOLDCLEAR_DLQ_INGEST", "true"),
                ("HOLDCLEAR_POLL_INTERVAL", "100ms"),
                ("HOLDCLEAR_POLL_MAX_INTERVAL", "200ms"),
                ("HOLDCLEAR_ENGINE_IDLE_POLL", "100ms"),
                ("HOLDCLEAR_RETRY_INITIAL", "50ms"),
                ("HOLDCLEAR_RETRY_MAX_ELAPSED", "1s"),
                ("HOLDCLEAR_CONSOLE_ADDR", "127.0.0.1:0"),
                (
                    "HOLDCLEAR_CONSOLE_OPERATOR_TOKENS",
                    &format!("olga:{OPERATOR_TOKEN}"),
                ),
                (
                    "HOLDCLEAR_CONSOLE_VIEWER_TOKENS",
                    &format!("victor:{VIEWER_TOKEN}"),
                ),
            ],
        );
        let rabbit = Rabbit::new(&prefix).await;
        let worker = crate::support::worker::start(settings.clone()).await;
        let console = holdclear::console::start(
            settings.clone(),
            Store::from_pool(pool.clone()),
            CancellationToken::new(),
        )
        .await
        .expect("the console starts");
        let base = format!("http://{}", console.addr);
        Self {
            pool: pool.clone(),
            rabbit,
            sim,
            worker: Some(worker),
            console: Some(console),
            base,
            settings,
        }
    }

    /// Publishes a held order of `domain`'s end customer through a partner
    /// no rule names (the catch-all rule assigns the customer's own account).
    pub async fn hold(&self, order: &str, domain: &str) {
        let mut event = held_event(&unique("evt"), order);
        event["data"]["endCustomer"]["email"] = Value::from(format!("it@{domain}"));
        event["data"]["partner"]["id"] = Value::from("P-900");
        self.rabbit.publish_events(&[event]).await;
    }

    /// Waits until the order's latest case is in `state`; returns its id.
    pub async fn case_in(&self, order: &str, state: &str) -> uuid::Uuid {
        wait_for(DEADLINE, &format!("order {order} {state}"), || async {
            sqlx::query_scalar::<_, uuid::Uuid>(
                "SELECT id FROM cases WHERE order_key = $1 AND state = $2
                 ORDER BY created_at DESC LIMIT 1",
            )
            .bind(order)
            .bind(state)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
        })
        .await
    }

    /// An escalated `SMART_ACCOUNT_NOT_ACTIVE` case (hooli.com is INACTIVE
    /// in the demo scenario).
    pub async fn escalated(&self, order: &str) -> uuid::Uuid {
        self.hold(order, "hooli.com").await;
        self.case_in(order, "escalated").await
    }

    /// The simulator after the customer activated hooli.com.
    pub fn activate_hooli(&self) {
        let mut scenario = Scenario::demo().unwrap();
        for a in &mut scenario.accounts {
            if a.domain == "hooli.com" {
                a.status = "ACTIVE".into();
            }
        }
        self.sim.reset(scenario).unwrap();
    }

    /// Dead-letters `body` with `code` and waits until the worker stored it.
    pub async fn dead_letter(
        &self,
        message_id: &str,
        code: &str,
        detail: &str,
        body: &[u8],
    ) -> i64 {
        self.rabbit
            .dead_letter(message_id, code, detail, body)
            .await;
        wait_for(DEADLINE, &format!("dead letter {message_id}"), || async {
            sqlx::query_scalar::<_, i64>("SELECT id FROM dead_letters WHERE message_id = $1")
                .bind(message_id)
                .fetch_optional(&self.pool)
                .await
                .unwrap()
        })
        .await
    }

    /// Operations of `kind` by `operator`.
    pub async fn operations(&self, kind: &str, operator: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM operations WHERE kind = $1 AND operator = $2")
            .bind(kind)
            .bind(operator)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Signs in with `token` over HTTP.
    pub async fn sign_in(&self, token: &str) -> Browser {
        Browser::sign_in(&self.base, token).await
    }

    /// Stops the console and the worker.
    pub async fn stop(mut self) {
        if let Some(c) = self.console.take() {
            c.shutdown().await.unwrap();
        }
        if let Some(w) = self.worker.take() {
            w.shutdown().await.unwrap();
        }
    }
}

/// An HTTP client with one session cookie, as a browser keeps it.
pub struct Browser {
    pub base: String,
    pub client: reqwest::Client,
    pub cookie: String,
}

/// The value of the first hidden `csrf` field of a page.
pub fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF field")
        + 19;
    html[at..].split('"').next().unwrap().to_owned()
}

fn session_cookie(res: &reqwest::Response) -> Option<String> {
    res.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("holdclear_session="))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

/// A client that does not follow redirects (tests look at them).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

impl Browser {
    /// The sign-in page, then the form with `token`.
    pub async fn sign_in(base: &str, token: &str) -> Self {
        let client = client();
        let page = client.get(format!("{base}/login")).send().await.unwrap();
        let anonymous = session_cookie(&page).expect("the sign-in page sets a session");
        let csrf = csrf_of(&page.text().await.unwrap());
        let res = client
            .post(format!("{base}/login"))
            .header(reqwest::header::COOKIE, &anonymous)
            .form(&[("token", token), ("csrf", &csrf), ("next", "/")])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 303, "signing in redirects");
        let cookie = session_cookie(&res).expect("signing in sets the session");
        Self {
            base: base.to_owned(),
            client,
            cookie,
        }
    }

    /// `GET path`: status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let res = self
            .client
            .get(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, &self.cookie)
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.text().await.unwrap())
    }

    /// This session's CSRF token (from the overview's sign-out form).
    pub async fn csrf(&self) -> String {
        csrf_of(&self.get("/").await.1)
    }

    /// `POST path` with `form` (a `csrf` field is the caller's): status and
    /// the `Location` it redirects to.
    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> (u16, String) {
        let res = self
            .client
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, &self.cookie)
            .form(form)
            .send()
            .await
            .unwrap();
        let to = res
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let status = res.status().as_u16();
        let body = res.text().await.unwrap_or_default();
        (status, if to.is_empty() { body } else { to })
    }
}
