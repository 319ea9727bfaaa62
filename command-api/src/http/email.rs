//! Email verification and email change (`domain/email.rs`): a code goes by
//! mail (the notifier sends it), and confirming it verifies the address, or
//! swaps in the new one.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use events::codes::{Code, Purpose};
use platform::http::ErrorBody;
use serde::Deserialize;

use super::auth::{self_or_admin, Principal};
use super::commands::{run_decision, CommandRequest, Decided};
use super::error::ApiError;
use super::idempotency;
use super::json::JsonBody;
use super::AppState;
use crate::domain::email;
use crate::sessions::Revoke;
use crate::store::Emails;
use crate::validation::{self, FieldErrors};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users/{id}/email", post(request))
        .route("/users/{id}/email/verify", post(verify))
}

const REQUEST_ROUTE: &str = "POST /users/{id}/email";
const VERIFY_ROUTE: &str = "POST /users/{id}/email/verify";

/// `POST /users/{id}/email`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailRequest {
    /// A new address to change to, or the current one (unverified) to get a
    /// new code. Stored normalised (trimmed, ASCII lower-case).
    #[schema(example = "alice@example.com")]
    pub email: String,
}

/// `POST /users/{id}/email/verify`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The code from the mail: 8 digits (spaces and hyphens are ignored).
    #[schema(example = "12345678", max_length = 64)]
    pub code: String,
}

/// Sends a code to an address: a change to a new address (reserved like a
/// registration's until the code runs out; the current address stays until
/// the code is confirmed), or the current unverified one again. Appends
/// EmailVerificationRequested; a newer code replaces an older one.
#[utoipa::path(post, path = "/users/{id}/email", tag = "users",
    request_body(content = EmailRequest, content_type = "application/json"),
    params(
        ("id" = Uuid, Path, description = "The user id: the token's own user, or any user for an administrator"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Retries with the same key and body get the first answer (no second mail); 1–255 visible ASCII characters", pattern = "^[!-~]{1,255}$"),
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events"),
    ),
    security(("access_token" = ["user"]), ("access_token" = ["admin"])),
    responses(
        (status = 200, description = "EmailVerificationRequested appended; the mail follows", body = super::commands::Accepted, headers(("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "Invalid id (`invalid_id`), malformed JSON (`malformed_json`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 401, description = "No bearer token (`unauthenticated`) or an invalid one (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "Another user without the admin scope (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 409, description = "`email_taken` (another user's address, or reserved by their change), `email_unchanged` (already the verified address), `user_deactivated` or `concurrent_modification`", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown fields (`validation_failed`), or an Idempotency-Key used for another address (`idempotency_key_reused`)", body = ErrorBody),
        (status = 429, description = "A code went to this user less than `EMAIL_RESEND_SECS` ago, to whichever address (`rate_limited`)", body = ErrorBody, headers(
            ("Retry-After" = u64, description = "Seconds until a new code may be asked for"))),
        (status = 500, description = "An unexpected failure (`internal`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the request timed out", body = ErrorBody),
    ))]
#[tracing::instrument(name = "request_email_code", skip_all, fields(user_id = %id))]
pub(crate) async fn request(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<EmailRequest>,
) -> Result<Response, ApiError> {
    let id = platform::http::parse_uuid(&id).ok_or(ApiError::InvalidId)?;
    let actor = self_or_admin(principal, id, &state).await?;
    let mut errors = FieldErrors::default();
    let Some(address) = errors.check("email", validation::email(&body.email)) else {
        return Err(ApiError::Invalid {
            message: "some fields are invalid".into(),
            fields: errors.0,
        });
    };
    let code = Code::generate();
    let sealed = state.codes.key.seal(Purpose::EmailVerification, id, &code);
    let policy = state.codes.email;
    let request = CommandRequest {
        id,
        headers: &headers,
        route: REQUEST_ROUTE,
        fingerprint: idempotency::fingerprint(&[REQUEST_ROUTE, &id.to_string(), &address]),
        actor: &actor,
        revoke: Revoke::Nothing,
    };
    run_decision(&state, request, |user, now| {
        let events = email::request(user, &address, sealed.clone(), now, policy)?;
        let new_address = (address != user.email).then(|| address.clone());
        Ok(Decided {
            events,
            refusal: None,
            emails: Emails::Reserve {
                email: new_address,
                until: now + policy.ttl,
            },
        })
    })
    .await
}

/// Confirms the mailed code: appends EmailVerified (the address is then the
/// user's verified email; for a change, the old address is released). A
/// wrong code appends EmailCodeFailed and answers 400; after
/// `CODE_MAX_ATTEMPTS` wrong codes, or once it expired, the code is dead and
/// a new one must be asked for.
#[utoipa::path(post, path = "/users/{id}/email/verify", tag = "users",
    request_body(content = VerifyRequest, content_type = "application/json"),
    params(
        ("id" = Uuid, Path, description = "The user id: the token's own user, or any user for an administrator"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "A retry of a confirmation with the same key gets its first answer; 1–255 visible ASCII characters", pattern = "^[!-~]{1,255}$"),
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events"),
    ),
    security(("access_token" = ["user"]), ("access_token" = ["admin"])),
    responses(
        (status = 200, description = "EmailVerified appended", body = super::commands::Accepted, headers(("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "`invalid_code` (wrong, used, or none outstanding), `code_expired`, `too_many_attempts`; or an invalid id, malformed JSON or an invalid header", body = ErrorBody),
        (status = 401, description = "No bearer token (`unauthenticated`) or an invalid one (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "Another user without the admin scope (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 409, description = "`email_taken` (the new address was taken after its code ran out), `user_deactivated` or `concurrent_modification`", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown fields (`validation_failed`)", body = ErrorBody),
        (status = 500, description = "An unexpected failure (`internal`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the request timed out", body = ErrorBody),
    ))]
#[tracing::instrument(name = "verify_email", skip_all, fields(user_id = %id))]
pub(crate) async fn verify(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<VerifyRequest>,
) -> Result<Response, ApiError> {
    let id = platform::http::parse_uuid(&id).ok_or(ApiError::InvalidId)?;
    let actor = self_or_admin(principal, id, &state).await?;
    if body.code.chars().count() > 64 {
        return Err(ApiError::Invalid {
            message: "some fields are invalid".into(),
            fields: [("code".to_owned(), "at most 64 characters".to_owned())].into(),
        });
    }
    let request = CommandRequest {
        id,
        headers: &headers,
        route: VERIFY_ROUTE,
        // The code is a secret: one key is one confirmation of this user.
        fingerprint: idempotency::fingerprint(&[VERIFY_ROUTE, &id.to_string()]),
        actor: &actor,
        revoke: Revoke::Nothing,
    };
    let key = state.codes.key.clone();
    let max_attempts = state.codes.max_attempts;
    run_decision(&state, request, |user, now| {
        let decision = email::confirm(user, id, &body.code, &key, now, max_attempts)?;
        let emails = match (&decision.refusal, email::pending_change(user)) {
            (None, Some(address)) => Emails::Swap {
                email: address.to_owned(),
            },
            _ => Emails::Unchanged,
        };
        Ok(Decided {
            events: decision.events,
            refusal: decision.refusal.map(ApiError::Code),
            emails,
        })
    })
    .await
}
