//! The consumer: reads `users.events.v1` in the notifier's own group and
//! queues one row in `notifier_mails` per event that asks for a mail.
//!
//! A batch's rows are inserted in one transaction, and only then are its
//! offsets stored: a crash re-delivers rather than loses, and the insert's
//! `ON CONFLICT (event_id) DO NOTHING` (the deduplication by `ce_id`) makes a
//! re-delivery harmless. While PostgreSQL fails, the partitions are paused
//! and the batch retried with backoff, the consumer polling all the while so
//! it keeps its place in the group however long the outage lasts.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use events::IntegrationEvent;
use futures::FutureExt;
use platform::shutdown::Shutdown;
use platform::tasks::DropAwayOnPanic;
use platform::telemetry::error_chain;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientConfig, Message as _};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::config::Settings;
use crate::mail::{NewMail, MAIL_TYPES};
use crate::store;

/// Most messages handled in one transaction.
pub const MAX_BATCH: usize = 500;
/// Longest wait between retries of a batch while PostgreSQL fails.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A message as the consumer keeps it (owned, so a batch can be retried).
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub ce_id: Option<String>,
    pub ce_type: Option<String>,
    pub body: Vec<u8>,
}

impl Received {
    fn from_kafka(message: &BorrowedMessage<'_>) -> Self {
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
            ce_id: header("ce_id"),
            ce_type: header("ce_type"),
            body: message.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// What a message means to the notifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// A mail to queue.
    Mail(NewMail),
    /// Not a mail type: nothing to do.
    Skip,
    /// A mail type that cannot be decoded, or a message with no type (it
    /// may have been one): counted, logged, skipped.
    Bad(String),
}

/// Reads one message: the three mail types are decoded, the rest skipped
/// undecoded (the notifier tolerates types it does not know).
pub fn read(message: &Received) -> Reading {
    let Some(ce_type) = message.ce_type.as_deref() else {
        return Reading::Bad("no ce_type header".into());
    };
    if !MAIL_TYPES.contains(&ce_type) {
        return Reading::Skip;
    }
    let Some(ce_id) = message.ce_id.as_deref() else {
        return Reading::Bad("no ce_id header".into());
    };
    match IntegrationEvent::decode(ce_id, ce_type, &message.body) {
        Ok(event) => NewMail::for_event(&event).map_or(Reading::Skip, Reading::Mail),
        Err(error) => Reading::Bad(error_chain(&error)),
    }
}

pub fn consumer_config(settings: &Settings) -> ClientConfig {
    // Security and tuning from KAFKA_CONFIG_* / KAFKA_SASL_* / KAFKA_SSL_*
    // first (see platform::kafka); the settings below win over them.
    let mut config = platform::kafka::client_config_from_env();
    config
        .set("bootstrap.servers", &settings.kafka_brokers)
        .set("group.id", &settings.kafka_group_id)
        .set("client.id", "userstream-notifier")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            settings.kafka_session_timeout_ms.to_string(),
        )
        .set("enable.auto.commit", "true")
        // Offsets are stored by hand, after the batch's rows are committed.
        .set("enable.auto.offset.store", "false");
    config
}

pub struct Worker {
    /// Closed away from the runtime's threads if a panic drops it.
    consumer: DropAwayOnPanic<StreamConsumer>,
    pool: PgPool,
    wake: Arc<Notify>,
    /// Messages received while a failing batch waited, in arrival order.
    holdback: VecDeque<Received>,
}

/// What one [`Worker::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A batch was handled and its offsets stored: this many new mails.
    Queued {
        new: u64,
        bad: usize,
    },
    Stopped,
}

impl Worker {
    pub fn new(settings: &Settings, pool: PgPool, wake: Arc<Notify>) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer = consumer_config(settings).create()?;
        consumer.subscribe(&[&settings.kafka_topic])?;
        Ok(Self {
            consumer: DropAwayOnPanic::new(consumer),
            pool,
            wake,
            holdback: VecDeque::new(),
        })
    }

    /// Consumes until shutdown, then commits the stored offsets.
    pub async fn run_until_stopped(mut self, mut shutdown: Shutdown) {
        tracing::info!("notifier consuming");
        while !shutdown.is_requested() {
            if self.step(&mut shutdown).await == Step::Stopped {
                break;
            }
        }
        if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored yet is the usual cause; the next start re-reads.
            tracing::debug!(error = %error_chain(&error), "final offset commit");
        }
        tracing::info!("notifier consumer stopped");
    }

    /// Takes the next batch and queues its mails, retrying while PostgreSQL
    /// fails; stores the offsets once the rows are committed.
    #[tracing::instrument(name = "notifier_consume_step", skip_all)]
    pub async fn step(&mut self, shutdown: &mut Shutdown) -> Step {
        let Some(batch) = self.next_batch(shutdown).await else {
            return Step::Stopped;
        };
        let mut mails = Vec::new();
        let mut bad = 0;
        for message in &batch {
            match read(message) {
                Reading::Mail(mail) => mails.push(mail),
                Reading::Skip => {}
                Reading::Bad(cause) => {
                    bad += 1;
                    metrics::counter!("notifier_bad_messages_total").increment(1);
                    tracing::warn!(topic = message.topic, partition = message.partition,
                        offset = message.offset, ce_type = ?message.ce_type, cause,
                        "undecodable mail message skipped");
                }
            }
        }
        let mut backoff = Duration::from_millis(100);
        let mut paused = None;
        loop {
            match store::insert(&self.pool, &mails).await {
                Ok(new) => {
                    if let Some(partitions) = paused.take() {
                        if let Err(error) = self.consumer.resume(&partitions) {
                            tracing::warn!(error = %error_chain(&error), "could not resume partitions");
                        }
                    }
                    self.store_offsets(&batch);
                    metrics::counter!("notifier_messages_total", "outcome" => "queued")
                        .increment(new);
                    metrics::counter!("notifier_messages_total", "outcome" => "duplicate")
                        .increment(mails.len() as u64 - new);
                    if new > 0 {
                        self.wake.notify_one();
                    }
                    return Step::Queued { new, bad };
                }
                Err(error) => {
                    metrics::counter!("notifier_database_errors_total", "task" => "consumer")
                        .increment(1);
                    tracing::error!(error = %error_chain(&error), mails = mails.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "cannot queue mails; partitions paused, retrying");
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

    /// The held-back messages, or the next one Kafka gives, plus whatever
    /// else is ready now, up to [`MAX_BATCH`]. None on shutdown.
    async fn next_batch(&mut self, shutdown: &mut Shutdown) -> Option<Vec<Received>> {
        let mut batch: Vec<Received> = Vec::new();
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
                            batch.push(Received::from_kafka(&message));
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
                Some(Ok(message)) => batch.push(Received::from_kafka(&message)),
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
    /// group); anything still delivered is held back. False on shutdown.
    async fn wait_polling(&mut self, delay: Duration, shutdown: &mut Shutdown) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                () = shutdown.requested() => return false,
                received = self.consumer.recv() => match received {
                    Ok(message) => self.holdback.push_back(Received::from_kafka(&message)),
                    Err(error) => consume_error(&error),
                },
            }
        }
    }

    /// Stores, per partition, the offset after the batch's last message.
    fn store_offsets(&self, batch: &[Received]) {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for message in batch {
            let offset = next
                .entry((message.topic.as_str(), message.partition))
                .or_default();
            *offset = (*offset).max(message.offset + 1);
        }
        for ((topic, partition), offset) in next {
            if let Err(error) = self.consumer.store_offset(topic, partition, offset) {
                // Moved to another member in a rebalance: it re-reads from
                // the last commit, and the dedup absorbs the repeat.
                tracing::debug!(error = %error_chain(&error), topic, partition, "offset not stored");
            }
        }
    }
}

fn consume_error(error: &KafkaError) {
    metrics::counter!("notifier_consume_errors_total").increment(1);
    tracing::warn!(error = %error_chain(error), "kafka consume error");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ce_type: Option<&str>, body: &str) -> Received {
        Received {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            ce_id: Some(uuid::Uuid::new_v4().to_string()),
            ce_type: ce_type.map(str::to_owned),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn other_types_are_skipped_undecoded_and_broken_mail_types_are_bad() {
        assert_eq!(
            read(&message(Some("user.deactivated.v1"), "garbage")),
            Reading::Skip
        );
        assert_eq!(
            read(&message(Some("user.someday.v9"), "garbage")),
            Reading::Skip
        );
        assert!(matches!(
            read(&message(Some("user.registered.v1"), "{not json")),
            Reading::Bad(_)
        ));
        assert!(matches!(read(&message(None, "{}")), Reading::Bad(_)));
    }

    #[test]
    fn a_reset_request_becomes_a_reset_mail_to_its_address() {
        let user = uuid::Uuid::new_v4();
        let body = serde_json::json!({
            "user_id": user, "stream_version": 3, "global_position": 9,
            "occurred_at": "2026-12-03T10:00:00Z",
            "data": { "email": "bob@example.org", "expires_at": "2026-12-03T10:30:00Z" }
        });
        let received = message(Some("user.password_reset_requested.v1"), &body.to_string());
        let Reading::Mail(mail) = read(&received) else {
            panic!("a mail");
        };
        assert_eq!(mail.kind, crate::mail::Kind::PasswordReset);
        assert_eq!(mail.recipient, "bob@example.org");
        assert_eq!(mail.user_id, user);
        assert_eq!(mail.event_id.to_string(), received.ce_id.unwrap());
        assert!(mail.code_expires_at.is_some());
    }
}
