//! `holdclear console`: the operators' web console, its own process.
//!
//! Server-rendered pages (maud: compile-time checked, every value
//! HTML-escaped) read the store as the CLI does; every action is a plain
//! form posted to the server (CSRF-checked, operators only) that calls the
//! same library code as the CLI ([`crate::operations`]) and redirects.
//! One small script only refreshes the live parts of a page. Every asset
//! is embedded; every answer carries a strict Content-Security-Policy.
//!
//! - [`auth`]: sign-in tokens or a trusted proxy header, signed session
//!   cookies, CSRF tokens.
//! - `layout`: the page shell and the small pieces pages share.
//! - `overview`, `escalations` (and the case page), `dead_letters`,
//!   `operations`: the pages, with their actions; `rules`: the rules in
//!   force and how they decided.

pub mod auth;
mod dead_letters;
mod escalations;
mod layout;
mod operations;
mod overview;
mod rules;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigError, Settings};
use crate::operations::OperationError;
use crate::rules::{Rules, RulesError};
use crate::store::{Store, StoreError};
use auth::{Auth, Session, User};

/// The Content-Security-Policy of every answer: nothing from elsewhere, no
/// inline script or style, no framing, forms only to the console.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A setting is missing or wrong (exit 64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What every handler shares.
pub(crate) struct Shared {
    pub store: Store,
    pub settings: Settings,
    pub auth: Auth,
    /// The rules file in force, as read at start (for the case page's
    /// explanation), or why it could not be read.
    pub rules: Result<Rules, RulesError>,
    /// Replays started here run here; cancelled at shutdown (interrupted,
    /// resumable).
    pub tasks: TaskTracker,
    pub stop: CancellationToken,
}

pub(crate) type AppState = Arc<Shared>;

/// A running console.
pub struct ConsoleHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    tasks: TaskTracker,
}

impl ConsoleHandle {
    /// Stops serving, interrupts the replays running here and waits.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.server.await.unwrap_or(Ok(()))
    }

    /// Resolves when the server stops (on `stop`).
    pub async fn wait(self) -> std::io::Result<()> {
        let result = self.server.await.unwrap_or(Ok(()));
        self.tasks.close();
        self.tasks.wait().await;
        result
    }
}

/// Starts the console on `settings.console.addr` (refused without any
/// credential), serving until `stop` is cancelled.
pub async fn start(
    settings: Settings,
    store: Store,
    stop: CancellationToken,
) -> Result<ConsoleHandle, ConsoleError> {
    settings.console.check_credentials()?;
    let addr = settings.console.addr;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ConsoleError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ConsoleError::Bind { addr, source })?;
    let tasks = TaskTracker::new();
    let shared = Arc::new(Shared {
        auth: Auth::new(&settings.console),
        rules: Rules::load(&settings.rules_path),
        store,
        settings,
        tasks: tasks.clone(),
        stop: stop.clone(),
    });
    let app = router(shared);
    let shutdown = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    tracing::info!(%addr, "Console listening.");
    Ok(ConsoleHandle {
        addr,
        stop,
        server,
        tasks,
    })
}

fn router(shared: AppState) -> Router {
    let pages = Router::new()
        .route("/", get(overview::page))
        .route("/escalations", get(escalations::groups))
        .route("/escalations/list", get(escalations::list))
        .route("/cases/{id}", get(escalations::case_page))
        .route("/cases/{id}/retry", post(escalations::retry))
        .route("/cases/{id}/close", post(escalations::close))
        .route("/cases/{id}/claim", post(escalations::claim))
        .route("/cases/{id}/note", post(escalations::note))
        .route("/dead-letters", get(dead_letters::groups))
        .route("/dead-letters/list", get(dead_letters::list))
        .route("/dead-letters/{id}", get(dead_letters::message))
        .route("/dead-letters/{id}/note", post(dead_letters::note))
        .route("/dead-letters/claim", post(dead_letters::claim))
        .route("/dead-letters/archive", post(dead_letters::archive))
        .route(
            "/replay",
            get(operations::replay_form).post(operations::replay),
        )
        .route("/operations", get(operations::list))
        .route("/rules", get(rules::page))
        .route("/operations/{id}", get(operations::report))
        .route("/operations/{id}/cancel", post(operations::cancel))
        .route("/logout", post(logout))
        .layer(middleware::from_fn_with_state(shared.clone(), require_user));
    Router::new()
        .merge(pages)
        .route("/login", get(login_page).post(login))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .layer(middleware::from_fn(security_headers))
        .with_state(shared)
}

/// Every answer: CSP, no sniffing, no framing, no referrer, not cached.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// The signed-in user of a request (set by [`require_user`]).
#[derive(Clone)]
pub(crate) struct Viewer {
    pub user: User,
    pub csrf: String,
    pub session: Session,
}

/// Pages need a user: a page asked for without one goes to the sign-in
/// page (302), anything else is 401.
async fn require_user(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let session = s.auth.session(req.headers());
    let Some((user, session)) = session.and_then(|x| x.user.clone().map(|u| (u, x))) else {
        if req.method() == axum::http::Method::GET {
            let next = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let to = format!("/login?next={}", layout::url_encode(next));
            return (StatusCode::FOUND, [(header::LOCATION, to)]).into_response();
        }
        return (StatusCode::UNAUTHORIZED, "sign in first\n").into_response();
    };
    let csrf = s.auth.csrf(&session);
    req.extensions_mut().insert(Viewer {
        user,
        csrf,
        session,
    });
    next.run(req).await
}

/// Why an action or a page failed, as the answer says it.
pub(crate) enum PageError {
    /// 400 with the reason (the operator's mistake).
    Refused(String),
    /// 403: viewers do not act; a form without the right CSRF token.
    Forbidden(&'static str),
    /// 404.
    NotFound(String),
    /// 500 (logged; the page says only that the store failed).
    Internal(String),
}

impl From<StoreError> for PageError {
    fn from(e: StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<OperationError> for PageError {
    fn from(e: OperationError) -> Self {
        match e {
            OperationError::Refused(m) => Self::Refused(m),
            OperationError::NotFound(m) => Self::NotFound(m),
            e => Self::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            Self::Refused(m) => (StatusCode::BAD_REQUEST, m),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, m.to_owned()),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m),
            Self::Internal(m) => {
                tracing::error!(error = %m, "Console request failed.");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the store failed; see the console's log".to_owned(),
                )
            }
        };
        (status, layout::error_page(status, &text)).into_response()
    }
}

/// An action's gate: an operator, and the session's CSRF token.
pub(crate) fn may_act(v: &Viewer, s: &Shared, csrf: &str) -> Result<(), PageError> {
    if !s.auth.csrf_ok(&v.session, csrf) {
        return Err(PageError::Forbidden(
            "the form's CSRF token is missing or wrong: reload the page and try again",
        ));
    }
    if !v.user.may_act() {
        return Err(PageError::Forbidden("viewers cannot act: ask an operator"));
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
    csrf: String,
    next: Option<String>,
}

/// Only a path of this console: never an open redirect.
fn local_path(next: Option<&str>) -> String {
    match next {
        Some(p) if p.starts_with('/') && !p.starts_with("//") && !p.contains('\\') => p.to_owned(),
        _ => "/".to_owned(),
    }
}

async fn login_page(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(q): axum::extract::Query<LoginQuery>,
) -> Response {
    let session = match s.auth.session(&headers) {
        Some(session) => session,
        None => s.auth.new_session(None),
    };
    let page = layout::login(&s.auth.csrf(&session), &local_path(q.next.as_deref()), None);
    ([(header::SET_COOKIE, s.auth.cookie(&session))], page).into_response()
}

async fn login(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    axum::Form(f): axum::Form<LoginForm>,
) -> Response {
    let Some(pre) = s.auth.session(&headers) else {
        return PageError::Forbidden("no sign-in session: open the sign-in page again")
            .into_response();
    };
    if !s.auth.csrf_ok(&pre, &f.csrf) {
        return PageError::Forbidden("the form's CSRF token is wrong: reload the page")
            .into_response();
    }
    let next = local_path(f.next.as_deref());
    let Some(user) = s.auth.sign_in(&f.token) else {
        tracing::warn!("Console sign-in refused (unknown token).");
        let page = layout::login(&s.auth.csrf(&pre), &next, Some("That token is not valid."));
        return (StatusCode::UNAUTHORIZED, page).into_response();
    };
    tracing::info!(user = %user.name, role = user.role.as_str(), "Console sign-in.");
    let session = s.auth.new_session(Some(user));
    (
        [(header::SET_COOKIE, s.auth.cookie(&session))],
        Redirect::to(&next),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(s): State<AppState>,
    axum::Extension(v): axum::Extension<Viewer>,
    axum::Form(f): axum::Form<CsrfForm>,
) -> Response {
    if !s.auth.csrf_ok(&v.session, &f.csrf) {
        return PageError::Forbidden("the form's CSRF token is wrong").into_response();
    }
    (
        [(header::SET_COOKIE, s.auth.cleared_cookie())],
        Redirect::to("/login"),
    )
        .into_response()
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("assets/console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("assets/console.js"),
    )
        .into_response()
}
