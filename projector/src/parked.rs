//! Messages the projector could not apply: kept with their reason in
//! `projector_parked`, counted, reported, and retried on demand
//! (`projector retry`) once the cause is fixed.

use std::collections::BTreeMap;

use events::IntegrationEvent;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::batch::{Mode, ReadModel};
use crate::message::Message;

/// Why a message was parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// Not a message this projector can read.
    Undecodable,
    /// A `ce_type` (or a logged event type) this build does not know.
    UnknownType,
    /// Its event id is not in the log where the message says.
    NotInLog,
    /// The log's event cannot follow the view (a projection bug or a newer rule).
    InvalidTransition,
    /// Versions are missing that the log cannot supply.
    Gap,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::UnknownType => "unknown_type",
            Self::NotInLog => "not_in_log",
            Self::InvalidTransition => "invalid_transition",
            Self::Gap => "gap",
        }
    }
}

/// A message of a batch to park.
#[derive(Debug, Clone)]
pub struct Park {
    /// Index into the batch.
    pub index: usize,
    pub user_id: Option<Uuid>,
    pub stream_version: Option<i32>,
    pub reason: Reason,
    pub detail: String,
}

impl Park {
    pub fn new(
        index: usize,
        event: Option<&IntegrationEvent>,
        reason: Reason,
        detail: String,
    ) -> Self {
        Self {
            index,
            user_id: event.map(|e| e.user_id),
            stream_version: event.map(|e| e.stream_version),
            reason,
            detail,
        }
    }
}

/// Parks messages in the batch's transaction. A message parked again (a
/// redelivery, a retry that still fails) counts one more attempt.
#[tracing::instrument(name = "sql_park_messages", skip_all, fields(parked = parks.len()))]
pub async fn insert(
    tx: &mut PgConnection,
    messages: &[Message],
    parks: &[Park],
) -> Result<(), sqlx::Error> {
    for park in parks {
        let m = &messages[park.index];
        sqlx::query(
            "INSERT INTO projector_parked (topic, partition, kafka_offset, message_key, ce_id, \
               ce_type, body, user_id, stream_version, reason, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (topic, partition, kafka_offset) DO UPDATE SET \
               reason = EXCLUDED.reason, detail = EXCLUDED.detail, \
               attempts = projector_parked.attempts + 1, last_attempt = now()",
        )
        .bind(&m.topic)
        .bind(m.partition)
        .bind(m.offset)
        .bind(&m.key)
        .bind(&m.ce_id)
        .bind(&m.ce_type)
        .bind(&m.body)
        .bind(park.user_id)
        .bind(park.stream_version)
        .bind(park.reason.as_str())
        .bind(&park.detail)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

#[derive(sqlx::FromRow)]
struct ReasonCount {
    reason: String,
    count: i64,
}

/// Parked messages by reason.
#[tracing::instrument(name = "sql_count_parked", skip_all)]
pub async fn count_by_reason(pool: &PgPool) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows: Vec<ReasonCount> =
        sqlx::query_as("SELECT reason, count(*) AS count FROM projector_parked GROUP BY reason")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|r| (r.reason, r.count)).collect())
}

#[derive(sqlx::FromRow)]
struct ParkedRow {
    id: i64,
    topic: String,
    partition: i32,
    kafka_offset: i64,
    message_key: Option<String>,
    ce_id: Option<String>,
    ce_type: Option<String>,
    body: Vec<u8>,
}

/// What `projector retry` did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Retried {
    /// Messages that now applied (or were already in the view) and left the table.
    pub resolved: usize,
    /// Messages that still cannot be applied; their attempt count went up.
    pub still_parked: usize,
}

/// Runs every parked message (or only `ids`) through the projection again,
/// in their original order; those that now apply are removed.
#[tracing::instrument(name = "retry_parked", skip(model))]
pub async fn retry(model: &ReadModel, ids: Option<&[i64]>) -> Result<Retried, sqlx::Error> {
    let rows: Vec<ParkedRow> = sqlx::query_as(
        "SELECT id, topic, partition, kafka_offset, message_key, ce_id, ce_type, body \
         FROM projector_parked WHERE $1::bigint[] IS NULL OR id = ANY($1) \
         ORDER BY topic, partition, kafka_offset",
    )
    .bind(ids)
    .fetch_all(model.rows.pool())
    .await?;
    let mut retried = Retried::default();
    for chunk in rows.chunks(500) {
        let messages: Vec<Message> = chunk
            .iter()
            .map(|r| Message {
                topic: r.topic.clone(),
                partition: r.partition,
                offset: r.kafka_offset,
                key: r.message_key.clone(),
                ce_id: r.ce_id.clone(),
                ce_type: r.ce_type.clone(),
                body: r.body.clone(),
            })
            .collect();
        let outcome = model.apply_batch(&messages, Mode::Retry).await?;
        let still: Vec<usize> = outcome.parked.iter().map(|(i, _)| *i).collect();
        let resolved: Vec<i64> = chunk
            .iter()
            .enumerate()
            .filter(|(i, _)| !still.contains(i))
            .map(|(_, r)| r.id)
            .collect();
        sqlx::query("DELETE FROM projector_parked WHERE id = ANY($1)")
            .bind(&resolved)
            .execute(model.rows.pool())
            .await?;
        retried.resolved += resolved.len();
        retried.still_parked += still.len();
    }
    Ok(retried)
}
