//! query-api settings, read once from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use platform::config::{parse, string, InvalidSetting};
use secrecy::{ExposeSecret, SecretString};

/// Local development defaults; production sets the variables.
pub const DEV_DATABASE_URL: &str = "postgres://userstream:userstream@127.0.0.1:5432/userstream";
pub const DEV_REDIS_URL: &str = "redis://127.0.0.1:6379";

#[derive(Debug, Clone)]
pub struct Settings {
    /// `BIND_ADDR`, default `127.0.0.1:3002`.
    pub bind_addr: SocketAddr,
    /// `DATABASE_URL`.
    pub database_url: SecretString,
    /// `DATABASE_MAX_CONNECTIONS`, default 20.
    pub database_max_connections: u32,
    /// `REDIS_URL`.
    pub redis_url: SecretString,
    /// `REDIS_KEY_PREFIX`, default `userstream:` (must match the projector's).
    pub redis_key_prefix: String,
    /// `REDIS_TIMEOUT_MS`: deadline of one Redis call before falling back to PostgreSQL, default 50.
    pub redis_timeout: Duration,
    /// `REDIS_VIEW_TTL_SECS`: lifetime of a view cached on a miss, default one day.
    pub redis_view_ttl: Duration,
    /// `REQUEST_TIMEOUT_MS`, default 5 000.
    pub request_timeout: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, InvalidSetting> {
        Ok(Self {
            bind_addr: parse("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 3002)))?,
            database_url: string("DATABASE_URL", DEV_DATABASE_URL).into(),
            database_max_connections: parse("DATABASE_MAX_CONNECTIONS", 20)?,
            redis_url: string("REDIS_URL", DEV_REDIS_URL).into(),
            redis_key_prefix: string("REDIS_KEY_PREFIX", "userstream:"),
            redis_timeout: Duration::from_millis(parse("REDIS_TIMEOUT_MS", 50)?),
            redis_view_ttl: Duration::from_secs(parse("REDIS_VIEW_TTL_SECS", 86_400)?),
            request_timeout: Duration::from_millis(parse("REQUEST_TIMEOUT_MS", 5_000)?),
        })
    }

    pub fn database_url(&self) -> &str {
        self.database_url.expose_secret()
    }

    pub fn redis_url(&self) -> &str {
        self.redis_url.expose_secret()
    }
}
