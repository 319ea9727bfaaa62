//! The consumer loop: take what Kafka has ready as one batch, apply it in one
//! transaction, then store the offsets ([`platform::consumer`]).
//!
//! Offsets are stored only after the batch's transaction committed, so a crash
//! re-delivers rather than loses; the version check makes the re-delivery
//! harmless. A message that cannot be applied is parked by the batch and never
//! holds the partition. Only a failure of PostgreSQL itself stops progress:
//! then the partitions are paused and the batch retried with backoff while
//! the consumer keeps polling, so it stays in its group however long the
//! outage lasts.

use platform::consumer::BatchConsumer;
use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

use crate::batch::{Mode, Outcome, ReadModel};
use crate::config::Settings;

/// Most messages applied in one transaction.
pub const MAX_BATCH: usize = 1_000;

/// What one [`Worker::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A batch was applied and its offsets stored.
    Applied(Outcome),
    /// Shutdown was requested before the batch was applied.
    Stopped,
}

pub struct Worker {
    kafka: BatchConsumer,
    model: ReadModel,
}

pub fn consumer_config(settings: &Settings) -> ClientConfig {
    let mut config = platform::consumer::config(
        &settings.kafka_brokers,
        &settings.kafka_group_id,
        "userstream-projector",
        settings.kafka_session_timeout_ms,
    );
    config.set(
        "max.poll.interval.ms",
        settings.kafka_max_poll_interval_ms.to_string(),
    );
    config
}

impl Worker {
    pub fn new(settings: &Settings, model: ReadModel) -> Result<Self, KafkaError> {
        let kafka = BatchConsumer::subscribe(
            &consumer_config(settings),
            &settings.kafka_topic,
            "projector_consume_errors_total",
        )?;
        Ok(Self { kafka, model })
    }

    pub fn consumer(&self) -> &StreamConsumer {
        self.kafka.consumer()
    }

    /// Consumes until shutdown, then commits the stored offsets.
    pub async fn run_until_stopped(mut self, shutdown: Shutdown) {
        tracing::info!("projector consuming");
        let mut shutdown = shutdown;
        while !shutdown.is_requested() {
            if self.step(&mut shutdown).await == Step::Stopped {
                break;
            }
        }
        // The last batch's views reach Redis before the process ends.
        self.model.flush_cache().await;
        self.kafka.commit();
        tracing::info!("projector stopped");
    }

    /// Takes the next batch and applies it, retrying while PostgreSQL fails.
    #[tracing::instrument(name = "projector_step", skip_all)]
    pub async fn step(&mut self, shutdown: &mut Shutdown) -> Step {
        let Some(batch) = self.kafka.next_batch(MAX_BATCH, shutdown).await else {
            return Step::Stopped;
        };
        fail::fail_point!("projector::consume");
        let model = &self.model;
        let applied = self
            .kafka
            .until_committed(
                &batch,
                shutdown,
                || model.apply_batch(&batch, Mode::Consume),
                |error, backoff| {
                    metrics::counter!("projector_apply_errors_total", "kind" => "database")
                        .increment(1);
                    tracing::error!(error = %error_chain(error), messages = batch.len(), retry_in_ms = backoff.as_millis() as u64, "cannot apply a batch; partitions paused, retrying");
                },
            )
            .await;
        match applied {
            Some(outcome) => {
                record(&outcome, batch.len());
                Step::Applied(outcome)
            }
            None => Step::Stopped,
        }
    }
}

fn record(outcome: &Outcome, messages: usize) {
    let parked = outcome.parked.len();
    let applied_messages = messages.saturating_sub(outcome.duplicates + parked);
    metrics::counter!("projector_messages_total", "outcome" => "applied")
        .increment(applied_messages as u64);
    metrics::counter!("projector_messages_total", "outcome" => "duplicate")
        .increment(outcome.duplicates as u64);
    metrics::counter!("projector_messages_total", "outcome" => "parked").increment(parked as u64);
    metrics::counter!("projector_events_applied_total").increment(outcome.applied as u64);
    metrics::counter!("projector_events_healed_total").increment(outcome.healed as u64);
    metrics::histogram!("projector_batch_messages").record(messages as f64);
}
