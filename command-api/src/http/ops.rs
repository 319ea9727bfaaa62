//! Operational endpoints: liveness, readiness, metrics.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::AppState;

/// Alive and serving.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = serde_json::Value)))]
pub async fn healthz() -> impl IntoResponse {
    platform::http::healthz().await
}

/// Ready when PostgreSQL answers and every background task runs; the relay's
/// state is reported alongside but does not make the API unready: commands
/// are accepted while Kafka is away, the log buffers them.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "PostgreSQL reachable; relay state included", body = serde_json::Value),
        (status = 503, description = "PostgreSQL unreachable, or a background task failed (the process then exits)", body = serde_json::Value),
    ))]
#[tracing::instrument(name = "readyz", skip_all)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let postgres = platform::db::ping(state.store.pool()).await;
    platform::http::readiness(BTreeMap::from([
        ("postgres", postgres),
        ("relay", Ok(state.relay.snapshot())),
        ("tasks", state.tasks.check()),
    ]))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics() -> impl IntoResponse {
    platform::http::metrics().await
}
