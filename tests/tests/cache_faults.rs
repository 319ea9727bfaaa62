//! The cache never contradicts the read model (DESIGN.md invariant 9), with
//! the real binaries and a Redis of the test's own that it stops, restarts
//! from a snapshot, pauses and flushes: no reader ever gets a version older
//! than one already served, and Redis is trusted again soon after it answers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use read_model::{state, Lookup, ViewCache};
use userstream_tests::read_side::{await_version, read_user, register, set_active, PrivateRedis};
use userstream_tests::{eventually, Running, Service, TestEnv};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(30);

struct Stack {
    env: TestEnv,
    redis: PrivateRedis,
    command: Running,
    projector: Option<Running>,
    query: Running,
    http: reqwest::Client,
}

impl Stack {
    async fn start(projector_env: &[(&str, &str)]) -> Self {
        let env = TestEnv::new().await;
        let redis = PrivateRedis::start().await;
        let url = redis.url();
        let command = env.spawn(Service::CommandApi, &[]).await;
        let mut with_redis = vec![("REDIS_URL", url.as_str())];
        with_redis.extend_from_slice(projector_env);
        let projector = env.spawn(Service::Projector, &with_redis).await;
        let query = env
            .spawn(Service::QueryApi, &[("REDIS_URL", url.as_str())])
            .await;
        Self {
            env,
            redis,
            command,
            projector: Some(projector),
            query,
            http: reqwest::Client::new(),
        }
    }

    async fn start_projector(&mut self, extra: &[(&str, &str)]) {
        let url = self.redis.url();
        let mut with_redis = vec![("REDIS_URL", url.as_str())];
        with_redis.extend_from_slice(extra);
        self.projector = Some(self.env.spawn(Service::Projector, &with_redis).await);
    }

    /// Waits until Redis holds `id` at `version`, settled, in the trusted namespace.
    async fn cached(&self, id: Uuid, version: i32) -> Duration {
        let started = Instant::now();
        let cache = ViewCache::new(
            &self.redis.url(),
            self.env.redis_prefix.clone(),
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
        .unwrap();
        eventually(
            &format!("Redis to serve {id} at version {version}"),
            DEADLINE,
            || async {
                // A read fills the cache on a miss.
                read_user(&self.http, &self.query, id).await;
                let state = state::load(&self.env.pool).await.ok()?;
                let ns = state.namespace()?;
                match cache.get(ns, id, state.batch_seq).await.ok()? {
                    Lookup::Hit(hit) if hit.version == version => Some(()),
                    _ => None,
                }
            },
        )
        .await;
        started.elapsed()
    }
}

/// Reads one user over and over until stopped; every answer is kept.
struct Reader {
    seen: Arc<Mutex<Vec<(u16, i64, String)>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    fn start(stack: &Stack, id: Uuid) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let http = stack.http.clone();
        let url = stack.query.url(&format!("/users/{id}"));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            while !*stopped.borrow_and_update() {
                tick.tick().await;
                let Ok(response) = http.get(&url).send().await else {
                    continue;
                };
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                log.lock().unwrap().push((
                    status,
                    body["version"].as_i64().unwrap_or(-1),
                    body["status"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        });
        Self { seen, stop, task }
    }

    /// Stops and checks: all 200, versions never go back; returns the answers.
    async fn finish(self) -> Vec<(u16, i64, String)> {
        self.stop.send(true).unwrap();
        self.task.await.unwrap();
        let seen = self.seen.lock().unwrap().clone();
        assert!(!seen.is_empty());
        let mut newest = 0;
        for (i, (status, version, _)) in seen.iter().enumerate() {
            assert_eq!(*status, 200, "answer {i} of {}: {seen:?}", seen.len());
            assert!(
                *version >= newest,
                "answer {i} went back from version {newest} to {version}"
            );
            newest = *version;
        }
        seen
    }

    /// Waits until the reader has seen `count` more answers (time for stale data to show).
    async fn observe(&self, count: usize) {
        let start = self.seen.lock().unwrap().len();
        eventually("more reads", DEADLINE, || async {
            (self.seen.lock().unwrap().len() >= start + count).then_some(())
        })
        .await;
    }
}

/// The reproduction: Redis holds version 2 in its snapshot, is
/// stopped, the user changes, and Redis comes back from the snapshot.
async fn restart_from_snapshot(change_while_down_to_active: bool) {
    let mut stack = Stack::start(&[]).await;
    let id = register(&stack.http, &stack.command, "snap").await.id;
    let mut version = 1;
    if change_while_down_to_active {
        version = set_active(&stack.http, &stack.command, id, false)
            .await
            .version;
    }
    stack.cached(id, version as i32).await;
    stack.redis.save().await;
    let reader = Reader::start(&stack, id);
    reader.observe(20).await;

    stack.redis.kill();
    let changed = set_active(&stack.http, &stack.command, id, change_while_down_to_active).await;
    await_version(&stack.http, &stack.query, id, changed.version).await;
    reader.observe(20).await;

    stack.redis.restart().await;
    let back = Instant::now();
    reader.observe(200).await;
    let trusted_after = stack.cached(id, changed.version as i32).await;
    reader.observe(50).await;
    let seen = reader.finish().await;
    let last = seen.last().unwrap();
    assert_eq!(last.1, changed.version);
    let expected = if change_while_down_to_active {
        "active"
    } else {
        "deactivated"
    };
    let after_change = seen.iter().skip_while(|(_, v, _)| *v < changed.version);
    assert!(after_change.clone().all(|(_, _, s)| s == expected));
    eprintln!(
        "Redis trusted again {:?} after it answered ({:?} counting the test's own polling)",
        trusted_after,
        back.elapsed()
    );
}

#[tokio::test]
async fn a_redis_restarted_from_an_old_snapshot_never_reactivates_a_user() {
    restart_from_snapshot(false).await;
}

#[tokio::test]
async fn a_redis_restarted_from_an_old_snapshot_never_shows_an_older_deactivation() {
    restart_from_snapshot(true).await;
}

/// Redis loses writes it had acknowledged (restart from a snapshot taken
/// before them) while no batch was in flight: nothing failed at the time, so
/// only the batch number in the namespace shows it.
#[tokio::test]
async fn a_redis_that_lost_acknowledged_writes_is_not_trusted() {
    let mut stack = Stack::start(&[]).await;
    let id = register(&stack.http, &stack.command, "amnesia").await.id;
    stack.cached(id, 1).await;
    stack.redis.save().await;
    let changed = set_active(&stack.http, &stack.command, id, false).await;
    stack.cached(id, changed.version as i32).await;
    let reader = Reader::start(&stack, id);
    reader.observe(20).await;
    // No projector to notice and open a fresh namespace: the readers alone
    // must tell that the restarted Redis is behind.
    stack.projector.take().unwrap().stop().await;
    stack.redis.restart().await;
    let consulted = |query: &Running| {
        let query = query.url("/metrics");
        async move {
            let text = reqwest::get(query).await.ok()?.text().await.ok()?;
            let sum: f64 = text
                .lines()
                .filter(|l| {
                    l.starts_with("query_cache_total{result=\"hit\"}")
                        || l.starts_with("query_cache_total{result=\"behind\"}")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            Some(sum)
        }
    };
    let before = consulted(&stack.query).await.unwrap();
    eventually(
        "the query API to consult the restarted Redis",
        DEADLINE,
        || async { (consulted(&stack.query).await? > before + 50.0).then_some(()) },
    )
    .await;
    stack.start_projector(&[]).await;
    stack.cached(id, changed.version as i32).await;
    let seen = reader.finish().await;
    assert!(seen
        .iter()
        .all(|(_, v, s)| *v == changed.version && s == "deactivated"));
}

#[tokio::test]
async fn a_redis_paused_past_the_write_deadline_never_serves_an_older_version() {
    let stack = Stack::start(&[]).await;
    let id = register(&stack.http, &stack.command, "paused").await.id;
    stack.cached(id, 1).await;
    let reader = Reader::start(&stack, id);
    reader.observe(20).await;
    // Writes (and the projector's mark before commit) hang past its 200 ms deadline.
    stack.redis.cmd(&["CLIENT", "PAUSE", "1500", "WRITE"]).await;
    let changed = set_active(&stack.http, &stack.command, id, false).await;
    await_version(&stack.http, &stack.query, id, changed.version).await;
    reader.observe(100).await;
    stack.cached(id, changed.version as i32).await;
    let seen = reader.finish().await;
    assert_eq!(seen.last().unwrap().1, changed.version);
}

#[tokio::test]
async fn a_flushed_redis_never_serves_an_older_version() {
    let stack = Stack::start(&[]).await;
    let id = register(&stack.http, &stack.command, "flushed").await.id;
    stack.cached(id, 1).await;
    let reader = Reader::start(&stack, id);
    reader.observe(20).await;
    stack.redis.cmd(&["FLUSHALL"]).await;
    let changed = set_active(&stack.http, &stack.command, id, false).await;
    reader.observe(50).await;
    stack.cached(id, changed.version as i32).await;
    stack.redis.cmd(&["FLUSHALL"]).await;
    let again = set_active(&stack.http, &stack.command, id, true).await;
    stack.cached(id, again.version as i32).await;
    let seen = reader.finish().await;
    assert_eq!(seen.last().unwrap().1, again.version);
}

#[tokio::test]
async fn a_projector_killed_between_its_commit_and_its_redis_write_leaves_no_stale_view() {
    let mut stack = Stack::start(&[]).await;
    let id = register(&stack.http, &stack.command, "crashy").await.id;
    stack.cached(id, 1).await;
    // The administrator who deactivates below, projected before the crash
    // point is armed, so that the first commit it stops at is the user's.
    let admin = userstream_tests::identity::kept_admin(&stack.http, &stack.command).await;
    stack.cached(admin.id, 2).await;
    stack.projector.take().unwrap().stop().await;
    // This projector dies right after each commit that changed views, before
    // telling Redis the views. It reads in a group of its own, from the
    // start: what the first one applied changes nothing and commits nothing,
    // so the first commit it stops at is the user's. (Taking over the first
    // one's group is `handover.rs`'s subject.)
    let crash_group = format!("{}-crash", stack.env.group_id);
    stack
        .start_projector(&[
            ("FAILPOINTS", "projector::after_commit=panic"),
            ("KAFKA_GROUP_ID", &crash_group),
        ])
        .await;
    let reader = Reader::start(&stack, id);
    reader.observe(20).await;
    let changed = set_active(&stack.http, &stack.command, id, false).await;
    let crashed = stack.projector.take().unwrap();
    assert!(!crashed.wait_exit(DEADLINE).await.success());
    let committed: i32 = sqlx::query_scalar("SELECT version FROM user_views WHERE id = $1")
        .bind(id)
        .fetch_one(&stack.env.pool)
        .await
        .unwrap();
    assert_eq!(
        i64::from(committed),
        changed.version,
        "committed before the crash"
    );
    await_version(&stack.http, &stack.query, id, changed.version).await;
    reader.observe(100).await;
    stack.start_projector(&[]).await;
    stack.cached(id, changed.version as i32).await;
    let seen = reader.finish().await;
    assert_eq!(seen.last().unwrap().1, changed.version);
}

/// Redis stalls (`CLIENT PAUSE ALL`), then dies, then comes back, while a
/// reader reads one user and its status changes: every answer is 200 with a
/// version that never goes back, each within a bound far below the pause
/// (deadlines, then the breaker, send reads to PostgreSQL), and /readyz
/// reports Redis degraded meanwhile.
#[tokio::test]
async fn reads_stay_correct_and_bounded_while_redis_stalls_dies_and_returns() {
    let mut stack = Stack::start(&[]).await;
    let id = register(&stack.http, &stack.command, "stalled").await.id;
    stack.cached(id, 1).await;
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let reader = Reader::start(&stack, id);
    let probe = {
        let (http, url, slowest) = (
            stack.http.clone(),
            stack.query.url(&format!("/users/{id}")),
            Arc::clone(&slowest),
        );
        tokio::spawn(async move {
            loop {
                let started = Instant::now();
                if http.get(&url).send().await.is_err() {
                    return;
                }
                let took = started.elapsed();
                let mut slowest = slowest.lock().unwrap();
                *slowest = (*slowest).max(took);
            }
        })
    };
    reader.observe(20).await;

    stack.redis.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]).await;
    let paused = set_active(&stack.http, &stack.command, id, false).await;
    await_version(&stack.http, &stack.query, id, paused.version).await;
    reader.observe(100).await;
    let readyz: serde_json::Value = stack
        .http
        .get(stack.query.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        readyz["checks"]["redis"]["detail"]["degraded"].is_string(),
        "{readyz}"
    );

    // The breaker opened: reads stopped waiting on the paused Redis.
    let skipped = stack
        .query
        .metric("query_cache_total{result=\"breaker_open\"}")
        .await;
    assert!(
        skipped > 0.0,
        "the breaker never opened while Redis was paused"
    );

    stack.redis.kill();
    let down = set_active(&stack.http, &stack.command, id, true).await;
    await_version(&stack.http, &stack.query, id, down.version).await;
    reader.observe(100).await;

    stack.redis.restart().await;
    stack.cached(id, down.version as i32).await;
    reader.observe(50).await;
    probe.abort();
    let seen = reader.finish().await;
    assert_eq!(seen.last().unwrap().1, down.version);
    let slowest = *slowest.lock().unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "a read took {slowest:?} while Redis was paused for 3 s"
    );
}
