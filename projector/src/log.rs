//! The projector's reads of the log (through `events_public`, which holds no
//! secrets) and its per-partition progress.

use std::collections::{BTreeMap, HashMap};

use eventlog::LogRow;
use events::IntegrationEvent;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::message::Message;

#[derive(sqlx::FromRow)]
struct Located {
    event_id: Uuid,
    stream_id: Uuid,
    stream_version: i32,
}

/// Where each of `ids` is in the log: (user, version), for those that are.
#[tracing::instrument(name = "sql_locate_events", skip_all, fields(events = ids.len()))]
pub async fn locate(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, (Uuid, i32)>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<Located> = sqlx::query_as(
        "SELECT event_id, stream_id, stream_version FROM events_public WHERE event_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.event_id, (r.stream_id, r.stream_version)))
        .collect())
}

/// For each (user, after, upto): that user's events with versions in
/// (after, upto], by user and version. Every version up to `upto` has
/// committed: a user's version n+1 is appended only after n committed, and
/// version `upto` was found in the log in this transaction.
#[tracing::instrument(name = "sql_read_user_ranges", skip_all, fields(users = ranges.len()))]
pub async fn read_ranges(
    tx: &mut PgConnection,
    ranges: &[(Uuid, i32, i32)],
) -> Result<Vec<LogRow>, sqlx::Error> {
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    let users: Vec<Uuid> = ranges.iter().map(|r| r.0).collect();
    let after: Vec<i32> = ranges.iter().map(|r| r.1).collect();
    let upto: Vec<i32> = ranges.iter().map(|r| r.2).collect();
    sqlx::query_as(
        "SELECT e.transaction_id::text::bigint AS xid, e.global_position, e.stream_id, e.stream_version, e.event_id, e.event_type, \
                e.schema_version, e.payload, e.recorded_at \
         FROM UNNEST($1::uuid[], $2::int[], $3::int[]) AS w(user_id, after_version, upto_version) \
         JOIN events_public e ON e.stream_id = w.user_id \
          AND e.stream_version > w.after_version AND e.stream_version <= w.upto_version \
         ORDER BY e.stream_id, e.stream_version",
    )
    .bind(&users)
    .bind(&after)
    .bind(&upto)
    .fetch_all(tx)
    .await
}

/// Records, per partition, the next offset and the highest log position of
/// the batch, in the batch's transaction.
#[tracing::instrument(name = "sql_record_partition_progress", skip_all)]
pub async fn record_progress(
    tx: &mut PgConnection,
    messages: &[Message],
    events: &[(usize, IntegrationEvent)],
) -> Result<(), sqlx::Error> {
    let mut progress: BTreeMap<(&str, i32), (i64, i64)> = BTreeMap::new();
    for message in messages {
        let entry = progress
            .entry((message.topic.as_str(), message.partition))
            .or_insert((0, 0));
        entry.0 = entry.0.max(message.offset + 1);
    }
    for (index, event) in events {
        let message = &messages[*index];
        if let Some(entry) = progress.get_mut(&(message.topic.as_str(), message.partition)) {
            entry.1 = entry.1.max(event.global_position);
        }
    }
    let mut topics = Vec::with_capacity(progress.len());
    let mut partitions = Vec::with_capacity(progress.len());
    let mut next_offsets = Vec::with_capacity(progress.len());
    let mut positions = Vec::with_capacity(progress.len());
    for ((topic, partition), (next_offset, position)) in progress {
        topics.push(topic);
        partitions.push(partition);
        next_offsets.push(next_offset);
        positions.push(position);
    }
    // One statement for every partition the batch touched.
    sqlx::query(
        "INSERT INTO projector_partitions (topic, partition, next_offset, last_position, updated_at) \
         SELECT t, p, o, l, now() FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::bigint[]) AS u(t, p, o, l) \
         ON CONFLICT (topic, partition) DO UPDATE SET \
           next_offset = GREATEST(projector_partitions.next_offset, EXCLUDED.next_offset), \
           last_position = GREATEST(projector_partitions.last_position, EXCLUDED.last_position), \
           updated_at = now()",
    )
    .bind(&topics)
    .bind(&partitions)
    .bind(&next_offsets)
    .bind(&positions)
    .execute(tx)
    .await?;
    Ok(())
}
