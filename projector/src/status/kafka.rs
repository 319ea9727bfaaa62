//! Kafka's side of `projector status`: the group's committed offsets and the
//! partitions' watermarks.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::Settings;

/// How long each Kafka request may take; an unreachable Kafka costs this once.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(3);

/// What Kafka says about one partition.
pub(super) struct KafkaPartition {
    pub partition: i32,
    pub committed: Option<i64>,
    pub low: i64,
    pub high: i64,
}

/// Why Kafka's side of the status is missing.
#[derive(Debug, thiserror::Error)]
pub(super) enum KafkaQueryError {
    // The client's message names the failure and its code; its source only repeats them.
    #[error("{0}")]
    Kafka(KafkaError),
    #[error("topic {0:?} does not exist")]
    NoTopic(String),
}

/// The group's committed offsets and the watermarks of every partition of
/// the topic. Blocking: run it off the async workers. A consumer that does
/// not subscribe never joins the group, so this cannot disturb the live one.
pub(super) fn partitions(settings: &Settings) -> Result<Vec<KafkaPartition>, KafkaQueryError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka_brokers)
        .set("group.id", &settings.kafka_group_id)
        .set("client.id", "userstream-projector-status")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(KafkaQueryError::Kafka)?;
    let topic = settings.kafka_topic.as_str();
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(KafkaQueryError::Kafka)?;
    let ids: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if ids.is_empty() {
        return Err(KafkaQueryError::NoTopic(topic.to_owned()));
    }
    let mut wanted = TopicPartitionList::new();
    for id in &ids {
        wanted.add_partition(topic, *id);
    }
    let committed = consumer
        .committed_offsets(wanted, KAFKA_TIMEOUT)
        .map_err(KafkaQueryError::Kafka)?;
    let mut partitions = Vec::with_capacity(ids.len());
    for id in ids {
        let (low, high) = consumer
            .fetch_watermarks(topic, id, KAFKA_TIMEOUT)
            .map_err(KafkaQueryError::Kafka)?;
        let committed = match committed.find_partition(topic, id).map(|p| p.offset()) {
            Some(Offset::Offset(offset)) => Some(offset),
            _ => None,
        };
        partitions.push(KafkaPartition {
            partition: id,
            committed,
            low,
            high,
        });
    }
    Ok(partitions)
}
