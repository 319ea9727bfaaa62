//! The query API's HTTP surface.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use platform::http::{error_response, ErrorBody, ErrorDetail};
use platform::tasks::Tasks;
use platform::telemetry::error_chain;
use read_model::{Lookup, ViewCache, ViewRows};
use uuid::Uuid;

use crate::gate::Gate;

#[derive(Clone)]
pub struct AppState {
    pub rows: ViewRows,
    pub cache: ViewCache,
    pub gate: Gate,
    pub tasks: Tasks,
}

pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let routes = Router::new()
        .route("/users/{id}", get(get_user))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .with_state(state);
    platform::http::layers(routes, request_timeout)
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the id is not a UUID.
    #[error("the id is not a valid UUID")]
    InvalidId,
    /// 404: no view for this id (unknown, or not projected yet).
    #[error("no user with this id")]
    UserNotFound,
    /// 503: PostgreSQL is unreachable.
    #[error("the read model is unavailable")]
    Unavailable(#[source] sqlx::Error),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::InvalidId => (StatusCode::BAD_REQUEST, "invalid_id"),
            Self::UserNotFound => (StatusCode::NOT_FOUND, "user_not_found"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        if status.is_server_error() {
            tracing::error!(code, error = %error_chain(&self), "request failed");
        }
        error_response(status, code, self.to_string(), BTreeMap::new())
    }
}

/// `GET /users/{id}`: the Redis view, or the PostgreSQL row on a miss (which
/// then fills the cache). A Redis failure is a miss, never an error.
#[utoipa::path(get, path = "/users/{id}", tag = "users",
    params(
        ("id" = String, Path, description = "The user id (a UUID)"),
        ("If-None-Match" = Option<String>, Header, description = "`\"<version>\"`: 304 when the view is still at that version"),
    ),
    responses(
        (status = 200, description = "The user's view", body = UserDocument, headers(("ETag" = String, description = "The quoted version"))),
        (status = 304, description = "Not modified since the version in If-None-Match"),
        (status = 400, description = "The id is not a UUID (`invalid_id`)", body = ErrorBody),
        (status = 404, description = "No such user, or not projected yet (`user_not_found`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the request timed out (`unavailable`, `timeout`)", body = ErrorBody),
    ))]
#[tracing::instrument(name = "get_user", skip_all, fields(user_id = %id))]
async fn get_user(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::InvalidId)?;
    let mut fill = None;
    if let Some((ns, committed)) = state.gate.namespace() {
        match state.cache.get(ns, id, committed).await {
            Ok(Lookup::Hit(cached)) => {
                metrics::counter!("query_cache_total", "result" => "hit").increment(1);
                return Ok(respond(&headers, cached.version, cached.body));
            }
            Ok(Lookup::Miss) => {
                metrics::counter!("query_cache_total", "result" => "miss").increment(1);
                fill = Some(ns);
            }
            Ok(Lookup::Behind) => {
                // Redis lost writes; the projector opens a fresh namespace.
                metrics::counter!("query_cache_total", "result" => "behind").increment(1);
            }
            Err(error) => {
                metrics::counter!("query_cache_total", "result" => "error").increment(1);
                tracing::warn!(error = %error_chain(&error), "Redis unavailable; reading PostgreSQL");
                state.gate.suspect();
            }
        }
    } else {
        metrics::counter!("query_cache_total", "result" => "bypass").increment(1);
    }
    let view = state
        .rows
        .load(id)
        .await
        .map_err(ApiError::Unavailable)?
        .ok_or(ApiError::UserNotFound)?;
    if let Some(ns) = fill {
        let cache = state.cache.clone();
        let view = view.clone();
        // Filling the cache is not on the reader's clock. The fill loses to a
        // pending or newer entry, so it cannot put back an older version.
        tokio::spawn(async move {
            if let Err(error) = cache.put(ns, &view).await {
                tracing::debug!(error = %error_chain(&error), "cache fill skipped");
            }
        });
    }
    let body = serde_json::to_string(&view).expect("views serialise to JSON");
    Ok(respond(&headers, view.version, body))
}

/// 200 with the body and `ETag: "<version>"`, or 304 when the client has it.
fn respond(headers: &HeaderMap, version: i32, body: String) -> Response {
    let etag = format!("\"{version}\"");
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let etag = HeaderValue::from_str(&etag).expect("a quoted number is a valid header");
    if not_modified {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    (
        StatusCode::OK,
        [
            (header::ETAG, etag),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        body,
    )
        .into_response()
}

/// The answer of `GET /users/{id}`: the JSON form of `events::UserView`, which
/// the read model stores and serves as is. Described here so that the events
/// crate stays free of HTTP types; the tests validate every answer against it.
#[derive(utoipa::ToSchema)]
#[schema(as = UserView)]
#[allow(dead_code)]
struct UserDocument {
    id: uuid::Uuid,
    /// Normalised (trimmed, lower-case).
    username: String,
    /// Normalised (trimmed, lower-case).
    email: String,
    status: StatusDocument,
    /// The user's stream version this view reflects; also the `ETag`.
    version: i32,
    registered_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
}

#[derive(utoipa::ToSchema)]
#[schema(as = UserStatus)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum StatusDocument {
    Active,
    Deactivated,
}

/// The query API as served, generated from the handlers' annotations.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "userstream query API",
        description = "Read side of userstream: the users' views, eventually consistent with the command API. \
Every error answers `{\"error\":{\"code\",\"message\"}}`.",
    ),
    paths(get_user, healthz, readyz, metrics, openapi),
    components(schemas(UserDocument, StatusDocument, ErrorBody, ErrorDetail))
)]
struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 description of this API", content_type = "application/json")))]
async fn openapi() -> impl IntoResponse {
    axum::Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// Alive and serving.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = serde_json::Value)))]
async fn healthz() -> impl IntoResponse {
    platform::http::healthz().await
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
async fn metrics() -> impl IntoResponse {
    platform::http::metrics().await
}

/// Ready when PostgreSQL answers; Redis is reported, but answers still come
/// without it.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "PostgreSQL reachable and background tasks running; Redis reported (degraded is still ready)", body = serde_json::Value),
        (status = 503, description = "PostgreSQL unreachable, or a background task failed", body = serde_json::Value),
    ))]
#[tracing::instrument(name = "readyz", skip_all)]
async fn readyz(State(state): State<AppState>) -> Response {
    let postgres = platform::db::ping(state.rows.pool()).await;
    let redis = match state.cache.ping().await {
        Ok(()) => serde_json::json!("reachable"),
        Err(error) => serde_json::json!({ "degraded": error.to_string() }),
    };
    platform::http::readiness(BTreeMap::from([
        ("postgres", postgres),
        ("redis", Ok(redis)),
        ("cache", Ok(state.gate.describe())),
        ("tasks", state.tasks.check()),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_view_is_the_shape_the_read_model_serves() {
        let doc = serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["UserStatus"]["enum"],
            serde_json::json!(["active", "deactivated"])
        );
        let view = events::UserView {
            id: Uuid::new_v4(),
            username: "ada".into(),
            email: "ada@example.com".into(),
            status: events::UserStatus::Deactivated,
            version: 2,
            registered_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        };
        let served = serde_json::to_value(&view).unwrap();
        let mut documented: Vec<&str> = schemas["UserView"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut fields: Vec<&str> = served
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        documented.sort_unstable();
        fields.sort_unstable();
        assert_eq!(documented, fields);
        let required = schemas["UserView"]["required"].as_array().unwrap().len();
        assert_eq!(required, fields.len());
    }
}
