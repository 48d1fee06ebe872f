//! The operations HTTP server: `/healthz` (the process runs) and `/readyz`
//! (the database and the broker are usable). Build on [`router`] to add
//! routes (e.g. `/metrics`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::health::Health;

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

/// The routes of the operations server, without state left to supply.
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
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

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"})))
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let r = health.readiness();
    if r.ready {
        (StatusCode::OK, Json(serde_json::json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "down": r.down})),
        )
    }
}

/// Binds `addr` (port 0 picks a free one) and serves `router` on a task of
/// `tracker` until `cancel`; returns the address actually bound.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<SocketAddr, HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    tracker.spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(addr = %bound, error = %e, "The HTTP server failed.");
        }
    });
    tracing::info!(addr = %bound, "HTTP server listening.");
    Ok(bound)
}
