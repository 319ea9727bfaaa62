//! projector settings, read once from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use platform::config::{parse, string, InvalidSetting};
use platform::db::DatabaseSettings;
use read_model::CacheSettings;

#[derive(Debug, Clone)]
pub struct Settings {
    /// `BIND_ADDR` for /healthz, /readyz and /metrics, default `127.0.0.1:3003`.
    pub bind_addr: SocketAddr,
    /// `DATABASE_URL`, `DATABASE_MAX_CONNECTIONS` (default 10).
    pub database: DatabaseSettings,
    /// `REDIS_*`; `REDIS_TIMEOUT_MS` defaults to 200.
    pub cache: CacheSettings,
    /// `KAFKA_BROKERS`, default `127.0.0.1:9092`.
    pub kafka_brokers: String,
    /// `KAFKA_TOPIC`, default `users.events.v1`.
    pub kafka_topic: String,
    /// `KAFKA_GROUP_ID`, default `userstream-projector`.
    pub kafka_group_id: String,
    /// `KAFKA_SESSION_TIMEOUT_MS`, default 10 000: how long the group waits
    /// for a member that stopped heartbeating (a crashed projector) before
    /// giving its partitions to another.
    pub kafka_session_timeout_ms: u32,
    /// `KAFKA_MAX_POLL_INTERVAL_MS`, default 300 000 (librdkafka's): a
    /// consumer that does not poll for this long leaves its group. The
    /// projector keeps polling while it retries, so this bounds only a hang.
    pub kafka_max_poll_interval_ms: u32,
}

impl Settings {
    pub fn from_env() -> Result<Self, InvalidSetting> {
        Ok(Self {
            bind_addr: parse("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 3003)))?,
            database: DatabaseSettings::from_env(10, "userstream_projector")?,
            cache: CacheSettings::from_env(Duration::from_millis(200))?,
            kafka_brokers: string("KAFKA_BROKERS", "127.0.0.1:9092"),
            kafka_topic: string("KAFKA_TOPIC", "users.events.v1"),
            kafka_group_id: string("KAFKA_GROUP_ID", "userstream-projector"),
            kafka_session_timeout_ms: parse("KAFKA_SESSION_TIMEOUT_MS", 10_000)?,
            kafka_max_poll_interval_ms: parse("KAFKA_MAX_POLL_INTERVAL_MS", 300_000)?,
        })
    }
}
