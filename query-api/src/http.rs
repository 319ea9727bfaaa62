//! The query API's HTTP surface.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use platform::http::{error_response, ErrorBody, ErrorDetail};
use platform::tasks::Tasks;
use platform::telemetry::error_chain;
use read_model::{CacheError, Lookup, ViewCache, ViewRows};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::coalesce::Loads;
use crate::consistency::{self, VersionWaiters};
use crate::gate::Gate;
use crate::list::{self, UserPage};

/// What every handler shares, behind one `Arc`: a request clones the state
/// more than once on its way through the layers, and one reference count is
/// cheaper to move between cores than one per field.
pub struct AppState {
    pub rows: ViewRows,
    pub cache: ViewCache,
    pub gate: Gate,
    pub tasks: Tasks,
    /// `QUERY_API_TOKEN`, if reads need one.
    pub token: Option<SecretString>,
    /// Reads waiting for a user's view to reach a version (`min_version`).
    pub waiters: VersionWaiters,
    /// `READ_WAIT_MAX_MS`.
    pub read_wait: Duration,
    /// PostgreSQL reads of single views in progress, shared by concurrent misses.
    pub loads: Loads,
    /// `query_cache_total` by result.
    pub outcomes: CacheOutcomes,
}

/// The `query_cache_total` series, one per result, registered once: looking
/// a labelled counter up by its key on every read costs a cached read a few
/// percent of its throughput (see BENCHMARKS.md).
pub struct CacheOutcomes {
    hit: metrics::Counter,
    absent: metrics::Counter,
    miss: metrics::Counter,
    behind: metrics::Counter,
    breaker_open: metrics::Counter,
    error: metrics::Counter,
    bypass: metrics::Counter,
}

impl CacheOutcomes {
    /// Registers every series (at zero) with the installed recorder.
    pub fn register() -> Self {
        let counter =
            |result: &'static str| metrics::counter!("query_cache_total", "result" => result);
        Self {
            hit: counter("hit"),
            absent: counter("absent"),
            miss: counter("miss"),
            behind: counter("behind"),
            breaker_open: counter("breaker_open"),
            error: counter("error"),
            bypass: counter("bypass"),
        }
    }
}

pub fn router(state: Arc<AppState>, request_timeout: Duration) -> Router {
    let mut users = Router::new()
        .route("/users", get(list::list_users))
        .route("/users/{id}", get(get_user));
    if state.token.is_some() {
        users = users.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    }
    let routes = users
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .with_state(state);
    platform::http::layers(routes, request_timeout)
}

/// With `QUERY_API_TOKEN` set, `/users` reads need it as a bearer token
/// (compared in constant time).
async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.token {
        let presented = platform::http::bearer_token(request.headers());
        let valid = presented.is_some_and(|token| {
            bool::from(token.as_bytes().ct_eq(expected.expose_secret().as_bytes()))
        });
        if !valid {
            return ApiError::Unauthenticated.into_response();
        }
    }
    next.run(request).await
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the id is not a UUID.
    #[error("the id is not a valid UUID")]
    InvalidId,
    /// 400: a query parameter is malformed, unknown or out of range.
    #[error("{0}")]
    InvalidQuery(String),
    /// 400: `after` is not a cursor this API gave out.
    #[error("after is not a cursor from a previous page")]
    InvalidCursor,
    /// 404: `min_position` names no event.
    #[error("no event has this position")]
    UnknownPosition,
    /// 409: the read model did not reach `min_version` / `min_position` in
    /// time: the resource is not yet in the state asked for; retry (not a
    /// server failure: the read model is merely behind).
    #[error("the read model has not caught up with the requested version or position yet")]
    NotCaughtUp,
    /// 401: `QUERY_API_TOKEN` is set and the request lacks it.
    #[error("a valid bearer token is required")]
    Unauthenticated,
    /// 404: no view for this id (unknown, or not projected yet).
    #[error("no user with this id")]
    UserNotFound,
    /// 503: PostgreSQL is unreachable.
    #[error("the read model is unavailable")]
    Unavailable(#[source] Arc<sqlx::Error>),
}

impl ApiError {
    pub fn database(error: sqlx::Error) -> Self {
        Self::Unavailable(Arc::new(error))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::InvalidId => (StatusCode::BAD_REQUEST, "invalid_id"),
            Self::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            Self::InvalidCursor => (StatusCode::BAD_REQUEST, "invalid_cursor"),
            Self::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Self::UnknownPosition => (StatusCode::NOT_FOUND, "unknown_position"),
            Self::NotCaughtUp => (StatusCode::CONFLICT, "not_caught_up"),
            Self::UserNotFound => (StatusCode::NOT_FOUND, "user_not_found"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        if status.is_server_error() {
            tracing::error!(code, error = %error_chain(&self), "request failed");
        }
        let mut response = error_response(status, code, self.to_string(), BTreeMap::new());
        if matches!(self, Self::NotCaughtUp) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Read-your-writes parameters of `GET /users/{id}`.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadParams {
    /// Wait (at most `READ_WAIT_MAX_MS`) until the view has reached this
    /// version: the `version` a command answered.
    #[param(minimum = 1, maximum = 2147483647)]
    min_version: Option<i32>,
    /// Wait (at most `READ_WAIT_MAX_MS`) until the projector has applied
    /// every event up to this position: the `position` a command answered.
    #[param(minimum = 1)]
    min_position: Option<i64>,
}

/// `GET /users/{id}`: the Redis view, or the PostgreSQL row on a miss (which
/// then fills the cache). A Redis failure is a miss, never an error.
#[utoipa::path(get, path = "/users/{id}", tag = "users",
    params(
        ("id" = Uuid, Path, description = "The user id"),
        ReadParams,
        ("If-None-Match" = Option<String>, Header, description = "`\"<version>\"`: 304 when the view is still at that version"),
    ),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The user's view", body = UserDocument, headers(("ETag" = String, description = "The quoted version"))),
        (status = 304, description = "Not modified since the version in If-None-Match"),
        (status = 400, description = "The id is not a UUID (`invalid_id`) or a parameter is malformed (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "`QUERY_API_TOKEN` is set and the bearer token is missing or wrong (`unauthenticated`)", body = ErrorBody),
        (status = 404, description = "No such user, or not projected yet (`user_not_found`); or no event has `min_position` (`unknown_position`)", body = ErrorBody),
        (status = 409, description = "The read model did not reach `min_version`/`min_position` within `READ_WAIT_MAX_MS` (`not_caught_up`)", body = ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait before retrying"))),
        (status = 503, description = "PostgreSQL unavailable or the request timed out (`unavailable`, `timeout`)", body = ErrorBody),
    ))]
#[tracing::instrument(name = "get_user", skip_all, fields(user_id = %id))]
async fn get_user(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    params: Result<Query<ReadParams>, QueryRejection>,
    IfNoneMatch(if_none_match): IfNoneMatch,
) -> Result<Response, ApiError> {
    let id = platform::http::parse_uuid(&id).ok_or(ApiError::InvalidId)?;
    let Query(params) =
        params.map_err(|rejection| ApiError::InvalidQuery(rejection.body_text()))?;
    if params.min_version.is_some_and(|v| v < 1) || params.min_position.is_some_and(|p| p < 1) {
        return Err(ApiError::InvalidQuery(
            "min_version and min_position are at least 1".into(),
        ));
    }
    if params.min_position.is_none() && params.min_version.is_none() {
        let (version, body) = read_view(&state, id).await?.ok_or(ApiError::UserNotFound)?;
        return Ok(respond(if_none_match.as_ref(), version, body));
    }
    let deadline = consistency::deadline(state.read_wait);
    if let Some(position) = params.min_position {
        Box::pin(consistency::await_position(
            state.rows.pool(),
            &state.gate,
            position,
            deadline,
        ))
        .await?;
    }
    let Some(wanted) = params.min_version else {
        let (version, body) = read_view(&state, id).await?.ok_or(ApiError::UserNotFound)?;
        return Ok(respond(if_none_match.as_ref(), version, body));
    };
    loop {
        // Registered before the read, so a batch committing in between wakes it.
        let woken = state.waiters.register(id, wanted);
        if let Some((version, body)) = read_view(&state, id).await? {
            if version >= wanted {
                return Ok(respond(if_none_match.as_ref(), version, body));
            }
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            return Err(ApiError::NotCaughtUp);
        }
    }
}

/// The view's version and JSON: from Redis when it has a settled entry in a
/// trusted namespace, else from PostgreSQL (then filling Redis, with the view
/// or, for an id with no view, with its absence).
async fn read_view(state: &AppState, id: Uuid) -> Result<Option<(i32, String)>, ApiError> {
    let mut fill = None;
    if let Some((ns, committed)) = state.gate.namespace() {
        match state.cache.get(ns, id, committed).await {
            Ok(Lookup::Hit(cached)) => {
                state.outcomes.hit.increment(1);
                return Ok(Some((cached.version, cached.body)));
            }
            Ok(Lookup::Absent) => {
                state.outcomes.absent.increment(1);
                return Ok(None);
            }
            Ok(Lookup::Miss { at }) => {
                state.outcomes.miss.increment(1);
                fill = Some((ns, at));
            }
            Ok(Lookup::Behind) => {
                // Redis lost writes; the projector opens a fresh namespace.
                state.outcomes.behind.increment(1);
            }
            // The breaker is open: Redis was not asked, nothing new is known.
            Err(CacheError::Unreachable(_)) => {
                state.outcomes.breaker_open.increment(1);
            }
            Err(error) => {
                state.outcomes.error.increment(1);
                tracing::warn!(error = %error_chain(&error), "Redis unavailable; reading PostgreSQL");
                state.gate.suspect();
            }
        }
    } else {
        state.outcomes.bypass.increment(1);
    }
    // Boxed: the PostgreSQL read's future is large, and a hit should not
    // carry (and move) it.
    Box::pin(load_and_fill(state, id, fill)).await
}

/// The view from PostgreSQL, then (in the background) filled into Redis.
async fn load_and_fill(
    state: &AppState,
    id: Uuid,
    fill: Option<(read_model::Namespace, i64)>,
) -> Result<Option<(i32, String)>, ApiError> {
    let loaded = state.loads.load(&state.rows, id).await;
    let view = loaded.map_err(ApiError::Unavailable)?;
    if let Some((ns, missed_at)) = fill {
        let cache = state.cache.clone();
        let view = view.clone();
        // Filling the cache is not on the reader's clock. The fill loses to a
        // pending or newer entry, and to time (a late fill is dropped), so it
        // cannot put back an older version, nor hide a new user.
        tokio::spawn(async move {
            let filled = match &view {
                Some(view) => cache.fill(ns, view, Some(missed_at)).await,
                None => cache.fill_absent(ns, id, Some(missed_at)).await,
            };
            if let Err(error) = filled {
                tracing::debug!(error = %error_chain(&error), "cache fill skipped");
            }
        });
    }
    Ok(view.map(|view| {
        let body = serde_json::to_string(&view).expect("views serialise to JSON");
        (view.version, body)
    }))
}

/// The `If-None-Match` header alone (the whole header map is not copied).
struct IfNoneMatch(Option<HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.headers.get(header::IF_NONE_MATCH).cloned()))
    }
}

/// 200 with the body and `ETag: "<version>"`, or 304 when the client has it.
fn respond(if_none_match: Option<&HeaderValue>, version: i32, body: String) -> Response {
    let etag = format!("\"{version}\"");
    let not_modified = if_none_match
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
pub(crate) struct UserDocument {
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
    /// The roles granted and not revoked, sorted, each once.
    roles: Vec<String>,
    /// Set while a lockout from failed password checks may be in force: no
    /// password is checked before this time unless an administrator unlocks.
    /// Whether it is still in force is for the reader to compare with its
    /// clock; null when no lock was imposed or it was lifted.
    #[schema(required = true)]
    locked_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether `email` was confirmed with a mailed code. An email change
    /// shows here only once the new address is verified: until then `email`
    /// is the old one.
    email_verified: bool,
    profile: ProfileDocument,
}

/// What the user tells about themself; every field is present, null (or
/// empty) when not set.
#[derive(utoipa::ToSchema)]
#[schema(as = Profile)]
#[allow(dead_code)]
pub(crate) struct ProfileDocument {
    #[schema(required = true)]
    display_name: Option<String>,
    /// A BCP 47 language tag.
    #[schema(required = true)]
    locale: Option<String>,
    /// An IANA time zone name.
    #[schema(required = true)]
    time_zone: Option<String>,
    #[schema(schema_with = preferences_schema)]
    preferences: BTreeMap<String, serde_json::Value>,
}

/// `preferences`: an object whose values are scalars (string, boolean or
/// number), as the events carry them. Written by hand: utoipa would describe
/// a map of `serde_json::Value` as values of any type.
fn preferences_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    let scalar = ObjectBuilder::new().schema_type(SchemaType::from_iter([
        Type::String,
        Type::Boolean,
        Type::Number,
    ]));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(scalar))
        .description(Some(
            "Small client-defined settings: string keys, scalar values (string, boolean or number).",
        ))
        .build()
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
    paths(get_user, list::list_users, healthz, readyz, metrics, openapi),
    components(schemas(UserDocument, ProfileDocument, StatusDocument, UserPage, ErrorBody, ErrorDetail)),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

/// The optional bearer token (`QUERY_API_TOKEN`) as a security scheme.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

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
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let postgres = platform::db::ping(state.rows.pool()).await;
    let redis = match state.cache.ping().await {
        Ok(()) => serde_json::json!("reachable"),
        Err(error) => serde_json::json!({
            "degraded": error.to_string(),
            "breaker": state.cache.breaker_state(),
        }),
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
            roles: vec!["admin".into()],
            locked_until: None,
            email_verified: true,
            profile: events::Profile {
                display_name: Some("Ada".into()),
                locale: None,
                time_zone: None,
                preferences: [("digest".to_owned(), serde_json::json!(true))].into(),
            },
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
        let properties = &schemas["UserView"]["properties"];
        assert_eq!(properties["roles"]["type"], "array");
        assert_eq!(properties["roles"]["items"]["type"], "string");
        assert_eq!(
            properties["locked_until"]["type"],
            serde_json::json!(["string", "null"])
        );
        assert_eq!(properties["locked_until"]["format"], "date-time");
        assert_eq!(properties["email_verified"]["type"], "boolean");
        assert_eq!(
            properties["profile"]["$ref"],
            "#/components/schemas/Profile"
        );
        let profile = &schemas["Profile"];
        let mut documented: Vec<&str> = profile["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut fields: Vec<&str> = served["profile"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        documented.sort_unstable();
        fields.sort_unstable();
        assert_eq!(documented, fields);
        assert_eq!(profile["required"].as_array().unwrap().len(), fields.len());
        for nullable in ["display_name", "locale", "time_zone"] {
            assert_eq!(
                profile["properties"][nullable]["type"],
                serde_json::json!(["string", "null"]),
                "{nullable}"
            );
        }
        let preferences = &profile["properties"]["preferences"];
        assert_eq!(preferences["type"], "object");
        assert_eq!(
            preferences["additionalProperties"]["type"],
            serde_json::json!(["string", "boolean", "number"])
        );
    }
}
