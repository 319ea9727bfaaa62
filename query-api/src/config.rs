//! query-api settings, read once from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use platform::config::{parse, string, InvalidSetting};
use read_model::CacheSettings;
use secrecy::{ExposeSecret, SecretString};

/// Local development default; production sets DATABASE_URL.
pub const DEV_DATABASE_URL: &str = "postgres://userstream:userstream@127.0.0.1:5432/userstream";

#[derive(Debug, Clone)]
pub struct Settings {
    /// `BIND_ADDR`, default `127.0.0.1:3002`.
    pub bind_addr: SocketAddr,
    /// `DATABASE_URL`.
    pub database_url: SecretString,
    /// `DATABASE_MAX_CONNECTIONS`, default 20.
    pub database_max_connections: u32,
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
            database_url: string("DATABASE_URL", DEV_DATABASE_URL).into(),
            database_max_connections: parse("DATABASE_MAX_CONNECTIONS", 20)?,
            cache: CacheSettings::from_env(Duration::from_millis(50))?,
            request_timeout: Duration::from_millis(parse("REQUEST_TIMEOUT_MS", 5_000)?),
        })
    }

    pub fn database_url(&self) -> &str {
        self.database_url.expose_secret()
    }
}
