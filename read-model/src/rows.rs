//! The `user_views` table: the durable copy of the read model.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use events::{Profile, UserStatus, UserView};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

/// The table's columns, in one place for every SELECT, INSERT and COPY.
/// The profile is flattened into its own columns (`display_name` …
/// `preferences`), so an operator can query them like the other fields.
pub const COLUMNS: &str = "id, username, email, status, version, registered_at, updated_at, \
    roles, locked_until, email_verified, display_name, locale, time_zone, preferences";

/// One row of `user_views`, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ViewRow {
    pub id: Uuid,
    pub username: String,
    pub email: String,
    pub status: String,
    pub version: i32,
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub roles: Vec<String>,
    pub locked_until: Option<DateTime<Utc>>,
    pub email_verified: bool,
    pub display_name: Option<String>,
    pub locale: Option<String>,
    pub time_zone: Option<String>,
    pub preferences: Json<BTreeMap<String, serde_json::Value>>,
}

impl TryFrom<ViewRow> for UserView {
    type Error = sqlx::Error;

    fn try_from(row: ViewRow) -> Result<Self, Self::Error> {
        let status = UserStatus::parse(&row.status).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown status {:?}", row.status).into())
        })?;
        Ok(UserView {
            id: row.id,
            username: row.username,
            email: row.email,
            status,
            version: row.version,
            registered_at: row.registered_at,
            updated_at: row.updated_at,
            roles: row.roles,
            locked_until: row.locked_until,
            email_verified: row.email_verified,
            profile: Profile {
                display_name: row.display_name,
                locale: row.locale,
                time_zone: row.time_zone,
                preferences: row.preferences.0,
            },
        })
    }
}

fn into_views(rows: Vec<ViewRow>) -> Result<Vec<UserView>, sqlx::Error> {
    rows.into_iter().map(UserView::try_from).collect()
}

#[derive(Clone)]
pub struct ViewRows {
    pool: PgPool,
}

impl ViewRows {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One user's view, if the projector has built it.
    #[tracing::instrument(name = "sql_load_view", skip(self))]
    pub async fn load(&self, id: Uuid) -> Result<Option<UserView>, sqlx::Error> {
        let row: Option<ViewRow> =
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM user_views WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(UserView::try_from).transpose()
    }

    /// The views of those of `ids` the projector has built, in one statement.
    #[tracing::instrument(name = "sql_load_views_by_id", skip_all, fields(users = ids.len()))]
    pub async fn load_each(&self, ids: &[Uuid]) -> Result<Vec<UserView>, sqlx::Error> {
        if let [id] = ids {
            return Ok(self.load(*id).await?.into_iter().collect());
        }
        let rows: Vec<ViewRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM user_views WHERE id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        into_views(rows)
    }

    /// Writes `view` only if the stored row is exactly one version behind (or
    /// absent for version 1). Returns false when another writer got there
    /// first. Used by tests that seed a view without the projector.
    #[tracing::instrument(name = "sql_store_next_view", skip_all, fields(id = %view.id, version = view.version))]
    pub async fn store_next(&self, view: &UserView) -> Result<bool, sqlx::Error> {
        let result = sqlx::query(&format!(
            "INSERT INTO user_views ({COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (id) DO UPDATE SET {UPDATE_ALL} \
             WHERE user_views.version = EXCLUDED.version - 1"
        ))
        .bind(view.id)
        .bind(&view.username)
        .bind(&view.email)
        .bind(view.status.as_str())
        .bind(view.version)
        .bind(view.registered_at)
        .bind(view.updated_at)
        .bind(&view.roles)
        .bind(view.locked_until)
        .bind(view.email_verified)
        .bind(&view.profile.display_name)
        .bind(&view.profile.locale)
        .bind(&view.profile.time_zone)
        .bind(Json(&view.profile.preferences))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }
}

/// What `GET /users` filters on; every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Normalised username (exact).
    pub username: Option<String>,
    /// Normalised email (exact).
    pub email: Option<String>,
    pub status: Option<UserStatus>,
}

impl ViewRows {
    /// Up to `limit` views matching `filter` after the id `after`, in id
    /// order: a keyset page. Ids never change, so a page boundary stays put
    /// while users are added or change status: no user is shown twice, and
    /// none that kept matching is skipped. A username or email narrows the
    /// walk to its index; a status alone walks `user_views_status_id_idx`;
    /// no filter walks the primary key.
    #[tracing::instrument(name = "sql_page_views", skip(self))]
    pub async fn page(
        &self,
        filter: &Filter,
        after: Uuid,
        limit: i64,
    ) -> Result<Vec<UserView>, sqlx::Error> {
        let mut query =
            sqlx::QueryBuilder::new(format!("SELECT {COLUMNS} FROM user_views WHERE id > "));
        query.push_bind(after);
        if let Some(username) = &filter.username {
            query.push(" AND username = ").push_bind(username);
        }
        if let Some(email) = &filter.email {
            query.push(" AND email = ").push_bind(email);
        }
        if let Some(status) = filter.status {
            query.push(" AND status = ").push_bind(status.as_str());
        }
        query.push(" ORDER BY id LIMIT ").push_bind(limit);
        let rows: Vec<ViewRow> = query.build_query_as().fetch_all(&self.pool).await?;
        into_views(rows)
    }
}

/// What an upsert sets from `EXCLUDED`: every column but the key.
const UPDATE_ALL: &str = "username = EXCLUDED.username, email = EXCLUDED.email, \
    status = EXCLUDED.status, version = EXCLUDED.version, \
    registered_at = EXCLUDED.registered_at, updated_at = EXCLUDED.updated_at, \
    roles = EXCLUDED.roles, locked_until = EXCLUDED.locked_until, \
    email_verified = EXCLUDED.email_verified, display_name = EXCLUDED.display_name, \
    locale = EXCLUDED.locale, time_zone = EXCLUDED.time_zone, \
    preferences = EXCLUDED.preferences";

/// Writes `views` into `table` (`user_views` or a generation being built,
/// named by the caller, never by input) in one statement, each unless the
/// table already has that user at the same or a newer version.
#[tracing::instrument(name = "sql_upsert_into", skip_all, fields(table = %table, views = views.len()))]
pub async fn upsert_into(
    conn: &mut PgConnection,
    table: &str,
    views: &[&UserView],
) -> Result<u64, sqlx::Error> {
    if views.is_empty() {
        return Ok(0);
    }
    let mut query = QueryBuilder::new("");
    push_upsert(&mut query, table, views);
    Ok(query.build().execute(conn).await?.rows_affected())
}

/// Appends the statement of [`upsert_into`] to `query`, so that a caller can
/// make it part of a larger one. `views` must not be empty.
///
/// The views travel as one array per column through UNNEST. UNNEST flattens
/// a two-dimensional array, and PostgreSQL has no array of arrays, so each
/// view's roles travel as one array literal ([`roles_literal`]) and are cast
/// back to `text[]` per row. Preferences travel as a `jsonb[]`, one object
/// per view (jsonb is a scalar to UNNEST, so no flattening happens).
pub fn push_upsert<'a>(
    query: &mut QueryBuilder<'a, Postgres>,
    table: &str,
    views: &[&'a UserView],
) {
    let mut ids = Vec::with_capacity(views.len());
    let mut usernames = Vec::with_capacity(views.len());
    let mut emails = Vec::with_capacity(views.len());
    let mut statuses = Vec::with_capacity(views.len());
    let mut versions = Vec::with_capacity(views.len());
    let mut registered = Vec::with_capacity(views.len());
    let mut updated = Vec::with_capacity(views.len());
    let mut roles = Vec::with_capacity(views.len());
    let mut locked_until = Vec::with_capacity(views.len());
    let mut email_verified = Vec::with_capacity(views.len());
    let mut display_names = Vec::with_capacity(views.len());
    let mut locales = Vec::with_capacity(views.len());
    let mut time_zones = Vec::with_capacity(views.len());
    let mut preferences = Vec::with_capacity(views.len());
    for view in views {
        ids.push(view.id);
        usernames.push(view.username.as_str());
        emails.push(view.email.as_str());
        statuses.push(view.status.as_str());
        versions.push(view.version);
        registered.push(view.registered_at);
        updated.push(view.updated_at);
        roles.push(roles_literal(&view.roles));
        locked_until.push(view.locked_until);
        email_verified.push(view.email_verified);
        display_names.push(view.profile.display_name.as_deref());
        locales.push(view.profile.locale.as_deref());
        time_zones.push(view.profile.time_zone.as_deref());
        preferences.push(Json(&view.profile.preferences));
    }
    query
        .push(format_args!(
            "INSERT INTO {table} ({COLUMNS}) \
             SELECT v.id, v.username, v.email, v.status, v.version, v.registered_at, v.updated_at, \
                    v.roles::text[], v.locked_until, v.email_verified, v.display_name, v.locale, \
                    v.time_zone, v.preferences \
             FROM UNNEST("
        ))
        .push_bind(ids)
        .push("::uuid[], ")
        .push_bind(usernames)
        .push("::text[], ")
        .push_bind(emails)
        .push("::text[], ")
        .push_bind(statuses)
        .push("::text[], ")
        .push_bind(versions)
        .push("::int[], ")
        .push_bind(registered)
        .push("::timestamptz[], ")
        .push_bind(updated)
        .push("::timestamptz[], ")
        .push_bind(roles)
        .push("::text[], ")
        .push_bind(locked_until)
        .push("::timestamptz[], ")
        .push_bind(email_verified)
        .push("::boolean[], ")
        .push_bind(display_names)
        .push("::text[], ")
        .push_bind(locales)
        .push("::text[], ")
        .push_bind(time_zones)
        .push("::text[], ")
        .push_bind(preferences)
        .push(format_args!(
            "::jsonb[]) \
             AS v(id, username, email, status, version, registered_at, updated_at, \
                  roles, locked_until, email_verified, display_name, locale, time_zone, \
                  preferences) \
             ON CONFLICT (id) DO UPDATE SET {UPDATE_ALL} \
             WHERE {table}.version < EXCLUDED.version"
        ));
}

/// `roles` as a PostgreSQL array literal (`{"admin","support"}`), the input
/// form of `text[]`: what the upserts cast per row and COPY reads. Every
/// element is quoted, with `"` and `\` escaped, so no role name can be read
/// as a delimiter, a nested array or NULL, whatever it holds (names are
/// validated by the command API, but the read model must not depend on it).
pub fn roles_literal(roles: &[String]) -> String {
    let mut out = String::with_capacity(2 + roles.iter().map(|r| r.len() + 3).sum::<usize>());
    out.push('{');
    for (i, role) in roles.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in role.chars() {
            if matches!(c, '"' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_literals_quote_every_element() {
        assert_eq!(roles_literal(&[]), "{}");
        assert_eq!(
            roles_literal(&["admin".into(), "support".into()]),
            r#"{"admin","support"}"#
        );
        assert_eq!(
            roles_literal(&[r#"a"b\c"#.into(), "NULL".into(), "{x,y}".into()]),
            r#"{"a\"b\\c","NULL","{x,y}"}"#
        );
    }
}
