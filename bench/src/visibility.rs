//! End-to-end visibility: how long after the command API answers a command
//! the query API shows its version, with the relay, the projector and the
//! query API all running on one database and topic, at half the highest
//! command rate the same system sustains.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::future::join_all;
use reqwest::header::{ETAG, IF_NONE_MATCH};
use userstream_tests::{Service, TestEnv};

use crate::projection::{clean_up, VIEW_TTL};
use crate::stats::percentile;
use crate::writes::{bench_user, SEED, STATUS_CLIENTS, USERS_PER_CLIENT};
use crate::{env_or, Plan, PATIENCE};

/// A probe gives up on a command after this long (counted as this long).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time between two reads of one probe: every millisecond for the first
/// [`PROBE_FAST_FOR`] (the goal's range), then every [`PROBE_SLOW_EVERY`],
/// so a slow delivery does not multiply the probing load.
const PROBE_EVERY: Duration = Duration::from_millis(1);
const PROBE_FAST_FOR: Duration = Duration::from_millis(50);
const PROBE_SLOW_EVERY: Duration = Duration::from_millis(5);
/// How often the bench looks for write transactions of other databases.
const FOREIGN_EVERY: Duration = Duration::from_millis(50);

pub struct Visibility {
    /// Status commands per second with 8 closed-loop clients (the maximum).
    pub max_rate: f64,
    /// Those commands over the time until the read model had them all.
    pub sustained: f64,
    /// The paced phase's target (half the maximum) and what it reached.
    pub target: f64,
    pub rate: f64,
    /// Time from a command's answer until the query API shows its version.
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Commands probed, of those answered in the paced phase.
    pub probed: usize,
    pub answered: usize,
    /// Probes that did not see their version within [`PROBE_TIMEOUT`].
    pub timeouts: usize,
    /// Commands not answered 200 in the paced phase.
    pub failures: usize,
    /// Reads per second the probes sent to the query API.
    pub probe_reads: f64,
    /// Command latency (send to answer) in the paced phase.
    pub command_p50: Duration,
    pub command_p99: Duration,
    /// Share of samples (every 50 ms) in which a write transaction of another
    /// database on the cluster had been open for more than 10 ms, and the
    /// oldest seen: such a transaction holds back the relay's xmin horizon.
    pub foreign_busy: f64,
    pub foreign_max: Duration,
    /// The probes no such transaction was seen to hold up, and their
    /// percentiles (the pipeline's own latency, as far as 50 ms sampling
    /// can tell).
    pub undisturbed: usize,
    pub undisturbed_p50: Duration,
    pub undisturbed_p99: Duration,
    /// Projection batches committed per second in the paced phase.
    pub projector_batches: f64,
    /// Relay batches per second, and their mean time from being queued to
    /// the checkpoint passing them (the command API's own histogram).
    pub relay_batches: f64,
    pub relay_batch_time: Duration,
    /// With `BENCH_STAGES=1`: medians of answer → relay checkpoint past the
    /// event, and answer → the view's row in PostgreSQL at the version.
    pub stages: Option<(Duration, Duration)>,
}

/// The bench users' status as the bench has made it, and which have a
/// command (or a probe) in flight.
struct Users {
    deactivated: Vec<AtomicBool>,
    busy: Vec<AtomicBool>,
    /// An administrator's access token: status changes need one.
    admin_token: String,
}

impl Users {
    fn new(n: usize, admin_token: String) -> Self {
        Self {
            deactivated: (0..n).map(|_| AtomicBool::new(false)).collect(),
            busy: (0..n).map(|_| AtomicBool::new(false)).collect(),
            admin_token,
        }
    }

    /// The next user, round robin from `next`, with nothing in flight.
    fn claim(&self, next: &mut usize) -> Option<usize> {
        let n = self.busy.len();
        for _ in 0..n {
            let user = *next % n;
            *next += 1;
            if !self.busy[user].swap(true, Ordering::AcqRel) {
                return Some(user);
            }
        }
        None
    }

    fn release(&self, user: usize) {
        self.busy[user].store(false, Ordering::Release);
    }
}

/// Toggles `user` (deactivate or reactivate); the version it reached and
/// the event's log position.
async fn toggle(
    http: &reqwest::Client,
    api: &str,
    users: &Users,
    user: usize,
) -> anyhow::Result<(i32, i64)> {
    let deactivated = users.deactivated[user].load(Ordering::Acquire);
    let verb = if deactivated {
        "reactivate"
    } else {
        "deactivate"
    };
    let response = http
        .post(format!("{api}/users/{}/{verb}", bench_user(user)))
        .bearer_auth(&users.admin_token)
        .send()
        .await?;
    let status = response.status();
    if status != 200 {
        bail!("{verb} answered {status}");
    }
    let answer: serde_json::Value = response.json().await?;
    users.deactivated[user].store(!deactivated, Ordering::Release);
    let version = answer["version"]
        .as_i64()
        .context("the answer carries no version")?;
    let position = answer["position"]
        .as_i64()
        .context("the answer carries no position")?;
    Ok((version as i32, position))
}

/// What one probe found.
struct Probe {
    answered: Instant,
    /// Answer → the query API showed the version; None after [`PROBE_TIMEOUT`].
    visible: Option<Duration>,
    /// Reads sent to the query API.
    reads: u32,
    /// With stages: answer → relay checkpoint at or past the event, and
    /// answer → the view's row at the version (first seen by the probe).
    relayed: Option<Duration>,
    projected: Option<Duration>,
}

/// Reads the user from the query API (every [`PROBE_EVERY`], then every
/// [`PROBE_SLOW_EVERY`]) until it shows `version` or later. With `stages`,
/// each round also reads the relay checkpoint and the view's row from
/// PostgreSQL until they have passed the event.
async fn probe(
    http: &reqwest::Client,
    query: &str,
    stages: Option<&sqlx::PgPool>,
    user: usize,
    (version, position): (i32, i64),
    answered: Instant,
) -> Probe {
    let id = bench_user(user);
    let url = format!("{query}/users/{id}");
    // 304 (no body) while the view is still at the previous version.
    let previous = format!("\"{}\"", version - 1);
    let mut found = Probe {
        answered,
        visible: None,
        reads: 0,
        relayed: None,
        projected: None,
    };
    loop {
        if let Some(pool) = stages.filter(|_| found.projected.is_none()) {
            let seen: Result<(Option<i64>, Option<i32>), _> = sqlx::query_as(
                "SELECT (SELECT max(global_position) FROM relay_checkpoints), \
                        (SELECT version FROM user_views WHERE id = $1::uuid)",
            )
            .bind(&id)
            .fetch_one(pool)
            .await;
            if let Ok((checkpoint, row)) = seen {
                if found.relayed.is_none() && checkpoint.is_some_and(|c| c >= position) {
                    found.relayed = Some(answered.elapsed());
                }
                if row.is_some_and(|v| v >= version) {
                    found.projected = Some(answered.elapsed());
                    found.relayed.get_or_insert(answered.elapsed());
                }
            }
        }
        found.reads += 1;
        if let Ok(response) = http.get(&url).header(IF_NONE_MATCH, &previous).send().await {
            let seen = response
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim_matches('"').parse::<i32>().ok());
            let _ = response.bytes().await;
            if seen.is_some_and(|seen| seen >= version) {
                found.visible = Some(answered.elapsed());
                return found;
            }
        }
        let waited = answered.elapsed();
        if waited > PROBE_TIMEOUT {
            return found;
        }
        tokio::time::sleep(if waited < PROBE_FAST_FOR {
            PROBE_EVERY
        } else {
            PROBE_SLOW_EVERY
        })
        .await;
    }
}

/// Samples, every [`FOREIGN_EVERY`] until `stop`, the age of the oldest
/// write transaction of any other database on the cluster (zero when none):
/// (when sampled, age).
async fn foreign_transactions(
    pool: sqlx::PgPool,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<(Instant, Duration)>> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let age: f64 = sqlx::query_scalar(
            "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)::float8 \
             FROM pg_stat_activity \
             WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database()",
        )
        .fetch_one(&pool)
        .await?;
        samples.push((Instant::now(), Duration::from_secs_f64(age.max(0.0))));
        tokio::time::sleep(FOREIGN_EVERY).await;
    }
    Ok(samples)
}

/// Whether a write transaction of another database was seen open across the
/// moment the command was answered and still open while the probe waited: it
/// holds the relay's xmin horizon below the command's event.
fn disturbed(probe: &Probe, foreign: &[(Instant, Duration)]) -> bool {
    let until = probe.answered + probe.visible.unwrap_or(PROBE_TIMEOUT);
    foreign.iter().any(|&(at, age)| {
        at > probe.answered
            && at <= until
            && at.checked_sub(age).is_some_and(|s| s < probe.answered)
    })
}

/// Waits until every event of the log is in the read model.
async fn caught_up(env: &TestEnv) -> anyhow::Result<()> {
    let give_up = Instant::now() + PATIENCE;
    loop {
        let done: bool = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM events) = (SELECT coalesce(sum(version), 0) FROM user_views)",
        )
        .fetch_one(&env.pool)
        .await?;
        if done {
            return Ok(());
        }
        if Instant::now() > give_up {
            bail!("the read model did not catch up with the log");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Sample {
    command: Duration,
    /// None: not probed.
    probe: Option<Probe>,
}

pub async fn visibility(plan: &Plan, run: usize) -> anyhow::Result<Visibility> {
    let _ = run;
    let env = TestEnv::new().await;
    let n_users = STATUS_CLIENTS * USERS_PER_CLIENT;
    sqlx::query(SEED)
        .bind(n_users as i64)
        .execute(&env.pool)
        .await
        .context("seed bench users")?;
    sqlx::query("VACUUM ANALYZE events")
        .execute(&env.pool)
        .await?;
    let command_api = env
        .spawn(
            Service::CommandApi,
            &[
                ("RUST_LOG", "warn,platform::service=info"),
                ("DATABASE_MAX_CONNECTIONS", "32"),
            ],
        )
        .await;
    let projector = env
        .spawn(
            Service::Projector,
            &[("RUST_LOG", "warn,platform::service=info"), VIEW_TTL],
        )
        .await;
    let query_api = env
        .spawn(
            Service::QueryApi,
            &[("RUST_LOG", "warn,platform::service=info"), VIEW_TTL],
        )
        .await;
    let http = reqwest::Client::new();
    let admin_token = userstream_tests::identity::admin_token(&http, &command_api).await;
    caught_up(&env).await?;
    let api = command_api.url("");
    let query = query_api.url("");
    let users = Arc::new(Users::new(n_users, admin_token));
    let window = Duration::from_secs(plan.seconds);

    // 1. The maximum: closed-loop clients, each toggling its own users.
    let started = Instant::now();
    let clients = (0..STATUS_CLIENTS).map(|client| {
        let (http, api, users) = (&http, &api, &users);
        async move {
            let mut done = 0_u64;
            let mut i = 0;
            while started.elapsed() < window {
                let user = client * USERS_PER_CLIENT + i % USERS_PER_CLIENT;
                toggle(http, api, users, user).await?;
                done += 1;
                i += 1;
            }
            anyhow::Ok(done)
        }
    });
    let done: u64 = join_all(clients)
        .await
        .into_iter()
        .sum::<anyhow::Result<u64>>()?;
    let max_rate = done as f64 / started.elapsed().as_secs_f64();
    caught_up(&env).await?;
    // The same commands over the time until the read model had them all:
    // the rate the whole pipeline sustains, for context.
    let sustained = done as f64 / started.elapsed().as_secs_f64();

    // 2. Half of it, paced (open loop: a late command does not delay the
    //    next), every `probe_every`-th command probed.
    // `BENCH_VISIBILITY_RATE` replaces the half for a diagnosis (latency
    // against rate); the bench's figure is at half the maximum.
    let target = env_or("BENCH_VISIBILITY_RATE", max_rate / 2.0);
    let probed_per_second: f64 = env_or("BENCH_PROBED_PER_SECOND", 50.0);
    let probe_every = ((target / probed_per_second).round() as usize).max(1);
    let stages = if env_or("BENCH_STAGES", 0) == 1 {
        Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(16)
                .connect(&env.database_url)
                .await?,
        )
    } else {
        None
    };
    let batch_seq = || async {
        sqlx::query_scalar::<_, i64>("SELECT batch_seq FROM projection_state")
            .fetch_one(&env.pool)
            .await
    };
    let seq_before = batch_seq().await?;
    let relay_before = (
        command_api.metric("relay_batch_duration_seconds_sum").await,
        command_api
            .metric("relay_batch_duration_seconds_count")
            .await,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let foreign = tokio::spawn(foreign_transactions(env.pool.clone(), stop.clone()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut next = 0;
    let mut skipped = 0_usize;
    for i in 0_u64.. {
        let due = started + Duration::from_secs_f64(i as f64 / target);
        if due >= started + window {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let Some(user) = users.claim(&mut next) else {
            skipped += 1;
            continue;
        };
        let (http, api, query, users) = (http.clone(), api.clone(), query.clone(), users.clone());
        let stages = stages.clone();
        let probed = i % probe_every as u64 == 0;
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = toggle(&http, &api, &users, user).await;
            let answered = Instant::now();
            let sample = match outcome {
                Ok(accepted) => Some(Sample {
                    command: answered - sent,
                    probe: match probed {
                        true => Some(
                            probe(&http, &query, stages.as_ref(), user, accepted, answered).await,
                        ),
                        false => None,
                    },
                }),
                Err(_) => None,
            };
            // A user whose command failed is left busy: its status is unknown.
            if sample.is_some() {
                users.release(user);
            }
            sample
        }));
    }
    let paced = started.elapsed().as_secs_f64();
    let samples: Vec<Option<Sample>> = join_all(tasks)
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    stop.store(true, Ordering::Release);
    let batches = batch_seq().await? - seq_before;
    let relay_batches = command_api
        .metric("relay_batch_duration_seconds_count")
        .await
        - relay_before.1;
    let relay_seconds =
        command_api.metric("relay_batch_duration_seconds_sum").await - relay_before.0;
    let foreign = foreign.await??;
    let foreign_busy = foreign
        .iter()
        .filter(|(_, age)| *age > Duration::from_millis(10))
        .count();
    let foreign_max = foreign
        .iter()
        .map(|(_, age)| *age)
        .max()
        .unwrap_or_default();
    if skipped > 0 {
        println!("    {skipped} commands skipped: every user had one in flight");
    }
    let failures = samples.iter().filter(|s| s.is_none()).count();
    let samples: Vec<Sample> = samples.into_iter().flatten().collect();
    let commands: Vec<Duration> = samples.iter().map(|s| s.command).collect();
    let probes: Vec<&Probe> = samples.iter().filter_map(|s| s.probe.as_ref()).collect();
    let visible: Vec<Duration> = probes
        .iter()
        .map(|p| p.visible.unwrap_or(PROBE_TIMEOUT))
        .collect();
    let undisturbed: Vec<Duration> = probes
        .iter()
        .filter(|p| !disturbed(p, &foreign))
        .map(|p| p.visible.unwrap_or(PROBE_TIMEOUT))
        .collect();
    let timeouts = probes.iter().filter(|p| p.visible.is_none()).count();
    let reads: u64 = probes.iter().map(|p| u64::from(p.reads)).sum();
    let stages = stages.map(|_| {
        let relayed: Vec<Duration> = probes.iter().filter_map(|p| p.relayed).collect();
        let projected: Vec<Duration> = probes.iter().filter_map(|p| p.projected).collect();
        (percentile(&relayed, 50.0), percentile(&projected, 50.0))
    });

    drop(query_api);
    drop(projector);
    drop(command_api);
    clean_up(plan, env).await?;
    Ok(Visibility {
        projector_batches: batches as f64 / paced,
        relay_batches: relay_batches / paced,
        relay_batch_time: Duration::from_secs_f64(relay_seconds / relay_batches.max(1.0)),
        max_rate,
        sustained,
        target,
        rate: samples.len() as f64 / paced,
        p50: percentile(&visible, 50.0),
        p99: percentile(&visible, 99.0),
        max: percentile(&visible, 100.0),
        probed: visible.len(),
        answered: samples.len(),
        timeouts,
        failures,
        probe_reads: reads as f64 / paced,
        command_p50: percentile(&commands, 50.0),
        command_p99: percentile(&commands, 99.0),
        foreign_busy: foreign_busy as f64 / foreign.len().max(1) as f64,
        foreign_max,
        undisturbed: undisturbed.len(),
        undisturbed_p50: percentile(&undisturbed, 50.0),
        undisturbed_p99: percentile(&undisturbed, 99.0),
        stages,
    })
}
