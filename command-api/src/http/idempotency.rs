//! `Idempotency-Key` support: a retry with the same key and the same command
//! gets the first answer again and appends nothing; the same key with another
//! command is refused with 422.
//!
//! The answer is recorded in the transaction that appends the events (see
//! `store::IdempotencyClaim`), so "appended" and "answer recorded" cannot
//! disagree after a crash.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sha2::{Digest, Sha256};

use super::commands::Accepted;
use super::error::ApiError;
use crate::store::{EventStore, IdempotencyClaim, StoredAnswer};

pub const HEADER: &str = "idempotency-key";
const MAX_KEY_LEN: usize = 255;

/// The key the client sent, if any; 1–255 visible ASCII characters.
pub fn key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let invalid = || ApiError::InvalidHeader {
        name: "Idempotency-Key",
        reason: "must be 1 to 255 visible ASCII characters",
    };
    let key = value.to_str().map_err(|_| invalid())?.trim();
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid());
    }
    Ok(Some(key.to_owned()))
}

/// SHA-256 over the parts that make two requests "the same command".
pub fn fingerprint(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Who sends a command, as far as its idempotency key is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// No credentials: registration, password-reset completion.
    Anonymous,
    /// An authenticated principal: a user id, or the bootstrap `admin`.
    Principal(&'a str),
}

/// The actor recorded for commands sent without credentials.
pub const ANONYMOUS: &str = "anonymous";

impl<'a> Caller<'a> {
    /// The caller an event's `actor` names: principals are user ids or the
    /// bootstrap `admin`, never [`ANONYMOUS`].
    pub fn acting(actor: &'a str) -> Self {
        if actor == ANONYMOUS {
            Self::Anonymous
        } else {
            Self::Principal(actor)
        }
    }
}

/// The scope a key lives in: the caller and the route template (`route` is
/// `"POST /users/{id}/deactivate"` and the like), so one caller's key never
/// replays or blocks another caller's command, or a command on another route.
///
/// An identified caller's key is theirs on that route: the same key with
/// another command there is a 422, which tells a client it reused a key by
/// mistake. Anonymous callers cannot be told apart (an address is shared
/// behind a NAT or proxy and changes when a phone changes networks, exactly
/// when clients retry), so their scope also holds the command's fingerprint:
/// a key only ever matches the same command. Guessing someone's key therefore
/// cannot block their registration (another command does not collide with
/// it), nor replay their answer (a registration replay also needs the
/// password, checked against the logged argon2 hash).
pub fn scope(caller: Caller<'_>, route: &str, fingerprint: &str) -> String {
    match caller {
        Caller::Principal(principal) => format!("{principal} {route}"),
        Caller::Anonymous => format!("anonymous {route} {fingerprint}"),
    }
}

/// A command sent with an `Idempotency-Key`: where the key lives and what a
/// stored answer must match to be replayed.
#[derive(Debug, Clone)]
pub struct Idempotent {
    scope: String,
    key: String,
    fingerprint: String,
}

impl Idempotent {
    /// `None` when the request carried no key.
    pub fn new(
        key: Option<String>,
        caller: Caller<'_>,
        route: &str,
        fingerprint: String,
    ) -> Option<Self> {
        key.map(|key| Self {
            scope: scope(caller, route, &fingerprint),
            key,
            fingerprint,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// What the store records with the events, in their transaction.
    pub fn claim(&self, status: StatusCode, ttl: std::time::Duration) -> IdempotencyClaim {
        IdempotencyClaim {
            scope: self.scope.clone(),
            key: self.key.clone(),
            fingerprint: self.fingerprint.clone(),
            status: status.as_u16(),
            ttl,
        }
    }

    /// The live answer under this key in this scope, checked against this
    /// request's fingerprint: another command under the same key is a 422.
    pub async fn lookup(&self, store: &EventStore) -> Result<Option<StoredAnswer>, ApiError> {
        let answer = store.stored_answer(&self.scope, &self.key).await?;
        match answer {
            Some(answer) if answer.fingerprint != self.fingerprint => {
                Err(ApiError::IdempotencyKeyReused)
            }
            other => Ok(other),
        }
    }
}

/// The first answer, given again, marked as a replay.
pub fn replay(answer: &StoredAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let body = Accepted {
        id: answer.stream_id,
        version: answer.appended.version,
        position: answer.appended.position,
    };
    let mut response = body.respond(status);
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

/// Adds `Location` to a 201.
pub fn with_location(mut response: Response, id: uuid::Uuid) -> Response {
    if response.status() == StatusCode::CREATED {
        if let Ok(location) = HeaderValue::from_str(&format!("/users/{id}")) {
            response.headers_mut().insert(header::LOCATION, location);
        }
    }
    response
}

impl Accepted {
    /// The answer with its `ETag`, the version a later `If-Match` names.
    pub fn respond(self, status: StatusCode) -> Response {
        let etag = format!("\"{}\"", self.version);
        let id = self.id;
        with_location(
            (status, [(header::ETAG, etag)], Json(self)).into_response(),
            id,
        )
    }
}
