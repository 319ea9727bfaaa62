//! The relay: mirrors the event log to Kafka, gap-safe, at least once, in order.
//!
//! * One leader per topic among all replicas: the relay holds a session-level
//!   advisory lock (its key derived from the topic, [`session::lock_key`]) on a
//!   dedicated connection, and reads and checkpoints through that same
//!   connection, so a relay whose session died cannot move the checkpoint. A
//!   lost session is noticed within seconds ([`session`]).
//! * Gap-safe reads ([`log::read_batch`]): (transaction id, position) order,
//!   only below `pg_snapshot_xmin(pg_current_snapshot())`.
//! * In order, no gaps: the idempotent producer never times a message out
//!   (`message.timeout.ms = 0`). A message that timed out would be skipped while
//!   later messages of its partition were written, and re-sending it would then
//!   put it after them: a reorder. Kafka being away just makes the batch wait.
//!   Any other permanent failure of a message is a fatal producer error
//!   (`enable.gapless.guarantee`) instead of a gap: the producer is replaced
//!   and everything after the checkpoint is sent again.
//! * The checkpoint moves only after Kafka acknowledged every message up to it.
//!   Up to [`PIPELINE_DEPTH`] batches are in flight: the next batch is read and
//!   queued while the previous one waits for its acknowledgements, and
//!   checkpoints advance in batch order. Any failure drops the pipeline and
//!   re-sends from the checkpoint (same `ce_id`s).
//! * Woken by LISTEN/NOTIFY at commit, with a polling fallback.

pub mod log;
pub mod session;
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
use sqlx::PgPool;

use crate::config::{KafkaSettings, RelaySettings};
pub use log::{read_batch, Checkpoint, Lag};
pub use status::RelayStatus;

pub const NOTIFY_CHANNEL: &str = "events_appended";
/// Batches queued on the producer before the oldest must be acknowledged.
pub const PIPELINE_DEPTH: usize = 2;
/// After losing its session, a replica waits this many `RELAY_LEADER_RETRY_MS`
/// before competing again, so a healthy replica takes over.
const STAND_DOWN: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("the leader's database session did not answer within {0:?}")]
    SessionTimedOut(Duration),
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
    /// New events committed while the oldest batch waited for its
    /// acknowledgements and the pipeline had room: the next step reads them.
    Woken,
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
pub struct Progress {
    checkpoint: Checkpoint,
    cursor: Checkpoint,
    in_flight: VecDeque<InFlight>,
}

impl Progress {
    /// Nothing in flight; the next read starts after `checkpoint`.
    pub fn new(checkpoint: Checkpoint) -> Self {
        Self {
            checkpoint,
            cursor: checkpoint,
            in_flight: VecDeque::new(),
        }
    }

    /// The last event Kafka acknowledged (and the leader saved).
    pub fn checkpoint(&self) -> Checkpoint {
        self.checkpoint
    }

    /// Batches queued on the producer and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Forgets what is in flight: the next read starts after the checkpoint.
    pub fn rewind(&mut self) {
        self.in_flight.clear();
        self.cursor = self.checkpoint;
    }
}

/// The relay of one topic; [`Self::run_until_stopped`] competes for
/// leadership and drives [`Self::step`] while leader.
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
        // The admin client's settings are checked now too, not at first use.
        admin_config(&kafka).create_native_config()?;
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
            let mut pause = self.settings.leader_retry;
            if let Err(error) = self.lead(&mut shutdown).await {
                tracing::error!(error = %error_chain(&error), "relay lost its database session; retrying");
                self.status
                    .update(|s| s.last_error = Some(error_chain(&error)));
                // A replica whose session just failed lets a healthy one
                // take the lock first.
                pause = self.settings.leader_retry * STAND_DOWN;
            }
            self.status.update(|s| s.leader = false);
            metrics::gauge!("relay_leader").set(0.0);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
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
        let timeout = self.settings.statement_timeout;
        let mut conn = session::bounded(timeout, session::connect(&self.pool, timeout)).await?;
        let key = session::lock_key(&self.kafka.topic);
        while !session::try_lock(&mut conn, key, timeout).await? {
            tokio::select! {
                () = tokio::time::sleep(self.settings.leader_retry) => {}
                () = shutdown.requested() => return Ok(()),
            }
        }
        tracing::info!(topic = %self.kafka.topic, "relay is leader");
        self.status.update(|s| s.leader = true);
        metrics::gauge!("relay_leader").set(1.0);

        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        let mut progress = Progress::new(
            session::bounded(timeout, log::load_checkpoint(&mut conn, &self.kafka.topic)).await?,
        );
        let mut topic_ready = false;
        let mut backoff = Duration::from_millis(200);
        let mut recheck = None;

        while !shutdown.is_requested() {
            let outcome = async {
                if !topic_ready {
                    self.ensure_topic().await?;
                    topic_ready = true;
                }
                self.step_or_wake(&mut conn, &mut progress, notified(&mut listener))
                    .await
            };
            let outcome = tokio::select! {
                o = outcome => o,
                () = shutdown.requested() => return Ok(()),
            };
            match outcome {
                Ok(Step::Queued(_) | Step::Published(_)) => {
                    backoff = Duration::from_millis(200);
                    recheck = None;
                }
                // A NOTIFY came while a batch waited; if its event is not
                // readable yet, the rechecks after an idle read apply.
                Ok(Step::Woken) => recheck = next_recheck(None, true),
                Ok(Step::Idle) => {
                    // The next step's read doubles as the session check.
                    let wait = recheck
                        .unwrap_or(self.settings.poll_interval.min(self.settings.session_check));
                    tokio::select! {
                        woken = tokio::time::timeout(wait, listener.recv()) => {
                            recheck = next_recheck(recheck, woken.is_ok_and(|r| r.is_ok()));
                        }
                        () = shutdown.requested() => {}
                    }
                }
                Err(error @ (RelayError::Database(_) | RelayError::SessionTimedOut(_))) => {
                    return Err(error)
                }
                Err(error) => {
                    progress.rewind();
                    metrics::counter!("relay_publish_errors_total").increment(1);
                    tracing::error!(error = %error_chain(&error), retry_in_ms = backoff.as_millis() as u64, "relay could not publish; the checkpoint holds");
                    self.status
                        .update(|s| s.last_error = Some(error_chain(&error)));
                    self.replace_producer_if_fatal();
                    tokio::select! {
                        checked = self.pause(&mut conn, backoff) => checked?,
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
            Ok(producer) => {
                self.producer = producer;
                metrics::counter!("relay_producers_replaced_total").increment(1);
            }
            Err(error) => {
                tracing::error!(error = %error_chain(&error), "could not create a new Kafka producer");
            }
        }
    }

    /// One move of the pipeline: queue the next batch while there is room and
    /// something to read, otherwise wait for the oldest batch's acknowledgements
    /// and advance the checkpoint past it.
    ///
    /// `conn` is the leader's session; tests may pass any connection to the
    /// database. Every statement on it is bounded, and while it waits for
    /// acknowledgements the session is checked every `RELAY_SESSION_CHECK_MS`.
    pub async fn step(
        &self,
        conn: &mut PgConnection,
        progress: &mut Progress,
    ) -> Result<Step, RelayError> {
        self.step_or_wake(conn, progress, std::future::pending())
            .await
    }

    /// [`Self::step`], except that a wait for acknowledgements ends when
    /// `committed` does (new events were committed: a NOTIFY) while the
    /// pipeline has room for another batch. The waiting batch then goes back
    /// to the front of the pipeline, and the next step reads the new events,
    /// so they are queued on the producer behind it and leave as soon as it
    /// is acknowledged, rather than after its checkpoint and a read.
    #[tracing::instrument(name = "relay_step", skip_all, fields(checkpoint = progress.checkpoint.global_position))]
    pub async fn step_or_wake(
        &self,
        conn: &mut PgConnection,
        progress: &mut Progress,
        committed: impl Future<Output = ()>,
    ) -> Result<Step, RelayError> {
        let timeout = self.settings.statement_timeout;
        if progress.in_flight.len() < PIPELINE_DEPTH {
            let batch = session::bounded(
                timeout,
                read_batch(conn, progress.cursor, self.settings.batch_size),
            )
            .await?;
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
        let Some(mut oldest) = progress.in_flight.pop_front() else {
            return Ok(Step::Idle);
        };
        let room = progress.in_flight.len() + 1 < PIPELINE_DEPTH;
        let mut committed = std::pin::pin!(committed);
        // Every message up to `oldest.last` is acknowledged before the
        // checkpoint may pass it. Meanwhile the session must stay alive: a
        // leader that lost it must stop, whatever Kafka does.
        loop {
            tokio::select! {
                acked = &mut oldest.acks => break acked?,
                () = tokio::time::sleep(self.settings.session_check) => {
                    session::check(conn, timeout).await?;
                }
                () = &mut committed, if room => {
                    progress.in_flight.push_front(oldest);
                    return Ok(Step::Woken);
                }
            }
        }
        session::bounded(
            timeout,
            log::save_checkpoint(conn, &self.kafka.topic, oldest.last),
        )
        .await?;
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

    /// Waits `duration`, checking the session every `RELAY_SESSION_CHECK_MS`.
    async fn pause(&self, conn: &mut PgConnection, duration: Duration) -> Result<(), RelayError> {
        let until = Instant::now() + duration;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            tokio::time::sleep(left.min(self.settings.session_check)).await;
            session::check(conn, self.settings.statement_timeout).await?;
        }
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
    pub async fn ensure_topic(&self) -> Result<(), RelayError> {
        let admin: AdminClient<DefaultClientContext> = admin_config(&self.kafka).create()?;
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

/// Ends when a NOTIFY arrives; never, if the listener fails (the relay
/// then goes on as if none came: the poll and the session check still run).
async fn notified(listener: &mut PgListener) {
    if listener.recv().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// After a NOTIFY the relay reads at once, but the new event may not be
/// readable yet: it is published only below the cluster's xmin, and another
/// transaction that was open when it committed (of any database) holds that
/// back and sends no NOTIFY when it ends. So a read that found nothing after a
/// NOTIFY is retried soon, at growing intervals, before the relay falls back
/// to waiting for the next NOTIFY or its poll.
const FIRST_RECHECK: Duration = Duration::from_millis(1);
const LAST_RECHECK: Duration = Duration::from_millis(128);

/// The wait before the next read after an idle one: `notified` is whether a
/// NOTIFY (rather than the timeout) ended the last wait.
fn next_recheck(recheck: Option<Duration>, notified: bool) -> Option<Duration> {
    if notified {
        return Some(FIRST_RECHECK);
    }
    recheck
        .map(|wait| wait * 2)
        .filter(|wait| *wait <= LAST_RECHECK)
}

/// The producer settings: `KAFKA_CONFIG_*` (security, tuning), then the
/// settings the delivery guarantees rest on, which always win.
pub fn producer_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = kafka.client.client_config();
    if config.get("client.id").is_none() {
        config.set("client.id", "userstream-relay");
    }
    // No linger (librdkafka's default is 5 ms): an event leaves as soon as
    // it is queued, and while a request is out the next ones gather, so
    // batching grows with the load rather than costing a fixed 5 ms.
    // Nagle's algorithm would hold a small request back behind an
    // unacknowledged one.
    for (name, value) in [
        ("compression.type", "lz4"),
        ("linger.ms", "0"),
        ("socket.nagle.disable", "true"),
    ] {
        if config.get(name).is_none() {
            config.set(name, value);
        }
    }
    kafka.client.apply(
        &mut config,
        &[
            ("bootstrap.servers", kafka.brokers.clone()),
            // No duplicates or reordering from the producer's own retries.
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            // Never give up on a message: a timed-out message leaves a gap
            // that later messages of its partition pass, and re-sending it
            // would put it after them. While Kafka is away the batch waits.
            ("message.timeout.ms", "0".into()),
            // Any other permanent failure of a message (e.g. the broker
            // refusing it as too large) is a fatal error, not a gap: the
            // relay replaces the producer and re-sends from the checkpoint.
            ("enable.gapless.guarantee", "true".into()),
            // One produce request at a time. With five in flight and no
            // linger, the fatal-error test reordered a user in 4 runs of 30:
            // a request that followed a refused one was written, so the
            // refused event's re-send landed after its successor; with one,
            // 0 of 30. librdkafka does not promise this (ARCHITECTURE.md,
            // relay, says what is still open).
            ("max.in.flight.requests.per.connection", "1".into()),
            // Same key → same partition as Java clients compute it.
            ("partitioner", "murmur2_random".into()),
        ],
    );
    config
}

/// The admin client's settings (creating the topic): the same security.
pub fn admin_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = kafka.client.client_config();
    kafka
        .client
        .set_own(&mut config, "bootstrap.servers", kafka.brokers.clone());
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_notify_reads_are_retried_at_growing_intervals_then_left_to_the_poll() {
        let mut recheck = next_recheck(None, true);
        let mut waits = Vec::new();
        while let Some(wait) = recheck {
            waits.push(wait.as_millis());
            recheck = next_recheck(recheck, false);
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128]);
        assert_eq!(next_recheck(Some(LAST_RECHECK), true), Some(FIRST_RECHECK));
        assert_eq!(next_recheck(None, false), None);
    }
}
