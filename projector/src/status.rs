//! `projector status`: where the projection stands, from PostgreSQL (the
//! generation, the trusted Redis namespace, per-partition progress, parked
//! messages) and Kafka (the group's committed offsets and the partitions'
//! high watermarks, hence the lag). [`collect`] is also what the running
//! projector reads for its gauges.

mod kafka;

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use read_model::state;
use serde::Serialize;
use sqlx::PgPool;

use crate::config::Settings;
use kafka::KafkaQueryError;

/// The projection's state, as `projector status` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// The generation of `user_views` serving (raised by each rebuild).
    pub projection_version: i32,
    /// The trusted Redis namespace's epoch; None: readers skip Redis.
    pub cache_epoch: Option<i64>,
    pub redis_trusted: bool,
    /// Number of the last committed projection batch.
    pub batch_seq: i64,
    /// The last position in the log (what the projection is heading for).
    pub log_position: Option<i64>,
    /// The highest log position applied from any partition.
    pub last_applied_position: Option<i64>,
    pub kafka: KafkaStatus,
    /// Per partition, those of the configured topic and any with recorded progress.
    pub partitions: Vec<PartitionStatus>,
    /// Parked messages by reason.
    pub parked: BTreeMap<String, i64>,
    pub parked_total: i64,
}

/// Whether Kafka answered, and for which topic and group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KafkaStatus {
    pub topic: String,
    pub group_id: String,
    pub reachable: bool,
    /// What went wrong: Kafka did not answer (`reachable` false), or the topic is missing.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// Recorded in PostgreSQL by the batch that applied the partition's messages.
    pub next_offset: Option<i64>,
    pub last_position: Option<i64>,
    pub updated_at: Option<DateTime<Utc>>,
    /// The group's committed offset in Kafka (None: nothing committed yet).
    pub committed_offset: Option<i64>,
    pub high_watermark: Option<i64>,
    /// High watermark − committed offset (the low watermark when nothing is
    /// committed: the group starts from the earliest message).
    pub lag: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct PartitionRow {
    topic: String,
    partition: i32,
    next_offset: i64,
    last_position: i64,
    updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct ParkedCount {
    reason: String,
    count: i64,
}

/// Reads the status; fails only when PostgreSQL does (an unreachable Kafka
/// is reported inside).
pub async fn collect(pool: &PgPool, settings: &Settings) -> Result<Status, sqlx::Error> {
    let kafka = {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || kafka::partitions(&settings))
    };
    let state = state::load(pool).await?;
    let rows = partition_rows(pool).await?;
    let parked = parked_counts(pool).await?;
    let log_position = log_position(pool).await?;
    let (kafka, reachable) = match kafka.await {
        Ok(Ok(partitions)) => (Ok(partitions), true),
        Ok(Err(error)) => (
            Err(error.to_string()),
            matches!(error, KafkaQueryError::NoTopic(_)),
        ),
        Err(error) => (Err(format!("the Kafka query failed: {error}")), false),
    };

    let mut partitions: BTreeMap<(String, i32), PartitionStatus> = BTreeMap::new();
    let empty = |topic: &str, partition| PartitionStatus {
        topic: topic.to_owned(),
        partition,
        next_offset: None,
        last_position: None,
        updated_at: None,
        committed_offset: None,
        high_watermark: None,
        lag: None,
    };
    for row in &rows {
        let entry = partitions
            .entry((row.topic.clone(), row.partition))
            .or_insert_with(|| empty(&row.topic, row.partition));
        entry.next_offset = Some(row.next_offset);
        entry.last_position = Some(row.last_position);
        entry.updated_at = Some(row.updated_at);
    }
    if let Ok(found) = &kafka {
        for p in found {
            let entry = partitions
                .entry((settings.kafka_topic.clone(), p.partition))
                .or_insert_with(|| empty(&settings.kafka_topic, p.partition));
            entry.committed_offset = p.committed;
            entry.high_watermark = Some(p.high);
            entry.lag = Some((p.high - p.committed.unwrap_or(p.low)).max(0));
        }
    }
    Ok(Status {
        projection_version: state.projection_version,
        cache_epoch: state.cache_epoch,
        redis_trusted: state.cache_epoch.is_some(),
        batch_seq: state.batch_seq,
        log_position,
        last_applied_position: rows.iter().map(|r| r.last_position).max(),
        kafka: KafkaStatus {
            topic: settings.kafka_topic.clone(),
            group_id: settings.kafka_group_id.clone(),
            reachable,
            error: kafka.err(),
        },
        partitions: partitions.into_values().collect(),
        parked_total: parked.iter().map(|p| p.count).sum(),
        parked: parked.into_iter().map(|p| (p.reason, p.count)).collect(),
    })
}

#[tracing::instrument(name = "sql_partition_progress", skip_all)]
async fn partition_rows(pool: &PgPool) -> Result<Vec<PartitionRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT topic, partition, next_offset, last_position, updated_at \
         FROM projector_partitions ORDER BY topic, partition",
    )
    .fetch_all(pool)
    .await
}

#[tracing::instrument(name = "sql_count_parked", skip_all)]
async fn parked_counts(pool: &PgPool) -> Result<Vec<ParkedCount>, sqlx::Error> {
    sqlx::query_as(
        "SELECT reason, count(*) AS count FROM projector_parked GROUP BY reason ORDER BY reason",
    )
    .fetch_all(pool)
    .await
}

#[tracing::instrument(name = "sql_log_position", skip_all)]
async fn log_position(pool: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(global_position) FROM events_public")
        .fetch_one(pool)
        .await
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_dash = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        writeln!(f, "projection version     {}", self.projection_version)?;
        match self.cache_epoch {
            Some(epoch) => writeln!(
                f,
                "redis                  trusted (namespace p{}:e{epoch})",
                self.projection_version
            )?,
            None => writeln!(
                f,
                "redis                  not trusted (no namespace; readers use PostgreSQL)"
            )?,
        }
        writeln!(f, "batch seq              {}", self.batch_seq)?;
        writeln!(f, "log position           {}", or_dash(self.log_position))?;
        writeln!(
            f,
            "last applied position  {}",
            or_dash(self.last_applied_position)
        )?;
        match &self.kafka.error {
            None => writeln!(
                f,
                "kafka                  reachable (topic {}, group {})",
                self.kafka.topic, self.kafka.group_id
            )?,
            Some(error) if self.kafka.reachable => {
                writeln!(f, "kafka                  reachable, but {error}")?
            }
            Some(error) => writeln!(f, "kafka                  UNREACHABLE: {error}")?,
        }
        writeln!(
            f,
            "partitions:\n  {:<24} {:>9} {:>12} {:>14} {:<27} {:>10} {:>10} {:>8}",
            "topic",
            "partition",
            "next_offset",
            "last_position",
            "updated_at",
            "committed",
            "high",
            "lag"
        )?;
        for p in &self.partitions {
            writeln!(
                f,
                "  {:<24} {:>9} {:>12} {:>14} {:<27} {:>10} {:>10} {:>8}",
                p.topic,
                p.partition,
                or_dash(p.next_offset),
                or_dash(p.last_position),
                p.updated_at.map_or_else(
                    || "-".to_owned(),
                    |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ),
                or_dash(p.committed_offset),
                or_dash(p.high_watermark),
                or_dash(p.lag),
            )?;
        }
        if self.parked_total == 0 {
            write!(f, "parked messages        none")
        } else {
            let by_reason: Vec<String> = self
                .parked
                .iter()
                .map(|(reason, count)| format!("{reason} {count}"))
                .collect();
            write!(
                f,
                "parked messages        {} ({})",
                self.parked_total,
                by_reason.join(", ")
            )
        }
    }
}

/// How often the running projector publishes [`collect`]'s figures as gauges.
pub const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Sets the `/metrics` gauges from one [`Status`]: the same figures
/// `projector status` prints.
pub fn publish(status: &Status) {
    metrics::gauge!("projector_projection_version").set(f64::from(status.projection_version));
    metrics::gauge!("projector_batch_seq").set(status.batch_seq as f64);
    if let Some(position) = status.last_applied_position {
        metrics::gauge!("projector_last_applied_position").set(position as f64);
    }
    if let Some(position) = status.log_position {
        metrics::gauge!("projector_log_position").set(position as f64);
    }
    for reason in [
        "undecodable",
        "unknown_type",
        "not_in_log",
        "invalid_transition",
        "gap",
    ] {
        let count = status.parked.get(reason).copied().unwrap_or(0);
        metrics::gauge!("projector_parked_messages", "reason" => reason).set(count as f64);
    }
    for partition in &status.partitions {
        if let Some(lag) = partition.lag {
            metrics::gauge!("projector_partition_lag", "partition" => partition.partition.to_string())
                .set(lag as f64);
        }
    }
    metrics::gauge!("projector_kafka_reachable").set(if status.kafka.reachable {
        1.0
    } else {
        0.0
    });
}

/// Publishes the status every [`PUBLISH_EVERY`] until shutdown.
pub async fn publish_until_stopped(
    pool: PgPool,
    settings: Settings,
    mut shutdown: platform::shutdown::Shutdown,
) {
    loop {
        match collect(&pool, &settings).await {
            Ok(status) => publish(&status),
            Err(error) => tracing::warn!(
                error = %platform::telemetry::error_chain(&error),
                "cannot collect the projector status for /metrics"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(PUBLISH_EVERY) => {}
            () = shutdown.requested() => return,
        }
    }
}
