//! JSON body extraction that answers in the API's error shape:
//! 415 when the body is not declared as JSON, 413 when it is too large,
//! 400 when it is not JSON, 422 when it has the wrong fields or types.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// The largest body any command accepts.
pub const BODY_LIMIT: usize = 16 * 1024;

/// A required JSON body.
pub struct JsonBody<T>(pub T);

/// A JSON body that may be left out entirely: an empty body, or the JSON
/// `null`, means `None`.
pub struct OptionalJsonBody<T>(pub Option<T>);

fn declared_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit: BODY_LIMIT }
        } else {
            ApiError::MalformedJson(rejection.body_text())
        }
    })
}

/// serde reads a struct from a JSON array too (its fields in order), so an
/// array is refused here: every body the API documents is an object.
fn refuse_array(bytes: &[u8]) -> Result<(), ApiError> {
    if bytes.trim_ascii_start().first() != Some(&b'[') {
        return Ok(());
    }
    // Malformed JSON stays a 400.
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|error| ApiError::MalformedJson(error.to_string()))?;
    Err(ApiError::Invalid {
        message: "the body must be a JSON object".into(),
        fields: BTreeMap::from([("body".to_owned(), "must be a JSON object".to_owned())]),
    })
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    refuse_array(bytes)?;
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let field = if path == "." { "body".to_owned() } else { path };
                let message = inner.to_string();
                ApiError::Invalid {
                    message: format!("the body does not match the expected shape: {message}"),
                    fields: BTreeMap::from([(field, message)]),
                }
            }
            _ => ApiError::MalformedJson(inner.to_string()),
        }
    })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !declared_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = read_body(req, state).await?;
        parse(&bytes).map(Self)
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = declared_json(req.headers());
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        parse::<Option<T>>(&bytes).map(Self)
    }
}
