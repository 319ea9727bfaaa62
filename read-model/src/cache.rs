//! Redis views: one hash per user, `{prefix}user:{id}` → `{v: version, body: JSON}`.
//!
//! Writes go through a Lua script that compares versions inside Redis, so a
//! slow or repeated writer can never replace a view with an older one. Every
//! call has a short deadline and, after a failure to connect, the cache stays
//! off for a moment instead of making every request wait on a dead server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use events::UserView;
use platform::config::{self, InvalidSetting};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

/// Sets the view unless Redis already holds the same or a newer version.
/// KEYS[1] = key; ARGV = version, body, ttl seconds. Returns 1 if written.
const PUT_IF_NEWER: &str = r"
local current = redis.call('HGET', KEYS[1], 'v')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'body', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
";

/// How long the cache stays off after a failed connection attempt.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis error")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis is unreachable; next attempt in under {0:?}")]
    Unreachable(Duration),
}

/// A cached view: its version and the JSON body served for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedView {
    pub version: i32,
    pub body: String,
}

/// Where the views are cached and how patiently; shared by the projector
/// and the query API so both read the same variables.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// `REDIS_URL`, default `redis://127.0.0.1:6379` (local development).
    pub url: SecretString,
    /// `REDIS_KEY_PREFIX`, default `userstream:`; must match across services.
    pub key_prefix: String,
    /// `REDIS_TIMEOUT_MS`: deadline of one Redis call.
    pub timeout: Duration,
    /// `REDIS_VIEW_TTL_SECS`: how long a cached view lives, default one day.
    pub view_ttl: Duration,
}

impl CacheSettings {
    /// Reads the variables; `default_timeout` differs by caller (a reader
    /// falls back to PostgreSQL sooner than the projector gives up a write).
    pub fn from_env(default_timeout: Duration) -> Result<Self, InvalidSetting> {
        Ok(Self {
            url: config::string("REDIS_URL", "redis://127.0.0.1:6379").into(),
            key_prefix: config::string("REDIS_KEY_PREFIX", "userstream:"),
            timeout: Duration::from_millis(config::parse(
                "REDIS_TIMEOUT_MS",
                default_timeout.as_millis() as u64,
            )?),
            view_ttl: Duration::from_secs(config::parse("REDIS_VIEW_TTL_SECS", 86_400)?),
        })
    }
}

#[derive(Clone)]
pub struct ViewCache {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
    script: redis::Script,
    connection: Mutex<Connection>,
}

#[derive(Default)]
struct Connection {
    manager: Option<ConnectionManager>,
    retry_at: Option<Instant>,
}

impl ViewCache {
    /// Does not connect yet: a service starts even while Redis is away.
    pub fn new(
        url: &str,
        prefix: impl Into<String>,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<Self, CacheError> {
        Ok(Self {
            inner: Arc::new(Inner {
                client: redis::Client::open(url)?,
                prefix: prefix.into(),
                ttl,
                timeout,
                script: redis::Script::new(PUT_IF_NEWER),
                connection: Mutex::new(Connection::default()),
            }),
        })
    }

    /// The cache `settings` describe (not connected yet).
    pub fn from_settings(settings: &CacheSettings) -> Result<Self, CacheError> {
        Self::new(
            settings.url.expose_secret(),
            settings.key_prefix.clone(),
            settings.view_ttl,
            settings.timeout,
        )
    }

    pub fn key(&self, id: Uuid) -> String {
        format!("{}user:{id}", self.inner.prefix)
    }

    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        {
            let state = self.inner.connection.lock().expect("cache state lock");
            if let Some(manager) = &state.manager {
                return Ok(manager.clone());
            }
            if let Some(at) = state.retry_at {
                let now = Instant::now();
                if at > now {
                    return Err(CacheError::Unreachable(at - now));
                }
            }
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.inner.timeout)
            .set_response_timeout(self.inner.timeout)
            .set_number_of_retries(1);
        let connected = self
            .deadline(async {
                ConnectionManager::new_with_config(self.inner.client.clone(), config)
                    .await
                    .map_err(CacheError::from)
            })
            .await;
        let mut state = self.inner.connection.lock().expect("cache state lock");
        match connected {
            Ok(manager) => {
                state.manager = Some(manager.clone());
                state.retry_at = None;
                Ok(manager)
            }
            Err(error) => {
                state.retry_at = Some(Instant::now() + RECONNECT_AFTER);
                Err(error)
            }
        }
    }

    async fn deadline<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        tokio::time::timeout(self.inner.timeout, fut)
            .await
            .map_err(|_| CacheError::Timeout(self.inner.timeout))?
    }

    /// The cached view of `id`, if any.
    #[tracing::instrument(name = "redis_get_view", skip(self))]
    pub async fn get(&self, id: Uuid) -> Result<Option<CachedView>, CacheError> {
        let mut conn = self.connection().await?;
        let key = self.key(id);
        let (version, body): (Option<i32>, Option<String>) = self
            .deadline(async {
                Ok(redis::cmd("HMGET")
                    .arg(&key)
                    .arg("v")
                    .arg("body")
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        Ok(version
            .zip(body)
            .map(|(version, body)| CachedView { version, body }))
    }

    /// Stores `view` unless a same-or-newer version is there. Returns whether it wrote.
    #[tracing::instrument(name = "redis_put_view", skip_all, fields(id = %view.id, version = view.version))]
    pub async fn put(&self, view: &UserView) -> Result<bool, CacheError> {
        let mut conn = self.connection().await?;
        let body = serde_json::to_string(view).expect("views serialise to JSON");
        let written: i32 = self
            .deadline(async {
                Ok(self
                    .inner
                    .script
                    .key(self.key(view.id))
                    .arg(view.version)
                    .arg(body)
                    .arg(self.inner.ttl.as_secs().max(1))
                    .invoke_async(&mut conn)
                    .await?)
            })
            .await?;
        Ok(written == 1)
    }

    /// `PING`, for readiness checks.
    pub async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.connection().await?;
        self.deadline(async {
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            Ok(())
        })
        .await
    }
}
