//! `POST /users/{id}/password`: the user changes their own password.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use platform::http::ErrorBody;
use secrecy::SecretString;
use serde::Deserialize;

use super::auth::Principal;
use super::commands::{metadata, run_command, CommandRequest};
use super::error::ApiError;
use super::idempotency;
use super::json::JsonBody;
use super::AppState;
use crate::domain::sign_in::Refusal;
use crate::domain::Command;
use crate::sessions::Revoke;
use crate::signin::Checked;
use crate::validation::{self, FieldErrors};

pub fn router() -> Router<AppState> {
    Router::new().route("/users/{id}/password", post(change))
}

const ROUTE: &str = "POST /users/{id}/password";

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    /// The password now; checked like a sign-in (a wrong one counts towards the lock).
    #[schema(max_length = 128)]
    pub current_password: String,
    /// 12–128 characters, as at registration.
    #[schema(min_length = 12, max_length = 128)]
    pub new_password: String,
}

/// Changes the caller's own password: appends PasswordChanged and ends every
/// other session of the user (their refresh tokens stop working).
#[utoipa::path(post, path = "/users/{id}/password", tag = "users",
    request_body(content = ChangePasswordRequest, content_type = "application/json"),
    params(
        ("id" = Uuid, Path, description = "The user id: the access token's own user"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "A retry with the same key gets the first answer, after the current password is checked again; 1–255 visible ASCII characters", pattern = "^[!-~]{1,255}$"),
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events"),
    ),
    security(("access_token" = ["user"])),
    responses(
        (status = 200, description = "PasswordChanged appended", body = super::commands::Accepted, headers(("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "Invalid id (`invalid_id`), malformed JSON (`malformed_json`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 401, description = "No bearer token (`unauthenticated`) or an invalid one (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "Another user's id (`forbidden`), a wrong current password (`wrong_password`) or a locked account (`account_locked`)", body = ErrorBody),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 409, description = "`user_deactivated` or `concurrent_modification`", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown fields (`validation_failed`)", body = ErrorBody),
        (status = 500, description = "An unexpected failure (`internal`)", body = ErrorBody),
        (status = 503, description = "The hashing queue is full (`overloaded`), PostgreSQL unavailable or the request timed out", body = ErrorBody),
    ))]
#[tracing::instrument(name = "change_password", skip_all, fields(user_id = %id))]
pub(crate) async fn change(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ChangePasswordRequest>,
) -> Result<Response, ApiError> {
    let id = platform::http::parse_uuid(&id).ok_or(ApiError::InvalidId)?;
    if id != principal.user_id() {
        return Err(ApiError::Forbidden);
    }
    let mut errors = FieldErrors::default();
    errors.check("new_password", validation::password(&body.new_password));
    if body.current_password.chars().count() > 128 {
        errors
            .0
            .insert("current_password".into(), "at most 128 characters".into());
    }
    if !errors.is_empty() {
        return Err(ApiError::Invalid {
            message: "some fields are invalid".into(),
            fields: errors.0,
        });
    }
    let actor = id.to_string();
    let current = SecretString::from(body.current_password);
    let check_metadata = metadata(&headers, &actor, None);
    match state.sign_in.check(id, &current, &check_metadata).await? {
        Checked::Passed(_) => {}
        Checked::Failed => return Err(ApiError::WrongPassword),
        Checked::Refused(Refusal::Locked { .. }) => return Err(ApiError::AccountLocked),
        Checked::Refused(Refusal::Deactivated) => {
            return Err(ApiError::StateConflict(
                crate::domain::DomainError::Deactivated,
            ))
        }
        Checked::Refused(Refusal::Unknown) => return Err(ApiError::UserNotFound),
    }
    let password_hash = state
        .hasher
        .hash(SecretString::from(body.new_password))
        .await?;
    let request = CommandRequest {
        id,
        headers: &headers,
        route: ROUTE,
        // The body is secret and stays out of the fingerprint: one key is one
        // password change of this user.
        fingerprint: idempotency::fingerprint(&[ROUTE, &actor]),
        actor: &actor,
        revoke: Revoke::AllBut {
            session: principal.session(),
            because: "password changed",
        },
    };
    run_command(&state, request, || Command::ChangePassword {
        password_hash: password_hash.clone(),
    })
    .await
}
