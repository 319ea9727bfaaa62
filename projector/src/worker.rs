//! The consumer loop: read a message, apply it, then mark it consumed.
//!
//! Offsets are stored only after the event's effect is in PostgreSQL, so a
//! crash re-delivers rather than loses; the version guard makes the re-delivery
//! harmless. An event that cannot be applied (a gap, a database outage) is
//! retried with backoff and the partition waits: skipping it would silently
//! corrupt the view.

use std::time::Duration;

use events::IntegrationEvent;
use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientConfig, Message};

use crate::apply::{Applied, ApplyError, ReadModel};
use crate::config::Settings;

/// What one [`Worker::step`] did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    /// Not an event this projector understands; logged and counted.
    Undecodable,
}

pub struct Worker {
    consumer: StreamConsumer,
    model: ReadModel,
}

pub fn consumer_config(settings: &Settings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.kafka_brokers)
        .set("group.id", &settings.kafka_group_id)
        .set("client.id", "userstream-projector")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        // Offsets are stored by hand, after the effect is durable.
        .set("enable.auto.offset.store", "false");
    config
}

impl Worker {
    pub fn new(settings: &Settings, model: ReadModel) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer = consumer_config(settings).create()?;
        consumer.subscribe(&[&settings.kafka_topic])?;
        Ok(Self { consumer, model })
    }

    /// Consumes until shutdown, then commits the stored offsets.
    pub async fn run_until_stopped(self, mut shutdown: Shutdown) {
        tracing::info!("projector consuming");
        while !shutdown.is_requested() {
            let mut retry_stop = shutdown.clone();
            tokio::select! {
                () = self.step(&mut retry_stop) => {}
                () = shutdown.requested() => {}
            }
        }
        if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored yet is the usual cause; the next start re-reads.
            tracing::debug!(error = %error_chain(&error), "final offset commit");
        }
        tracing::info!("projector stopped");
    }

    /// Takes the next message and handles it, retrying until it is applied.
    async fn step(&self, shutdown: &mut Shutdown) {
        let message = match self.consumer.recv().await {
            Ok(message) => message,
            Err(error) => {
                metrics::counter!("projector_consume_errors_total").increment(1);
                tracing::warn!(error = %error_chain(&error), "kafka consume error");
                tokio::time::sleep(Duration::from_millis(500)).await;
                return;
            }
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.handle(&message).await {
                Ok(outcome) => {
                    metrics::counter!("projector_messages_total", "outcome" => format!("{outcome:?}").to_lowercase()).increment(1);
                    if let Err(error) = self.consumer.store_offset_from_message(&message) {
                        tracing::warn!(error = %error_chain(&error), "could not store the offset (partition revoked?)");
                    }
                    return;
                }
                Err(error) => {
                    let kind = match error {
                        ApplyError::Gap { .. } => "gap",
                        ApplyError::Invalid { .. } => "invalid",
                        ApplyError::Database(_) => "database",
                    };
                    metrics::counter!("projector_apply_errors_total", "kind" => kind).increment(1);
                    tracing::error!(error = %error_chain(&error), partition = message.partition(), offset = message.offset(), retry_in_ms = backoff.as_millis() as u64, "cannot apply event; the partition waits");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.requested() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    #[tracing::instrument(name = "project_message", skip_all, fields(partition = message.partition(), offset = message.offset()))]
    async fn handle(&self, message: &BorrowedMessage<'_>) -> Result<Outcome, ApplyError> {
        let event = match decode(message) {
            Ok(event) => event,
            Err(reason) => {
                tracing::error!(%reason, "skipping a message that is not a user event");
                return Ok(Outcome::Undecodable);
            }
        };
        Ok(match self.model.apply(&event).await? {
            Applied::Applied => {
                metrics::gauge!("projector_last_position").set(event.global_position as f64);
                Outcome::Applied
            }
            Applied::Duplicate => Outcome::Duplicate,
        })
    }
}

fn decode(message: &BorrowedMessage<'_>) -> Result<IntegrationEvent, String> {
    let header = |name: &str| -> Option<String> {
        message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
    };
    let id = header("ce_id").ok_or("no ce_id header")?;
    let ce_type = header("ce_type").ok_or("no ce_type header")?;
    let body = message.payload().ok_or("no body")?;
    IntegrationEvent::decode(&id, &ce_type, body).map_err(|e| error_chain(&e))
}
