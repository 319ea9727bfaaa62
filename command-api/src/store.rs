//! The PostgreSQL event store: reading a stream and appending to it.
//!
//! Conflicts are the database's to detect: the unique (stream_id,
//! stream_version) key makes two appends at the same version collide, and the
//! reservation table's unique keys make two registrations of one username or
//! email collide, inside the transaction that appends the event.

use events::domain::EventMetadata;
use events::UserEvent;
use sqlx::postgres::PgDatabaseError;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// Where an append landed: the consistency token returned to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub version: i32,
    pub position: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the username is taken")]
    UsernameTaken,
    #[error("the email is taken")]
    EmailTaken,
    #[error("another command appended to the stream first")]
    VersionConflict,
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("stored event {position} cannot be read")]
    Decode {
        position: i64,
        #[source]
        source: events::DecodeError,
    },
}

/// Maps a unique-constraint violation to the domain conflict it stands for.
fn on_constraint(error: sqlx::Error) -> AppendError {
    let constraint = error
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<PgDatabaseError>())
        .and_then(PgDatabaseError::constraint);
    match constraint {
        Some("user_identities_username_key") => AppendError::UsernameTaken,
        Some("user_identities_email_key") => AppendError::EmailTaken,
        Some("events_stream_version_key") => AppendError::VersionConflict,
        _ => AppendError::Database(error),
    }
}

#[derive(Clone)]
pub struct EventStore {
    pool: PgPool,
}

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The user's events, oldest first.
    #[tracing::instrument(name = "sql_load_stream", skip(self))]
    pub async fn load(&self, stream_id: Uuid) -> Result<Vec<UserEvent>, LoadError> {
        let rows: Vec<(i64, String, i16, serde_json::Value)> = sqlx::query_as(
            "SELECT global_position, event_type, schema_version, payload \
             FROM events WHERE stream_id = $1 ORDER BY stream_version",
        )
        .bind(stream_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(position, event_type, schema_version, payload)| {
                UserEvent::decode(&event_type, schema_version, payload)
                    .map_err(|source| LoadError::Decode { position, source })
            })
            .collect()
    }

    /// Reserves the username and email and appends UserRegistered, atomically.
    #[tracing::instrument(name = "sql_register", skip_all, fields(%user_id))]
    pub async fn register(
        &self,
        user_id: Uuid,
        username: &str,
        email: &str,
        events: &[UserEvent],
        metadata: &EventMetadata,
    ) -> Result<Appended, AppendError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO user_identities (user_id, username, email) VALUES ($1, $2, $3)")
            .bind(user_id)
            .bind(username)
            .bind(email)
            .execute(&mut *tx)
            .await
            .map_err(on_constraint)?;
        let appended = insert_events(&mut tx, user_id, 0, events, metadata).await?;
        tx.commit().await?;
        Ok(appended)
    }

    /// Appends `events` after `expected_version`; fails with
    /// [`AppendError::VersionConflict`] when someone else appended first.
    #[tracing::instrument(name = "sql_append", skip(self, events, metadata))]
    pub async fn append(
        &self,
        stream_id: Uuid,
        expected_version: i32,
        events: &[UserEvent],
        metadata: &EventMetadata,
    ) -> Result<Appended, AppendError> {
        let mut tx = self.pool.begin().await?;
        let appended =
            insert_events(&mut tx, stream_id, expected_version, events, metadata).await?;
        tx.commit().await?;
        Ok(appended)
    }
}

#[tracing::instrument(name = "sql_insert_events", skip_all, fields(count = events.len()))]
async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    stream_id: Uuid,
    expected_version: i32,
    events: &[UserEvent],
    metadata: &EventMetadata,
) -> Result<Appended, AppendError> {
    let metadata = serde_json::to_value(metadata).expect("metadata serialises to JSON");
    let mut appended = Appended {
        version: expected_version,
        position: 0,
    };
    for event in events {
        appended.version += 1;
        let schema_version = UserEvent::current_schema_version(event.event_type())
            .expect("every event type has a schema version");
        appended.position = sqlx::query_scalar(
            "INSERT INTO events \
               (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             RETURNING global_position",
        )
        .bind(stream_id)
        .bind(appended.version)
        .bind(Uuid::now_v7())
        .bind(event.event_type())
        .bind(schema_version)
        .bind(event.payload())
        .bind(&metadata)
        .fetch_one(&mut **tx)
        .await
        .map_err(on_constraint)?;
    }
    Ok(appended)
}
