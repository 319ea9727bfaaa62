//! The relay: mirrors the event log to Kafka, gap-safe, at least once, in order.
//!
//! * One leader among all replicas: the relay holds a session-level advisory
//!   lock on a dedicated connection, and reads and checkpoints through that same
//!   connection, so a relay whose session died cannot move the checkpoint.
//! * Gap-safe reads ([`log::read_batch`]): (transaction id, position) order,
//!   only below `pg_snapshot_xmin(pg_current_snapshot())`.
//! * In order, no gaps: the idempotent producer never times a message out
//!   (`message.timeout.ms = 0`). A message that timed out would be skipped while
//!   later messages of its partition were written, and re-sending it would then
//!   put it after them: a reorder. Kafka being away just makes the batch wait.
//! * The checkpoint moves only after Kafka acknowledged every message up to it.
//!   Up to [`PIPELINE_DEPTH`] batches are in flight: the next batch is read and
//!   queued while the previous one waits for its acknowledgements, and
//!   checkpoints advance in batch order. Any failure drops the pipeline and
//!   re-sends from the checkpoint (same `ce_id`s).
//! * Woken by LISTEN/NOTIFY at commit, with a polling fallback.

pub mod log;
pub mod status;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use events::IntegrationEvent;
use futures::future::try_join_all;
use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use sqlx::postgres::{PgConnection, PgListener};
use sqlx::{Connection, PgPool};

use crate::config::{KafkaSettings, RelaySettings};
pub use log::{read_batch, Checkpoint, Lag};
pub use status::RelayStatus;

/// Advisory lock key of the relay leader ("usrelay" in ASCII). Advisory locks are
/// per database, so each database (and each test database) has its own leader.
const LEADER_LOCK: i64 = 0x0075_7372_656c_6179;
pub const NOTIFY_CHANNEL: &str = "events_appended";
/// Batches queued on the producer before the oldest must be acknowledged.
pub const PIPELINE_DEPTH: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("event at position {position} cannot be read")]
    Decode {
        position: i64,
        #[source]
        source: events::DecodeError,
    },
    #[error("kafka refused or did not acknowledge a message")]
    Kafka(#[from] KafkaError),
    #[error("could not create topic {topic}: {code}")]
    Topic {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// What one [`Relay::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// This many events were read and queued on the producer.
    Queued(usize),
    /// This many events were acknowledged and checkpointed.
    Published(usize),
    /// Nothing committed is waiting and nothing is in flight.
    Idle,
}

type Acks = Pin<Box<dyn Future<Output = Result<(), KafkaError>> + Send>>;

/// A batch queued on the producer, waiting for its acknowledgements.
struct InFlight {
    last: Checkpoint,
    count: usize,
    recorded_at: DateTime<Utc>,
    queued_at: Instant,
    acks: Acks,
}

/// Where the leader is: acknowledged (`checkpoint`) and read (`cursor`).
struct Progress {
    checkpoint: Checkpoint,
    cursor: Checkpoint,
    in_flight: VecDeque<InFlight>,
}

impl Progress {
    fn new(checkpoint: Checkpoint) -> Self {
        Self {
            checkpoint,
            cursor: checkpoint,
            in_flight: VecDeque::new(),
        }
    }

    /// Forgets what is in flight: the next read starts after the checkpoint.
    fn rewind(&mut self) {
        self.in_flight.clear();
        self.cursor = self.checkpoint;
    }
}

pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    kafka: KafkaSettings,
    settings: RelaySettings,
    status: RelayStatus,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        kafka: KafkaSettings,
        settings: RelaySettings,
        status: RelayStatus,
    ) -> Result<Self, KafkaError> {
        let producer = producer_config(&kafka).create()?;
        status.update(|s| s.enabled = true);
        Ok(Self {
            pool,
            producer,
            kafka,
            settings,
            status,
        })
    }

    /// Competes for leadership and relays while leader, until shutdown.
    pub async fn run_until_stopped(mut self, mut shutdown: Shutdown) {
        while !shutdown.is_requested() {
            if let Err(error) = self.lead(&mut shutdown).await {
                tracing::error!(error = %error_chain(&error), "relay lost its database session; retrying");
                self.status
                    .update(|s| s.last_error = Some(error_chain(&error)));
            }
            self.status.update(|s| s.leader = false);
            metrics::gauge!("relay_leader").set(0.0);
            tokio::select! {
                () = tokio::time::sleep(self.settings.leader_retry) => {}
                () = shutdown.requested() => {}
            }
        }
        // Let queued messages reach the broker before the process exits; what
        // does not is re-sent by the next leader from the checkpoint.
        let _ = self.producer.flush(Timeout::After(Duration::from_secs(5)));
        tracing::info!("relay stopped");
    }

    /// Takes the leader lock (waiting for it), then relays until the session
    /// fails or shutdown is requested. Returning drops the connection, which
    /// releases the lock.
    async fn lead(&mut self, shutdown: &mut Shutdown) -> Result<(), RelayError> {
        let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_LOCK)
                .fetch_one(&mut conn)
                .await?;
            if got {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(self.settings.leader_retry) => {}
                () = shutdown.requested() => return Ok(()),
            }
        }
        tracing::info!("relay is leader");
        self.status.update(|s| s.leader = true);
        metrics::gauge!("relay_leader").set(1.0);

        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        let mut progress = Progress::new(log::load_checkpoint(&mut conn, &self.kafka.topic).await?);
        let mut topic_ready = false;
        let mut backoff = Duration::from_millis(200);

        while !shutdown.is_requested() {
            let outcome = async {
                if !topic_ready {
                    self.ensure_topic().await?;
                    topic_ready = true;
                }
                self.step(&mut conn, &mut progress).await
            };
            let outcome = tokio::select! {
                o = outcome => o,
                () = shutdown.requested() => return Ok(()),
            };
            match outcome {
                Ok(Step::Queued(_) | Step::Published(_)) => backoff = Duration::from_millis(200),
                Ok(Step::Idle) => {
                    tokio::select! {
                        // An error here is a dropped listener connection, which
                        // PgListener re-establishes; the poll covers the gap.
                        _ = tokio::time::timeout(self.settings.poll_interval, listener.recv()) => {}
                        () = shutdown.requested() => {}
                    }
                }
                Err(RelayError::Database(error)) => return Err(error.into()),
                Err(error) => {
                    progress.rewind();
                    metrics::counter!("relay_publish_errors_total").increment(1);
                    tracing::error!(error = %error_chain(&error), retry_in_ms = backoff.as_millis() as u64, "relay could not publish; the checkpoint holds");
                    self.status
                        .update(|s| s.last_error = Some(error_chain(&error)));
                    self.replace_producer_if_fatal();
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.requested() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        Ok(())
    }

    /// An idempotent producer that hit a fatal error (e.g. a broken sequence)
    /// refuses every later message; only a new producer can go on. Everything
    /// after the checkpoint is re-sent, so nothing is skipped.
    fn replace_producer_if_fatal(&mut self) {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return;
        };
        tracing::error!(?code, %reason, "the Kafka producer hit a fatal error; replacing it");
        match producer_config(&self.kafka).create() {
            Ok(producer) => self.producer = producer,
            Err(error) => {
                tracing::error!(error = %error_chain(&error), "could not create a new Kafka producer");
            }
        }
    }

    /// One move of the pipeline: queue the next batch while there is room and
    /// something to read, otherwise wait for the oldest batch's acknowledgements
    /// and advance the checkpoint past it.
    #[tracing::instrument(name = "relay_step", skip_all, fields(checkpoint = progress.checkpoint.global_position))]
    async fn step(
        &self,
        conn: &mut PgConnection,
        progress: &mut Progress,
    ) -> Result<Step, RelayError> {
        if progress.in_flight.len() < PIPELINE_DEPTH {
            let batch = read_batch(conn, progress.cursor, self.settings.batch_size).await?;
            if let Some((xid, newest)) = batch.last() {
                let last = Checkpoint {
                    transaction_id: *xid,
                    global_position: newest.global_position,
                };
                let recorded_at = newest.recorded_at;
                let deliveries = batch
                    .iter()
                    .map(|(_, recorded)| self.send(&IntegrationEvent::from_recorded(recorded)))
                    .collect::<Result<Vec<_>, _>>()?;
                progress.in_flight.push_back(InFlight {
                    last,
                    count: batch.len(),
                    recorded_at,
                    queued_at: Instant::now(),
                    acks: Box::pin(async move { try_join_all(deliveries).await.map(drop) }),
                });
                progress.cursor = last;
                return Ok(Step::Queued(batch.len()));
            }
        }
        let Some(oldest) = progress.in_flight.pop_front() else {
            return Ok(Step::Idle);
        };
        // Every message up to `oldest.last` is acknowledged before the
        // checkpoint may pass it.
        oldest.acks.await?;
        log::save_checkpoint(conn, &self.kafka.topic, oldest.last).await?;
        progress.checkpoint = oldest.last;

        metrics::counter!("relay_events_published_total").increment(oldest.count as u64);
        metrics::histogram!("relay_batch_duration_seconds")
            .record(oldest.queued_at.elapsed().as_secs_f64());
        self.status.update(|s| {
            s.checkpoint = oldest.last;
            s.last_published_at = Some(oldest.recorded_at);
            s.last_error = None;
        });
        Ok(Step::Published(oldest.count))
    }

    /// Queues one message; the returned future resolves when Kafka acknowledged it.
    fn send(
        &self,
        event: &IntegrationEvent,
    ) -> Result<impl Future<Output = Result<(), KafkaError>> + Send + 'static, KafkaError> {
        let headers = event.headers(&self.kafka.ce_source).iter().fold(
            OwnedHeaders::new(),
            |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                })
            },
        );
        let key = event.key();
        let body = event.body();
        let record = FutureRecord::to(&self.kafka.topic)
            .key(&key)
            .payload(&body)
            .headers(headers);
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(error, _)| error)?;
        Ok(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((error, _))) => Err(error),
                Err(_canceled) => Err(KafkaError::Canceled),
            }
        })
    }

    /// Creates the topic with the configured partitions unless it exists.
    async fn ensure_topic(&self) -> Result<(), RelayError> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka.brokers)
            .create()?;
        let topic = NewTopic::new(
            &self.kafka.topic,
            self.kafka.topic_partitions,
            TopicReplication::Fixed(self.kafka.topic_replication),
        );
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics([&topic], &options).await? {
            match result {
                Ok(_) => tracing::info!(topic = %self.kafka.topic, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(RelayError::Topic { topic, code }),
            }
        }
        Ok(())
    }
}

/// The producer settings the delivery guarantees rest on.
pub fn producer_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", "userstream-relay")
        // No duplicates or reordering from the producer's own retries.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Never give up on a message: a timed-out message leaves a gap that
        // later messages of its partition pass, and re-sending it would put it
        // after them. While Kafka is away the batch waits; the log buffers.
        .set("message.timeout.ms", "0")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        // Same key → same partition as Java clients compute it.
        .set("partitioner", "murmur2_random");
    config
}
