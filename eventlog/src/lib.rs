//! Reading the event log gap-safe: in (transaction id, position) order, and
//! only below `pg_snapshot_xmin(pg_current_snapshot())`.
//!
//! Positions come from an identity column, so a transaction that commits late
//! can hold a lower position than events already visible. Every transaction
//! whose id is below the snapshot's xmin has finished, so reading only those,
//! in transaction order, never skips an event that appears later with a lower
//! position. The relay reads the `events` table (it needs the full payload);
//! the read side reads `events_public`, which holds no secrets. Both go through
//! [`read_batch`].

use chrono::{DateTime, Utc};
use events::PublicRow;
use sqlx::PgConnection;
use uuid::Uuid;

/// Which relation to read: the same rows, with or without write-side secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `events`: the full payload (the relay, on the write side).
    Events,
    /// `events_public`: the payload without secrets (the read side).
    Public,
}

impl Source {
    /// The batch read. ORDER BY names the relation's columns: a bare
    /// `transaction_id` would mean the bigint output column and make
    /// PostgreSQL sort the whole backlog instead of walking
    /// `events_transaction_order_idx`.
    pub const fn sql(self) -> &'static str {
        match self {
            Self::Events => READ_EVENTS,
            Self::Public => READ_PUBLIC,
        }
    }
}

macro_rules! read_batch_sql {
    ($relation:literal) => {
        concat!(
            "SELECT transaction_id::text::bigint AS xid, global_position, stream_id, \
               stream_version, event_id, event_type, schema_version, payload, recorded_at \
             FROM ",
            $relation,
            " WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2) \
               AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY ",
            $relation,
            ".transaction_id, ",
            $relation,
            ".global_position LIMIT $3"
        )
    };
}

const READ_EVENTS: &str = read_batch_sql!("events");
const READ_PUBLIC: &str = read_batch_sql!("events_public");

/// A position in the log's read order: (transaction id, global position) of
/// the last event read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Checkpoint {
    pub transaction_id: i64,
    pub global_position: i64,
}

/// One row of the log as read, not yet decoded.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LogRow {
    pub xid: i64,
    pub global_position: i64,
    pub stream_id: Uuid,
    pub stream_version: i32,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i16,
    pub payload: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
}

impl LogRow {
    /// Where a reader stands after this row.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            transaction_id: self.xid,
            global_position: self.global_position,
        }
    }

    /// The row as the read side sees it (only meaningful for [`Source::Public`]).
    pub fn into_public(self) -> PublicRow {
        PublicRow {
            global_position: self.global_position,
            stream_id: self.stream_id,
            stream_version: self.stream_version,
            event_id: self.event_id,
            event_type: self.event_type,
            schema_version: self.schema_version,
            payload: self.payload,
            recorded_at: self.recorded_at,
        }
    }
}

/// The next `limit` events after `after` from finished transactions only:
/// nothing can still appear before the last row returned.
#[tracing::instrument(name = "sql_read_log_batch", skip(conn))]
pub async fn read_batch(
    conn: &mut PgConnection,
    source: Source,
    after: Checkpoint,
    limit: i64,
) -> Result<Vec<LogRow>, sqlx::Error> {
    sqlx::query_as(source.sql())
        .bind(after.transaction_id)
        .bind(after.global_position)
        .bind(limit)
        .fetch_all(conn)
        .await
}
