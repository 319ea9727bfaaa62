//! Redis views, namespaced and guarded so that the cache never serves a
//! version older than the read model has already committed.
//!
//! Keys live in a namespace `{prefix}p{projection_version}:e{epoch}:`, which
//! `projection_state` names. In it:
//! * `user:{id}` is a hash `{v, p, body}`: the view at version `v`, or with
//!   `p = 1` a *pending* mark: version `v` is being committed, so readers miss
//!   and fills of older versions are refused.
//! * `through` is the number of the last projection batch Redis was told of.
//!
//! The projector marks a batch's users pending and raises `through` *before*
//! committing the batch ([`ViewCache::mark`]), and puts the views after
//! ([`ViewCache::put_many`]). A reader trusts an entry only when it is not
//! pending and `through` is at least the last committed batch number
//! ([`ViewCache::get`]): a Redis that lost writes (restarted from a snapshot,
//! failed over) holds a lower `through` and is not trusted; a Redis that could
//! not be marked (down, paused) made the batch drop the namespace instead. All
//! compares happen inside Redis, in Lua, so concurrent writers cannot interleave.
//!
//! Every call has a short deadline, and after a failure to connect the cache
//! stays off for a moment instead of making every request wait on a dead server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use events::UserView;
use platform::config::{self, InvalidSetting};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

/// Marks a batch's users pending and raises `through`, unless the namespace
/// is missing batches. KEYS[1] = through, KEYS[2..] = user keys; ARGV[1] = last
/// committed batch number, ARGV[2] = this batch's number, ARGV[3] = ttl,
/// ARGV[4..] = the versions being committed. Returns 1 if marked, 0 if the
/// namespace cannot be trusted (its `through` is missing or behind).
const MARK: &str = r"
local through = tonumber(redis.call('GET', KEYS[1]))
if not through or through < tonumber(ARGV[1]) then
  return 0
end
for i = 2, #KEYS do
  local v = tonumber(ARGV[i + 2])
  local current = tonumber(redis.call('HGET', KEYS[i], 'v'))
  if not current or current < v then
    redis.call('HSET', KEYS[i], 'v', v, 'p', 1)
    redis.call('HDEL', KEYS[i], 'body')
    redis.call('EXPIRE', KEYS[i], ARGV[3])
  end
end
if tonumber(ARGV[2]) > through then
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
";

/// Puts views unless a newer version (or the same one, settled) is there.
/// KEYS = user keys; ARGV[1] = ttl, then (version, body) per key. Returns the
/// number written.
const PUT: &str = r"
local written = 0
for i = 1, #KEYS do
  local v = tonumber(ARGV[2 * i])
  local current = redis.call('HMGET', KEYS[i], 'v', 'p')
  local cv = tonumber(current[1])
  if not cv or cv < v or (cv == v and current[2] == '1') then
    redis.call('HSET', KEYS[i], 'v', v, 'p', 0, 'body', ARGV[2 * i + 1])
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    written = written + 1
  end
end
return written
";

/// A trusted entry, or why not. KEYS[1] = user key, KEYS[2] = through;
/// ARGV[1] = last committed batch number known to the reader. Returns
/// {version, body} on a hit, {0} on a miss, {-1} when the namespace is behind.
/// Flagged read-only, so it runs on replicas and during `CLIENT PAUSE WRITE`.
const GET: &str = r"#!lua flags=no-writes
local through = tonumber(redis.call('GET', KEYS[2]))
if not through or through < tonumber(ARGV[1]) then
  return {-1}
end
local e = redis.call('HMGET', KEYS[1], 'v', 'p', 'body')
if not e[1] or e[2] == '1' or not e[3] then
  return {0}
end
return {tonumber(e[1]), e[3]}
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
    #[error("unexpected answer from a cache script: {0}")]
    Protocol(String),
}

/// One namespace of cached views: a generation of the read model and a cache
/// epoch, both named by `projection_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Namespace {
    pub projection_version: i32,
    pub epoch: i64,
}

/// What [`ViewCache::get`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A settled entry in a namespace that has every committed batch.
    Hit(CachedView),
    /// No entry, or one whose next version is being committed.
    Miss,
    /// The namespace is behind the read model (it lost writes): trust nothing in it.
    Behind,
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
    mark: redis::Script,
    put: redis::Script,
    get: redis::Script,
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
                mark: redis::Script::new(MARK),
                put: redis::Script::new(PUT),
                get: redis::Script::new(GET),
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

    /// The key prefix of `ns`.
    pub fn namespace_prefix(&self, ns: Namespace) -> String {
        format!(
            "{}p{}:e{}:",
            self.inner.prefix, ns.projection_version, ns.epoch
        )
    }

    /// The key of one user's view in `ns`.
    pub fn key(&self, ns: Namespace, id: Uuid) -> String {
        format!("{}user:{id}", self.namespace_prefix(ns))
    }

    /// The key holding the number of the last batch `ns` was told of.
    pub fn through_key(&self, ns: Namespace) -> String {
        format!("{}through", self.namespace_prefix(ns))
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

    /// The view of `id` in `ns`, trusted only when the namespace has every
    /// batch up to `committed_seq` and the entry is not pending.
    #[tracing::instrument(name = "redis_get_view", skip(self))]
    pub async fn get(
        &self,
        ns: Namespace,
        id: Uuid,
        committed_seq: i64,
    ) -> Result<Lookup, CacheError> {
        let mut conn = self.connection().await?;
        let answer: Vec<redis::Value> = self
            .deadline(async {
                Ok(self
                    .inner
                    .get
                    .key(self.key(ns, id))
                    .key(self.through_key(ns))
                    .arg(committed_seq)
                    .invoke_async(&mut conn)
                    .await?)
            })
            .await?;
        match answer.as_slice() {
            [redis::Value::Int(-1)] => Ok(Lookup::Behind),
            [redis::Value::Int(0)] => Ok(Lookup::Miss),
            [version, body] => Ok(Lookup::Hit(CachedView {
                version: redis::from_redis_value(version)?,
                body: redis::from_redis_value(body)?,
            })),
            other => Err(CacheError::Protocol(format!("{other:?}"))),
        }
    }

    /// Before a batch commits: marks `pending` (user, version being
    /// committed) in `ns` and records batch `seq`, provided `ns` has every
    /// batch up to `committed_seq`. Returns false when the namespace is
    /// behind; the caller must then stop trusting it.
    #[tracing::instrument(name = "redis_mark_pending", skip_all, fields(users = pending.len(), seq))]
    pub async fn mark(
        &self,
        ns: Namespace,
        committed_seq: i64,
        seq: i64,
        pending: &[(Uuid, i32)],
    ) -> Result<bool, CacheError> {
        let mut conn = self.connection().await?;
        let mut invocation = self.inner.mark.key(self.through_key(ns));
        invocation
            .arg(committed_seq)
            .arg(seq)
            .arg(self.inner.ttl.as_secs().max(1));
        for (id, version) in pending {
            invocation.key(self.key(ns, *id)).arg(*version);
        }
        let marked: i32 = self
            .deadline(async { Ok(invocation.invoke_async(&mut conn).await?) })
            .await?;
        Ok(marked == 1)
    }

    /// Stores views in `ns`, each unless a newer (or the same, settled)
    /// version is there. Returns how many were written.
    #[tracing::instrument(name = "redis_put_views", skip_all, fields(views = views.len()))]
    pub async fn put_many(&self, ns: Namespace, views: &[&UserView]) -> Result<usize, CacheError> {
        if views.is_empty() {
            return Ok(0);
        }
        let mut conn = self.connection().await?;
        let mut invocation = self.inner.put.prepare_invoke();
        invocation.arg(self.inner.ttl.as_secs().max(1));
        for view in views {
            let body = serde_json::to_string(view).expect("views serialise to JSON");
            invocation
                .key(self.key(ns, view.id))
                .arg(view.version)
                .arg(body);
        }
        let written: usize = self
            .deadline(async { Ok(invocation.invoke_async(&mut conn).await?) })
            .await?;
        Ok(written)
    }

    /// Stores one view (a reader's fill after a miss); see [`Self::put_many`].
    pub async fn put(&self, ns: Namespace, view: &UserView) -> Result<bool, CacheError> {
        Ok(self.put_many(ns, &[view]).await? == 1)
    }

    /// The number of the last batch `ns` was told of, if it has one.
    #[tracing::instrument(name = "redis_get_through", skip(self))]
    pub async fn through(&self, ns: Namespace) -> Result<Option<i64>, CacheError> {
        let mut conn = self.connection().await?;
        self.deadline(async {
            Ok(redis::cmd("GET")
                .arg(self.through_key(ns))
                .query_async(&mut conn)
                .await?)
        })
        .await
    }

    /// Opens a fresh namespace at batch `seq`. Returns false if `ns` was
    /// already in use (the caller draws another epoch).
    #[tracing::instrument(name = "redis_open_namespace", skip(self))]
    pub async fn open(&self, ns: Namespace, seq: i64) -> Result<bool, CacheError> {
        let mut conn = self.connection().await?;
        let created: Option<String> = self
            .deadline(async {
                Ok(redis::cmd("SET")
                    .arg(self.through_key(ns))
                    .arg(seq)
                    .arg("NX")
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        Ok(created.is_some())
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
