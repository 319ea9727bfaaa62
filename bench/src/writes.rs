//! The command API's write paths under load.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::future::join_all;
use serde_json::json;
use userstream_tests::{Running, Service, TestEnv};

use crate::stats::{median, percentile};
use crate::Plan;

/// Concurrent registering clients; more than the hashing permits, so the
/// hashers never wait for work.
const REGISTER_CLIENTS: usize = 16;
/// Concurrent status-changing clients, for the API and for pgbench alike.
pub const STATUS_CLIENTS: usize = 8;
/// Users each status client owns (clients never touch each other's users).
pub const USERS_PER_CLIENT: usize = 50;

pub struct Registration {
    pub throughput: f64,
    /// cores ÷ time of one hash on an idle machine (the goal's reference).
    pub limit: f64,
    /// Hashes per second with one hashing thread per core, measured: what the
    /// machine really sustains when the cores share memory bandwidth.
    pub parallel: f64,
    pub healthz_p99: Duration,
    pub probes: usize,
}

pub struct StatusChanges {
    pub api: f64,
    pub pgbench: f64,
    pub clients: usize,
}

/// The service settings of every write bench: the relay is measured on its
/// own (relay.rs), and logging is kept to warnings.
const QUIET: [(&str, &str); 3] = [
    ("RELAY_ENABLED", "false"),
    ("RUST_LOG", "warn,platform::service=info"),
    ("DATABASE_MAX_CONNECTIONS", "32"),
];

/// Seconds of each of `samples` argon2 hashes, one after another on one
/// thread of an otherwise idle machine (the best case a hash can have).
pub async fn hash_seconds(samples: usize) -> anyhow::Result<Vec<f64>> {
    tokio::task::spawn_blocking(move || {
        let mut seconds = Vec::new();
        for i in 0..samples + 2 {
            let started = Instant::now();
            command_api::password::hash_blocking("bench password 123")?;
            // The first two warm the thread's work area and the caches.
            if i >= 2 {
                seconds.push(started.elapsed().as_secs_f64());
            }
        }
        Ok(seconds)
    })
    .await?
}

/// Hashes per second with one thread per core hashing flat out for `window`.
pub fn parallel_capacity(window: Duration) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let started = Instant::now();
    let hashed: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..cores)
            .map(|_| {
                scope.spawn(|| {
                    let mut n = 0u64;
                    while started.elapsed() < window {
                        if command_api::password::hash_blocking("bench password 123").is_ok() {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    hashed as f64 / started.elapsed().as_secs_f64()
}

pub async fn registration(plan: &Plan, run: usize) -> anyhow::Result<Registration> {
    // The limit is sampled before and after the load, so drift on a shared
    // machine shows up in both halves rather than in one.
    let mut hash_times = hash_seconds(15).await?;
    let env = TestEnv::new().await;
    let api = env.spawn(Service::CommandApi, &QUIET).await;
    let http = reqwest::Client::new();
    let counter = Arc::new(AtomicU64::new(0));
    let register = |http: reqwest::Client, api: &Running, counter: Arc<AtomicU64>| {
        let url = api.url("/users");
        async move {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let body = json!({
                "username": format!("r{run}_{n}"),
                "email": format!("r{run}_{n}@example.com"),
                "password": "bench password 123",
            });
            let response = http.post(url).json(&body).send().await?;
            anyhow::Ok(response.status().as_u16())
        }
    };
    // Warm up connections and the database.
    for _ in 0..4 {
        register(http.clone(), &api, counter.clone()).await?;
    }

    let window = Duration::from_secs(plan.seconds);
    let started = Instant::now();
    let clients = (0..REGISTER_CLIENTS).map(|_| {
        let (http, counter) = (http.clone(), counter.clone());
        let api = &api;
        async move {
            let mut accepted = 0u64;
            while started.elapsed() < window {
                match register(http.clone(), api, counter.clone()).await? {
                    201 => accepted += 1,
                    other => bail!("registration answered {other}"),
                }
            }
            anyhow::Ok(accepted)
        }
    });
    let healthz = api.url("/healthz");
    let probe = async {
        let mut latencies = Vec::new();
        while started.elapsed() < window {
            let sent = Instant::now();
            let status = http.get(&healthz).send().await?.status();
            latencies.push(sent.elapsed());
            if !status.is_success() {
                bail!("/healthz answered {status}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::Ok(latencies)
    };
    let (accepted, latencies) = tokio::join!(join_all(clients), probe);
    let elapsed = started.elapsed().as_secs_f64();
    let accepted: u64 = accepted.into_iter().sum::<anyhow::Result<u64>>()?;
    let latencies = latencies?;
    drop(api);
    hash_times.extend(hash_seconds(15).await?);
    let parallel =
        tokio::task::spawn_blocking(|| parallel_capacity(Duration::from_secs(3))).await?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    Ok(Registration {
        throughput: accepted as f64 / elapsed,
        limit: cores / median(&hash_times),
        parallel,
        healthz_p99: percentile(&latencies, 99.0),
        probes: latencies.len(),
    })
}

/// The id of bench user `n`, computed the same way in SQL (see [`SEED`]).
pub fn bench_user(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

pub const SEED: &str = "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
    SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, 1, gen_random_uuid(), \
           'UserRegistered', 1, jsonb_build_object('username', 'bench' || n, \
           'email', 'bench' || n || '@example.com', \
           'password_hash', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA') \
    FROM generate_series(0, $1 - 1) AS n";

/// What the command API does per status command: read the acting
/// administrator's stream (still an active admin?), read the user's stream,
/// then append one event at the next version in a transaction (the NOTIFY
/// trigger fires too). Deactivations also revoke the user's sessions, an
/// UPDATE left out here, so pgbench does a little less than the API.
const PGBENCH_SCRIPT: &str = r#"\set n :client_id * :per + random(0, :per - 1)
SELECT stream_version, event_type, schema_version, payload FROM events WHERE stream_id = '00000000-0000-4000-8000-000000000000'::uuid ORDER BY stream_version;
SELECT stream_version, event_type, schema_version, payload FROM events WHERE stream_id = ('00000000-0000-4000-8000-' || lpad(to_hex(:n), 12, '0'))::uuid ORDER BY stream_version;
BEGIN;
INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) SELECT s.id, (SELECT max(stream_version) FROM events e WHERE e.stream_id = s.id) + 1, gen_random_uuid(), 'UserDeactivated', 1, '{"reason": null}', '{"actor": "admin", "correlation_id": "pgbench"}' FROM (SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(:n), 12, '0'))::uuid AS id) s RETURNING global_position;
COMMIT;
"#;

async fn seeded_env() -> anyhow::Result<TestEnv> {
    let env = TestEnv::new().await;
    sqlx::query(SEED)
        .bind((STATUS_CLIENTS * USERS_PER_CLIENT) as i64)
        .execute(&env.pool)
        .await
        .context("seed bench users")?;
    sqlx::query("VACUUM ANALYZE events")
        .execute(&env.pool)
        .await?;
    Ok(env)
}

pub async fn status_changes(plan: &Plan, run: usize) -> anyhow::Result<StatusChanges> {
    let _ = run;
    // Same seed, separate databases: both start from identical streams.
    let api_env = seeded_env().await?;
    let pg_env = seeded_env().await?;
    let api = api_env.spawn(Service::CommandApi, &QUIET).await;
    let http = reqwest::Client::new();
    let admin_token = userstream_tests::identity::admin_token(&http, &api).await;

    let window = Duration::from_secs(plan.seconds);
    let started = Instant::now();
    let clients = (0..STATUS_CLIENTS).map(|client| {
        let http = http.clone();
        let api = &api;
        let admin_token = &admin_token;
        async move {
            let mut deactivated = [false; USERS_PER_CLIENT];
            let mut accepted = 0u64;
            let mut i = 0;
            while started.elapsed() < window {
                let slot = i % USERS_PER_CLIENT;
                let verb = if deactivated[slot] {
                    "reactivate"
                } else {
                    "deactivate"
                };
                let id = bench_user(client * USERS_PER_CLIENT + slot);
                let status = http
                    .post(api.url(&format!("/users/{id}/{verb}")))
                    .bearer_auth(admin_token)
                    .send()
                    .await?
                    .status();
                if status != 200 {
                    bail!("{verb} answered {status}");
                }
                deactivated[slot] = !deactivated[slot];
                accepted += 1;
                i += 1;
            }
            anyhow::Ok(accepted)
        }
    });
    let accepted: u64 = join_all(clients)
        .await
        .into_iter()
        .sum::<anyhow::Result<u64>>()?;
    let api_rate = accepted as f64 / started.elapsed().as_secs_f64();
    drop(api);

    let pgbench_rate = pgbench(
        &pg_env.database_url,
        plan.seconds,
        STATUS_CLIENTS,
        PGBENCH_SCRIPT,
        &[format!("per={USERS_PER_CLIENT}")],
    )?;
    Ok(StatusChanges {
        api: api_rate,
        pgbench: pgbench_rate,
        clients: STATUS_CLIENTS,
    })
}

fn pgbench_binary() -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
        .pop()
        .context("pgbench not found under /usr/lib/postgresql/*/bin (scripts/stack up installs it)")
}

/// Runs `script` under pgbench with `clients` clients for `seconds`, with
/// `-D` `defines`; returns its transactions per second.
pub fn pgbench(
    database_url: &str,
    seconds: u64,
    clients: usize,
    script: &str,
    defines: &[String],
) -> anyhow::Result<f64> {
    // postgres://user:password@host:port/database
    let rest = database_url
        .strip_prefix("postgres://")
        .context("DATABASE_URL scheme")?;
    let (credentials, location) = rest.split_once('@').context("DATABASE_URL credentials")?;
    let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
    let (host_port, database) = location.split_once('/').context("DATABASE_URL database")?;
    let (host, port) = host_port.split_once(':').unwrap_or((host_port, "5432"));
    let text = script;
    let script = std::env::temp_dir().join(format!("userstream-bench-{}.sql", std::process::id()));
    std::fs::write(&script, text)?;
    let output = Command::new(pgbench_binary()?)
        .env("PGPASSWORD", password)
        .args(["-n", "-h", host, "-p", port, "-U", user])
        .args(["-c", &clients.to_string(), "-j", "2"])
        .args(["-T", &seconds.to_string()])
        .args(defines.iter().flat_map(|d| ["-D", d.as_str()]))
        .arg("-f")
        .arg(&script)
        .arg(database)
        .output()
        .context("run pgbench")?;
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed: {}{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps in pgbench output: {stdout}"))
}
