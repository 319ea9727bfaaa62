//! The consumer loop: take what Kafka has ready as one batch, apply it in one
//! transaction, then store the offsets.
//!
//! Offsets are stored only after the batch's transaction committed, so a crash
//! re-delivers rather than loses; the version check makes the re-delivery
//! harmless. A message that cannot be applied is parked by the batch and never
//! holds the partition. Only a failure of PostgreSQL itself stops progress:
//! then the partitions are paused and the batch retried with backoff while
//! the consumer keeps polling, so it stays in its group however long the
//! outage lasts.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures::FutureExt;
use platform::shutdown::Shutdown;
use platform::tasks::DropAwayOnPanic;
use platform::telemetry::error_chain;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

use crate::batch::{Mode, Outcome, ReadModel};
use crate::config::Settings;
use crate::message::Message;

/// Most messages applied in one transaction.
pub const MAX_BATCH: usize = 1_000;
/// Longest wait between retries of a batch while PostgreSQL fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What one [`Worker::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A batch was applied and its offsets stored.
    Applied(Outcome),
    /// Shutdown was requested before the batch was applied.
    Stopped,
}

pub struct Worker {
    /// Closed away from the runtime's threads if a panic drops it (see
    /// [`DropAwayOnPanic`]), so the panic is reported and the process exits.
    consumer: DropAwayOnPanic<StreamConsumer>,
    model: ReadModel,
    /// Messages received while a failing batch waited, in arrival order.
    holdback: VecDeque<Message>,
}

pub fn consumer_config(settings: &Settings) -> ClientConfig {
    // Security and tuning from KAFKA_CONFIG_* / KAFKA_SASL_* / KAFKA_SSL_*
    // first (see platform::kafka); the settings below win over them.
    let mut config = platform::kafka::client_config_from_env();
    config
        .set("bootstrap.servers", &settings.kafka_brokers)
        .set("group.id", &settings.kafka_group_id)
        .set("client.id", "userstream-projector")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            settings.kafka_session_timeout_ms.to_string(),
        )
        .set(
            "max.poll.interval.ms",
            settings.kafka_max_poll_interval_ms.to_string(),
        )
        .set("enable.auto.commit", "true")
        // Offsets are stored by hand, after the batch's transaction committed.
        .set("enable.auto.offset.store", "false");
    config
}

impl Worker {
    pub fn new(settings: &Settings, model: ReadModel) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer = consumer_config(settings).create()?;
        consumer.subscribe(&[&settings.kafka_topic])?;
        Ok(Self {
            consumer: DropAwayOnPanic::new(consumer),
            model,
            holdback: VecDeque::new(),
        })
    }

    pub fn consumer(&self) -> &StreamConsumer {
        &self.consumer
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
        if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored yet is the usual cause; the next start re-reads.
            tracing::debug!(error = %error_chain(&error), "final offset commit");
        }
        tracing::info!("projector stopped");
    }

    /// Takes the next batch and applies it, retrying while PostgreSQL fails.
    #[tracing::instrument(name = "projector_step", skip_all)]
    pub async fn step(&mut self, shutdown: &mut Shutdown) -> Step {
        let Some(batch) = self.next_batch(shutdown).await else {
            return Step::Stopped;
        };
        fail::fail_point!("projector::consume");
        let mut backoff = Duration::from_millis(100);
        let mut paused = None;
        loop {
            match self.model.apply_batch(&batch, Mode::Consume).await {
                Ok(outcome) => {
                    if let Some(partitions) = paused.take() {
                        if let Err(error) = self.consumer.resume(&partitions) {
                            tracing::warn!(error = %error_chain(&error), "could not resume partitions");
                        }
                    }
                    self.store_offsets(&batch);
                    record(&outcome, batch.len());
                    return Step::Applied(outcome);
                }
                Err(error) => {
                    metrics::counter!("projector_apply_errors_total", "kind" => "database")
                        .increment(1);
                    tracing::error!(error = %error_chain(&error), messages = batch.len(), retry_in_ms = backoff.as_millis() as u64, "cannot apply a batch; partitions paused, retrying");
                    if paused.is_none() {
                        paused = self.pause_all();
                    }
                    if !self.wait_polling(backoff, shutdown).await {
                        return Step::Stopped;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The held-back messages, or the next one Kafka gives, plus whatever else
    /// is ready right now, up to [`MAX_BATCH`]. None on shutdown.
    async fn next_batch(&mut self, shutdown: &mut Shutdown) -> Option<Vec<Message>> {
        let mut batch: Vec<Message> = Vec::new();
        while batch.len() < MAX_BATCH {
            match self.holdback.pop_front() {
                Some(message) => batch.push(message),
                None => break,
            }
        }
        if batch.is_empty() {
            loop {
                tokio::select! {
                    received = self.consumer.recv() => match received {
                        Ok(message) => {
                            batch.push(Message::from_kafka(&message));
                            break;
                        }
                        Err(error) => consume_error(&error),
                    },
                    () = shutdown.requested() => return None,
                }
            }
        }
        while batch.len() < MAX_BATCH {
            match self.consumer.recv().now_or_never() {
                Some(Ok(message)) => batch.push(Message::from_kafka(&message)),
                Some(Err(error)) => {
                    consume_error(&error);
                    break;
                }
                None => break,
            }
        }
        Some(batch)
    }

    fn pause_all(&self) -> Option<rdkafka::TopicPartitionList> {
        let assignment = self.consumer.assignment().ok()?;
        match self.consumer.pause(&assignment) {
            Ok(()) => Some(assignment),
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "could not pause partitions");
                None
            }
        }
    }

    /// Waits `delay` while polling the consumer (it must poll to stay in its
    /// group); anything still delivered is held back for the next batch.
    /// False on shutdown.
    async fn wait_polling(&mut self, delay: Duration, shutdown: &mut Shutdown) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                () = shutdown.requested() => return false,
                received = self.consumer.recv() => match received {
                    Ok(message) => self.holdback.push_back(Message::from_kafka(&message)),
                    Err(error) => consume_error(&error),
                },
            }
        }
    }

    /// Stores, per partition, the offset after the batch's last message.
    fn store_offsets(&self, batch: &[Message]) {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for message in batch {
            let offset = next
                .entry((message.topic.as_str(), message.partition))
                .or_default();
            *offset = (*offset).max(message.offset + 1);
        }
        for ((topic, partition), offset) in next {
            if let Err(error) = self.consumer.store_offset(topic, partition, offset) {
                // The partition moved to another consumer in a rebalance; it
                // re-reads from the last commit, which the version check absorbs.
                tracing::debug!(error = %error_chain(&error), topic, partition, "offset not stored");
            }
        }
    }
}

fn consume_error(error: &KafkaError) {
    metrics::counter!("projector_consume_errors_total").increment(1);
    tracing::warn!(error = %error_chain(error), "kafka consume error");
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
