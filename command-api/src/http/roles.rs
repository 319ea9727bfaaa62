//! Roles: granted and revoked by events, turned into scopes when tokens are
//! issued (`domain/roles.rs`).

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{delete, post};
use axum::Router;
use platform::http::ErrorBody;
use serde::Deserialize;

use super::auth::{Admin, RoleGranter};
use super::commands::{run_command, CommandRequest};
use super::error::ApiError;
use super::idempotency;
use super::json::JsonBody;
use super::AppState;
use crate::domain::roles;
use crate::domain::Command;
use crate::sessions::Revoke;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users/{id}/roles", post(grant))
        .route("/users/{id}/roles/{role}", delete(revoke))
}

/// `POST /users/{id}/roles`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// A lower-case letter, then up to 31 lower-case letters, digits, `_` or
    /// `-`. `admin` makes an administrator; every role becomes a scope of the
    /// same name in the user's access tokens.
    #[schema(example = "admin", pattern = "^[a-z][a-z0-9_-]{0,31}$")]
    pub role: String,
}

fn invalid_role() -> ApiError {
    ApiError::Invalid {
        message: "some fields are invalid".into(),
        fields: [(
            "role".to_owned(),
            format!("must match {}", roles::ROLE_PATTERN),
        )]
        .into(),
    }
}

/// Grants a role: appends RoleGranted. An administrator's access token, or
/// the `ADMIN_TOKEN` (its one power: making the first administrators).
#[utoipa::path(post, path = "/users/{id}/roles", tag = "roles",
    request_body(content = GrantRequest, content_type = "application/json"),
    params(
        ("id" = Uuid, Path, description = "The user id"),
        ("If-Match" = Option<String>, Header, nullable = false, example = "\"1\"", description = "RFC 9110: `*` or entity tags of the user's current version, otherwise 412"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Retries with the same key and body get the first answer; 1–255 visible ASCII characters", pattern = "^[!-~]{1,255}$"),
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events"),
    ),
    security(("access_token" = ["admin"]), ("admin_token" = [])),
    responses(
        (status = 200, description = "RoleGranted appended", body = super::commands::Accepted, headers(("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "Invalid id (`invalid_id`), malformed JSON (`malformed_json`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 401, description = "No bearer token (`unauthenticated`) or an invalid one (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "Neither the ADMIN_TOKEN nor an active administrator's token (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 409, description = "`role_already_granted` or `concurrent_modification`", body = ErrorBody),
        (status = 412, description = "If-Match names no tag of the user's current version (`precondition_failed`)", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown fields (`validation_failed`) or a reused Idempotency-Key (`idempotency_key_reused`)", body = ErrorBody),
        (status = 500, description = "An unexpected failure (`internal`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the request timed out (`unavailable`, `timeout`)", body = ErrorBody),
    ))]
#[tracing::instrument(name = "grant_role", skip_all, fields(user_id = %id))]
pub(crate) async fn grant(
    State(state): State<AppState>,
    granter: RoleGranter,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<GrantRequest>,
) -> Result<Response, ApiError> {
    let id = platform::http::parse_uuid(&id).ok_or(ApiError::InvalidId)?;
    if !roles::is_valid(&body.role) {
        return Err(invalid_role());
    }
    const ROUTE: &str = "POST /users/{id}/roles";
    let actor = granter.actor();
    let request = CommandRequest {
        id,
        headers: &headers,
        route: ROUTE,
        fingerprint: idempotency::fingerprint(&[ROUTE, &id.to_string(), &body.role]),
        actor: &actor,
        revoke: Revoke::Nothing,
    };
    let role = body.role;
    run_command(&state, request, || Command::GrantRole {
        role: role.clone(),
    })
    .await
}

/// Revokes a role: appends RoleRevoked. An administrator's access token.
/// Tokens already issued keep their scopes until they expire; the command
/// API itself checks the administrator's current roles on every command.
#[utoipa::path(delete, path = "/users/{id}/roles/{role}", tag = "roles",
    params(
        ("id" = Uuid, Path, description = "The user id"),
        ("role" = String, Path, description = "The role", pattern = "^[a-z][a-z0-9_-]{0,31}$"),
        ("If-Match" = Option<String>, Header, nullable = false, example = "\"1\"", description = "RFC 9110: `*` or entity tags of the user's current version, otherwise 412"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Retries with the same key get the first answer; 1–255 visible ASCII characters", pattern = "^[!-~]{1,255}$"),
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events"),
    ),
    security(("access_token" = ["admin"])),
    responses(
        (status = 200, description = "RoleRevoked appended", body = super::commands::Accepted, headers(("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "Invalid id (`invalid_id`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 401, description = "No bearer token (`unauthenticated`) or an invalid one (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "Not an active administrator's token (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 409, description = "`role_not_granted`, `own_account` (administrators cannot give up their own `admin` role) or `concurrent_modification`", body = ErrorBody),
        (status = 412, description = "If-Match names no tag of the user's current version (`precondition_failed`)", body = ErrorBody),
        (status = 422, description = "A role name that is not valid (`validation_failed`) or a reused Idempotency-Key (`idempotency_key_reused`)", body = ErrorBody),
        (status = 500, description = "An unexpected failure (`internal`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the request timed out (`unavailable`, `timeout`)", body = ErrorBody),
    ))]
#[tracing::instrument(name = "revoke_role", skip_all, fields(user_id = %id))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    admin: Admin,
    Path((id, role)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = platform::http::parse_uuid(&id).ok_or(ApiError::InvalidId)?;
    if !roles::is_valid(&role) {
        return Err(invalid_role());
    }
    if role == roles::ADMIN_SCOPE {
        admin.refuse_own(id)?;
    }
    const ROUTE: &str = "DELETE /users/{id}/roles/{role}";
    let actor = admin.actor();
    let request = CommandRequest {
        id,
        headers: &headers,
        route: ROUTE,
        fingerprint: idempotency::fingerprint(&[ROUTE, &id.to_string(), &role]),
        actor: &actor,
        revoke: Revoke::Nothing,
    };
    run_command(&state, request, || Command::RevokeRole {
        role: role.clone(),
    })
    .await
}
