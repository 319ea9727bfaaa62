//! The consumer loop the projector and the notifier share: take what Kafka
//! has ready as one batch, hand it to the service until the service has
//! committed it, then store the batch's offsets.
//!
//! Offsets are stored by hand (`enable.auto.offset.store=false`) and only
//! after the service's transaction committed, so a crash re-delivers rather
//! than loses; each service makes a re-delivery harmless (the projector by
//! its version check, the notifier by its `ce_id` key). While the service's
//! database fails, the partitions are paused and the batch retried with
//! backoff, the consumer polling all the while so that it keeps its place in
//! the group however long the outage lasts; messages still delivered are
//! held back for the next batch.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

use crate::shutdown::Shutdown;
use crate::tasks::DropAwayOnPanic;
use crate::telemetry::error_chain;

/// Longest wait between retries of a batch while the service's database fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A message as the services keep it: owned, so that a batch can outlive the
/// consumer's buffers, be retried, and be parked as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub ce_id: Option<String>,
    pub ce_type: Option<String>,
    pub body: Vec<u8>,
}

impl Message {
    pub fn from_kafka(message: &BorrowedMessage<'_>) -> Self {
        let header = |name: &str| -> Option<String> {
            message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            ce_id: header("ce_id"),
            ce_type: header("ce_type"),
            body: message.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// The settings every consumer of the topic needs: security and tuning from
/// `KAFKA_CONFIG_*` / `KAFKA_SASL_*` / `KAFKA_SSL_*` first (see
/// [`crate::kafka`]); the ones set here win over them.
pub fn config(
    brokers: &str,
    group_id: &str,
    client_id: &str,
    session_timeout_ms: u32,
) -> ClientConfig {
    let mut config = crate::kafka::client_config_from_env();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group_id)
        .set("client.id", client_id)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session_timeout_ms.to_string())
        .set("enable.auto.commit", "true")
        // Offsets are stored by hand, after the batch is committed.
        .set("enable.auto.offset.store", "false");
    config
}

/// A subscribed consumer, with the messages held back while a batch waited.
pub struct BatchConsumer {
    /// Closed away from the runtime's threads if a panic drops it (see
    /// [`DropAwayOnPanic`]), so the panic is reported and the process exits.
    consumer: DropAwayOnPanic<StreamConsumer>,
    /// Messages received while a failing batch waited, in arrival order.
    holdback: VecDeque<Message>,
    /// The counter of consume errors, e.g. `projector_consume_errors_total`.
    errors_metric: &'static str,
}

impl BatchConsumer {
    /// Creates the consumer and subscribes it to `topic`.
    pub fn subscribe(
        config: &ClientConfig,
        topic: &str,
        errors_metric: &'static str,
    ) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer = config.create()?;
        consumer.subscribe(&[topic])?;
        Ok(Self {
            consumer: DropAwayOnPanic::new(consumer),
            holdback: VecDeque::new(),
            errors_metric,
        })
    }

    pub fn consumer(&self) -> &StreamConsumer {
        &self.consumer
    }

    /// The held-back messages, or the next one Kafka gives, plus whatever
    /// else is ready right now, up to `max`. None on shutdown.
    pub async fn next_batch(
        &mut self,
        max: usize,
        shutdown: &mut Shutdown,
    ) -> Option<Vec<Message>> {
        let held = self.holdback.len().min(max);
        let mut batch: Vec<Message> = self.holdback.drain(..held).collect();
        if batch.is_empty() {
            loop {
                tokio::select! {
                    received = self.consumer.recv() => match received {
                        Ok(message) => {
                            batch.push(Message::from_kafka(&message));
                            break;
                        }
                        Err(error) => self.consume_error(&error),
                    },
                    () = shutdown.requested() => return None,
                }
            }
        }
        while batch.len() < max {
            match self.consumer.recv().now_or_never() {
                Some(Ok(message)) => batch.push(Message::from_kafka(&message)),
                Some(Err(error)) => {
                    self.consume_error(&error);
                    break;
                }
                None => break,
            }
        }
        Some(batch)
    }

    /// Runs `attempt` until it succeeds, then stores the offsets after
    /// `batch`. After a failure (handed to `failed` with the wait before the
    /// next try, to count and log) the partitions are paused and the consumer
    /// keeps polling while it waits; they resume after the success. None on
    /// shutdown, with nothing stored.
    pub async fn until_committed<T, E, F, Fut>(
        &mut self,
        batch: &[Message],
        shutdown: &mut Shutdown,
        mut attempt: F,
        mut failed: impl FnMut(&E, Duration),
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = Duration::from_millis(100);
        let mut paused = None;
        loop {
            match attempt().await {
                Ok(done) => {
                    if let Some(partitions) = paused.take() {
                        if let Err(error) = self.consumer.resume(&partitions) {
                            tracing::warn!(error = %error_chain(&error), "could not resume partitions");
                        }
                    }
                    self.store_offsets(batch);
                    return Some(done);
                }
                Err(error) => {
                    failed(&error, backoff);
                    if paused.is_none() {
                        paused = self.pause_all();
                    }
                    if !self.wait_polling(backoff, shutdown).await {
                        return None;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Commits the stored offsets (at shutdown).
    pub fn commit(&self) {
        if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored yet is the usual cause; the next start re-reads.
            tracing::debug!(error = %error_chain(&error), "final offset commit");
        }
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
                    Err(error) => self.consume_error(&error),
                },
            }
        }
    }

    /// Stores, per partition, the offset after the batch's last message: the
    /// next one to read. (`store_offset` would add one itself: librdkafka's
    /// `rd_kafka_offset_store` stores the offset it is given plus one, while
    /// `rd_kafka_offsets_store`, used here, stores the offsets as given.)
    fn store_offsets(&self, batch: &[Message]) {
        for ((topic, partition), offset) in next_offsets(batch) {
            let mut next = TopicPartitionList::new();
            let stored = next
                .add_partition_offset(topic, partition, Offset::Offset(offset))
                .and_then(|()| self.consumer.store_offsets(&next));
            if let Err(error) = stored {
                // The partition moved to another member in a rebalance; it
                // re-reads from the last commit, and the service's
                // deduplication absorbs the repeat.
                tracing::debug!(error = %error_chain(&error), topic, partition, "offset not stored");
            }
        }
    }

    fn consume_error(&self, error: &KafkaError) {
        metrics::counter!(self.errors_metric).increment(1);
        tracing::warn!(error = %error_chain(error), "kafka consume error");
    }
}

/// How long a graceful stop waits for a consumer task to commit its offsets.
pub const STOP_WAIT: Duration = Duration::from_secs(10);

/// Waits (at most [`STOP_WAIT`]) for the consumer task `consumer` to end
/// after a stop was asked for: a service's last work before it exits.
pub async fn stopped(consumer: tokio::task::JoinHandle<()>) {
    if tokio::time::timeout(STOP_WAIT, consumer).await.is_err() {
        tracing::warn!("the consumer did not stop in time; offsets re-read on the next start");
    }
}

/// Per partition, the offset after the last of `batch`'s messages.
fn next_offsets(batch: &[Message]) -> BTreeMap<(&str, i32), i64> {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for message in batch {
        let offset = next
            .entry((message.topic.as_str(), message.partition))
            .or_default();
        *offset = (*offset).max(message.offset + 1);
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(partition: i32, offset: i64) -> Message {
        Message {
            topic: "t".into(),
            partition,
            offset,
            key: None,
            ce_id: None,
            ce_type: None,
            body: Vec::new(),
        }
    }

    #[test]
    fn the_stored_offset_is_the_one_after_each_partitions_last_message() {
        let batch = [at(0, 7), at(1, 3), at(0, 5), at(0, 9), at(1, 2)];
        let next: Vec<_> = next_offsets(&batch).into_iter().collect();
        assert_eq!(next, [(("t", 0), 10), (("t", 1), 4)]);
    }
}
