//! `GET /users`: keyset pages of users, filtered by any of username and
//! email (exact, as normalised) and status; a look-up is a filtered page.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use events::{UserStatus, UserView};
use read_model::rows::Filter;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::http::{ApiError, AppState};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
/// Longest username or email a look-up accepts (the longest an email can be).
const MAX_IDENTIFIER_CHARS: usize = 254;

/// The query string of `GET /users`. Every filter given must match.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Exact username, matched after trimming and lower-casing.
    #[param(min_length = 1, max_length = 254)]
    username: Option<String>,
    /// Exact email, matched after trimming and lower-casing.
    #[param(min_length = 1, max_length = 254)]
    email: Option<String>,
    /// Only users in this status.
    #[param(inline)]
    status: Option<StatusParam>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// The `next` of the previous page (opaque).
    #[param(pattern = "^[0-9a-f]{32}$")]
    after: Option<String>,
    /// Wait (at most `READ_WAIT_MAX_MS`) until the projector has applied
    /// every event up to this position: the `position` a command answered.
    #[param(minimum = 1)]
    min_position: Option<i64>,
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum StatusParam {
    Active,
    Deactivated,
}

/// One page of users.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserPage {
    #[schema(value_type = Vec<crate::http::UserDocument>)]
    items: Vec<UserView>,
    /// Pass as `after` for the next page; null on the last page.
    #[schema(pattern = "^[0-9a-f]{32}$")]
    next: Option<String>,
}

/// `GET /users`: a page of users matching every filter given.
#[utoipa::path(get, path = "/users", tag = "users",
    params(ListParams),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A page of the users matching every filter, in id order (a username or email matches at most one)", body = UserPage),
        (status = 400, description = "A parameter is malformed, unknown or out of range (`invalid_query`, `invalid_cursor`)", body = platform::http::ErrorBody),
        (status = 404, description = "No event has `min_position` (`unknown_position`)", body = platform::http::ErrorBody),
        (status = 401, description = "`QUERY_API_TOKEN` is set and the bearer token is missing or wrong (`unauthenticated`)", body = platform::http::ErrorBody),
        (status = 409, description = "The projector did not reach `min_position` within `READ_WAIT_MAX_MS` (`not_caught_up`)", body = platform::http::ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait before retrying"))),
        (status = 503, description = "PostgreSQL unavailable or the request timed out (`unavailable`, `timeout`)", body = platform::http::ErrorBody),
    ))]
#[tracing::instrument(name = "list_users", skip_all)]
pub async fn list_users(
    State(state): State<Arc<AppState>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<UserPage>, ApiError> {
    let Query(params) =
        params.map_err(|rejection| ApiError::InvalidQuery(rejection.body_text()))?;
    for (name, value) in [("username", &params.username), ("email", &params.email)] {
        if value
            .as_ref()
            .is_some_and(|v| v.is_empty() || v.chars().count() > MAX_IDENTIFIER_CHARS)
        {
            return Err(ApiError::InvalidQuery(format!(
                "{name} has 1 to {MAX_IDENTIFIER_CHARS} characters"
            )));
        }
    }
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::InvalidQuery(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let after = match &params.after {
        Some(cursor) => decode_cursor(cursor).ok_or(ApiError::InvalidCursor)?,
        None => Uuid::nil(),
    };
    if let Some(position) = params.min_position {
        if position < 1 {
            return Err(ApiError::InvalidQuery("min_position is at least 1".into()));
        }
        let deadline = crate::consistency::deadline(state.read_wait);
        crate::consistency::await_position(state.rows.pool(), &state.gate, position, deadline)
            .await?;
    }
    let filter = Filter {
        username: params.username.as_deref().map(events::domain::normalise),
        email: params.email.as_deref().map(events::domain::normalise),
        status: params.status.map(|s| match s {
            StatusParam::Active => UserStatus::Active,
            StatusParam::Deactivated => UserStatus::Deactivated,
        }),
    };
    // PostgreSQL text cannot hold NUL, and no stored username or email has
    // one: such a filter matches nobody.
    let impossible = [&filter.username, &filter.email]
        .into_iter()
        .flatten()
        .any(|value| value.contains('\0'));
    if impossible {
        return Ok(Json(UserPage {
            items: Vec::new(),
            next: None,
        }));
    }
    // One more than asked tells whether another page follows.
    let mut items = state
        .rows
        .page(&filter, after, limit + 1)
        .await
        .map_err(ApiError::database)?;
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|last| encode_cursor(last.id))
    } else {
        None
    };
    Ok(Json(UserPage { items, next }))
}

/// Cursors are the last id of a page; clients treat them as opaque.
fn encode_cursor(id: Uuid) -> String {
    id.simple().to_string()
}

fn decode_cursor(cursor: &str) -> Option<Uuid> {
    let valid = cursor.len() == 32
        && cursor
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    valid.then(|| Uuid::try_parse(cursor).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_anything_else_is_refused() {
        let id = Uuid::new_v4();
        assert_eq!(decode_cursor(&encode_cursor(id)), Some(id));
        for bad in [
            "",
            "zz",
            &id.to_string(),
            &encode_cursor(id).to_uppercase(),
            &format!("{}0", encode_cursor(id)),
        ] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }
}
