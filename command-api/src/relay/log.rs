//! The relay's SQL: reading the log gap-safe, the checkpoint, the lag.

use chrono::{DateTime, Utc};
use events::domain::RecordedEvent;
use events::UserEvent;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::RelayError;

/// The relay's position in the log: the last event Kafka acknowledged, as
/// (transaction id, global position), the order the log is read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub transaction_id: i64,
    pub global_position: i64,
}

/// How far Kafka is behind the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Events committed to the log but not yet acknowledged by Kafka.
    pub events: i64,
    /// Age of the oldest of them; 0 when there are none.
    pub seconds: f64,
}

/// The relay's read. ORDER BY names the table's columns: a bare
/// `transaction_id` would mean the bigint output column and make PostgreSQL
/// sort the whole backlog instead of walking `events_transaction_order_idx`.
pub const READ_BATCH: &str = "SELECT transaction_id::text::bigint AS xid, global_position, \
        stream_id, stream_version, event_id, event_type, schema_version, payload, recorded_at \
     FROM events \
     WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2) \
       AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
     ORDER BY events.transaction_id, events.global_position \
     LIMIT $3";

type Row = (
    i64,
    i64,
    Uuid,
    i32,
    Uuid,
    String,
    i16,
    serde_json::Value,
    DateTime<Utc>,
);

/// The next events after `after`, from finished transactions only: every
/// transaction below `pg_snapshot_xmin` has committed or aborted, so nothing
/// can still appear before the last event returned.
#[tracing::instrument(name = "sql_read_batch", skip(conn))]
pub async fn read_batch(
    conn: &mut PgConnection,
    after: Checkpoint,
    limit: i64,
) -> Result<Vec<(i64, RecordedEvent)>, RelayError> {
    let rows: Vec<Row> = sqlx::query_as(READ_BATCH)
        .bind(after.transaction_id)
        .bind(after.global_position)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.into_iter()
        .map(
            |(xid, position, stream_id, version, event_id, event_type, schema, payload, at)| {
                let event = UserEvent::decode(&event_type, schema, payload)
                    .map_err(|source| RelayError::Decode { position, source })?;
                Ok((
                    xid,
                    RecordedEvent {
                        global_position: position,
                        stream_id,
                        stream_version: version,
                        event_id,
                        recorded_at: at,
                        event,
                    },
                ))
            },
        )
        .collect()
}

#[tracing::instrument(name = "sql_load_checkpoint", skip(conn))]
pub async fn load_checkpoint(
    conn: &mut PgConnection,
    relay: &str,
) -> Result<Checkpoint, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM relay_checkpoints WHERE relay = $1",
    )
    .bind(relay)
    .fetch_optional(conn)
    .await?;
    Ok(
        row.map_or(Checkpoint::default(), |(xid, position)| Checkpoint {
            transaction_id: xid,
            global_position: position,
        }),
    )
}

#[tracing::instrument(name = "sql_save_checkpoint", skip(conn))]
pub async fn save_checkpoint(
    conn: &mut PgConnection,
    relay: &str,
    checkpoint: Checkpoint,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO relay_checkpoints (relay, transaction_id, global_position, updated_at) \
         VALUES ($1, $2::bigint::text::xid8, $3, now()) \
         ON CONFLICT (relay) DO UPDATE SET transaction_id = EXCLUDED.transaction_id, \
           global_position = EXCLUDED.global_position, updated_at = now()",
    )
    .bind(relay)
    .bind(checkpoint.transaction_id)
    .bind(checkpoint.global_position)
    .execute(conn)
    .await?;
    Ok(())
}

/// Events after the checkpoint of `relay`, and the age of the oldest.
#[tracing::instrument(name = "sql_relay_lag", skip(pool))]
pub async fn lag(pool: &PgPool, relay: &str) -> Result<Lag, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let checkpoint = load_checkpoint(&mut conn, relay).await?;
    let (events, seconds): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(recorded_at))::float8 FROM events \
         WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2)",
    )
    .bind(checkpoint.transaction_id)
    .bind(checkpoint.global_position)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Lag {
        events,
        seconds: seconds.unwrap_or(0.0).max(0.0),
    })
}
