//! The projector's reads of the log (through `events_public`, which holds no
//! secrets) and its per-partition progress.

use std::collections::{BTreeMap, HashMap};

use eventlog::LogRow;
use events::IntegrationEvent;
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::message::Message;

/// The log's rows of `ids` that are in the log, by event id.
#[tracing::instrument(name = "sql_locate_events", skip_all, fields(events = ids.len()))]
pub async fn locate(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, LogRow>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<LogRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM events_public e WHERE e.event_id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.event_id, r)).collect())
}

/// The columns of a [`LogRow`] from `events_public e`.
const COLUMNS: &str = "e.transaction_id::text::bigint AS xid, e.global_position, e.stream_id, \
    e.stream_version, e.event_id, e.event_type, e.schema_version, e.payload, e.recorded_at";

/// Splits `ranges` (user, after, upto) into the rows `located` holds for
/// the ranges it covers whole, and the ranges it does not (a gap), which
/// must be read with [`read_ranges`].
pub fn covered(
    ranges: &[(Uuid, i32, i32)],
    located: HashMap<Uuid, LogRow>,
) -> (Vec<LogRow>, Vec<(Uuid, i32, i32)>) {
    let mut by_version: HashMap<(Uuid, i32), LogRow> = located
        .into_values()
        .map(|row| ((row.stream_id, row.stream_version), row))
        .collect();
    let mut rows = Vec::new();
    let mut gaps = Vec::new();
    for &(user, after, upto) in ranges {
        if ((after + 1)..=upto).all(|version| by_version.contains_key(&(user, version))) {
            rows.extend(((after + 1)..=upto).filter_map(|v| by_version.remove(&(user, v))));
        } else {
            gaps.push((user, after, upto));
        }
    }
    (rows, gaps)
}

/// For each (user, after, upto): that user's events with versions in
/// (after, upto], by user and version. Every version up to `upto` has
/// committed: a user's version n+1 is appended only after n committed, and
/// version `upto` was found in the log before.
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
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} \
         FROM UNNEST($1::uuid[], $2::int[], $3::int[]) AS w(user_id, after_version, upto_version) \
         JOIN events_public e ON e.stream_id = w.user_id \
          AND e.stream_version > w.after_version AND e.stream_version <= w.upto_version \
         ORDER BY e.stream_id, e.stream_version",
    ))
    .bind(&users)
    .bind(&after)
    .bind(&upto)
    .fetch_all(tx)
    .await
}

/// Appends, for the batch's one write statement, the statement that
/// records per partition the next offset and the highest log position of
/// the batch (one statement for every partition the batch touched).
pub fn push_progress<'a>(
    query: &mut QueryBuilder<'a, Postgres>,
    messages: &'a [Message],
    events: &[(usize, IntegrationEvent)],
) {
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
    query
        .push(
            "INSERT INTO projector_partitions (topic, partition, next_offset, last_position, updated_at) \
             SELECT t, p, o, l, now() FROM UNNEST(",
        )
        .push_bind(topics)
        .push("::text[], ")
        .push_bind(partitions)
        .push("::int[], ")
        .push_bind(next_offsets)
        .push("::bigint[], ")
        .push_bind(positions)
        .push(
            "::bigint[]) AS u(t, p, o, l) \
             ON CONFLICT (topic, partition) DO UPDATE SET \
               next_offset = GREATEST(projector_partitions.next_offset, EXCLUDED.next_offset), \
               last_position = GREATEST(projector_partitions.last_position, EXCLUDED.last_position), \
               updated_at = now()",
        );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: Uuid, version: i32) -> LogRow {
        LogRow {
            xid: 1,
            global_position: i64::from(version),
            stream_id: user,
            stream_version: version,
            event_id: Uuid::new_v4(),
            event_type: "user.reactivated".into(),
            schema_version: 1,
            payload: serde_json::json!({}),
            recorded_at: chrono::Utc::now(),
        }
    }

    fn located(rows: Vec<LogRow>) -> HashMap<Uuid, LogRow> {
        rows.into_iter().map(|r| (r.event_id, r)).collect()
    }

    fn versions(rows: &[LogRow]) -> Vec<(Uuid, i32)> {
        rows.iter()
            .map(|r| (r.stream_id, r.stream_version))
            .collect()
    }

    #[test]
    fn a_range_the_located_rows_cover_whole_needs_no_read() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let found = located(vec![row(a, 3), row(a, 4), row(b, 1), row(a, 2)]);
        let (rows, gaps) = covered(&[(a, 2, 4), (b, 0, 1)], found);
        assert!(gaps.is_empty());
        assert_eq!(versions(&rows), [(a, 3), (a, 4), (b, 1)]);
    }

    #[test]
    fn a_range_with_a_version_the_batch_lacks_is_read_whole() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        // a: view at 1, the batch has 2 and 4 (3 missing); b: view at 2, batch has 4 only.
        let found = located(vec![row(a, 2), row(a, 4), row(b, 4)]);
        let (rows, gaps) = covered(&[(a, 1, 4), (b, 2, 4)], found);
        assert!(rows.is_empty(), "{:?}", versions(&rows));
        assert_eq!(gaps, [(a, 1, 4), (b, 2, 4)]);
    }

    #[test]
    fn rows_outside_every_range_are_left_out() {
        let a = Uuid::new_v4();
        // Versions 1 and 2 are in the view already (a redelivery).
        let found = located(vec![row(a, 1), row(a, 2), row(a, 3)]);
        let (rows, gaps) = covered(&[(a, 2, 3)], found);
        assert!(gaps.is_empty());
        assert_eq!(versions(&rows), [(a, 3)]);
    }
}
