//! The user commands: register, deactivate, reactivate.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use chrono::Utc;
use events::codes::{Code, Purpose};
use events::UserEvent;
use platform::http::ErrorBody;
use secrecy::SecretString;
use serde::Deserialize;
use uuid::Uuid;

use super::auth::Admin;
use super::commands::{lookup, metadata, run_command, Accepted, CommandRequest};
use super::error::ApiError;
use super::idempotency::{self, Caller, Idempotent, ANONYMOUS};
use super::json::{JsonBody, OptionalJsonBody};
use super::rate_limit::WithinRegistrationQuota;
use super::AppState;
use crate::domain::{decide, Command, User};
use crate::sessions::Revoke;
use crate::store::{AppendError, StoredAnswer, Taken};
use crate::validation::{self, FieldErrors};

/// The registration route, as idempotency scopes and fingerprints name it.
const REGISTER_ROUTE: &str = "POST /users";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", post(register))
        .route("/users/{id}/deactivate", post(deactivate))
        .route("/users/{id}/reactivate", post(reactivate))
        .route("/users/{id}/unlock", post(unlock))
}

/// `POST /users`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// 3–32 characters of `[A-Za-z0-9_.-]`, with any surrounding ASCII
    /// whitespace; stored trimmed and lower-cased, unique in that form.
    #[schema(
        example = "alice",
        pattern = r"^[\t\n\f\r ]*[A-Za-z0-9_.-]{3,32}[\t\n\f\r ]*$"
    )]
    pub username: String,
    /// An address `local@domain` of at most 254 characters (a dot-atom local
    /// part of at most 64; domain labels of letters, digits and hyphens),
    /// with any surrounding ASCII whitespace; stored trimmed and lower-cased,
    /// unique in that form.
    #[schema(
        example = "alice@example.com",
        pattern = r"^[\t\n\f\r ]*(?=[^\t\n\f\r ]{3,254}[\t\n\f\r ]*$)(?=[^@]{1,64}@)[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?[\t\n\f\r ]*$"
    )]
    pub email: String,
    /// 12–128 characters. Hashed with argon2id; never stored or returned as sent.
    #[schema(
        example = "correct horse battery staple",
        min_length = 12,
        max_length = 128
    )]
    pub password: String,
}

/// `POST /users/{id}/deactivate` and `/reactivate`; the body may be left out.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    /// Why, for the audit trail; at most 500 characters (stored trimmed).
    #[serde(default)]
    #[schema(max_length = 500)]
    pub reason: Option<String>,
}

/// Registers a user: appends UserRegistered, with a code that verifies the
/// email address; the notifier mails it in the welcome mail.
#[utoipa::path(post, path = "/users", tag = "users",
    request_body(content = RegisterRequest, content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Retries with the same key and body (and password) get the first answer; 1–255 visible ASCII characters. Keys of anonymous callers are scoped by the command: the same key with another body is a new command, never a replay", pattern = "^[!-~]{1,255}$"),
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events: 1–128 characters of `[A-Za-z0-9._:-]`, otherwise replaced by a generated one; generated when absent and echoed back"),
    ),
    responses(
        (status = 201, description = "Registered", body = Accepted, headers(
            ("Location" = String, description = "/users/{id}"),
            ("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "Malformed JSON (`malformed_json`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 409, description = "`username_taken`, `email_taken` or `concurrent_modification`", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown fields (`validation_failed`, with `fields`) or an Idempotency-Key whose first registration had another password (`idempotency_key_reused`)", body = ErrorBody),
        (status = 429, description = "This client started more registrations than its quota (`rate_limited`)", body = ErrorBody, headers(
            ("Retry-After" = u64, description = "Seconds until this client may register again"))),
        (status = 500, description = "An unexpected failure (`internal`); details are logged, not returned", body = ErrorBody),
        (status = 503, description = "The password hashing queue is full (`overloaded`, with `Retry-After`), PostgreSQL unavailable (`unavailable`) or the request timed out (`timeout`)", body = ErrorBody, headers(
            ("Retry-After" = u64, description = "With `overloaded`: seconds to wait before retrying"))),
    ))]
#[tracing::instrument(name = "register_user", skip_all)]
pub(crate) async fn register(
    State(state): State<AppState>,
    _quota: WithinRegistrationQuota,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterRequest>,
) -> Result<Response, ApiError> {
    let key = idempotency::key(&headers)?;
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
    let password = SecretString::from(body.password);
    // The password is not part of the fingerprint (it must not be stored even
    // hashed fast); a replay checks it against the user's argon2 hash instead.
    let fingerprint = idempotency::fingerprint(&[REGISTER_ROUTE, &username, &email]);
    let idempotent = Idempotent::new(key, Caller::Anonymous, REGISTER_ROUTE, fingerprint);
    if let Some(answer) = lookup(&state, idempotent.as_ref()).await? {
        return replay_registration(&state, &answer, password).await;
    }
    // A place in the hashing queue first: when it is full the answer is 503
    // `overloaded` at once, before the database is asked anything.
    let slot = state.hasher.reserve()?;
    // A name already taken is refused before any argon2 work, so a flood of
    // taken names costs one indexed look-up each. The reservation below, in
    // the appending transaction, stays the guarantee against races.
    let taken = state.store.identity_taken(&username, &email).await?;
    if taken != Taken::Neither {
        // A retry whose first attempt committed since the look-up above sees
        // its own name taken: it gets its answer, not a 409.
        drop(slot);
        if let Some(answer) = lookup(&state, idempotent.as_ref()).await? {
            return replay_registration(&state, &answer, password).await;
        }
        return Err(match taken {
            Taken::Username => ApiError::UsernameTaken,
            _ => ApiError::EmailTaken,
        });
    }

    let password_hash = slot.hash(password.clone()).await?;
    let id = Uuid::now_v7();
    // The code that verifies the address, mailed by the notifier.
    let code = Code::generate();
    let now = Utc::now();
    let events = decide(
        &User::default(),
        Command::Register {
            username: username.clone(),
            email: email.clone(),
            password_hash,
            sealed_code: state.codes.key.seal(Purpose::EmailVerification, id, &code),
            code_expires_at: now + state.codes.email.ttl,
        },
        now,
    )?;
    let claim = idempotent
        .as_ref()
        .map(|i| i.claim(StatusCode::CREATED, state.idempotency_ttl));
    let metadata = metadata(
        &headers,
        ANONYMOUS,
        idempotent.as_ref().map(Idempotent::key),
    );
    match state
        .store
        .register(id, &username, &email, &events, &metadata, claim.as_ref())
        .await
    {
        Ok(appended) => {
            tracing::info!(user_id = %id, version = appended.version, "user registered");
            let accepted = Accepted {
                id,
                version: appended.version,
                position: appended.position,
            };
            Ok(accepted.respond(StatusCode::CREATED))
        }
        // The same key won a race with this request: answer as it did.
        Err(AppendError::IdempotencyKeyTaken) => match lookup(&state, idempotent.as_ref()).await? {
            Some(answer) => replay_registration(&state, &answer, password).await,
            None => Err(ApiError::ConcurrentModification),
        },
        Err(other) => Err(other.into()),
    }
}

/// Replays a registration only for the same password: the first request's
/// hash is in the log, so the check costs one argon2 verification.
async fn replay_registration(
    state: &AppState,
    answer: &StoredAnswer,
    password: SecretString,
) -> Result<Response, ApiError> {
    let history = state.store.load(answer.stream_id).await?;
    let Some(UserEvent::Registered(registered)) = history.into_iter().next() else {
        return Err(ApiError::IdempotencyKeyReused);
    };
    let same = state
        .hasher
        .verify(password, registered.password_hash)
        .await?;
    if same {
        Ok(idempotency::replay(answer))
    } else {
        Err(ApiError::IdempotencyKeyReused)
    }
}

/// Deactivates a user: appends UserDeactivated. Requires an administrator's access token (scope `admin`).
#[utoipa::path(post, path = "/users/{id}/deactivate", tag = "users",
    request_body(content = Option<StatusRequest>, content_type = "application/json", description = "Optional; may be left out or `null`"),
    params(
        ("id" = Uuid, Path, description = "The user id"),
        ("If-Match" = Option<String>, Header, nullable = false, example = "\"1\"", description = "RFC 9110: `*` makes the command conditional on the user existing; entity tags (such as `\"3\"`, the `ETag` of version 3) on the user's current version being one of them, otherwise 412. Weak tags and values naming no version match nothing"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Retries with the same key and body get the first answer; keys are scoped by caller and route; 1–255 visible ASCII characters", pattern = "^[!-~]{1,255}$"),
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events: 1–128 characters of `[A-Za-z0-9._:-]`, otherwise replaced by a generated one; echoed back"),
    ),
    security(("access_token" = ["admin"])),
    responses(
        (status = 200, description = "UserDeactivated appended", body = Accepted, headers(("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "Invalid id (`invalid_id`), malformed JSON (`malformed_json`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 401, description = "No bearer token (`unauthenticated`), or not a valid access token (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "The token's user is not an active administrator (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 409, description = "`already_deactivated`, `own_account` (administrators cannot deactivate themselves) or `concurrent_modification`", body = ErrorBody),
        (status = 412, description = "If-Match names no tag of the user's current version (`precondition_failed`)", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown fields (`validation_failed`) or a reused Idempotency-Key (`idempotency_key_reused`)", body = ErrorBody),
        (status = 500, description = "An unexpected failure (`internal`); details are logged, not returned", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the request timed out (`unavailable`, `timeout`)", body = ErrorBody),
    ))]
#[tracing::instrument(name = "deactivate_user", skip_all, fields(user_id = %id))]
pub(crate) async fn deactivate(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<StatusRequest>,
) -> Result<Response, ApiError> {
    status_command(&state, &admin, &id, &headers, body, Toggle::Deactivate).await
}

/// Reactivates a user: appends UserReactivated. Requires an administrator's access token (scope `admin`).
#[utoipa::path(post, path = "/users/{id}/reactivate", tag = "users",
    request_body(content = Option<StatusRequest>, content_type = "application/json", description = "Optional; may be left out or `null`"),
    params(
        ("id" = Uuid, Path, description = "The user id"),
        ("If-Match" = Option<String>, Header, nullable = false, example = "\"1\"", description = "RFC 9110: `*` makes the command conditional on the user existing; entity tags (such as `\"3\"`, the `ETag` of version 3) on the user's current version being one of them, otherwise 412. Weak tags and values naming no version match nothing"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Retries with the same key and body get the first answer; keys are scoped by caller and route; 1–255 visible ASCII characters", pattern = "^[!-~]{1,255}$"),
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events: 1–128 characters of `[A-Za-z0-9._:-]`, otherwise replaced by a generated one; echoed back"),
    ),
    security(("access_token" = ["admin"])),
    responses(
        (status = 200, description = "UserReactivated appended", body = Accepted, headers(("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "Invalid id (`invalid_id`), malformed JSON (`malformed_json`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 401, description = "No bearer token (`unauthenticated`), or not a valid access token (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "The token's user is not an active administrator (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 409, description = "`already_active` or `concurrent_modification`", body = ErrorBody),
        (status = 412, description = "If-Match names no tag of the user's current version (`precondition_failed`)", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown fields (`validation_failed`) or a reused Idempotency-Key (`idempotency_key_reused`)", body = ErrorBody),
        (status = 500, description = "An unexpected failure (`internal`); details are logged, not returned", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the request timed out (`unavailable`, `timeout`)", body = ErrorBody),
    ))]
#[tracing::instrument(name = "reactivate_user", skip_all, fields(user_id = %id))]
pub(crate) async fn reactivate(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<StatusRequest>,
) -> Result<Response, ApiError> {
    status_command(&state, &admin, &id, &headers, body, Toggle::Reactivate).await
}

/// Lifts a lock from failed password checks before it runs out: appends UserUnlocked. Requires an administrator's access token (scope `admin`).
#[utoipa::path(post, path = "/users/{id}/unlock", tag = "users",
    request_body(content = Option<StatusRequest>, content_type = "application/json", description = "Optional; may be left out or `null`"),
    params(
        ("id" = Uuid, Path, description = "The user id"),
        ("If-Match" = Option<String>, Header, nullable = false, example = "\"1\"", description = "RFC 9110: `*` makes the command conditional on the user existing; entity tags (such as `\"3\"`, the `ETag` of version 3) on the user's current version being one of them, otherwise 412. Weak tags and values naming no version match nothing"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Retries with the same key and body get the first answer; keys are scoped by caller and route; 1–255 visible ASCII characters", pattern = "^[!-~]{1,255}$"),
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events: 1–128 characters of `[A-Za-z0-9._:-]`, otherwise replaced by a generated one; echoed back"),
    ),
    security(("access_token" = ["admin"])),
    responses(
        (status = 200, description = "UserUnlocked appended", body = Accepted, headers(("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "Invalid id (`invalid_id`), malformed JSON (`malformed_json`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 401, description = "No bearer token (`unauthenticated`), or not a valid access token (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "The token's user is not an active administrator (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 409, description = "`not_locked` (no lock in force) or `concurrent_modification`", body = ErrorBody),
        (status = 412, description = "If-Match names no tag of the user's current version (`precondition_failed`)", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as application/json (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown fields (`validation_failed`) or a reused Idempotency-Key (`idempotency_key_reused`)", body = ErrorBody),
        (status = 500, description = "An unexpected failure (`internal`); details are logged, not returned", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the request timed out (`unavailable`, `timeout`)", body = ErrorBody),
    ))]
#[tracing::instrument(name = "unlock_user", skip_all, fields(user_id = %id))]
pub(crate) async fn unlock(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<StatusRequest>,
) -> Result<Response, ApiError> {
    status_command(&state, &admin, &id, &headers, body, Toggle::Unlock).await
}

/// The status commands, which differ only in the command they send.
#[derive(Clone, Copy)]
enum Toggle {
    Deactivate,
    Reactivate,
    Unlock,
}

impl Toggle {
    fn route(self) -> &'static str {
        match self {
            Self::Deactivate => "POST /users/{id}/deactivate",
            Self::Reactivate => "POST /users/{id}/reactivate",
            Self::Unlock => "POST /users/{id}/unlock",
        }
    }

    fn command(self, reason: Option<String>) -> Command {
        match self {
            Self::Deactivate => Command::Deactivate { reason },
            Self::Reactivate => Command::Reactivate { reason },
            Self::Unlock => Command::Unlock { reason },
        }
    }

    /// Deactivation ends every session of the user at once: a deactivated
    /// user can neither sign in nor refresh.
    fn revoke(self) -> Revoke {
        match self {
            Self::Deactivate => Revoke::All {
                because: "user deactivated",
            },
            Self::Reactivate | Self::Unlock => Revoke::Nothing,
        }
    }
}

async fn status_command(
    state: &AppState,
    admin: &Admin,
    id: &str,
    headers: &HeaderMap,
    body: Option<StatusRequest>,
    toggle: Toggle,
) -> Result<Response, ApiError> {
    let id = platform::http::parse_uuid(id).ok_or(ApiError::InvalidId)?;
    if let Toggle::Deactivate = toggle {
        admin.refuse_own(id)?;
    }
    let reason = parse_reason(body)?;
    let fingerprint = idempotency::fingerprint(&[
        toggle.route(),
        &id.to_string(),
        reason.as_deref().unwrap_or(""),
    ]);
    let request = CommandRequest {
        id,
        headers,
        route: toggle.route(),
        fingerprint,
        actor: &admin.actor(),
        revoke: toggle.revoke(),
    };
    run_command(state, request, || toggle.command(reason.clone())).await
}

fn parse_reason(body: Option<StatusRequest>) -> Result<Option<String>, ApiError> {
    let mut errors = FieldErrors::default();
    let reason = errors.check("reason", validation::reason(body.and_then(|b| b.reason)));
    reason.ok_or(ApiError::Invalid {
        message: "some fields are invalid".into(),
        fields: errors.0,
    })
}
