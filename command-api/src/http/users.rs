//! The user commands: register, deactivate, reactivate.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use events::domain::EventMetadata;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::Admin;
use super::error::ApiError;
use super::json::{JsonBody, OptionalJsonBody};
use super::AppState;
use crate::domain::{decide, Command, User};
use crate::store::{AppendError, Appended};
use crate::validation::{self, FieldErrors};

/// How often a status command re-reads the stream and decides again after
/// losing an append race, before answering 409 `concurrent_modification`.
const MAX_ATTEMPTS: usize = 3;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", post(register))
        .route("/users/{id}/deactivate", post(deactivate))
        .route("/users/{id}/reactivate", post(reactivate))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    username: String,
    email: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    #[serde(default)]
    reason: Option<String>,
}

/// The answer to every accepted command: the consistency token for reads.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub id: Uuid,
    pub version: i32,
    pub position: i64,
}

impl Accepted {
    fn new(id: Uuid, appended: Appended) -> Self {
        Self {
            id,
            version: appended.version,
            position: appended.position,
        }
    }

    fn respond(self, status: StatusCode) -> Response {
        let etag = format!("\"{}\"", self.version);
        (status, [(header::ETAG, etag)], Json(self)).into_response()
    }
}

fn metadata(headers: &HeaderMap, actor: &str) -> EventMetadata {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    EventMetadata {
        correlation_id: header(platform::http::REQUEST_ID.as_str()),
        causation_id: None,
        actor: actor.to_owned(),
        idempotency_key: header("idempotency-key"),
    }
}

#[tracing::instrument(name = "register_user", skip_all)]
async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterRequest>,
) -> Result<Response, ApiError> {
    let mut errors = FieldErrors::default();
    let username = errors.check("username", validation::username(&body.username));
    let email = errors.check("email", validation::email(&body.email));
    errors.check("password", validation::password(&body.password));
    let (Some(username), Some(email), true) = (username, email, errors.is_empty()) else {
        return Err(ApiError::Invalid {
            message: "some fields are invalid".into(),
            fields: errors.0,
        });
    };

    let password_hash = state
        .hasher
        .hash(SecretString::from(body.password))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let id = Uuid::now_v7();
    let events = decide(
        &User::default(),
        Command::Register {
            username: username.clone(),
            email: email.clone(),
            password_hash,
        },
    )?;
    let appended = state
        .store
        .register(
            id,
            &username,
            &email,
            &events,
            &metadata(&headers, "anonymous"),
        )
        .await?;
    tracing::info!(user_id = %id, version = appended.version, "user registered");
    let mut response = Accepted::new(id, appended).respond(StatusCode::CREATED);
    if let Ok(location) = format!("/users/{id}").parse() {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[tracing::instrument(name = "deactivate_user", skip_all, fields(user_id = %id))]
async fn deactivate(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<StatusRequest>,
) -> Result<Response, ApiError> {
    let reason = parse_reason(body)?;
    change_status(&state, &id, &headers, || Command::Deactivate {
        reason: reason.clone(),
    })
    .await
}

#[tracing::instrument(name = "reactivate_user", skip_all, fields(user_id = %id))]
async fn reactivate(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<StatusRequest>,
) -> Result<Response, ApiError> {
    let reason = parse_reason(body)?;
    change_status(&state, &id, &headers, || Command::Reactivate {
        reason: reason.clone(),
    })
    .await
}

fn parse_reason(body: Option<StatusRequest>) -> Result<Option<String>, ApiError> {
    let mut errors = FieldErrors::default();
    let reason = errors.check("reason", validation::reason(body.and_then(|b| b.reason)));
    reason.ok_or(ApiError::Invalid {
        message: "some fields are invalid".into(),
        fields: errors.0,
    })
}

/// Load, decide, append; on a lost race, decide again on the fresh stream.
async fn change_status(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    command: impl Fn() -> Command,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(id).map_err(|_| ApiError::InvalidId)?;
    let metadata = metadata(headers, "admin");
    for _ in 0..MAX_ATTEMPTS {
        let history = state.store.load(id).await?;
        let user = User::from_events(&history);
        let events = decide(&user, command())?;
        match state
            .store
            .append(id, user.version, &events, &metadata)
            .await
        {
            Ok(appended) => {
                return Ok(Accepted::new(id, appended).respond(StatusCode::OK));
            }
            Err(AppendError::VersionConflict) => {
                tracing::debug!("lost an append race; deciding again on fresh state");
            }
            Err(other) => return Err(other.into()),
        }
    }
    Err(ApiError::ConcurrentModification)
}
