//! The relay: mirrors the event log to Kafka, gap-safe, at least once.
//!
//! * One leader among all replicas: the relay holds a session-level advisory
//!   lock on a dedicated connection, and reads and checkpoints through that same
//!   connection, so a relay whose session died cannot move the checkpoint.
//! * Gap-safe reads: events are read in (transaction id, position) order and only
//!   below `pg_snapshot_xmin(pg_current_snapshot())`, i.e. from transactions that
//!   have all finished. An event that commits late with a lower position belongs
//!   to a transaction at or above xmin, so it is waited for, never skipped.
//! * The checkpoint moves only after Kafka acknowledged every message of the
//!   batch; a failed delivery retries the batch (same `ce_id`s), never skips.
//! * Woken by LISTEN/NOTIFY at commit, with a polling fallback.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use events::domain::RecordedEvent;
use events::{IntegrationEvent, UserEvent};
use futures::future::try_join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use sqlx::postgres::{PgConnection, PgListener};
use sqlx::{Connection, PgPool};
use uuid::Uuid;

use crate::config::{KafkaSettings, RelaySettings};
use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;

/// Advisory lock key of the relay leader ("usrelay" in ASCII). Advisory locks are
/// per database, so each database (and each test database) has its own leader.
const LEADER_LOCK: i64 = 0x0075_7372_656c_6179;
pub const NOTIFY_CHANNEL: &str = "events_appended";

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

/// The relay's position in the log: the last event Kafka acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub transaction_id: i64,
    pub global_position: i64,
}

/// What one [`Relay::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// This many events were published and checkpointed.
    Published(usize),
    /// Nothing committed is waiting.
    Idle,
}

/// What `/readyz` shows of the relay in this process.
#[derive(Clone, Default)]
pub struct RelayStatus(Arc<Mutex<StatusInner>>);

#[derive(Default)]
struct StatusInner {
    enabled: bool,
    leader: bool,
    checkpoint: Checkpoint,
    last_published_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    lag: Option<Lag>,
}

/// How far Kafka is behind the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Events committed to the log but not yet acknowledged by Kafka.
    pub events: i64,
    /// Age of the oldest of them; 0 when there are none.
    pub seconds: f64,
}

impl RelayStatus {
    fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        if let Ok(mut inner) = self.0.lock() {
            f(&mut inner);
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let Ok(s) = self.0.lock() else {
            return serde_json::json!({ "error": "status unavailable" });
        };
        serde_json::json!({
            "enabled": s.enabled,
            "leader": s.leader,
            "checkpoint_position": s.checkpoint.global_position,
            "last_published_at": s.last_published_at,
            "last_error": s.last_error,
            "lag_events": s.lag.map(|l| l.events),
            "lag_seconds": s.lag.map(|l| l.seconds),
        })
    }

    /// Measures the lag from the shared checkpoint every `every`, for
    /// `/readyz` and the `relay_lag_*` gauges. Runs in every replica, leader
    /// or not, since it reads only the log and the checkpoint.
    pub async fn monitor_lag(
        self,
        pool: PgPool,
        relay: String,
        every: Duration,
        mut shutdown: Shutdown,
    ) {
        loop {
            match lag(&pool, &relay).await {
                Ok(lag) => {
                    metrics::gauge!("relay_lag_events").set(lag.events as f64);
                    metrics::gauge!("relay_lag_seconds").set(lag.seconds);
                    self.update(|s| s.lag = Some(lag));
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "could not measure the relay lag");
                    self.update(|s| s.lag = None);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.requested() => return,
            }
        }
    }
}

/// Events after the checkpoint of `relay`, and the age of the oldest.
#[tracing::instrument(name = "sql_relay_lag", skip(pool))]
pub async fn lag(pool: &PgPool, relay: &str) -> Result<Lag, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let checkpoint = load_checkpoint(&mut conn, relay).await?;
    let (events, seconds): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(recorded_at))::float8 FROM events \
         WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2)",
    )
    .bind(checkpoint.transaction_id)
    .bind(checkpoint.global_position)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Lag {
        events,
        seconds: seconds.unwrap_or(0.0).max(0.0),
    })
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
        // Let in-flight messages reach the broker before the process exits.
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
        let mut checkpoint = load_checkpoint(&mut conn, &self.kafka.topic).await?;
        let mut topic_ready = false;
        let mut backoff = Duration::from_millis(200);

        while !shutdown.is_requested() {
            let outcome = async {
                if !topic_ready {
                    self.ensure_topic().await?;
                    topic_ready = true;
                }
                self.step(&mut conn, &mut checkpoint).await
            };
            let outcome = tokio::select! {
                o = outcome => o,
                () = shutdown.requested() => return Ok(()),
            };
            match outcome {
                Ok(Step::Published(_)) => backoff = Duration::from_millis(200),
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
    /// refuses every later message; only a new producer can go on. The batch
    /// is re-sent from the checkpoint, so nothing is skipped.
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

    /// Publishes the next batch of finished events and advances the checkpoint.
    #[tracing::instrument(name = "relay_step", skip_all, fields(from = checkpoint.global_position))]
    pub async fn step(
        &self,
        conn: &mut PgConnection,
        checkpoint: &mut Checkpoint,
    ) -> Result<Step, RelayError> {
        let started = Instant::now();
        let batch = read_batch(conn, *checkpoint, self.settings.batch_size).await?;
        let Some(last) = batch.last().map(|(xid, e)| Checkpoint {
            transaction_id: *xid,
            global_position: e.global_position,
        }) else {
            return Ok(Step::Idle);
        };
        let deliveries = batch
            .iter()
            .map(|(_, recorded)| self.send(&IntegrationEvent::from_recorded(recorded)))
            .collect::<Result<Vec<_>, _>>()?;
        // Every message must be acknowledged before the checkpoint may pass it.
        try_join_all(deliveries).await?;
        save_checkpoint(conn, &self.kafka.topic, last).await?;
        *checkpoint = last;

        let count = batch.len();
        metrics::counter!("relay_events_published_total").increment(count as u64);
        metrics::histogram!("relay_batch_duration_seconds").record(started.elapsed().as_secs_f64());
        let at = batch.last().map(|(_, e)| e.recorded_at);
        self.status.update(|s| {
            s.checkpoint = last;
            s.last_published_at = at;
            s.last_error = None;
        });
        Ok(Step::Published(count))
    }

    /// Queues one message; the returned future resolves when Kafka acknowledged it.
    fn send(
        &self,
        event: &IntegrationEvent,
    ) -> Result<impl std::future::Future<Output = Result<(), KafkaError>>, KafkaError> {
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
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        // Same key → same partition as Java clients compute it.
        .set("partitioner", "murmur2_random")
        .set(
            "message.timeout.ms",
            kafka.message_timeout.as_millis().to_string(),
        );
    config
}

#[tracing::instrument(name = "sql_load_checkpoint", skip(conn))]
async fn load_checkpoint(conn: &mut PgConnection, relay: &str) -> Result<Checkpoint, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM relay_checkpoints WHERE relay = $1",
    )
    .bind(relay)
    .fetch_optional(conn)
    .await?;
    Ok(
        row.map_or(Checkpoint::default(), |(xid, position)| Checkpoint {
            transaction_id: xid,
            global_position: position,
        }),
    )
}

#[tracing::instrument(name = "sql_save_checkpoint", skip(conn))]
async fn save_checkpoint(
    conn: &mut PgConnection,
    relay: &str,
    checkpoint: Checkpoint,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO relay_checkpoints (relay, transaction_id, global_position, updated_at) \
         VALUES ($1, $2::bigint::text::xid8, $3, now()) \
         ON CONFLICT (relay) DO UPDATE SET transaction_id = EXCLUDED.transaction_id, \
           global_position = EXCLUDED.global_position, updated_at = now()",
    )
    .bind(relay)
    .bind(checkpoint.transaction_id)
    .bind(checkpoint.global_position)
    .execute(conn)
    .await?;
    Ok(())
}

type Row = (
    i64,
    i64,
    Uuid,
    i32,
    Uuid,
    String,
    i16,
    serde_json::Value,
    DateTime<Utc>,
);

/// The next events after `after`, from finished transactions only.
#[tracing::instrument(name = "sql_read_batch", skip(conn))]
pub async fn read_batch(
    conn: &mut PgConnection,
    after: Checkpoint,
    limit: i64,
) -> Result<Vec<(i64, RecordedEvent)>, RelayError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position, stream_id, stream_version, event_id, \
                event_type, schema_version, payload, recorded_at \
         FROM events \
         WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2) \
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY transaction_id, global_position \
         LIMIT $3",
    )
    .bind(after.transaction_id)
    .bind(after.global_position)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(
            |(xid, position, stream_id, version, event_id, event_type, schema, payload, at)| {
                let event = UserEvent::decode(&event_type, schema, payload)
                    .map_err(|source| RelayError::Decode { position, source })?;
                Ok((
                    xid,
                    RecordedEvent {
                        global_position: position,
                        stream_id,
                        stream_version: version,
                        event_id,
                        recorded_at: at,
                        event,
                    },
                ))
            },
        )
        .collect()
}
