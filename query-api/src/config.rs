//! query-api settings, read once from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use platform::config::{parse, string, InvalidSetting};
use platform::db::DatabaseSettings;
use read_model::CacheSettings;
use secrecy::SecretString;

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
    /// `QUERY_API_TOKEN`: when set (at least 16 characters), every `/users`
    /// read needs `Authorization: Bearer <it>`. Unset, the API is for
    /// internal networks only.
    pub token: Option<SecretString>,
    /// `READ_WAIT_MAX_MS`, default 2 000: the longest a read with
    /// `min_version` or `min_position` waits for the read model.
    pub read_wait: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, InvalidSetting> {
        Ok(Self {
            bind_addr: parse("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 3002)))?,
            database: DatabaseSettings::from_env(20, "userstream_query")?,
            cache: CacheSettings::from_env(Duration::from_millis(50))?,
            request_timeout: Duration::from_millis(parse("REQUEST_TIMEOUT_MS", 5_000)?),
            token: token()?,
            read_wait: Duration::from_millis(parse("READ_WAIT_MAX_MS", 2_000)?),
        })
    }
}

pub const TOKEN_MIN_CHARS: usize = 16;

fn token() -> Result<Option<SecretString>, InvalidSetting> {
    let token = string("QUERY_API_TOKEN", "");
    if token.is_empty() {
        return Ok(None);
    }
    if token.chars().count() < TOKEN_MIN_CHARS {
        return Err(InvalidSetting {
            name: "QUERY_API_TOKEN",
            value: "<hidden>".into(),
            reason: format!("must be at least {TOKEN_MIN_CHARS} characters when set"),
        });
    }
    Ok(Some(token.into()))
}
