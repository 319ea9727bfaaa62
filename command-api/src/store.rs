//! The PostgreSQL event store: reading a stream and appending to it.
//!
//! Conflicts are the database's to detect: the unique (stream_id,
//! stream_version) key makes two appends at the same version collide, and the
//! reservation table's unique keys make two registrations of one username or
//! email collide, inside the transaction that appends the event.

use events::domain::{EventMetadata, RecordedEvent};
use events::UserEvent;
use sqlx::postgres::PgDatabaseError;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::sessions::Revoke;

/// What an append does to the user's reserved email addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Emails {
    /// Nothing: most commands.
    #[default]
    Unchanged,
    /// A code went out: reserve `email` (a new address) until `until`, and
    /// release any other outstanding change's address. `None` when the code
    /// went to the current address.
    Reserve {
        email: Option<String>,
        until: chrono::DateTime<chrono::Utc>,
    },
    /// A change was confirmed: `email` becomes the current address, and the
    /// old one is released.
    Swap { email: String },
}

/// What an append changes besides the log, in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effects {
    pub revoke: Revoke,
    pub emails: Emails,
}

impl From<Revoke> for Effects {
    fn from(revoke: Revoke) -> Self {
        Self {
            revoke,
            emails: Emails::Unchanged,
        }
    }
}

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
    #[error("the idempotency key already answers another command")]
    IdempotencyKeyTaken,
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

/// An `Idempotency-Key` to record with the events it answers.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    /// Whose key it is: caller and route (see `http::idempotency::scope`).
    pub scope: String,
    pub key: String,
    pub fingerprint: String,
    /// The HTTP status the answer is given with.
    pub status: u16,
    pub ttl: std::time::Duration,
}

/// The first answer given under an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub fingerprint: String,
    pub status: u16,
    pub stream_id: Uuid,
    pub appended: Appended,
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
        Some("user_identities_email_key" | "email_reservations_pkey") => AppendError::EmailTaken,
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
        let rows: Vec<StreamRow> = sqlx::query_as(
            "SELECT global_position, event_type, schema_version, payload \
             FROM events WHERE stream_id = $1 ORDER BY stream_version",
        )
        .bind(stream_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                UserEvent::decode(&row.event_type, row.schema_version, row.payload).map_err(
                    |source| LoadError::Decode {
                        position: row.global_position,
                        source,
                    },
                )
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
        claim: Option<&IdempotencyClaim>,
    ) -> Result<Appended, AppendError> {
        let mut tx = self.pool.begin().await?;
        if let Some(claim) = claim {
            claim_key(&mut tx, claim, user_id).await?;
        }
        sqlx::query("INSERT INTO user_identities (user_id, username, email) VALUES ($1, $2, $3)")
            .bind(user_id)
            .bind(username)
            .bind(email)
            .execute(&mut *tx)
            .await
            .map_err(on_constraint)?;
        reserve_email(&mut tx, user_id, email, None).await?;
        let appended = insert_events(&mut tx, user_id, 0, events, metadata).await?;
        if let Some(claim) = claim {
            record_answer(&mut tx, claim, appended).await?;
        }
        tx.commit().await?;
        Ok(appended)
    }

    /// Appends `events` after `expected_version`; fails with
    /// [`AppendError::VersionConflict`] when someone else appended first.
    /// Sessions and email reservations change as `effects` says, in the
    /// same transaction.
    #[tracing::instrument(name = "sql_append", skip(self, events, metadata, claim, effects))]
    pub async fn append(
        &self,
        stream_id: Uuid,
        expected_version: i32,
        events: &[UserEvent],
        metadata: &EventMetadata,
        claim: Option<&IdempotencyClaim>,
        effects: impl Into<Effects>,
    ) -> Result<Appended, AppendError> {
        let Effects { revoke, emails } = effects.into();
        let mut tx = self.pool.begin().await?;
        if let Some(claim) = claim {
            claim_key(&mut tx, claim, stream_id).await?;
        }
        let appended =
            insert_events(&mut tx, stream_id, expected_version, events, metadata).await?;
        crate::sessions::revoke_in(&mut tx, stream_id, revoke).await?;
        change_emails(&mut tx, stream_id, &emails).await?;
        if let Some(claim) = claim {
            record_answer(&mut tx, claim, appended).await?;
        }
        tx.commit().await?;
        Ok(appended)
    }

    /// Which of `username` and `email` (normalised) are already reserved: a
    /// cheap look-up before any argon2 work. The reservation in the appending
    /// transaction stays the guarantee; this only spares the hash when the
    /// answer is already known.
    #[tracing::instrument(name = "sql_identity_taken", skip_all)]
    pub async fn identity_taken(&self, username: &str, email: &str) -> Result<Taken, sqlx::Error> {
        let row: TakenRow = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM user_identities WHERE username = $1) AS username, \
                    EXISTS (SELECT 1 FROM email_reservations WHERE email = $2 \
                            AND (expires_at IS NULL OR expires_at > now())) AS email",
        )
        .bind(username)
        .bind(email)
        .fetch_one(&self.pool)
        .await?;
        Ok(match row {
            TakenRow { username: true, .. } => Taken::Username,
            TakenRow { email: true, .. } => Taken::Email,
            _ => Taken::Neither,
        })
    }

    /// The user a sign-in names: by email when it has an `@` (usernames
    /// cannot), by username otherwise; `identifier` is normalised.
    #[tracing::instrument(name = "sql_find_user", skip_all)]
    pub async fn find_user(&self, identifier: &str) -> Result<Option<Uuid>, sqlx::Error> {
        // PostgreSQL text cannot hold NUL, and no registered name or address
        // contains one: such a sign-in name is unknown, not a server error.
        if identifier.contains('\0') {
            return Ok(None);
        }
        let sql = if identifier.contains('@') {
            "SELECT user_id FROM user_identities WHERE email = $1"
        } else {
            "SELECT user_id FROM user_identities WHERE username = $1"
        };
        sqlx::query_scalar(sql)
            .bind(identifier)
            .fetch_optional(&self.pool)
            .await
    }

    /// Up to `limit` events of a user after `after_version`, oldest first,
    /// with their metadata: the history an administrator reads.
    #[tracing::instrument(name = "sql_history_page", skip(self))]
    pub async fn history(
        &self,
        stream_id: Uuid,
        after_version: i32,
        limit: i64,
    ) -> Result<Vec<HistoryEntry>, LoadError> {
        let rows: Vec<HistoryRow> = sqlx::query_as(
            "SELECT global_position, stream_version, event_id, event_type, schema_version,                     payload, metadata, recorded_at              FROM events WHERE stream_id = $1 AND stream_version > $2              ORDER BY stream_version LIMIT $3",
        )
        .bind(stream_id)
        .bind(after_version)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let event = UserEvent::decode(&row.event_type, row.schema_version, row.payload)
                    .map_err(|source| LoadError::Decode {
                        position: row.global_position,
                        source,
                    })?;
                Ok(HistoryEntry {
                    recorded: RecordedEvent {
                        global_position: row.global_position,
                        stream_id,
                        stream_version: row.stream_version,
                        event_id: row.event_id,
                        recorded_at: row.recorded_at,
                        event,
                    },
                    // Metadata this build cannot read shows as unknown, not as an error.
                    metadata: serde_json::from_value(row.metadata).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The live (unexpired) answer recorded under `key` in `scope`, if any.
    #[tracing::instrument(name = "sql_stored_answer", skip_all)]
    pub async fn stored_answer(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<StoredAnswer>, sqlx::Error> {
        let row: Option<AnswerRow> = sqlx::query_as(
            "SELECT fingerprint, status, stream_id, version, position FROM idempotency_keys \
             WHERE scope = $1 AND key = $2 AND expires_at > now()",
        )
        .bind(scope)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| StoredAnswer {
            fingerprint: row.fingerprint,
            status: u16::try_from(row.status).unwrap_or_default(),
            stream_id: row.stream_id,
            appended: Appended {
                version: row.version,
                position: row.position,
            },
        }))
    }

    /// Deletes expired idempotency keys; returns how many.
    #[tracing::instrument(name = "sql_sweep_idempotency_keys", skip_all)]
    pub async fn sweep_idempotency_keys(&self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= now()")
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

/// One event of a stream as [`EventStore::load`] reads it.
#[derive(sqlx::FromRow)]
struct StreamRow {
    global_position: i64,
    event_type: String,
    schema_version: i16,
    payload: serde_json::Value,
}

/// One event of a user's history with who caused it.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub recorded: RecordedEvent,
    pub metadata: EventMetadata,
}

#[derive(sqlx::FromRow)]
struct HistoryRow {
    global_position: i64,
    stream_version: i32,
    event_id: Uuid,
    event_type: String,
    schema_version: i16,
    payload: serde_json::Value,
    metadata: serde_json::Value,
    recorded_at: chrono::DateTime<chrono::Utc>,
}

/// What [`EventStore::identity_taken`] found; the username is reported
/// first, as the reservation's insert would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    Neither,
    Username,
    Email,
}

#[derive(sqlx::FromRow)]
struct TakenRow {
    username: bool,
    email: bool,
}

/// A recorded answer as [`EventStore::stored_answer`] reads it.
#[derive(sqlx::FromRow)]
struct AnswerRow {
    fingerprint: String,
    status: i16,
    stream_id: Uuid,
    version: i32,
    position: i64,
}

/// Claims `key` first in the transaction: a concurrent request with the same
/// key waits here for the first to finish, then sees the key taken, instead of
/// racing it into a misleading conflict further on. An expired key is reused.
#[tracing::instrument(name = "sql_claim_idempotency_key", skip_all)]
async fn claim_key(
    tx: &mut Transaction<'_, Postgres>,
    claim: &IdempotencyClaim,
    stream_id: Uuid,
) -> Result<(), AppendError> {
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys \
           (scope, key, fingerprint, status, stream_id, version, position, expires_at) \
         VALUES ($1, $2, $3, $4, $5, 0, 0, now() + make_interval(secs => $6)) \
         ON CONFLICT (scope, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, \
           status = EXCLUDED.status, stream_id = EXCLUDED.stream_id, version = 0, position = 0, \
           created_at = now(), expires_at = EXCLUDED.expires_at \
         WHERE idempotency_keys.expires_at <= now()",
    )
    .bind(&claim.scope)
    .bind(&claim.key)
    .bind(&claim.fingerprint)
    .bind(i16::try_from(claim.status).unwrap_or(i16::MAX))
    .bind(stream_id)
    .bind(claim.ttl.as_secs_f64())
    .execute(&mut **tx)
    .await?;
    if claimed.rows_affected() == 1 {
        Ok(())
    } else {
        Err(AppendError::IdempotencyKeyTaken)
    }
}

#[tracing::instrument(name = "sql_record_idempotent_answer", skip_all)]
async fn record_answer(
    tx: &mut Transaction<'_, Postgres>,
    claim: &IdempotencyClaim,
    appended: Appended,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE idempotency_keys SET version = $3, position = $4 WHERE scope = $1 AND key = $2",
    )
    .bind(&claim.scope)
    .bind(&claim.key)
    .bind(appended.version)
    .bind(appended.position)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Reserves `email` for `user_id`: for good (`until` None, a current
/// address) or until a change's code runs out. An address held by another
/// user is taken, unless only by a change whose code has run out.
#[tracing::instrument(name = "sql_reserve_email", skip_all, fields(%user_id))]
async fn reserve_email(
    tx: &mut Transaction<'_, Postgres>,
    user_id: Uuid,
    email: &str,
    until: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<(), AppendError> {
    let held: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO email_reservations (email, user_id, expires_at) VALUES ($1, $2, $3) \
         ON CONFLICT (email) DO UPDATE SET user_id = EXCLUDED.user_id, \
             expires_at = CASE WHEN email_reservations.user_id = EXCLUDED.user_id \
                                    AND email_reservations.expires_at IS NULL \
                               THEN NULL ELSE EXCLUDED.expires_at END \
         WHERE email_reservations.user_id = EXCLUDED.user_id \
            OR email_reservations.expires_at <= now() \
         RETURNING user_id",
    )
    .bind(email)
    .bind(user_id)
    .bind(until)
    .fetch_optional(&mut **tx)
    .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(AppendError::EmailTaken),
    }
}

/// Applies [`Emails`] in the appending transaction.
#[tracing::instrument(name = "sql_change_emails", skip(tx))]
async fn change_emails(
    tx: &mut Transaction<'_, Postgres>,
    user_id: Uuid,
    emails: &Emails,
) -> Result<(), AppendError> {
    match emails {
        Emails::Unchanged => Ok(()),
        Emails::Reserve { email, until } => {
            // Only one change is outstanding at a time: release the others.
            sqlx::query(
                "DELETE FROM email_reservations \
                 WHERE user_id = $1 AND expires_at IS NOT NULL AND email IS DISTINCT FROM $2",
            )
            .bind(user_id)
            .bind(email.as_deref())
            .execute(&mut **tx)
            .await?;
            match email {
                Some(email) => reserve_email(tx, user_id, email, Some(*until)).await,
                None => Ok(()),
            }
        }
        Emails::Swap { email } => {
            let kept = sqlx::query(
                "UPDATE email_reservations SET expires_at = NULL WHERE email = $1 AND user_id = $2",
            )
            .bind(email)
            .bind(user_id)
            .execute(&mut **tx)
            .await?;
            if kept.rows_affected() != 1 {
                // Taken by someone else after this change's reservation ran out.
                return Err(AppendError::EmailTaken);
            }
            sqlx::query("DELETE FROM email_reservations WHERE user_id = $1 AND email <> $2")
                .bind(user_id)
                .bind(email)
                .execute(&mut **tx)
                .await?;
            sqlx::query("UPDATE user_identities SET email = $1 WHERE user_id = $2")
                .bind(email)
                .bind(user_id)
                .execute(&mut **tx)
                .await
                .map_err(on_constraint)?;
            Ok(())
        }
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
