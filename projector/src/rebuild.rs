//! `projector rebuild`: replays the log into a fresh generation of the read
//! model beside the serving one, then switches, blue/green.
//!
//! With N the serving generation (`projection_state.projection_version`):
//! fold the whole log into memory, COPY it into `user_views_g{N+1}` (no
//! indexes yet), index it, catch up on what arrived meanwhile, then switch in
//! one short transaction: lock `projection_state` (live projection batches
//! wait), fold the last events in, rename `user_views` away and the new table
//! into its place, raise the version and set `cache_epoch` to NULL so readers
//! skip Redis until the live projector opens a namespace for the new
//! generation. The live projector keeps running throughout: its SQL names
//! `user_views`, so after the switch it writes the new table.
//!
//! The new table is built from the log below xmin, and every event the live
//! projector applied was below xmin when the relay read it, so no user's view
//! is older in the new table than in the old one: readers never go backwards.

pub mod generation;
mod switch;

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context;
use events::UserView;
use read_model::state;
use sqlx::{Connection, PgConnection, PgPool};

use crate::fold::{Fold, BATCH_SIZE};
use switch::{drop_leftovers, drop_table, switch_with_retries};

/// Serialises rebuilds: a second one would drop the first one's table.
const REBUILD_LOCK: i64 = 0x7573_6572_7265_6231; // "userreb1"

/// Catch-up rounds before the switch: stop early once a round reads fewer
/// events than this, so the switch, which holds live batches, has little left.
const SMALL_CATCH_UP: u64 = 1_000;
const CATCH_UP_ROUNDS: usize = 10;

/// What a rebuild did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The generation now serving.
    pub generation: i32,
    pub events: u64,
    pub users: usize,
    /// Users whose stream could not be folded to its end (left at their last
    /// good version, as the live projector leaves them).
    pub problems: usize,
    pub fold: Duration,
    pub load: Duration,
    pub index: Duration,
    /// Events folded after the bulk load (catch-up and switch).
    pub caught_up: u64,
    /// How long the successful switch held (or waited for) `projection_state`:
    /// what live batches waited at most.
    pub switch: Duration,
    pub total: Duration,
}

impl Summary {
    /// Events per second over the initial fold.
    pub fn fold_rate(&self) -> f64 {
        self.events.saturating_sub(self.caught_up) as f64 / self.fold.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rebuild: generation {} serving; {} events, {} users, {} with problems; \
             fold {:.1}s ({:.0} events/s), load {:.1}s, index {:.1}s, caught up {} events, \
             switch {} ms, total {:.1}s",
            self.generation,
            self.events,
            self.users,
            self.problems,
            self.fold.as_secs_f64(),
            self.fold_rate(),
            self.load.as_secs_f64(),
            self.index.as_secs_f64(),
            self.caught_up,
            self.switch.as_millis(),
            self.total.as_secs_f64(),
        )
    }
}

/// Rebuilds the read model from the log and switches to it.
#[tracing::instrument(name = "rebuild", skip_all)]
pub async fn rebuild(pool: &PgPool) -> anyhow::Result<Summary> {
    let started = Instant::now();
    // One session for the whole rebuild: it holds the rebuild lock, and
    // closing it (even by dying) releases the lock.
    let mut conn = pool
        .acquire()
        .await
        .context("cannot connect to PostgreSQL")?
        .detach();
    anyhow::ensure!(
        try_lock(&mut conn).await?,
        "another `projector rebuild` is running"
    );
    let result = run(pool, &mut conn, started).await;
    if result.is_err() {
        discard_unfinished(&mut conn).await;
    }
    conn.close().await.ok();
    result
}

/// After a failure, drops the half-built generation (if the switch happened,
/// it is `user_views` by now and no table of that name is left to drop).
/// Best effort: the next rebuild drops it anyway.
async fn discard_unfinished(conn: &mut PgConnection) {
    let Ok(current) = state::load(&mut *conn).await else {
        return;
    };
    let unfinished = generation::table(current.projection_version + 1);
    if let Err(error) = drop_table(conn, &unfinished).await {
        tracing::warn!(table = unfinished, error = %platform::telemetry::error_chain(&error), "could not drop the unfinished generation");
    }
}

async fn run(pool: &PgPool, conn: &mut PgConnection, started: Instant) -> anyhow::Result<Summary> {
    let serving = state::load(&mut *conn).await?.projection_version;
    let next = serving + 1;
    drop_leftovers(conn).await?;
    generation::create(conn, next)
        .await
        .with_context(|| format!("cannot create {}", generation::table(next)))?;
    tracing::info!(generation = next, "rebuilding from the log");

    let phase = Instant::now();
    let mut fold = Fold::new();
    fold.fold_log(conn, BATCH_SIZE)
        .await
        .context("cannot read the log")?;
    let fold_time = phase.elapsed();
    let folded = fold.events;
    tracing::info!(
        events = folded,
        users = fold.views.len(),
        seconds = fold_time.as_secs_f64(),
        events_per_second = (folded as f64 / fold_time.as_secs_f64().max(1e-9)).round() as u64,
        "log folded"
    );

    let phase = Instant::now();
    let views: Vec<&UserView> = fold.views.values().collect();
    let rows = generation::copy(pool, next, &views, parallelism())
        .await
        .context("cannot load the new table")?;
    drop(views);
    let load_time = phase.elapsed();
    tracing::info!(rows, seconds = load_time.as_secs_f64(), "views loaded");

    fold.track_changes();
    let phase = Instant::now();
    let indexes = generation::build_indexes(pool, next)
        .await
        .context("cannot index the new table")?;
    let index_time = phase.elapsed();
    tracing::info!(
        ?indexes,
        seconds = index_time.as_secs_f64(),
        "indexes built"
    );

    for round in 1..=CATCH_UP_ROUNDS {
        let read = fold.fold_log(conn, BATCH_SIZE).await?;
        let changed = fold.take_changed();
        let views: Vec<&UserView> = changed.iter().filter_map(|id| fold.views.get(id)).collect();
        if let Err(error) = generation::upsert(conn, next, &views).await {
            fold.restore_changed(changed);
            return Err(error).context("cannot catch up the new table");
        }
        tracing::info!(round, events = read, views = views.len(), "caught up");
        if read < SMALL_CATCH_UP {
            break;
        }
    }

    let switch_time = switch_with_retries(conn, &mut fold, serving).await?;
    tracing::info!(
        generation = next,
        locked_ms = switch_time.as_millis() as u64,
        "switched"
    );
    let retired = generation::retired(serving);
    drop_table(conn, &retired).await.with_context(|| {
        format!("switched to generation {next}, but could not drop {retired} (the next rebuild drops it)")
    })?;
    Ok(Summary {
        generation: next,
        events: fold.events,
        users: fold.views.len(),
        problems: fold.problems.len(),
        fold: fold_time,
        load: load_time,
        index: index_time,
        caught_up: fold.events - folded,
        switch: switch_time,
        total: started.elapsed(),
    })
}

/// Concurrent COPY streams: one per core PostgreSQL may use (the client
/// only formats text meanwhile), at most four.
fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// Takes the rebuild lock for this session, if no other session holds it.
#[tracing::instrument(name = "sql_lock_rebuild", skip_all)]
async fn try_lock(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(REBUILD_LOCK)
        .fetch_one(conn)
        .await
}
