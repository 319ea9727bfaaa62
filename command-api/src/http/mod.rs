//! The command API's HTTP surface.

pub mod auth;
pub mod commands;
pub mod email;
pub mod error;
pub mod history;
pub mod idempotency;
pub mod json;
pub mod oauth;
pub mod openapi;
pub mod ops;
pub mod password;
pub mod password_reset;
pub mod profile;
pub mod rate_limit;
pub mod roles;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use secrecy::SecretString;

use crate::config::CodeSettings;
use crate::password::Hasher;
use crate::relay::RelayStatus;
use crate::sessions::Sessions;
use crate::signin::SignIn;
use crate::store::EventStore;
use crate::tokens::Keys;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: EventStore,
    pub hasher: Hasher,
    /// The bootstrap token: grants roles, nothing else.
    pub admin_token: Arc<SecretString>,
    /// Signing and verification keys of access tokens.
    pub keys: Arc<Keys>,
    pub sessions: Sessions,
    pub sign_in: SignIn,
    pub relay: RelayStatus,
    pub idempotency_ttl: Duration,
    /// The key that seals mailed codes, their lifetimes and attempt limit.
    pub codes: CodeSettings,
    /// Reset requests being worked on after their 202.
    pub reset_requests: password_reset::ResetRequests,
    /// The per-client quotas.
    pub limits: rate_limit::Limits,
    /// The background tasks, for `/readyz`.
    pub tasks: platform::tasks::Tasks,
}

pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let routes = Router::new()
        .merge(users::router())
        .merge(oauth::router())
        .merge(password::router())
        .merge(password_reset::router())
        .merge(profile::router())
        .merge(email::router())
        .merge(roles::router())
        .merge(history::router())
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::serve))
        .layer(DefaultBodyLimit::max(json::BODY_LIMIT))
        .with_state(state);
    platform::http::layers(routes, request_timeout)
}
