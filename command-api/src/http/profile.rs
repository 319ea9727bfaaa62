//! `PATCH /users/{id}/profile`: the user themself, or an administrator,
//! changes the profile with JSON merge patch semantics (`domain/profile.rs`).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::patch;
use axum::Router;
use platform::http::ErrorBody;

use super::auth::{self_or_admin, Principal};
use super::commands::{run_decision, CommandRequest, Decided};
use super::error::ApiError;
use super::idempotency;
use super::json::JsonBody;
use super::AppState;
use crate::domain::profile::{self, ProfileError};
use crate::sessions::Revoke;

pub fn router() -> Router<AppState> {
    Router::new().route("/users/{id}/profile", patch(change))
}

const ROUTE: &str = "PATCH /users/{id}/profile";

/// A JSON merge patch (RFC 7396) of the profile: a member sets its field,
/// `null` clears it, a member left out keeps it. `preferences` is merged key
/// by key the same way. Unknown members are refused. (`preferences` and
/// `time_zone` are spelled out exactly in `openapi::document`.)
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // The document's shape; the handler reads the members itself.
pub struct ProfilePatch {
    /// 1–100 characters, not only white space, no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    display_name: Option<String>,
    /// A BCP 47 language tag: `en`, `pt-BR`, `zh-Hant-TW`.
    #[schema(max_length = 35, pattern = "^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,4}$")]
    locale: Option<String>,
    /// A name of the IANA time zone database.
    time_zone: Option<String>,
    /// Scalars under keys of `^[a-z][a-z0-9_.-]{0,63}$`: a string of at
    /// most 256 characters, a number or a boolean; `null` removes the key.
    /// At most 32 keys, in the patch and after merging.
    #[schema(value_type = Option<Object>)]
    preferences: Option<BTreeMap<String, serde_json::Value>>,
}

/// Changes the profile: appends ProfileChanged with the whole profile after
/// the patch. The user themself (scope `user`) or an administrator.
#[utoipa::path(patch, path = "/users/{id}/profile", tag = "users",
    request_body(content = ProfilePatch, content_type = "application/merge-patch+json",
        description = "Also accepted as application/json"),
    params(
        ("id" = Uuid, Path, description = "The user id: the token's own user, or any user for an administrator"),
        ("If-Match" = Option<String>, Header, nullable = false, example = "\"1\"", description = "RFC 9110: `*` or entity tags of the user's current version, otherwise 412"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, description = "Retries with the same key and body get the first answer; 1–255 visible ASCII characters", pattern = "^[!-~]{1,255}$"),
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with the events"),
    ),
    security(("access_token" = ["user"]), ("access_token" = ["admin"])),
    responses(
        (status = 200, description = "ProfileChanged appended", body = super::commands::Accepted, headers(("ETag" = String, description = "The quoted version"))),
        (status = 400, description = "Invalid id (`invalid_id`), malformed JSON (`malformed_json`) or an invalid header (`invalid_header`)", body = ErrorBody),
        (status = 401, description = "No bearer token (`unauthenticated`) or an invalid one (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "Another user's profile without the admin scope (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 409, description = "`user_deactivated`, `too_many_preferences` (more than 32 after merging) or `concurrent_modification`", body = ErrorBody),
        (status = 412, description = "If-Match names another version (`precondition_failed`)", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB (`payload_too_large`)", body = ErrorBody),
        (status = 415, description = "Body not sent as JSON (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Invalid or unknown members (`validation_failed`, with `fields`), or an Idempotency-Key used for another patch (`idempotency_key_reused`)", body = ErrorBody),
        (status = 500, description = "An unexpected failure (`internal`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the request timed out", body = ErrorBody),
    ))]
#[tracing::instrument(name = "change_profile", skip_all, fields(user_id = %id))]
pub(crate) async fn change(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<serde_json::Map<String, serde_json::Value>>,
) -> Result<Response, ApiError> {
    let id = platform::http::parse_uuid(&id).ok_or(ApiError::InvalidId)?;
    let actor = self_or_admin(principal, id, &state).await?;
    let patch = profile::parse(&body).map_err(|fields| ApiError::Invalid {
        message: "some fields are invalid".into(),
        fields,
    })?;
    let canonical = serde_json::Value::Object(body).to_string();
    let request = CommandRequest {
        id,
        headers: &headers,
        route: ROUTE,
        fingerprint: idempotency::fingerprint(&[ROUTE, &id.to_string(), &canonical]),
        actor: &actor,
        revoke: Revoke::Nothing,
    };
    run_decision(&state, request, |user, _now| {
        match profile::change(user, &patch) {
            Ok(events) => Ok(Decided::accept(events)),
            Err(ProfileError::Domain(e)) => Err(e.into()),
            Err(ProfileError::TooManyPreferences) => Err(ApiError::TooManyPreferences),
        }
    })
    .await
}
