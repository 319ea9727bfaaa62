//! What every command on an existing user shares: the consistency token in
//! the answer, event metadata, `Idempotency-Key` replays, `If-Match`, and the
//! load–decide–append loop that decides again after losing a race.

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use events::domain::EventMetadata;
use events::UserEvent;
use secrecy::SecretString;
use serde::Serialize;
use uuid::Uuid;

use super::error::ApiError;
use super::idempotency::{self, Caller, Idempotent};
use super::AppState;
use crate::domain::{decide, Command, User};
use crate::sessions::Revoke;
use crate::store::{AppendError, Effects, Emails, StoredAnswer};

/// How often a command re-reads the stream and decides again after losing
/// an append race, before answering 409 `concurrent_modification`.
const MAX_ATTEMPTS: usize = 3;

/// The answer to every accepted command: the consistency token for reads.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    /// The user id.
    pub id: Uuid,
    /// The user's stream version after this command.
    pub version: i32,
    /// The global log position of the command's last event.
    pub position: i64,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Correlation and causation are the request id (set by the HTTP envelope
/// from `X-Request-Id`, or generated): an HTTP command is caused by its request.
pub(crate) fn metadata(headers: &HeaderMap, actor: &str, key: Option<&str>) -> EventMetadata {
    let request_id = header(headers, platform::http::REQUEST_ID.as_str());
    EventMetadata {
        correlation_id: request_id.clone(),
        causation_id: request_id,
        actor: actor.to_owned(),
        idempotency_key: key.map(str::to_owned),
    }
}

/// The live answer under the request's key, if it sent one.
pub(crate) async fn lookup(
    state: &AppState,
    idempotent: Option<&Idempotent>,
) -> Result<Option<StoredAnswer>, ApiError> {
    match idempotent {
        Some(idempotent) => idempotent.lookup(&state.store).await,
        None => Ok(None),
    }
}

/// One command on the user `id`, as the handler has checked it.
pub(crate) struct CommandRequest<'a> {
    pub id: Uuid,
    pub headers: &'a HeaderMap,
    /// The route template, e.g. `"POST /users/{id}/deactivate"`.
    pub route: &'a str,
    /// What makes two requests under one `Idempotency-Key` the same command.
    pub fingerprint: String,
    /// Who acts: recorded with the events and scoping the key.
    pub actor: &'a str,
    /// Sessions the command ends, in its transaction.
    pub revoke: Revoke,
}

/// `If-Match` (RFC 9110, 13.1.1): `*` (the user must exist) or a list of
/// entity tags, of which one must be the user's current ETag `"<version>"`
/// (strong comparison: weak tags never match). A value naming no version
/// matches nothing, so the command answers 412 rather than run unconditionally.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IfMatch {
    Any,
    Versions(Vec<i32>),
}

impl IfMatch {
    fn admits(&self, version: i32) -> bool {
        match self {
            Self::Any => true,
            Self::Versions(versions) => versions.contains(&version),
        }
    }
}

fn if_match(headers: &HeaderMap) -> Option<IfMatch> {
    let raw = headers.get(axum::http::header::IF_MATCH)?.as_bytes();
    if raw.trim_ascii() == b"*" {
        return Some(IfMatch::Any);
    }
    let versions = raw
        .split(|b| *b == b',')
        .filter_map(|tag| {
            let digits = tag.trim_ascii().strip_prefix(b"\"")?.strip_suffix(b"\"")?;
            let plain =
                !digits.is_empty() && digits[0] != b'0' && digits.iter().all(u8::is_ascii_digit);
            plain
                .then(|| std::str::from_utf8(digits).ok()?.parse().ok())
                .flatten()
        })
        .collect();
    Some(IfMatch::Versions(versions))
}

/// What one attempt of a command decided on the state it loaded.
pub(crate) struct Decided {
    pub events: Vec<UserEvent>,
    /// Set when the caller is refused even though `events` are appended (a
    /// wrong code's failure is recorded, then the caller hears no).
    pub refusal: Option<ApiError>,
    /// Reservations to change with the append.
    pub emails: Emails,
}

impl Decided {
    pub fn accept(events: Vec<UserEvent>) -> Self {
        Self {
            events,
            refusal: None,
            emails: Emails::Unchanged,
        }
    }
}

/// Load, check the precondition, decide, append: [`run_decision`] for a
/// command of the core rules ([`decide`]).
pub(crate) async fn run_command(
    state: &AppState,
    request: CommandRequest<'_>,
    command: impl Fn() -> Command,
) -> Result<Response, ApiError> {
    run_decision(state, request, |user, now| {
        Ok(Decided::accept(decide(user, command(), now)?))
    })
    .await
}

/// Load, check the precondition, decide, append. Without `If-Match`, a lost
/// race is decided again on the fresh stream; with it, a lost race is a 412.
/// The command's events are decided at the time of each attempt. A decision
/// with a refusal appends its events without the idempotency claim and
/// without ending sessions, then answers the refusal.
pub(crate) async fn run_decision(
    state: &AppState,
    request: CommandRequest<'_>,
    decide: impl Fn(&User, DateTime<Utc>) -> Result<Decided, ApiError>,
) -> Result<Response, ApiError> {
    run_decision_replaying(state, request, decide, ReplayCheck::Fingerprint).await
}

/// What a retry under the same `Idempotency-Key` must match to get the first
/// answer.
pub(crate) enum ReplayCheck<'a> {
    /// The fingerprint (checked by the look-up).
    Fingerprint,
    /// Also the password a reset set, which the fingerprint must not hold:
    /// one argon2 verification.
    ResetPassword(&'a SecretString),
}

impl ReplayCheck<'_> {
    pub(crate) async fn replay(
        &self,
        state: &AppState,
        answer: &StoredAnswer,
    ) -> Result<Response, ApiError> {
        match self {
            Self::Fingerprint => Ok(idempotency::replay(answer)),
            Self::ResetPassword(password) => {
                super::password_reset::replay_reset(state, answer, password).await
            }
        }
    }
}

/// [`run_decision`], with `check` applied to a retry under the same
/// `Idempotency-Key` (found before the decision, or won by a racing request).
pub(crate) async fn run_decision_replaying(
    state: &AppState,
    request: CommandRequest<'_>,
    decide: impl Fn(&User, DateTime<Utc>) -> Result<Decided, ApiError>,
    check: ReplayCheck<'_>,
) -> Result<Response, ApiError> {
    let CommandRequest {
        id,
        headers,
        route,
        fingerprint,
        actor,
        revoke,
    } = request;
    let precondition = if_match(headers);
    let idempotent = Idempotent::new(
        idempotency::key(headers)?,
        Caller::acting(actor),
        route,
        fingerprint,
    );
    if let Some(answer) = lookup(state, idempotent.as_ref()).await? {
        return check.replay(state, &answer).await;
    }
    let metadata = metadata(headers, actor, idempotent.as_ref().map(Idempotent::key));
    let claim = idempotent
        .as_ref()
        .map(|i| i.claim(StatusCode::OK, state.idempotency_ttl));
    for _ in 0..MAX_ATTEMPTS {
        let history = state.store.load(id).await?;
        let user = User::from_events(&history);
        if let Some(wanted) = &precondition {
            if user.version != 0 && !wanted.admits(user.version) {
                return Err(ApiError::PreconditionFailed {
                    current: user.version,
                });
            }
        }
        let Decided {
            events,
            refusal,
            emails,
        } = decide(&user, Utc::now())?;
        let refusal = match refusal {
            Some(refusal) if events.is_empty() => return Err(refusal),
            other => other,
        };
        let (claim, effects) = match refusal {
            None => (claim.as_ref(), Effects { revoke, emails }),
            Some(_) => (None, Effects::from(Revoke::Nothing)),
        };
        match state
            .store
            .append(id, user.version, &events, &metadata, claim, effects)
            .await
        {
            Ok(_) if refusal.is_some() => {
                tracing::info!(route, "refusal recorded");
                return Err(refusal.expect("checked just above"));
            }
            Ok(appended) => {
                tracing::info!(version = appended.version, route, "command accepted");
                let accepted = Accepted {
                    id,
                    version: appended.version,
                    position: appended.position,
                };
                return Ok(accepted.respond(StatusCode::OK));
            }
            Err(AppendError::VersionConflict)
                if matches!(precondition, Some(IfMatch::Versions(_))) =>
            {
                let current = User::from_events(&state.store.load(id).await?).version;
                return Err(ApiError::PreconditionFailed { current });
            }
            Err(AppendError::VersionConflict) => {
                tracing::debug!("lost an append race; deciding again on fresh state");
            }
            Err(AppendError::IdempotencyKeyTaken) => {
                return match lookup(state, idempotent.as_ref()).await? {
                    Some(answer) => check.replay(state, &answer).await,
                    None => Err(ApiError::ConcurrentModification),
                };
            }
            Err(other) => return Err(other.into()),
        }
    }
    Err(ApiError::ConcurrentModification)
}
