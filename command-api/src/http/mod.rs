//! The command API's HTTP surface.

pub mod auth;
pub mod error;
pub mod json;
pub mod users;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use secrecy::SecretString;

use crate::password::Hasher;
use crate::relay::RelayStatus;
use crate::store::EventStore;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: EventStore,
    pub hasher: Hasher,
    pub admin_token: Arc<SecretString>,
    pub relay: RelayStatus,
}

pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let routes = Router::new()
        .merge(users::router())
        .route("/healthz", get(platform::http::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(platform::http::metrics))
        .layer(DefaultBodyLimit::max(json::BODY_LIMIT))
        .with_state(state);
    platform::http::layers(routes, request_timeout)
}

/// Ready when PostgreSQL answers; the relay's state is reported alongside but
/// does not make the API unready: commands are accepted while Kafka is away,
/// the log buffers them.
#[tracing::instrument(name = "readyz", skip_all)]
async fn readyz(State(state): State<AppState>) -> Response {
    let postgres = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(state.store.pool()),
    )
    .await
    .map_err(|_| "timed out".to_owned())
    .and_then(|r| {
        r.map(|_| serde_json::json!("reachable"))
            .map_err(|e| e.to_string())
    });
    let mut checks = BTreeMap::from([("postgres", postgres)]);
    checks.insert("relay", Ok(state.relay.snapshot()));
    platform::http::readiness(checks)
}
