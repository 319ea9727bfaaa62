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

use super::error::ApiError;
use super::users::Accepted;
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

/// What a handler passes to the store to record its answer.
pub fn claim(
    key: Option<String>,
    fingerprint: String,
    status: StatusCode,
    ttl: std::time::Duration,
) -> Option<IdempotencyClaim> {
    key.map(|key| IdempotencyClaim {
        key,
        fingerprint,
        status: status.as_u16(),
        ttl,
    })
}

/// The live answer under `key`, checked against this request's fingerprint.
pub async fn lookup(
    store: &EventStore,
    key: &str,
    fingerprint: &str,
) -> Result<Option<StoredAnswer>, ApiError> {
    let answer = store.stored_answer(key).await?;
    match answer {
        Some(answer) if answer.fingerprint != fingerprint => Err(ApiError::IdempotencyKeyReused),
        other => Ok(other),
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
