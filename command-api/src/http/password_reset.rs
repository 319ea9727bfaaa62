//! Password reset by a mailed code (`domain/password_reset.rs`). Both
//! endpoints are anonymous and answer alike whether or not the address
//! belongs to anyone: a request always gets 202 before anything is looked
//! up, and a completion always costs one argon2 hash and answers
//! `invalid_code` for every refusal.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use events::codes::{Code, Purpose};
use events::domain::EventMetadata;
use events::UserEvent;
use platform::http::ErrorBody;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::commands::{
    lookup, metadata, run_decision_replaying, CommandRequest, Decided, ReplayCheck,
};
use super::error::ApiError;
use super::idempotency::{self, Caller, Idempotent, ANONYMOUS};
use super::json::JsonBody;
use super::rate_limit::WithinSignInQuota;
use super::AppState;
use crate::domain::codes::CodeRefusal;
use crate::domain::{password_reset, User};
use crate::sessions::Revoke;
use crate::store::{AppendError, Emails, StoredAnswer};
use crate::validation::{self, FieldErrors};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/password-resets", post(request))
        .route("/password-resets/complete", post(complete))
}

const COMPLETE_ROUTE: &str = "POST /password-resets/complete";

/// Reset requests being worked on at once; more answer 503 (which says
/// nothing about any address) instead of queueing without bound.
pub const MAX_PENDING_REQUESTS: usize = 64;

/// The work queue of reset requests.
#[derive(Clone)]
pub struct ResetRequests(Arc<Semaphore>);

impl Default for ResetRequests {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(MAX_PENDING_REQUESTS)))
    }
}

/// `POST /password-resets`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    /// The account's email address.
    #[schema(example = "alice@example.com")]
    pub email: String,
}

/// The answer to every well-formed reset request.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ResetRequested {
    #[schema(example = "if the address belongs to an active account, a code is on its way")]
    pub message: &'static str,
}

/// `POST /password-resets/complete`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteReset {
    /// The address the code went to.
    #[schema(example = "alice@example.com")]
    pub email: String,
    /// The code from the mail: 8 digits (spaces and hyphens are ignored).
    #[schema(example = "12345678", max_length = 64)]
    pub code: String,
    /// 12–128 characters, as at registration.
    #[schema(min_length = 12, max_length = 128)]
    pub new_password: String,
}

/// Asks for a reset code by mail. Always 202, whether or not the address
/// belongs to an active user: the look-up happens after the answer. No
/// second code goes to a user within `RESET_RESEND_SECS` of the last one.
#[utoipa::path(post, path = "/password-resets", tag = "users",
    request_body(content = ResetRequest, content_type = "application/json"),
    params(
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events"),
    ),
    responses(
        (status = 202, description = "Accepted; a code is mailed if the address belongs to an active user", body = ResetRequested),
        (status = 400, description = "Malformed JSON (`malformed_json`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown fields (`validation_failed`)", body = ErrorBody),
        (status = 429, description = "This client made more password grants and password-reset requests than its quota (`rate_limited`)", body = ErrorBody, headers(
            ("Retry-After" = u64, description = "Seconds until this client may try again"))),
        (status = 500, description = "An unexpected failure (`internal`)", body = ErrorBody),
        (status = 503, description = "Too many reset requests in progress (`overloaded`), or the request timed out", body = ErrorBody),
    ))]
#[tracing::instrument(name = "request_password_reset", skip_all)]
pub(crate) async fn request(
    State(state): State<AppState>,
    _quota: WithinSignInQuota,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ResetRequest>,
) -> Result<Response, ApiError> {
    let mut errors = FieldErrors::default();
    let Some(email) = errors.check("email", validation::email(&body.email)) else {
        return Err(ApiError::Invalid {
            message: "some fields are invalid".into(),
            fields: errors.0,
        });
    };
    let permit = state
        .reset_requests
        .0
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded {
            retry_after_secs: 1,
        })?;
    let metadata = metadata(&headers, ANONYMOUS, None);
    let work = send_code(state.clone(), email, metadata);
    tokio::spawn(
        async move {
            if let Err(error) = work.await {
                tracing::error!(
                    error = format!("{error:#}"),
                    "password reset request failed"
                );
            }
            drop(permit);
        }
        .instrument(tracing::info_span!("password_reset_request_work")),
    );
    let answer = ResetRequested {
        message: "if the address belongs to an active account, a code is on its way",
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// Appends PasswordResetRequested for the active user at `email`, if any.
async fn send_code(state: AppState, email: String, metadata: EventMetadata) -> anyhow::Result<()> {
    let Some(id) = state.store.find_user(&email).await? else {
        return Ok(());
    };
    let code = Code::generate();
    let sealed = state.codes.key.seal(Purpose::PasswordReset, id, &code);
    for _ in 0..3 {
        let user = User::from_events(&state.store.load(id).await?);
        let events = password_reset::request(&user, sealed.clone(), Utc::now(), state.codes.reset);
        if events.is_empty() {
            return Ok(());
        }
        match state
            .store
            .append(id, user.version, &events, &metadata, None, Revoke::Nothing)
            .await
        {
            Ok(appended) => {
                tracing::info!(user_id = %id, version = appended.version, "password reset code issued");
                return Ok(());
            }
            Err(AppendError::VersionConflict) => continue,
            Err(other) => return Err(other.into()),
        }
    }
    anyhow::bail!("the user kept changing; no reset code issued")
}

/// Sets a new password with the mailed code: appends PasswordReset, ends
/// every session of the user (their refresh tokens stop working) and lifts
/// a lock from failed password checks. A wrong code appends
/// PasswordResetFailed; after `CODE_MAX_ATTEMPTS` wrong codes, or once it
/// expired or was used, the code is dead. Every refusal is `invalid_code`.
#[utoipa::path(post, path = "/password-resets/complete", tag = "users",
    request_body(content = CompleteReset, content_type = "application/json"),
    params(
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "A retry with the same key, address and code gets the first answer if its new password is the one that reset set (checked against its hash); otherwise it is a new attempt with a used code. 1–255 visible ASCII characters", pattern = "^[!-~]{1,255}$"),
    ),
    responses(
        (status = 200, description = "PasswordReset appended", body = super::commands::Accepted, headers(("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "`invalid_code` (wrong, expired, used, attempts used up, or no such account), malformed JSON (`malformed_json`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 409, description = "The user kept changing (`concurrent_modification`)", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown fields (`validation_failed`)", body = ErrorBody),
        (status = 429, description = "This client made more password grants and password-reset requests than its quota (`rate_limited`)", body = ErrorBody, headers(
            ("Retry-After" = u64, description = "Seconds until this client may try again"))),
        (status = 500, description = "An unexpected failure (`internal`)", body = ErrorBody),
        (status = 503, description = "The hashing queue is full (`overloaded`), PostgreSQL unavailable or the request timed out", body = ErrorBody),
    ))]
#[tracing::instrument(name = "complete_password_reset", skip_all)]
pub(crate) async fn complete(
    State(state): State<AppState>,
    _quota: WithinSignInQuota,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CompleteReset>,
) -> Result<Response, ApiError> {
    let mut errors = FieldErrors::default();
    let email = errors.check("email", validation::email(&body.email));
    errors.check("new_password", validation::password(&body.new_password));
    if body.code.chars().count() > 64 {
        errors
            .0
            .insert("code".into(), "at most 64 characters".into());
    }
    let (Some(email), true) = (email, errors.is_empty()) else {
        return Err(ApiError::Invalid {
            message: "some fields are invalid".into(),
            fields: errors.0,
        });
    };
    // A retry under the same key, address and code (anonymous keys are
    // scoped by both) gets the first answer if its password is the one the
    // reset set: one argon2 verification instead of the hash below.
    let code = events::codes::as_typed(&body.code);
    let fingerprint = idempotency::fingerprint(&[COMPLETE_ROUTE, &email, &code]);
    let key = idempotency::key(&headers)?;
    let idempotent = Idempotent::new(key, Caller::Anonymous, COMPLETE_ROUTE, fingerprint.clone());
    let new_password = SecretString::from(body.new_password);
    let check = ReplayCheck::ResetPassword(&new_password);
    if let Some(answer) = lookup(&state, idempotent.as_ref()).await? {
        return check.replay(&state, &answer).await;
    }
    // The hash comes first, for every request: an unknown address and a
    // wrong code cost the same, and the code is checked only where its
    // outcome is appended.
    let password_hash = state.hasher.hash(new_password.clone()).await?;
    let Some(id) = state.store.find_user(&email).await? else {
        return Err(ApiError::Code(CodeRefusal::Invalid));
    };
    let request = CommandRequest {
        id,
        headers: &headers,
        route: COMPLETE_ROUTE,
        fingerprint,
        actor: ANONYMOUS,
        revoke: Revoke::All {
            because: "password reset",
        },
    };
    let key = state.codes.key.clone();
    let max_attempts = state.codes.max_attempts;
    let decide = |user: &User, now| {
        let decision = password_reset::complete(
            user,
            id,
            &body.code,
            &key,
            now,
            max_attempts,
            password_hash.clone(),
        );
        Ok(Decided {
            events: decision.events,
            refusal: decision.refusal.map(ApiError::Code),
            emails: Emails::Unchanged,
        })
    };
    run_decision_replaying(&state, request, decide, check).await
}

/// Replays a completed reset only for the password it set (the hash is in
/// its event); any other password is a new attempt with a used code.
pub(crate) async fn replay_reset(
    state: &AppState,
    answer: &StoredAnswer,
    new_password: &SecretString,
) -> Result<Response, ApiError> {
    let history = state.store.load(answer.stream_id).await?;
    let set = history
        .into_iter()
        .take(usize::try_from(answer.appended.version).unwrap_or(0))
        .rev()
        .find_map(|event| match event {
            UserEvent::PasswordReset(reset) => Some(reset.password_hash),
            _ => None,
        });
    let Some(set) = set else {
        return Err(ApiError::Code(CodeRefusal::Invalid));
    };
    if state.hasher.verify(new_password.clone(), set).await? {
        Ok(idempotency::replay(answer))
    } else {
        Err(ApiError::Code(CodeRefusal::Invalid))
    }
}
