//! command-api settings, read once from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use platform::config::{parse, string, InvalidSetting};
use platform::db::DatabaseSettings;
use secrecy::SecretString;

#[derive(Debug, Clone)]
pub struct Settings {
    /// `BIND_ADDR`, default `127.0.0.1:3001`.
    pub bind_addr: SocketAddr,
    /// `DATABASE_URL`, `DATABASE_MAX_CONNECTIONS` (default 20).
    pub database: DatabaseSettings,
    /// `ADMIN_TOKEN`: required, at least 16 characters; there is no built-in one.
    pub admin_token: SecretString,
    /// `HASH_CONCURRENCY`: argon2 hashes computed at once, default the number of cores.
    pub hash_concurrency: usize,
    /// `REQUEST_TIMEOUT_MS`, default 10 000.
    pub request_timeout: Duration,
    /// `IDEMPOTENCY_TTL_SECS`: how long an Idempotency-Key answers retries, default 24 h.
    pub idempotency_ttl: Duration,
    pub kafka: KafkaSettings,
    pub relay: RelaySettings,
}

#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `KAFKA_BROKERS`, default `127.0.0.1:9092`.
    pub brokers: String,
    /// `KAFKA_TOPIC`, default `users.events.v1`.
    pub topic: String,
    /// `KAFKA_TOPIC_PARTITIONS` used when the relay creates the topic, default 6.
    pub topic_partitions: i32,
    /// `KAFKA_TOPIC_REPLICATION` used when the relay creates the topic, default 1 (one local broker).
    pub topic_replication: i32,
    /// `CE_SOURCE`: the CloudEvents `source` attribute, default `urn:userstream:command-api`.
    pub ce_source: String,
}

#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// `RELAY_ENABLED`, default true. Replicas compete for one leader lock.
    pub enabled: bool,
    /// `RELAY_BATCH_SIZE`: most events read and published per round trip,
    /// default 5000. A batch waits for all its acknowledgements, so larger
    /// batches amortise that wait when a backlog drains; a quiet log gives
    /// small batches anyway.
    pub batch_size: i64,
    /// `RELAY_POLL_INTERVAL_MS`: fallback poll when no notification arrives, default 500.
    pub poll_interval: Duration,
    /// `RELAY_LEADER_RETRY_MS`: how often a follower tries to take the lock, default 1000.
    pub leader_retry: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, InvalidSetting> {
        let admin_token = string("ADMIN_TOKEN", "");
        if admin_token.chars().count() < 16 {
            return Err(InvalidSetting {
                name: "ADMIN_TOKEN",
                value: "<hidden>".into(),
                reason: "must be set to at least 16 characters".into(),
            });
        }
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Ok(Self {
            bind_addr: parse("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 3001)))?,
            database: DatabaseSettings::from_env(20, "userstream_command")?,
            admin_token: admin_token.into(),
            hash_concurrency: parse("HASH_CONCURRENCY", cores)?.max(1),
            request_timeout: Duration::from_millis(parse("REQUEST_TIMEOUT_MS", 10_000)?),
            idempotency_ttl: Duration::from_secs(parse("IDEMPOTENCY_TTL_SECS", 86_400)?),
            kafka: KafkaSettings {
                brokers: string("KAFKA_BROKERS", "127.0.0.1:9092"),
                topic: string("KAFKA_TOPIC", "users.events.v1"),
                topic_partitions: parse("KAFKA_TOPIC_PARTITIONS", 6)?,
                topic_replication: parse("KAFKA_TOPIC_REPLICATION", 1)?,
                ce_source: string("CE_SOURCE", "urn:userstream:command-api"),
            },
            relay: RelaySettings {
                enabled: parse("RELAY_ENABLED", true)?,
                batch_size: parse("RELAY_BATCH_SIZE", 5000)?,
                poll_interval: Duration::from_millis(parse("RELAY_POLL_INTERVAL_MS", 500)?),
                leader_retry: Duration::from_millis(parse("RELAY_LEADER_RETRY_MS", 1000)?),
            },
        })
    }
}
