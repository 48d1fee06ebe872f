//! The HTTP face of the simulator: the contract's five endpoints and the
//! simulator's own `/_sim/*` (statistics, reset, token revocation, a look at
//! an order that does not count as a read, a person's assignment by hand).
//!
//! Every contract call goes the same way: counted, delayed by the
//! endpoint's latency, authorised (API endpoints), held to the server-side
//! rate limit, then the fault knobs decide: answer normally, fail before
//! taking effect, hang, or take effect and lose the answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::Shared;
use super::scenario::{Scenario, SimEndpoint};
use super::world::{Decision, Reply, World};

/// The simulator's routes.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/oauth2/default/v1/token", post(token))
        .route(
            "/smart-accounts-and-licensing/v1/accounts/search",
            get(search),
        )
        .route(
            "/smart-accounts-and-licensing/v1/accounts/{domain}/customer/virtual-accounts",
            get(virtual_accounts),
        )
        .route("/commerce/v1/orders", get(orders_by_web_id))
        .route("/commerce/v1/orders/{number}", get(order))
        .route(
            "/commerce/v1/orders/{number}/smart-account-assignment",
            post(assign),
        )
        .route("/_sim/stats", get(stats))
        .route("/_sim/reset", post(reset))
        .route("/_sim/revoke-tokens", post(revoke_tokens))
        .route("/_sim/orders/{number}", get(peek_order))
        .route(
            "/_sim/orders/{number}/hand-assignment",
            post(hand_assignment),
        )
        .fallback(fallback)
        .with_state(shared)
}

async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let value = format!("{:032x}", rand::random::<u128>());
    handle(&shared, SimEndpoint::Token, &headers, move |w| {
        w.issue_token(&form, value)
    })
    .await
}

async fn search(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let query = parse_query(query);
    handle(&shared, SimEndpoint::Search, &headers, move |w| {
        w.search(&query)
    })
    .await
}

async fn virtual_accounts(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(domain): Path<String>,
) -> Response {
    handle(&shared, SimEndpoint::VirtualAccounts, &headers, move |w| {
        w.virtual_accounts(&domain)
    })
    .await
}

async fn orders_by_web_id(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let query = parse_query(query);
    handle(&shared, SimEndpoint::Order, &headers, move |w| {
        w.read_orders_by_web_id(query.get("webOrderId").map(String::as_str))
    })
    .await
}

async fn order(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(number): Path<String>,
) -> Response {
    handle(&shared, SimEndpoint::Order, &headers, move |w| {
        w.read_order(&number)
    })
    .await
}

async fn assign(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(number): Path<String>,
    body: Bytes,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    handle(&shared, SimEndpoint::Assign, &headers, move |w| {
        w.assign(&number, key.as_deref(), &body)
    })
    .await
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock().stats.clone()).into_response()
}

/// An empty body rebuilds the world from the current scenario; a TOML body
/// replaces the scenario.
async fn reset(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body);
    let mut world = shared.lock();
    let scenario = if text.trim().is_empty() {
        world.scenario().clone()
    } else {
        match Scenario::from_toml(&text, "POST /_sim/reset") {
            Ok(s) => s,
            Err(e) => return reply(Reply::error(400, "INVALID_SCENARIO", e.to_string()), None),
        }
    };
    *world = World::new(scenario);
    tracing::info!("Simulator reset.");
    Json(json!({"status": "SUCCESS", "statusMessage": "reset"})).into_response()
}

async fn revoke_tokens(State(shared): State<Arc<Shared>>) -> Response {
    shared.lock().revoke_tokens();
    Json(json!({"status": "SUCCESS", "statusMessage": "tokens revoked"})).into_response()
}

async fn peek_order(State(shared): State<Arc<Shared>>, Path(number): Path<String>) -> Response {
    match shared.lock().peek_order(&number) {
        Some(order) => Json(order).into_response(),
        None => reply(
            Reply::error(404, "ORDER_NOT_FOUND", format!("no order {number}")),
            None,
        ),
    }
}

/// The simulator plays the person who fixes an order in the portal: body
/// `{"smartAccountDomain": "…", "virtualAccountName": "…"}`; the account
/// and Virtual Account are set and the Smart Account hold is released.
async fn hand_assignment(
    State(shared): State<Arc<Shared>>,
    Path(number): Path<String>,
    body: Bytes,
) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct HandAssignment {
        smart_account_domain: String,
        virtual_account_name: String,
    }
    let fix: HandAssignment = match serde_json::from_slice(&body) {
        Ok(fix) => fix,
        Err(e) => return reply(Reply::error(400, "INVALID_BODY", e.to_string()), None),
    };
    let answer = shared.lock().assign_by_hand(
        &number,
        &fix.smart_account_domain,
        &fix.virtual_account_name,
    );
    reply(answer, None)
}

async fn fallback() -> Response {
    reply(Reply::error(404, "NOT_FOUND", "no such endpoint"), None)
}

/// What one call comes to once the knobs have spoken.
enum Outcome {
    Answer(Reply, Option<u64>),
    Bare(u16, &'static str),
    Hang(Duration),
}

/// Runs one contract call through latency, authorisation, rate limit and
/// faults; `act` is the call's effect on the world.
async fn handle(
    shared: &Shared,
    endpoint: SimEndpoint,
    headers: &HeaderMap,
    act: impl FnOnce(&mut World) -> Reply,
) -> Response {
    let latency = {
        let mut world = shared.lock();
        world.count_call(endpoint);
        world.latency(endpoint)
    };
    if !latency.is_zero() && !shared.pause(latency).await {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let roll: f64 = rand::random();
    let outcome = {
        let mut world = shared.lock();
        let api = endpoint != SimEndpoint::Token;
        if api && !world.authorised(bearer(headers)) {
            unauthorized(endpoint)
        } else if api && !world.within_rate_limit() {
            Outcome::Answer(
                Reply::error(429, "RATE_LIMITED", "too many requests"),
                Some(1),
            )
        } else {
            match world.decide(endpoint, roll) {
                Decision::Pass => {
                    let mut reply = act(&mut world);
                    reply.body = world.extended(reply.body);
                    Outcome::Answer(reply, None)
                }
                Decision::ServerError => Outcome::Answer(
                    Reply::error(503, "CISCO_ERROR", "the service is temporarily unavailable"),
                    None,
                ),
                Decision::BareServerError => Outcome::Bare(502, "Bad Gateway"),
                Decision::EmptyServerError => Outcome::Bare(503, ""),
                Decision::Timeout(hang) => Outcome::Hang(hang),
                Decision::LostResponse => {
                    let _ = act(&mut world);
                    Outcome::Bare(502, "Bad Gateway")
                }
                Decision::TooManyRequests(secs) => Outcome::Answer(
                    Reply::error(429, "RATE_LIMITED", "too many requests"),
                    Some(secs),
                ),
                Decision::Unauthorized => unauthorized(endpoint),
            }
        }
    };
    let response = match outcome {
        Outcome::Answer(r, retry_after) => reply(r, retry_after),
        Outcome::Bare(status, text) => bare(status, text),
        Outcome::Hang(hang) => {
            shared.pause(hang).await;
            bare(504, "Gateway Timeout")
        }
    };
    let status = response.status().as_u16();
    shared.lock().count_response(endpoint, status);
    tracing::debug!(endpoint = %endpoint, status, "Simulator answered.");
    response
}

fn unauthorized(endpoint: SimEndpoint) -> Outcome {
    let reply = if endpoint == SimEndpoint::Token {
        Reply {
            status: 401,
            body: json!({"error": "invalid_client"}),
        }
    } else {
        Reply::error(
            401,
            "UNAUTHORIZED",
            "the access token is missing, unknown or expired",
        )
    };
    Outcome::Answer(reply, None)
}

fn reply(r: Reply, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(r.body)).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    response
}

/// A proxy's answer: plain text, or no body at all when `text` is empty.
fn bare(status: u16, text: &'static str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if text.is_empty() {
        return status.into_response();
    }
    (status, [(header::CONTENT_TYPE, "text/plain")], text).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn parse_query(query: Option<String>) -> HashMap<String, String> {
    query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}
