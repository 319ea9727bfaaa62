//! The consumer: reads `users.events.v1` in the notifier's own group and
//! queues one row in `notifier_mails` per event that asks for a mail.
//!
//! A batch's rows are inserted in one transaction, and only then are its
//! offsets stored: a crash re-delivers rather than loses, and the insert's
//! `ON CONFLICT (event_id) DO NOTHING` (the deduplication by `ce_id`) makes a
//! re-delivery harmless. While PostgreSQL fails, the partitions are paused
//! and the batch retried with backoff, the consumer polling all the while so
//! it keeps its place in the group however long the outage lasts.

use std::sync::Arc;

use events::IntegrationEvent;
use platform::consumer::{BatchConsumer, Message};
use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::config::Settings;
use crate::mail::{NewMail, MAIL_TYPES};
use crate::store;

/// Most messages handled in one transaction.
pub const MAX_BATCH: usize = 500;

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
pub fn read(message: &Message) -> Reading {
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
    platform::consumer::config(
        &settings.kafka_brokers,
        &settings.kafka_group_id,
        "userstream-notifier",
        settings.kafka_session_timeout_ms,
    )
}

pub struct Worker {
    kafka: BatchConsumer,
    pool: PgPool,
    wake: Arc<Notify>,
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
        let kafka = BatchConsumer::subscribe(
            &consumer_config(settings),
            &settings.kafka_topic,
            "notifier_consume_errors_total",
        )?;
        Ok(Self { kafka, pool, wake })
    }

    /// Consumes until shutdown, then commits the stored offsets.
    pub async fn run_until_stopped(mut self, mut shutdown: Shutdown) {
        tracing::info!("notifier consuming");
        while !shutdown.is_requested() {
            if self.step(&mut shutdown).await == Step::Stopped {
                break;
            }
        }
        self.kafka.commit();
        tracing::info!("notifier consumer stopped");
    }

    /// Takes the next batch and queues its mails, retrying while PostgreSQL
    /// fails; stores the offsets once the rows are committed.
    #[tracing::instrument(name = "notifier_consume_step", skip_all)]
    pub async fn step(&mut self, shutdown: &mut Shutdown) -> Step {
        let Some(batch) = self.kafka.next_batch(MAX_BATCH, shutdown).await else {
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
        let pool = &self.pool;
        let queued = self
            .kafka
            .until_committed(
                &batch,
                shutdown,
                || store::insert(pool, &mails),
                |error, backoff| {
                    metrics::counter!("notifier_database_errors_total", "task" => "consumer")
                        .increment(1);
                    tracing::error!(error = %error_chain(error), mails = mails.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "cannot queue mails; partitions paused, retrying");
                },
            )
            .await;
        let Some(new) = queued else {
            return Step::Stopped;
        };
        metrics::counter!("notifier_messages_total", "outcome" => "queued").increment(new);
        metrics::counter!("notifier_messages_total", "outcome" => "duplicate")
            .increment(mails.len() as u64 - new);
        if new > 0 {
            self.wake.notify_one();
        }
        Step::Queued { new, bad }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ce_type: Option<&str>, body: &str) -> Message {
        Message {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
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
