//! The command API's errors: each variant knows its status and code; 5xx are
//! logged here, once, with their cause chain, and their details stay private.

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use platform::http::error_response;

use crate::domain::codes::CodeRefusal;
use crate::domain::DomainError;
use crate::password::HashError;
use crate::store::{AppendError, LoadError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// 400: the id in the path is not a UUID.
    #[error("the id is not a valid UUID")]
    InvalidId,
    /// 400: the query string has unknown, repeated or out-of-range parameters.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// 400: a header the API reads has an unusable value.
    #[error("the {name} header is invalid: {reason}")]
    InvalidHeader {
        name: &'static str,
        reason: &'static str,
    },
    /// 401: no bearer token.
    #[error("this request needs a bearer access token")]
    Unauthenticated,
    /// 401: a bearer token that is not a valid, unexpired access token.
    #[error("the access token is invalid or expired")]
    InvalidToken,
    /// 403: a valid token without the scope (or user) this request needs.
    #[error("the access token does not allow this")]
    Forbidden,
    /// 403: the current password given is wrong (a failed check, counted).
    #[error("the current password is wrong")]
    WrongPassword,
    /// 403: too many failed password checks; no password is checked until `until`.
    #[error("the account is locked after too many failed password checks")]
    AccountLocked,
    /// 404: no such user.
    #[error("no user with this id")]
    UserNotFound,
    /// 409: the username is reserved by another user.
    #[error("the username is taken")]
    UsernameTaken,
    /// 409: the email is reserved by another user.
    #[error("the email is taken")]
    EmailTaken,
    /// 409: the user is already in the requested state.
    #[error("{0}")]
    StateConflict(DomainError),
    /// 409: an administrator tried to deactivate themself or drop their own admin role.
    #[error("administrators cannot deactivate themselves or give up their own admin role")]
    OwnAccount,
    /// 409: a profile patch would leave more preferences than allowed.
    #[error("the preferences would have more than {max} keys", max = crate::domain::profile::PREFERENCES_MAX)]
    TooManyPreferences,
    /// 400: a mailed code was not accepted.
    #[error("{0}")]
    Code(CodeRefusal),
    /// 409: other commands kept winning the race for this user.
    #[error("the user was changed concurrently; retry")]
    ConcurrentModification,
    /// 412: `If-Match` named another version than the user's current one.
    #[error("the user is at version {current}, not the one If-Match names")]
    PreconditionFailed { current: i32 },
    /// 413: the body is larger than the limit.
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 415: the body is not declared as JSON.
    #[error("the body must be sent as application/json")]
    UnsupportedMediaType,
    /// 422: the JSON does not have the expected fields or types, or values break the rules.
    #[error("{message}")]
    Invalid {
        message: String,
        fields: BTreeMap<String, String>,
    },
    /// 422: the `Idempotency-Key` was first used for a different command.
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    /// 429: this client started too many registrations; retry after `retry_after_secs`.
    #[error("too many requests from this client; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// 503: the password hashing queue is full; retry after `retry_after_secs`.
    #[error("the service is overloaded; retry in {retry_after_secs} s")]
    Overloaded { retry_after_secs: u64 },
    /// 503: a dependency (PostgreSQL) is unreachable; the request may be retried.
    #[error("a dependency is unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// 500: anything else; details are logged, not returned.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_)
            | Self::InvalidId
            | Self::InvalidQuery(_)
            | Self::InvalidHeader { .. }
            | Self::Code(_) => StatusCode::BAD_REQUEST,
            Self::Unauthenticated | Self::InvalidToken => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::WrongPassword | Self::AccountLocked => StatusCode::FORBIDDEN,
            Self::UserNotFound => StatusCode::NOT_FOUND,
            Self::UsernameTaken
            | Self::EmailTaken
            | Self::StateConflict(_)
            | Self::OwnAccount
            | Self::TooManyPreferences
            | Self::ConcurrentModification => StatusCode::CONFLICT,
            Self::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Invalid { .. } | Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded { .. } | Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidId => "invalid_id",
            Self::InvalidQuery(_) => "invalid_query",
            Self::InvalidHeader { .. } => "invalid_header",
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidToken => "invalid_token",
            Self::Forbidden => "forbidden",
            Self::WrongPassword => "wrong_password",
            Self::AccountLocked => "account_locked",
            Self::UserNotFound => "user_not_found",
            Self::UsernameTaken => "username_taken",
            Self::EmailTaken => "email_taken",
            Self::StateConflict(DomainError::AlreadyDeactivated) => "already_deactivated",
            Self::StateConflict(DomainError::AlreadyActive) => "already_active",
            Self::StateConflict(DomainError::NotLocked) => "not_locked",
            Self::StateConflict(DomainError::Deactivated) => "user_deactivated",
            Self::StateConflict(DomainError::RoleAlreadyGranted) => "role_already_granted",
            Self::StateConflict(DomainError::RoleNotGranted) => "role_not_granted",
            Self::StateConflict(DomainError::EmailUnchanged) => "email_unchanged",
            Self::TooManyPreferences => "too_many_preferences",
            Self::Code(CodeRefusal::Invalid) => "invalid_code",
            Self::Code(CodeRefusal::Expired) => "code_expired",
            Self::Code(CodeRefusal::TooManyAttempts) => "too_many_attempts",
            Self::StateConflict(_) => "conflict",
            Self::OwnAccount => "own_account",
            Self::ConcurrentModification => "concurrent_modification",
            Self::PreconditionFailed { .. } => "precondition_failed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Invalid { .. } => "validation_failed",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::RateLimited { .. } => "rate_limited",
            Self::Overloaded { .. } => "overloaded",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

/// How long a caller refused for a full hashing queue is asked to wait: the
/// queue drains in well under a second, so the smallest value `Retry-After` has.
const OVERLOADED_RETRY_AFTER_SECS: u64 = 1;

impl From<HashError> for ApiError {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Overloaded => Self::Overloaded {
                retry_after_secs: OVERLOADED_RETRY_AFTER_SECS,
            },
            other => Self::Internal(other.into()),
        }
    }
}

impl From<crate::signin::CheckError> for ApiError {
    fn from(e: crate::signin::CheckError) -> Self {
        use crate::signin::CheckError;
        match e {
            CheckError::Hash(e) => e.into(),
            CheckError::Load(e) => e.into(),
            CheckError::Append(e) => e.into(),
            CheckError::Contended => Self::ConcurrentModification,
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::NotFound => Self::UserNotFound,
            DomainError::CodeRecentlySent { retry_after_secs } => {
                Self::RateLimited { retry_after_secs }
            }
            other => Self::StateConflict(other),
        }
    }
}

/// Failures to reach PostgreSQL mean "try again later" (503), not "we are
/// broken" (500): I/O and pool errors, and the server's own refusals to serve
/// (connection exceptions, shutdown, too many connections, missing database).
fn from_sqlx(error: sqlx::Error) -> ApiError {
    let unavailable = match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "53300" || code == "3D000"
        }),
        _ => false,
    };
    if unavailable {
        ApiError::Unavailable(error.into())
    } else {
        ApiError::Internal(error.into())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        from_sqlx(e)
    }
}

impl From<AppendError> for ApiError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::UsernameTaken => Self::UsernameTaken,
            AppendError::EmailTaken => Self::EmailTaken,
            AppendError::VersionConflict | AppendError::IdempotencyKeyTaken => {
                Self::ConcurrentModification
            }
            AppendError::Database(e) => e.into(),
        }
    }
}

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Database(e) => from_sqlx(e),
            decode @ LoadError::Decode { .. } => Self::Internal(decode.into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Overloaded { .. } = &self {
            // Expected back-pressure, not a failure: counted in
            // `argon2_jobs_refused_total`; a line per refusal would flood the
            // logs exactly when the service is busiest.
            tracing::debug!(
                code = self.code(),
                "registration refused: hashing queue full"
            );
        } else if status.is_server_error() {
            // `{:#}` on anyhow prints the whole cause chain on one line.
            let cause = match &self {
                Self::Unavailable(e) | Self::Internal(e) => format!("{e:#}"),
                other => other.to_string(),
            };
            tracing::error!(code = self.code(), error = %cause, "request failed");
        }
        let fields = match &self {
            Self::Invalid { fields, .. } => fields.clone(),
            Self::InvalidHeader { name, reason } => {
                BTreeMap::from([((*name).to_owned(), (*reason).to_owned())])
            }
            _ => BTreeMap::new(),
        };
        let mut response = error_response(status, self.code(), self.to_string(), fields);
        match &self {
            // RFC 6750, section 3.
            Self::Unauthenticated => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::InvalidToken => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                );
            }
            Self::Forbidden => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer error="insufficient_scope""#),
                );
            }
            Self::RateLimited { retry_after_secs } | Self::Overloaded { retry_after_secs } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        response
    }
}
