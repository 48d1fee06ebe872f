//! The operations HTTP server: `/healthz` (every task of the process runs)
//! and `/readyz` (the database and the broker are usable). Build on
//! [`router`] to add routes (e.g. `/metrics`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::health::Health;
use super::identity::WorkerIdentity;

/// What went wrong starting the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address (`HOLDCLEAR_HTTP_ADDR`).
        addr: SocketAddr,
        /// The operating system's refusal.
        source: std::io::Error,
    },
}

/// State of `/healthz` and `/readyz`.
#[derive(Clone)]
struct Probes {
    health: Arc<Health>,
    identity: WorkerIdentity,
}

/// The routes of the operations server, without state left to supply.
/// `/readyz` names the worker (`identity`).
pub fn router(health: Arc<Health>, identity: WorkerIdentity) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Probes { health, identity })
}

/// State of `/metrics`: the recorder, and the store once it is connected.
#[derive(Clone)]
struct MetricsState {
    handle: metrics_exporter_prometheus::PrometheusHandle,
    store: Arc<std::sync::OnceLock<crate::store::Store>>,
    health: Arc<Health>,
}

/// `/metrics`: Prometheus text; store gauges are read at each scrape once
/// the store is connected.
pub fn metrics_router(
    handle: metrics_exporter_prometheus::PrometheusHandle,
    store: Arc<std::sync::OnceLock<crate::store::Store>>,
    health: Arc<Health>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(MetricsState {
            handle,
            store,
            health,
        })
}

async fn metrics(State(m): State<MetricsState>) -> impl IntoResponse {
    ::metrics::gauge!("holdclear_ready").set(if m.health.readiness().ready { 1.0 } else { 0.0 });
    let body = match m.store.get() {
        Some(store) => super::metrics::render(&m.handle, store).await,
        None => m.handle.render(),
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
}

/// 200 while every task of the worker runs; 503 naming the task that
/// stopped (the worker is on its way out, to be restarted).
async fn healthz(State(p): State<Probes>) -> impl IntoResponse {
    match p.health.failure() {
        None => (
            StatusCode::OK,
            Json(serde_json::json!({"status": "ok", "worker": p.identity})),
        ),
        Some(f) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "failing",
                "task": f.task,
                "error": f.error,
                "worker": p.identity,
            })),
        ),
    }
}

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    let r = p.health.readiness();
    if r.ready {
        (
            StatusCode::OK,
            Json(serde_json::json!({"status": "ready", "worker": p.identity})),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "down": r.down, "worker": p.identity})),
        )
    }
}

/// Binds `addr` (port 0 picks a free one); returns the address actually
/// bound and the server: a future that serves `router` until `cancel`
/// (spawn it; it ends early only if the server fails, which it logs).
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    cancel: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()> + Send + 'static), HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    tracing::info!(addr = %bound, "HTTP server listening.");
    let serving = async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(addr = %bound, error = %e, "The HTTP server failed.");
        }
    };
    Ok((bound, serving))
}
