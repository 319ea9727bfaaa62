//! Redis views, namespaced and guarded so that the cache never serves a
//! version older than the read model has already committed.
//!
//! Only hot views are cached: a view enters Redis when a reader misses and
//! fills it ([`ViewCache::fill`]), stays for `REDIS_VIEW_TTL_SECS`, and is
//! kept current by the projector while it is there. A view nobody reads
//! never takes more than a short-lived mark. An id with no view is cached as
//! absent for `REDIS_NEGATIVE_TTL_SECS` ([`ViewCache::fill_absent`]).
//!
//! Keys live in a namespace `{prefix}p{projection_version}:e{epoch}:`, which
//! `projection_state` names. In it:
//! * `user:{id}` is a string `{v}:{p}:{body}` ([`Entry`]): the view at version
//!   `v`, or with `p = 1` a *pending* mark: version `v` is being committed, so
//!   readers miss and fills of older versions are refused. Version 0 with an
//!   empty body means "no such user" (a negative entry).
//! * `through` is the number of the last projection batch Redis was told of.
//!
//! The projector marks a batch's users pending and raises `through` *before*
//! committing the batch ([`ViewCache::mark`]); after the commit it rewrites
//! the views that were cached ([`ViewCache::refresh_many`]) and leaves the
//! others pending, for the next reader to fill. A mark lives at least
//! [`MARK_HOLDS_FOR`], and a fill is refused once [`FILL_MAX_AGE`] has passed
//! on Redis's clock since the miss that led to it, so a fill of what a reader
//! read before a commit can never outlive the mark that refuses it. A reader
//! trusts an entry only when it is not pending and `through` is at least the
//! last committed batch number ([`ViewCache::get`]): a Redis that lost writes
//! (restarted from a snapshot, failed over) holds a lower `through` and is not
//! trusted; a Redis that could not be marked (down, paused) made the batch
//! drop the namespace instead. Every write compares inside Redis, in Lua, so
//! concurrent writers cannot interleave; a read is one `MGET` of `through`
//! and the entry, atomic as any single command, and needs no script (a
//! script call cost Redis about 20 times a plain `GET`, see BENCHMARKS.md).
//!
//! Every call has a short deadline, and after a failure to connect the cache
//! stays off for a moment instead of making every request wait on a dead server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use events::UserView;
use platform::config::{self, InvalidSetting};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

/// The least time a pending mark stays in Redis.
pub const MARK_HOLDS_FOR: Duration = Duration::from_secs(60);
/// A reader's fill is refused when it reaches Redis later than this after the
/// miss that caused it (on Redis's clock). Well below [`MARK_HOLDS_FOR`]: the
/// projector gives a batch at most the difference between its mark and its
/// commit, see [`MARK_COMMIT_WITHIN`].
pub const FILL_MAX_AGE: Duration = Duration::from_secs(10);
/// A batch whose commit comes later than this after its mark drops the
/// namespace instead of trusting the mark.
pub const MARK_COMMIT_WITHIN: Duration = Duration::from_secs(20);

/// The Lua side of [`Entry::decode`], shared by the scripts that write
/// entries: `entry(key)` gives the stored version (a number) and the pending
/// flag (`'0'` or `'1'`), or nil for a missing or unreadable entry.
macro_rules! entry_lua {
    () => {
        r"
local function entry(key)
  local stored = redis.call('GET', key)
  if not stored then
    return nil, nil
  end
  local v, p = string.match(stored, '^(%d+):([01]):')
  return tonumber(v), p
end
"
    };
}

/// Marks a batch's users pending and raises `through`, unless the namespace
/// is missing batches. KEYS[1] = through, KEYS[2..] = user keys; ARGV[1] = last
/// committed batch number, ARGV[2] = this batch's number, ARGV[3] = the least
/// lifetime of a mark (s), ARGV[4..] = the versions being committed. Returns
/// {0} if the namespace cannot be trusted (its `through` is missing or behind),
/// else {1, hot...}: per user, 1 if a view of it was cached (a reader filled it).
const MARK: &str = concat!(
    entry_lua!(),
    r"
local through = tonumber(redis.call('GET', KEYS[1]))
if not through or through < tonumber(ARGV[1]) then
  return {0}
end
local answer = {1}
local hold = tonumber(ARGV[3])
for i = 2, #KEYS do
  local v = tonumber(ARGV[i + 2])
  local current, pending = entry(KEYS[i])
  local hot = 0
  if not current or current < v then
    if current and current > 0 and pending == '0' then
      hot = 1
    end
    redis.call('SET', KEYS[i], v .. ':1:', 'KEEPTTL')
    if redis.call('TTL', KEYS[i]) < hold then
      redis.call('EXPIRE', KEYS[i], hold)
    end
  end
  answer[i] = hot
end
if tonumber(ARGV[2]) > through then
  redis.call('SET', KEYS[1], ARGV[2])
end
return answer
"
);

/// Writes entries unless a newer version (or the same one, settled) is there.
/// KEYS = user keys; ARGV[1] = Redis time (ms) of the miss behind a fill, or
/// 0 for the projector's refresh; ARGV[2] = the fill's maximum age (ms); then
/// (version, body, ttl) per key, where ttl 0 means: only rewrite an entry
/// that is there, keeping its lifetime. Returns the number written.
const PUT: &str = concat!(
    entry_lua!(),
    r"
local since = tonumber(ARGV[1])
if since > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now - since > tonumber(ARGV[2]) then
    return 0
  end
end
local written = 0
for i = 1, #KEYS do
  local v = tonumber(ARGV[3 * i])
  local ttl = tonumber(ARGV[3 * i + 2])
  local cv, cp = entry(KEYS[i])
  if (cv or ttl > 0) and (not cv or cv < v or (cv == v and cp == '1')) then
    local entry = v .. ':0:' .. ARGV[3 * i + 1]
    if ttl > 0 then
      redis.call('SET', KEYS[i], entry, 'EX', ttl)
    else
      redis.call('SET', KEYS[i], entry, 'KEEPTTL')
    end
    written = written + 1
  end
end
return written
"
);

/// One cached entry as stored: `{version}:{pending}:{body}`, where pending
/// is `1` for a mark (no body) and `0` for a settled view (version 0 with an
/// empty body: a cached absence). The scripts above parse the same form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub version: i32,
    pub pending: bool,
    pub body: String,
}

impl Entry {
    /// The stored form.
    pub fn encode(&self) -> String {
        format!("{}:{}:{}", self.version, u8::from(self.pending), self.body)
    }

    /// Reads the stored form; `None` for anything else.
    pub fn decode(stored: &[u8]) -> Option<Self> {
        Self::decode_owned(stored.to_vec())
    }

    /// [`Entry::decode`] of a value the caller owns: the body keeps its
    /// buffer (a cached read copies its view once less).
    pub fn decode_owned(mut stored: Vec<u8>) -> Option<Self> {
        let (version, pending, header) = {
            let (version, rest) = split_at_colon(&stored)?;
            let (pending, _) = split_at_colon(rest)?;
            if version.is_empty() || !version.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let pending = match pending {
                b"0" => false,
                b"1" => true,
                _ => return None,
            };
            // The digits, `:`, the one-byte flag, `:`.
            let header = version.len() + 3;
            let version: i32 = std::str::from_utf8(version).ok()?.parse().ok()?;
            (version, pending, header)
        };
        stored.drain(..header);
        Some(Self {
            version,
            pending,
            body: String::from_utf8(stored).ok()?,
        })
    }
}

/// The bytes before the first `:` and those after it.
fn split_at_colon(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|b| *b == b':')?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

/// How long the cache stays off after a failed connection attempt.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// Consecutive failed calls that open the breaker; while open, calls fail at
/// once (readers go to PostgreSQL without waiting out a deadline), and after
/// [`BREAKER_OPEN_FOR`] one call probes Redis: success closes the breaker,
/// failure opens it again.
const BREAKER_THRESHOLD: u32 = 3;
const BREAKER_OPEN_FOR: Duration = Duration::from_millis(500);

/// The circuit breaker in front of every Redis call.
#[derive(Debug, Default, PartialEq, Eq)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    /// When the probe in flight started (half-open); a probe that never
    /// reports (its caller went away) is replaced after a while.
    probe_since: Option<Instant>,
}

impl Breaker {
    /// Whether a call may go to Redis at `now`; if not, how long until it may.
    fn admit(&mut self, now: Instant, timeout: Duration) -> Result<(), Duration> {
        let Some(until) = self.open_until else {
            return Ok(());
        };
        if now < until {
            return Err(until - now);
        }
        match self.probe_since {
            Some(since) if now < since + timeout * 2 => Err(since + timeout * 2 - now),
            _ => {
                self.probe_since = Some(now);
                Ok(())
            }
        }
    }

    fn record(&mut self, ok: bool, now: Instant) {
        if ok {
            *self = Self::default();
            return;
        }
        self.failures += 1;
        if self.probe_since.is_some() || self.failures >= BREAKER_THRESHOLD {
            self.open_until = Some(now + BREAKER_OPEN_FOR);
            self.probe_since = None;
        }
    }

    fn describe(&self) -> &'static str {
        match (self.open_until, self.probe_since) {
            (None, _) => "closed",
            (Some(_), None) => "open",
            (Some(_), Some(_)) => "half_open",
        }
    }
}

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
    /// A cached absence: there was no view of this id a moment ago.
    Absent,
    /// No entry, or one whose next version is being committed. `at` is
    /// Redis's time of the miss (ms), which a fill hands back.
    Miss { at: i64 },
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
    /// `REDIS_VIEW_TTL_SECS`: how long a view stays cached after a reader
    /// filled it, default one hour.
    pub view_ttl: Duration,
    /// `REDIS_NEGATIVE_TTL_SECS`: how long an id with no view is remembered
    /// as absent, default 5 s; 0 turns negative caching off.
    pub negative_ttl: Duration,
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
            view_ttl: Duration::from_secs(config::parse("REDIS_VIEW_TTL_SECS", 3_600)?),
            negative_ttl: Duration::from_secs(config::parse("REDIS_NEGATIVE_TTL_SECS", 5)?),
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
    negative_ttl: Duration,
    timeout: Duration,
    mark: redis::Script,
    put: redis::Script,
    /// Set by the first connection that succeeds and kept: the manager
    /// reconnects by itself. Read without a lock on every call.
    manager: OnceLock<ConnectionManager>,
    /// After a failed first connection: not before this.
    retry_at: Mutex<Option<Instant>>,
    breaker: Mutex<Breaker>,
    /// Whether the breaker is closed with no failure counted, the state of
    /// nearly every call: then a call neither locks the breaker nor reads the
    /// clock (two locks of a line both cores write, per read).
    calm: AtomicBool,
}

impl ViewCache {
    /// Does not connect yet: a service starts even while Redis is away.
    /// Absences are cached for 5 s; see [`Self::with_negative_ttl`].
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
                negative_ttl: Duration::from_secs(5),
                timeout,
                mark: redis::Script::new(MARK),
                put: redis::Script::new(PUT),
                manager: OnceLock::new(),
                retry_at: Mutex::new(None),
                breaker: Mutex::new(Breaker::default()),
                calm: AtomicBool::new(true),
            }),
        })
    }

    /// The cache `settings` describe (not connected yet).
    pub fn from_settings(settings: &CacheSettings) -> Result<Self, CacheError> {
        Ok(Self::new(
            settings.url.expose_secret(),
            settings.key_prefix.clone(),
            settings.view_ttl,
            settings.timeout,
        )?
        .with_negative_ttl(settings.negative_ttl))
    }

    /// How long [`Self::fill_absent`] remembers an absence; zero: not at all.
    #[must_use]
    pub fn with_negative_ttl(mut self, ttl: Duration) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("configured before it is shared")
            .negative_ttl = ttl;
        self
    }

    /// The key prefix of `ns`, with room for the rest of a key: every read
    /// builds two keys, one allocation each.
    pub fn namespace_prefix(&self, ns: Namespace) -> String {
        use std::fmt::Write as _;
        // "p{i32}:e{i64}:" takes at most 35 bytes, "user:{uuid}" 41.
        let mut prefix = String::with_capacity(self.inner.prefix.len() + 76);
        let _ = write!(
            prefix,
            "{}p{}:e{}:",
            self.inner.prefix, ns.projection_version, ns.epoch
        );
        prefix
    }

    /// The key of one user's view in `ns`.
    pub fn key(&self, ns: Namespace, id: Uuid) -> String {
        let mut key = self.namespace_prefix(ns);
        key.push_str("user:");
        key.push_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
        key
    }

    /// The key holding the number of the last batch `ns` was told of.
    pub fn through_key(&self, ns: Namespace) -> String {
        let mut key = self.namespace_prefix(ns);
        key.push_str("through");
        key
    }

    /// "closed", "open" or "half_open", for /readyz.
    pub fn breaker_state(&self) -> &'static str {
        self.inner.breaker.lock().expect("breaker lock").describe()
    }

    async fn connection(&self) -> Result<ConnectionManager, CacheError> {
        if !self.inner.calm.load(Ordering::Acquire) {
            let admitted = self
                .inner
                .breaker
                .lock()
                .expect("breaker lock")
                .admit(Instant::now(), self.inner.timeout);
            if let Err(wait) = admitted {
                return Err(CacheError::Unreachable(wait));
            }
        }
        if let Some(manager) = self.inner.manager.get() {
            return Ok(manager.clone());
        }
        {
            let retry_at = *self.inner.retry_at.lock().expect("cache state lock");
            if let Some(at) = retry_at {
                let now = Instant::now();
                if at > now {
                    return Err(CacheError::Unreachable(at - now));
                }
            }
        }
        // No response timeout of the connection's own: every command runs
        // under `deadline`, whose one timer also bounds a reconnection in
        // progress; a second timer per command cost a cached read several
        // percent of its throughput (see BENCHMARKS.md).
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.inner.timeout)
            .set_number_of_retries(1);
        let connected = self
            .deadline(async {
                ConnectionManager::new_with_config(self.inner.client.clone(), config)
                    .await
                    .map_err(CacheError::from)
            })
            .await;
        let mut retry_at = self.inner.retry_at.lock().expect("cache state lock");
        match connected {
            Ok(manager) => {
                *retry_at = None;
                // A call racing this one may have connected first: keep one.
                Ok(self.inner.manager.get_or_init(|| manager).clone())
            }
            Err(error) => {
                *retry_at = Some(Instant::now() + RECONNECT_AFTER);
                Err(error)
            }
        }
    }

    async fn deadline<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        let result = tokio::time::timeout(self.inner.timeout, fut)
            .await
            .map_err(|_| CacheError::Timeout(self.inner.timeout))
            .and_then(|result| result);
        if result.is_ok() && self.inner.calm.load(Ordering::Acquire) {
            return result;
        }
        let mut breaker = self.inner.breaker.lock().expect("breaker lock");
        let was = breaker.describe();
        breaker.record(result.is_ok(), Instant::now());
        let now = breaker.describe();
        self.inner
            .calm
            .store(*breaker == Breaker::default(), Ordering::Release);
        drop(breaker);
        if was != now {
            metrics::gauge!("redis_breaker_open").set(f64::from(u8::from(now != "closed")));
            tracing::warn!(from = was, to = now, "Redis circuit breaker changed state");
        }
        result
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
        let (through, stored): (Option<i64>, Option<Vec<u8>>) = self
            .deadline(async {
                Ok(redis::cmd("MGET")
                    .arg(self.through_key(ns))
                    .arg(self.key(ns, id))
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        if through.is_none_or(|through| through < committed_seq) {
            return Ok(Lookup::Behind);
        }
        match stored.map(Entry::decode_owned) {
            Some(Some(Entry {
                pending: false,
                version: 0,
                ..
            })) => Ok(Lookup::Absent),
            Some(Some(Entry {
                pending: false,
                version,
                body,
            })) => Ok(Lookup::Hit(CachedView { version, body })),
            Some(None) => Err(CacheError::Protocol("an undecodable cache entry".into())),
            // Absent or pending. Redis's time is taken after the miss and
            // before the caller reads PostgreSQL, which is all the fill's age
            // check needs (see `FILL_MAX_AGE`).
            None | Some(Some(Entry { pending: true, .. })) => Ok(Lookup::Miss {
                at: self.time_ms(&mut conn).await?,
            }),
        }
    }

    /// Redis's clock, in milliseconds.
    async fn time_ms(&self, conn: &mut ConnectionManager) -> Result<i64, CacheError> {
        let (seconds, micros): (i64, i64) = self
            .deadline(async { Ok(redis::cmd("TIME").query_async(conn).await?) })
            .await?;
        Ok(seconds * 1_000 + micros / 1_000)
    }

    /// Before a batch commits: marks `pending` (user, version being
    /// committed) in `ns` and records batch `seq`, provided `ns` has every
    /// batch up to `committed_seq`. Returns `None` when the namespace is
    /// behind (the caller must then stop trusting it), else, per user of
    /// `pending`, whether a view of it is cached (and so worth refreshing
    /// after the commit).
    #[tracing::instrument(name = "redis_mark_pending", skip_all, fields(users = pending.len(), seq))]
    pub async fn mark(
        &self,
        ns: Namespace,
        committed_seq: i64,
        seq: i64,
        pending: &[(Uuid, i32)],
    ) -> Result<Option<Vec<bool>>, CacheError> {
        let mut conn = self.connection().await?;
        let mut invocation = self.inner.mark.key(self.through_key(ns));
        invocation
            .arg(committed_seq)
            .arg(seq)
            .arg(MARK_HOLDS_FOR.as_secs());
        for (id, version) in pending {
            invocation.key(self.key(ns, *id)).arg(*version);
        }
        let answer: Vec<i64> = self
            .deadline(async { Ok(invocation.invoke_async(&mut conn).await?) })
            .await?;
        match answer.split_first() {
            Some((0, [])) => Ok(None),
            Some((1, hot)) if hot.len() == pending.len() => {
                Ok(Some(hot.iter().map(|flag| *flag == 1).collect()))
            }
            _ => Err(CacheError::Protocol(format!("mark answered {answer:?}"))),
        }
    }

    /// After a batch committed: rewrites the cached entries of `views` that
    /// are still there (see [`Self::mark`]), keeping their lifetime; entries
    /// that expired meanwhile are not brought back. Returns how many were written.
    #[tracing::instrument(name = "redis_refresh_views", skip_all, fields(views = views.len()))]
    pub async fn refresh_many(
        &self,
        ns: Namespace,
        views: &[&UserView],
    ) -> Result<usize, CacheError> {
        let entries: Vec<(Uuid, i32, String)> = views
            .iter()
            .map(|view| (view.id, view.version, body(view)))
            .collect();
        self.put(ns, None, Duration::ZERO, &entries).await
    }

    /// A reader's fill after [`Lookup::Miss`] at Redis time `missed_at`:
    /// stores `view` for `REDIS_VIEW_TTL_SECS` unless a newer (or the same,
    /// settled) version is there, or the miss is older than [`FILL_MAX_AGE`].
    /// `None` skips the age check (for tests that seed the cache).
    #[tracing::instrument(name = "redis_fill_view", skip_all, fields(user_id = %view.id))]
    pub async fn fill(
        &self,
        ns: Namespace,
        view: &UserView,
        missed_at: Option<i64>,
    ) -> Result<bool, CacheError> {
        let entry = (view.id, view.version, body(view));
        Ok(self.put(ns, missed_at, self.inner.ttl, &[entry]).await? == 1)
    }

    /// A reader's fill after a miss for an id with no view: remembers the
    /// absence for `REDIS_NEGATIVE_TTL_SECS` as version 0, which any mark of a
    /// real version replaces, so a registration is never hidden by it.
    #[tracing::instrument(name = "redis_fill_absent", skip(self, ns))]
    pub async fn fill_absent(
        &self,
        ns: Namespace,
        id: Uuid,
        missed_at: Option<i64>,
    ) -> Result<bool, CacheError> {
        if self.inner.negative_ttl.is_zero() {
            return Ok(false);
        }
        let entry = (id, 0, String::new());
        Ok(self
            .put(ns, missed_at, self.inner.negative_ttl, &[entry])
            .await?
            == 1)
    }

    async fn put(
        &self,
        ns: Namespace,
        missed_at: Option<i64>,
        ttl: Duration,
        entries: &[(Uuid, i32, String)],
    ) -> Result<usize, CacheError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut conn = self.connection().await?;
        let mut invocation = self.inner.put.prepare_invoke();
        invocation
            .arg(missed_at.unwrap_or(0))
            .arg(FILL_MAX_AGE.as_millis() as u64);
        let ttl = if ttl.is_zero() {
            0
        } else {
            ttl.as_secs().max(1)
        };
        for (id, version, body) in entries {
            invocation
                .key(self.key(ns, *id))
                .arg(*version)
                .arg(body)
                .arg(ttl);
        }
        let written: usize = self
            .deadline(async { Ok(invocation.invoke_async(&mut conn).await?) })
            .await?;
        Ok(written)
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

fn body(view: &UserView) -> String {
    serde_json::to_string(view).expect("views serialise to JSON")
}

#[cfg(test)]
mod entry_tests {
    use super::Entry;

    #[test]
    fn entries_read_back_as_written_whatever_the_body_holds() {
        for entry in [
            Entry {
                version: 7,
                pending: false,
                body: r#"{"a":"b:c","d":"1:0:"}"#.into(),
            },
            Entry {
                version: 8,
                pending: true,
                body: String::new(),
            },
            Entry {
                version: i32::MAX,
                pending: false,
                body: "{\"é\":1}".into(),
            },
            Entry {
                version: 0,
                pending: false,
                body: String::new(),
            },
        ] {
            assert_eq!(Entry::decode(entry.encode().as_bytes()), Some(entry));
        }
    }

    #[test]
    fn anything_else_is_not_an_entry() {
        for stored in [
            "", "7", "7:0", "x:0:{}", "-1:0:{}", "7:2:{}", "7:p:{}", ":0:{}",
        ] {
            assert_eq!(Entry::decode(stored.as_bytes()), None, "{stored:?}");
        }
        assert_eq!(Entry::decode(&[0xff, b':', b'0', b':']), None);
        assert_eq!(Entry::decode(b"7:0:\xff"), None, "a body that is not UTF-8");
        assert_eq!(
            Entry::decode(b"2147483648:0:{}"),
            None,
            "a version past i32"
        );
    }
}

#[cfg(test)]
mod breaker_tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_then_lets_one_probe_through() {
        let timeout = Duration::from_millis(50);
        let start = Instant::now();
        let mut breaker = Breaker::default();
        for _ in 0..BREAKER_THRESHOLD - 1 {
            breaker.record(false, start);
            assert!(breaker.admit(start, timeout).is_ok(), "still closed");
        }
        breaker.record(false, start);
        assert!(breaker.admit(start, timeout).is_err(), "open");
        let later = start + BREAKER_OPEN_FOR;
        assert!(breaker.admit(later, timeout).is_ok(), "one probe");
        assert!(breaker.admit(later, timeout).is_err(), "only one");
        assert_eq!(breaker.describe(), "half_open");
        breaker.record(false, later);
        assert!(
            breaker.admit(later, timeout).is_err(),
            "a failed probe opens it again"
        );
        let again = later + BREAKER_OPEN_FOR;
        assert!(breaker.admit(again, timeout).is_ok());
        breaker.record(true, again);
        assert_eq!(breaker.describe(), "closed");
        assert!(breaker.admit(again, timeout).is_ok());
    }

    #[test]
    fn a_probe_that_never_reports_is_replaced() {
        let timeout = Duration::from_millis(50);
        let start = Instant::now();
        let mut breaker = Breaker::default();
        for _ in 0..BREAKER_THRESHOLD {
            breaker.record(false, start);
        }
        let probe = start + BREAKER_OPEN_FOR;
        assert!(breaker.admit(probe, timeout).is_ok());
        assert!(breaker.admit(probe + timeout * 2, timeout).is_ok());
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn keys_keep_the_form_the_scripts_and_other_readers_expect() {
        let cache = ViewCache::new(
            "redis://127.0.0.1:1",
            "us:".to_owned(),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .expect("a valid URL");
        let ns = Namespace {
            projection_version: 3,
            epoch: i64::MAX,
        };
        let id = Uuid::parse_str("00000000-0000-4000-8000-00000000002a").unwrap();
        assert_eq!(
            cache.key(ns, id),
            format!(
                "us:p3:e{}:user:00000000-0000-4000-8000-00000000002a",
                i64::MAX
            )
        );
        assert_eq!(
            cache.through_key(ns),
            format!("us:p3:e{}:through", i64::MAX)
        );
    }
}
