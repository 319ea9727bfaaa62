//! Scenario 7, reads through the query API under wrk (2 threads, 50
//! connections), each against a limit measured in the same run:
//!
//! * cached `GET /users/{id}` vs `redis-get-limit` (an axum handler doing one
//!   Redis `GET` of the same bytes, no middleware) under the same wrk, and vs
//!   `redis-benchmark` doing `GET` of those bytes at the same concurrency;
//! * the same read with Redis unreachable (every read from PostgreSQL) vs
//!   pgbench running the same `SELECT` with as many clients as the query
//!   API's pool has connections. These reads walk all the seeded users, each
//!   wrk thread from its own point, so no two concurrent requests name one
//!   user: the query API coalesces concurrent misses of one user into one
//!   `SELECT`, and one hot user would measure that instead;
//! * a look-up by username and a page of 50, with and without Redis (for
//!   context: both are PostgreSQL reads).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use read_model::{state, Namespace, ViewCache, ViewRows};
use userstream_tests::{Service, TestEnv};
use uuid::Uuid;

use crate::writes::pgbench;
use crate::Plan;

const WRK_THREADS: usize = 2;
pub const WRK_CONNECTIONS: usize = 50;
/// Users in the read model; reads go to one of them, cached.
const USERS: i64 = 10_000;
/// The query API's PostgreSQL pool in this bench (and pgbench's clients).
pub const POOL: usize = 16;

/// What wrk measured against one URL.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub rate: f64,
    pub p50: Duration,
    pub p99: Duration,
}

pub struct Reads {
    pub cached: Load,
    pub limit: Load,
    pub redis_benchmark: f64,
    pub by_username: Load,
    pub page: Load,
    pub uncached: Load,
    pub uncached_by_username: Load,
    pub uncached_page: Load,
    pub pgbench: f64,
    pub body_bytes: usize,
}

const SEED: &str =
    "INSERT INTO user_views (id, username, email, status, version, registered_at, updated_at) \
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, 'reader' || n, \
       'reader' || n || '@example.com', 'active', 1, now(), now() \
FROM generate_series(1, $1) n";

/// The service settings of the read bench: warnings only (as the write
/// benches), and a
/// pool as large as pgbench's client count.
fn settings(redis: Option<&str>) -> Vec<(&'static str, String)> {
    let mut settings = vec![
        ("RUST_LOG", "warn,platform::service=info".to_owned()),
        ("DATABASE_MAX_CONNECTIONS", POOL.to_string()),
    ];
    if let Some(url) = redis {
        settings.push(("REDIS_URL", url.to_owned()));
    }
    settings
}

pub async fn reads(plan: &Plan, run: usize) -> anyhow::Result<Reads> {
    let _ = run;
    let env = TestEnv::new().await;
    sqlx::query(SEED)
        .bind(USERS)
        .execute(&env.pool)
        .await
        .context("seed the read model")?;
    sqlx::query("VACUUM ANALYZE user_views")
        .execute(&env.pool)
        .await?;
    let id = Uuid::parse_str("00000000-0000-4000-8000-00000000002a")?;
    let username = "reader42";

    // A trusted namespace, as the projector's keeper opens one.
    let cache = ViewCache::new(
        &userstream_tests::redis_url(),
        env.redis_prefix.clone(),
        Duration::from_secs(3_600),
        Duration::from_secs(2),
    )?;
    let current = state::load(&env.pool).await?;
    let ns = Namespace {
        projection_version: current.projection_version,
        epoch: 1,
    };
    if !cache.open(ns, current.batch_seq).await? {
        bail!("the bench namespace is in use");
    }
    sqlx::query("UPDATE projection_state SET cache_epoch = 1")
        .execute(&env.pool)
        .await?;
    let view = ViewRows::new(env.pool.clone())
        .load(id)
        .await?
        .context("seeded view")?;
    let body = serde_json::to_string(&view)?;

    let settings_on = settings(None);
    let on: Vec<(&str, &str)> = settings_on.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let query = env.spawn(Service::QueryApi, &on).await;
    // Fill the cache through the API itself and check it serves the hit.
    let url = query.url(&format!("/users/{id}"));
    let http = reqwest::Client::new();
    let mut hits = 0.0;
    for _ in 0..200 {
        let answer = http.get(&url).send().await?;
        if answer.status() != 200 {
            bail!("the query API answered {}", answer.status());
        }
        hits = query.metric("query_cache_total{result=\"hit\"}").await;
        if hits > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if hits == 0.0 {
        bail!("the query API never served {id} from Redis");
    }

    let seconds = plan.seconds;
    let cached = wrk(&url, seconds)?;
    let by_username = wrk(&query.url(&format!("/users?username={username}")), seconds)?;
    let page = wrk(&query.url("/users?status=active&limit=50"), seconds)?;
    drop(query);

    // The limit: the same bytes under a key of their own, one GET per request.
    let key = format!("{}limit", env.redis_prefix);
    let mut redis = redis::Client::open(userstream_tests::redis_url())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&body)
        .query_async(&mut redis)
        .await?;
    let limit_server = LimitServer::start(&key)?;
    let limit = wrk(&limit_server.url, seconds)?;
    drop(limit_server);
    let redis_benchmark = redis_benchmark(&key, body.len(), seconds)?;
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut redis).await?;

    // Uncached: nothing listens on port 1, so every read goes to PostgreSQL.
    let settings_off = settings(Some("redis://127.0.0.1:1"));
    let off: Vec<(&str, &str)> = settings_off.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let query = env.spawn(Service::QueryApi, &off).await;
    let url = query.url(&format!("/users/{id}"));
    let answer = http.get(&url).send().await?;
    if answer.status() != 200 {
        bail!("the query API without Redis answered {}", answer.status());
    }
    let uncached = wrk_spread(&query.url("/users/"), seconds)?;
    let uncached_by_username = wrk(&query.url(&format!("/users?username={username}")), seconds)?;
    let uncached_page = wrk(&query.url("/users?status=active&limit=50"), seconds)?;
    drop(query);
    let select = format!(
        "SELECT {} FROM user_views WHERE id = '{id}';\n",
        read_model::rows::COLUMNS
    );
    let pgbench_rate = pgbench(
        &env.url_as(userstream_tests::Role::Query),
        seconds,
        POOL,
        &select,
        &[],
    )?;
    crate::projection::clean_up(plan, env).await?;
    Ok(Reads {
        cached,
        limit,
        redis_benchmark,
        by_username,
        page,
        uncached,
        uncached_by_username,
        uncached_page,
        pgbench: pgbench_rate,
        body_bytes: body.len(),
    })
}

/// `redis-get-limit`, beside this binary.
struct LimitServer {
    child: Child,
    url: String,
}

impl LimitServer {
    fn start(key: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let path: PathBuf = exe.with_file_name("redis-get-limit");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let address = format!("127.0.0.1:{port}");
        let child = Command::new(&path)
            .args([address.as_str(), &userstream_tests::redis_url(), key])
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", path.display()))?;
        let url = format!("http://{address}/");
        for _ in 0..500 {
            if std::net::TcpStream::connect(&address).is_ok() {
                return Ok(Self { child, url });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("redis-get-limit did not start listening on {address}");
    }
}

impl Drop for LimitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// wrk against `url` for `seconds`; fails on any non-2xx answer or error.
fn wrk(url: &str, seconds: u64) -> anyhow::Result<Load> {
    run_wrk(url, seconds, &[])
}

/// Each wrk thread walks the seeded users from its own starting point.
const SPREAD_SCRIPT: &str = r#"
local threads = 0
function setup(thread)
  thread:set("cursor", threads * 5000)
  threads = threads + 1
end
function request()
  cursor = cursor % USERS + 1
  return wrk.format(nil, string.format("PATH%012x", cursor))
end
"#;

/// wrk reading `GET {users_url}{id}` for every seeded user in turn (see
/// [`SPREAD_SCRIPT`]), for `seconds`.
fn wrk_spread(users_url: &str, seconds: u64) -> anyhow::Result<Load> {
    let path = users_url
        .find("/users/")
        .map(|at| &users_url[at..])
        .context("a /users/ URL")?;
    let script = SPREAD_SCRIPT
        .replace("USERS", &USERS.to_string())
        .replace("PATH", &format!("{path}00000000-0000-4000-8000-"));
    let file = std::env::temp_dir().join(format!("userstream-bench-{}.lua", std::process::id()));
    std::fs::write(&file, script).context("write the wrk script")?;
    let load = run_wrk(users_url, seconds, &["-s", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(&file);
    load
}

fn run_wrk(url: &str, seconds: u64, extra: &[&str]) -> anyhow::Result<Load> {
    let output = Command::new("wrk")
        .args(["-t", &WRK_THREADS.to_string()])
        .args(["-c", &WRK_CONNECTIONS.to_string()])
        .args(["-d", &format!("{seconds}s"), "--latency"])
        .args(extra)
        .arg(url)
        .output()
        .context("run wrk (scripts/bench installs it)")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "wrk failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&stdout).with_context(|| format!("wrk against {url}:\n{stdout}"))
}

fn parse_wrk(out: &str) -> anyhow::Result<Load> {
    if let Some(line) = out
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        bail!("not every request succeeded: {}", line.trim());
    }
    let rate = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec")?;
    let percentile = |p: &str| -> anyhow::Result<Duration> {
        let value = out
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .map(str::trim)
            .with_context(|| format!("no {p} latency"))?;
        wrk_duration(value).with_context(|| format!("latency {value:?}"))
    };
    Ok(Load {
        rate,
        p50: percentile("50%")?,
        p99: percentile("99%")?,
    })
}

/// "812.00us", "2.61ms", "1.02s".
fn wrk_duration(value: &str) -> Option<Duration> {
    let split = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

/// `redis-benchmark` doing `GET key` (a value of `bytes` bytes) with the same
/// concurrency as wrk, for about `seconds`; returns requests per second.
fn redis_benchmark(key: &str, bytes: usize, seconds: u64) -> anyhow::Result<f64> {
    let (host, port) = redis_address();
    // Sized from a short first pass, so the run lasts about `seconds`.
    let probe = redis_benchmark_pass(&host, &port, key, bytes, 20_000)?;
    let requests = ((probe * seconds as f64) as u64).max(20_000);
    redis_benchmark_pass(&host, &port, key, bytes, requests)
}

fn redis_address() -> (String, String) {
    let url = userstream_tests::redis_url();
    let rest = url.trim_start_matches("redis://");
    let location = rest.rsplit_once('@').map_or(rest, |(_, l)| l);
    let location = location.split('/').next().unwrap_or(location);
    match location.split_once(':') {
        Some((host, port)) => (host.to_owned(), port.to_owned()),
        None => (location.to_owned(), "6379".to_owned()),
    }
}

fn redis_benchmark_pass(
    host: &str,
    port: &str,
    key: &str,
    bytes: usize,
    requests: u64,
) -> anyhow::Result<f64> {
    let output = Command::new("redis-benchmark")
        .args(["-h", host, "-p", port, "-q"])
        .args(["-c", &WRK_CONNECTIONS.to_string()])
        .args(["-n", &requests.to_string()])
        .args(["-d", &bytes.to_string()])
        .args(["GET", key])
        .output()
        .context("run redis-benchmark")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    // "GET key: 123456.79 requests per second, p50=0.207 msec"
    stdout
        .rsplit('\r')
        .chain(stdout.lines())
        .find_map(|l| {
            let (_, rest) = l.split_once(": ")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .with_context(|| format!("no rate in redis-benchmark output: {stdout:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let out = "Running 10s test @ http://127.0.0.1:1/\n  2 threads and 50 connections\n  Latency Distribution\n     50%  812.00us\n     75%    1.20ms\n     90%    2.00ms\n     99%    6.70ms\n  183000 requests in 10.00s, 50.00MB read\nRequests/sec:  18300.12\nTransfer/sec:      5.00MB\n";
        let load = parse_wrk(out).unwrap();
        assert_eq!(load.rate, 18300.12);
        assert_eq!(load.p50, Duration::from_micros(812));
        assert_eq!(load.p99, Duration::from_micros(6700));
        let failed = format!("{out}  Non-2xx or 3xx responses: 3\n");
        assert!(parse_wrk(&failed).is_err());
    }
}
