//! `GET /users/{id}/history`: a user's events for administrators, public
//! parts only (what the topic carries: never a hash, token or code), with
//! who acted, when and in answer to which request.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use events::IntegrationEvent;
use platform::http::ErrorBody;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::Admin;
use super::error::ApiError;
use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/users/{id}/history", get(history))
}

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 200;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Events per page, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// The `next_after` of the previous page: the last version it showed.
    #[param(minimum = 0, maximum = 2147483647)]
    pub after: Option<i32>,
}

/// One page of a user's history, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryPage {
    pub id: Uuid,
    pub events: Vec<HistoryEvent>,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<i32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HistoryEvent {
    /// The user's stream version after this event.
    pub version: i32,
    /// The global log position.
    pub position: i64,
    pub event_id: Uuid,
    /// The public type, as on the topic (`user.registered.v1`, …).
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub occurred_at: DateTime<Utc>,
    /// `anonymous`, `bootstrap` or the acting user's id.
    pub actor: String,
    /// The request id of the request that caused it.
    pub correlation_id: Option<String>,
    /// The event's public data, as on the topic.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// A user's events (administrators).
#[utoipa::path(get, path = "/users/{id}/history", tag = "users",
    params(("id" = Uuid, Path, description = "The user id"), HistoryQuery),
    security(("access_token" = ["admin"])),
    responses(
        (status = 200, description = "One page of events, oldest first", body = HistoryPage),
        (status = 400, description = "Invalid id (`invalid_id`) or query (`invalid_query`)", body = ErrorBody),
        (status = 401, description = "No bearer token (`unauthenticated`) or an invalid one (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "Not an active administrator's token (`forbidden`)", body = ErrorBody),
        (status = 404, description = "No such user (`user_not_found`)", body = ErrorBody),
        (status = 500, description = "An unexpected failure (`internal`)", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or the request timed out", body = ErrorBody),
    ))]
#[tracing::instrument(name = "user_history", skip_all, fields(user_id = %id))]
pub(crate) async fn history(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = platform::http::parse_uuid(&id).ok_or(ApiError::InvalidId)?;
    let Query(query) = query.map_err(|rejection| ApiError::InvalidQuery(rejection.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    let after = query.after.unwrap_or(0);
    if !(1..=MAX_LIMIT).contains(&limit) || after < 0 {
        return Err(ApiError::InvalidQuery(format!(
            "limit must be 1–{MAX_LIMIT} and after at least 0"
        )));
    }
    // One more than asked for tells whether another page follows.
    let mut entries = state.store.history(id, after, limit + 1).await?;
    if entries.is_empty() && after == 0 {
        return Err(ApiError::UserNotFound);
    }
    let more = entries.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    entries.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let events: Vec<HistoryEvent> = entries
        .into_iter()
        .map(|entry| {
            let public = IntegrationEvent::from_recorded(&entry.recorded);
            HistoryEvent {
                version: public.stream_version,
                position: public.global_position,
                event_id: public.event_id,
                event_type: public.ce_type(),
                occurred_at: public.occurred_at,
                actor: entry.metadata.actor,
                correlation_id: entry.metadata.correlation_id,
                data: public.data(),
            }
        })
        .collect();
    let next_after = more.then(|| events.last().map(|e| e.version)).flatten();
    Ok(Json(HistoryPage {
        id,
        events,
        next_after,
    })
    .into_response())
}
