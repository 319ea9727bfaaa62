//! query-api settings, read once from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use platform::config::{parse, InvalidSetting};
use platform::db::DatabaseSettings;
use read_model::CacheSettings;

#[derive(Debug, Clone)]
pub struct Settings {
    /// `BIND_ADDR`, default `127.0.0.1:3002`.
    pub bind_addr: SocketAddr,
    /// `DATABASE_URL`, `DATABASE_MAX_CONNECTIONS` (default 20).
    pub database: DatabaseSettings,
    /// `REDIS_*`; `REDIS_TIMEOUT_MS` defaults to 50, after which a read falls
    /// back to PostgreSQL.
    pub cache: CacheSettings,
    /// `REQUEST_TIMEOUT_MS`, default 5 000.
    pub request_timeout: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, InvalidSetting> {
        Ok(Self {
            bind_addr: parse("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 3002)))?,
            database: DatabaseSettings::from_env(20, "userstream_query")?,
            cache: CacheSettings::from_env(Duration::from_millis(50))?,
            request_timeout: Duration::from_millis(parse("REQUEST_TIMEOUT_MS", 5_000)?),
        })
    }
}
