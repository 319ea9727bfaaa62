//! projector settings, read once from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use platform::config::{parse, string, InvalidSetting};
use secrecy::{ExposeSecret, SecretString};

/// Local development defaults; production sets the variables.
pub const DEV_DATABASE_URL: &str = "postgres://userstream:userstream@127.0.0.1:5432/userstream";
pub const DEV_REDIS_URL: &str = "redis://127.0.0.1:6379";

#[derive(Debug, Clone)]
pub struct Settings {
    /// `BIND_ADDR` for /healthz, /readyz and /metrics, default `127.0.0.1:3003`.
    pub bind_addr: SocketAddr,
    /// `DATABASE_URL`.
    pub database_url: SecretString,
    /// `DATABASE_MAX_CONNECTIONS`, default 10.
    pub database_max_connections: u32,
    /// `REDIS_URL`.
    pub redis_url: SecretString,
    /// `REDIS_KEY_PREFIX`, default `userstream:`.
    pub redis_key_prefix: String,
    /// `REDIS_TIMEOUT_MS`: deadline of one Redis call, default 200.
    pub redis_timeout: Duration,
    /// `REDIS_VIEW_TTL_SECS`: how long a cached view lives, default one day.
    pub redis_view_ttl: Duration,
    /// `KAFKA_BROKERS`, default `127.0.0.1:9092`.
    pub kafka_brokers: String,
    /// `KAFKA_TOPIC`, default `users.events.v1`.
    pub kafka_topic: String,
    /// `KAFKA_GROUP_ID`, default `userstream-projector`.
    pub kafka_group_id: String,
}

impl Settings {
    pub fn from_env() -> Result<Self, InvalidSetting> {
        Ok(Self {
            bind_addr: parse("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 3003)))?,
            database_url: string("DATABASE_URL", DEV_DATABASE_URL).into(),
            database_max_connections: parse("DATABASE_MAX_CONNECTIONS", 10)?,
            redis_url: string("REDIS_URL", DEV_REDIS_URL).into(),
            redis_key_prefix: string("REDIS_KEY_PREFIX", "userstream:"),
            redis_timeout: Duration::from_millis(parse("REDIS_TIMEOUT_MS", 200)?),
            redis_view_ttl: Duration::from_secs(parse("REDIS_VIEW_TTL_SECS", 86_400)?),
            kafka_brokers: string("KAFKA_BROKERS", "127.0.0.1:9092"),
            kafka_topic: string("KAFKA_TOPIC", "users.events.v1"),
            kafka_group_id: string("KAFKA_GROUP_ID", "userstream-projector"),
        })
    }

    pub fn database_url(&self) -> &str {
        self.database_url.expose_secret()
    }

    pub fn redis_url(&self) -> &str {
        self.redis_url.expose_secret()
    }
}
