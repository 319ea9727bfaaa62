//! The relay's SQL: reading the log gap-safe, the checkpoint, the lag.

use events::domain::RecordedEvent;
use events::UserEvent;
use sqlx::{PgConnection, PgPool};

use super::RelayError;

pub use eventlog::Checkpoint;

/// How far Kafka is behind the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Events committed to the log after the checkpoint: exact up to
    /// [`LAG_COUNT_CAP`]; beyond it an estimate (`estimated`).
    pub events: i64,
    /// True when `events` is the estimate: the newest position minus the
    /// checkpoint's (positions of rolled-back transactions count too).
    pub estimated: bool,
    /// Age of the next event to publish (the first after the checkpoint in
    /// read order); 0 when there is none.
    pub seconds: f64,
}

/// The lag is counted exactly up to this many events and estimated beyond,
/// so measuring it every few seconds costs at most this many index entries
/// however large the backlog (a whole-backlog `count(*)` would grow with it).
pub const LAG_COUNT_CAP: i64 = 10_000;

/// The relay's read: the shared gap-safe reader over the full `events` table.
pub const READ_BATCH: &str = eventlog::Source::Events.sql();

/// The next events after `after`, from finished transactions only (see
/// [`eventlog::read_batch`]), decoded with their secrets: the relay drops them
/// when it builds the public message.
pub async fn read_batch(
    conn: &mut PgConnection,
    after: Checkpoint,
    limit: i64,
) -> Result<Vec<(i64, RecordedEvent)>, RelayError> {
    let rows = eventlog::read_batch(conn, eventlog::Source::Events, after, limit).await?;
    rows.into_iter()
        .map(|row| {
            let position = row.global_position;
            let event = UserEvent::decode(&row.event_type, row.schema_version, row.payload)
                .map_err(|source| RelayError::Decode { position, source })?;
            Ok((
                row.xid,
                RecordedEvent {
                    global_position: position,
                    stream_id: row.stream_id,
                    stream_version: row.stream_version,
                    event_id: row.event_id,
                    recorded_at: row.recorded_at,
                    event,
                },
            ))
        })
        .collect()
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    transaction_id: i64,
    global_position: i64,
}

#[derive(sqlx::FromRow)]
struct LagRow {
    counted: i64,
    seconds: Option<f64>,
    newest: Option<i64>,
}

#[tracing::instrument(name = "sql_load_checkpoint", skip(conn))]
pub async fn load_checkpoint(
    conn: &mut PgConnection,
    relay: &str,
) -> Result<Checkpoint, sqlx::Error> {
    let row: Option<CheckpointRow> = sqlx::query_as(
        "SELECT transaction_id::text::bigint AS transaction_id, global_position \
         FROM relay_checkpoints WHERE relay = $1",
    )
    .bind(relay)
    .fetch_optional(conn)
    .await?;
    Ok(row.map_or(Checkpoint::default(), |row| Checkpoint {
        transaction_id: row.transaction_id,
        global_position: row.global_position,
    }))
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

/// Events after the checkpoint of `relay` (capped count, then estimate), and
/// the age of the next one. Each part walks `events_transaction_order_idx`
/// or the primary key from one end, never the whole backlog.
#[tracing::instrument(name = "sql_relay_lag", skip(pool))]
pub async fn lag(pool: &PgPool, relay: &str) -> Result<Lag, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let checkpoint = load_checkpoint(&mut conn, relay).await?;
    let row: LagRow = sqlx::query_as(
        "SELECT \
           (SELECT count(*) FROM (SELECT 1 FROM events \
              WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2) \
              LIMIT $3) AS capped) AS counted, \
           (SELECT EXTRACT(EPOCH FROM now() - recorded_at)::float8 FROM events \
              WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2) \
              ORDER BY events.transaction_id, events.global_position LIMIT 1) AS seconds, \
           (SELECT max(global_position) FROM events) AS newest",
    )
    .bind(checkpoint.transaction_id)
    .bind(checkpoint.global_position)
    .bind(LAG_COUNT_CAP)
    .fetch_one(&mut *conn)
    .await?;
    let estimated = row.counted >= LAG_COUNT_CAP;
    let events = if estimated {
        let spread = row.newest.unwrap_or(0) - checkpoint.global_position;
        spread.max(LAG_COUNT_CAP)
    } else {
        row.counted
    };
    Ok(Lag {
        events,
        estimated,
        seconds: row.seconds.unwrap_or(0.0).max(0.0),
    })
}
