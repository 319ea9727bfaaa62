//! The read side catching up: the projector consuming a published backlog,
//! and `projector rebuild` replaying the whole log, each against a plain
//! client reading the same log from PostgreSQL in the same run.

use std::time::{Duration, Instant};

use anyhow::bail;
use futures::TryStreamExt;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use sqlx::types::chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};
use userstream_tests::{admin_database_url, kafka_brokers, Service, TestEnv};
use uuid::Uuid;

use crate::relay::seed_log;
use crate::{Plan, PATIENCE};

/// Cached views of a bench expire soon after it: every run opens its own
/// Redis prefix, and nobody reads it afterwards.
pub const VIEW_TTL: (&str, &str) = ("REDIS_VIEW_TTL_SECS", "900");

/// The baseline read: every column a projection needs, in the log's order,
/// from the view the read side reads (no password hashes).
const SCAN: &str =
    "SELECT stream_id, stream_version, event_id, event_type, schema_version, payload, recorded_at \
    FROM events_public ORDER BY transaction_id, global_position";

type ScanRow = (
    Uuid,
    i32,
    Uuid,
    String,
    i16,
    serde_json::Value,
    DateTime<Utc>,
);

pub struct CatchUp {
    /// Events per second the projector (or the rebuild) reached.
    pub rate: f64,
    /// Events per second of the plain scan, mean of one before and one after.
    pub scan: f64,
    pub events: i64,
    /// Committed projection batches (projector) or 0 (rebuild).
    pub batches: i64,
    /// Seconds the timed part took.
    pub seconds: f64,
}

/// Reads the whole log once as a client would, decoding every row (the
/// payload into a JSON value); returns (rows, rows per second).
pub async fn scan_log(database_url: &str) -> anyhow::Result<(u64, f64)> {
    let mut conn = PgConnection::connect(database_url).await?;
    let started = Instant::now();
    let mut read = 0_u64;
    {
        let mut rows = sqlx::query_as::<_, ScanRow>(SCAN).fetch(&mut conn);
        while let Some(row) = rows.try_next().await? {
            std::hint::black_box(&row);
            read += 1;
        }
    }
    let rate = read as f64 / started.elapsed().as_secs_f64();
    conn.close().await?;
    Ok((read, rate))
}

/// Drops a run's database and topics (unless `BENCH_KEEP` is set), so
/// repeated runs of a million events do not fill the shared stack.
pub async fn clean_up(plan: &Plan, env: TestEnv) -> anyhow::Result<()> {
    if plan.keep {
        println!(
            "    kept database {} and topic {}",
            env.database_name, env.topic
        );
        return Ok(());
    }
    env.pool.close().await;
    let mut admin = PgConnection::connect(&admin_database_url()).await?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        env.database_name
    ))
    .execute(&mut admin)
    .await?;
    admin.close().await?;
    let kafka: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()?;
    // A topic that was never created is fine.
    let _ = kafka
        .delete_topics(&[&env.topic], &AdminOptions::new())
        .await;
    Ok(())
}

/// Fails unless `user_views` holds `users` views whose versions add up to
/// `events`, and nothing was parked: the figure counts only a complete,
/// correct read model.
async fn check_views(env: &TestEnv, users: i64, events: i64) -> anyhow::Result<()> {
    let (count, versions): (i64, i64) =
        sqlx::query_as("SELECT count(*), coalesce(sum(version), 0)::bigint FROM user_views")
            .fetch_one(&env.pool)
            .await?;
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM projector_parked")
        .fetch_one(&env.pool)
        .await?;
    if count != users || versions != events || parked != 0 {
        bail!("read model incomplete: {count} views (want {users}), versions add up to {versions} (want {events}), {parked} parked");
    }
    Ok(())
}

/// Steady-state projection: a backlog already in a fresh topic, consumed by
/// the release projector in a fresh group.
pub async fn projection(plan: &Plan, run: usize) -> anyhow::Result<CatchUp> {
    let _ = run;
    let env = TestEnv::new().await;
    let users = plan.backlog / 4;
    let events = users * 4;
    let last = seed_log(&env, users).await?;

    // Publish the backlog with the release relay, then stop it.
    let relay = env
        .spawn(
            Service::CommandApi,
            &[("RUST_LOG", "warn,platform::service=info")],
        )
        .await;
    let give_up = Instant::now() + PATIENCE;
    loop {
        let at: Option<i64> = sqlx::query_scalar("SELECT global_position FROM relay_checkpoints")
            .fetch_optional(&env.pool)
            .await?;
        if at == Some(last) {
            break;
        }
        if Instant::now() > give_up {
            bail!("the relay did not publish the backlog");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;

    let (scanned, scan_before) = scan_log(&env.database_url).await?;
    if scanned != events as u64 {
        bail!("the scan read {scanned} events, not {events}");
    }

    let projector = env
        .spawn(
            Service::Projector,
            &[("RUST_LOG", "warn,platform::service=info"), VIEW_TTL],
        )
        .await;
    let consumed = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM projector_partitions WHERE topic = $1",
        )
        .bind(&env.topic)
        .fetch_one(&env.pool)
        .await
    };
    let give_up = Instant::now() + PATIENCE;
    // The clock starts when the first batch has committed, so start-up and
    // the consumer group's join are not counted (nor is that batch).
    let (first, started) = loop {
        let n = consumed().await?;
        if n > 0 {
            break (n, Instant::now());
        }
        if Instant::now() > give_up {
            bail!("the projector applied nothing");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    loop {
        let n = consumed().await?;
        if n >= events {
            break;
        }
        if Instant::now() > give_up {
            bail!("the projector stopped at {n} of {events} messages");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = (events - first) as f64 / seconds;
    drop(projector);
    check_views(&env, users, events).await?;
    let batches: i64 = sqlx::query_scalar("SELECT batch_seq FROM projection_state")
        .fetch_one(&env.pool)
        .await?;

    let (_, scan_after) = scan_log(&env.database_url).await?;
    clean_up(plan, env).await?;
    Ok(CatchUp {
        rate,
        scan: (scan_before + scan_after) / 2.0,
        events,
        batches,
        seconds,
    })
}

/// `projector rebuild` over a log of `plan.rebuild_events` events, timed
/// from the command's start to its successful exit.
pub async fn rebuild(plan: &Plan, run: usize) -> anyhow::Result<CatchUp> {
    let _ = run;
    let env = TestEnv::new().await;
    let users = plan.rebuild_events / 4;
    let events = users * 4;
    let seeding = Instant::now();
    seed_log(&env, users).await?;
    println!(
        "    seeded {events} events in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let (scanned, scan_before) = scan_log(&env.database_url).await?;
    if scanned != events as u64 {
        bail!("the scan read {scanned} events, not {events}");
    }

    let started = Instant::now();
    let finished = env
        .run(Service::Projector, &["rebuild"], &[VIEW_TTL], PATIENCE)
        .await;
    let seconds = started.elapsed().as_secs_f64();
    if !finished.status.success() {
        let tail = |text: &str| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        bail!(
            "projector rebuild exited with {}:\n{}\n{}",
            finished.status,
            tail(&finished.stdout),
            tail(&finished.stderr)
        );
    }
    // Its own account of where the time went.
    if let Some(summary) = finished.stdout.lines().find(|l| l.starts_with("rebuild:")) {
        println!("    {summary}");
    }
    check_views(&env, users, events).await?;

    let (_, scan_after) = scan_log(&env.database_url).await?;
    clean_up(plan, env).await?;
    Ok(CatchUp {
        rate: events as f64 / seconds,
        scan: (scan_before + scan_after) / 2.0,
        events,
        batches: 0,
        seconds,
    })
}
