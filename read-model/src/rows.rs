//! The `user_views` table.

use chrono::{DateTime, Utc};
use events::{UserStatus, UserView};
use sqlx::PgPool;
use uuid::Uuid;

type Row = (
    Uuid,
    String,
    String,
    String,
    i32,
    DateTime<Utc>,
    DateTime<Utc>,
);

fn to_view(row: Row) -> Result<UserView, sqlx::Error> {
    let (id, username, email, status, version, registered_at, updated_at) = row;
    let status = UserStatus::parse(&status)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown status {status:?}").into()))?;
    Ok(UserView {
        id,
        username,
        email,
        status,
        version,
        registered_at,
        updated_at,
    })
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
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, username, email, status, version, registered_at, updated_at \
             FROM user_views WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(to_view).transpose()
    }

    /// Writes `view` only if the stored row is exactly one version behind (or
    /// absent for version 1). Returns false when another writer got there
    /// first, so the caller re-reads and decides again.
    #[tracing::instrument(name = "sql_store_next_view", skip_all, fields(id = %view.id, version = view.version))]
    pub async fn store_next(&self, view: &UserView) -> Result<bool, sqlx::Error> {
        let result = sqlx::query(
            "INSERT INTO user_views (id, username, email, status, version, registered_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (id) DO UPDATE SET \
               username = EXCLUDED.username, email = EXCLUDED.email, status = EXCLUDED.status, \
               version = EXCLUDED.version, registered_at = EXCLUDED.registered_at, \
               updated_at = EXCLUDED.updated_at \
             WHERE user_views.version = EXCLUDED.version - 1",
        )
        .bind(view.id)
        .bind(&view.username)
        .bind(&view.email)
        .bind(view.status.as_str())
        .bind(view.version)
        .bind(view.registered_at)
        .bind(view.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }
}
