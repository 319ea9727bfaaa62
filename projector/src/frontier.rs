//! The frontier behind `?min_position=P` on the query API: the point in the
//! log's publication order (transaction id, then position, the relay's gap-safe
//! order) up to which every event is applied to the read model or parked.
//!
//! After every batch commit (and every [`TICK`] regardless) the task walks the
//! log from the frontier, below the cluster's xmin so that no transaction can
//! still commit an event behind it, and moves the frontier past every event
//! whose user's view has reached its version or that is parked. It stops at
//! the first event that is not applied yet. The write raises the
//! `projection_state` NOTIFY, which the query API waits on.

use std::time::Duration;

use eventlog::Checkpoint;
use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;
use read_model::state;
use sqlx::PgPool;
use tokio::sync::watch;

/// Walk the log at least this often, even without batches: the frontier can
/// be held by the xmin horizon rather than by the projector.
pub const TICK: Duration = Duration::from_millis(100);
/// Events examined per query.
const SCAN: i64 = 1_000;

#[derive(sqlx::FromRow)]
struct Scanned {
    xid: i64,
    global_position: i64,
    done: bool,
}

/// Moves the frontier as far as the log allows; returns where it stands.
#[tracing::instrument(name = "advance_frontier", skip_all)]
pub async fn advance(pool: &PgPool) -> Result<Checkpoint, sqlx::Error> {
    let start = state::load(pool).await?.applied();
    let mut frontier = start;
    loop {
        let rows: Vec<Scanned> = sqlx::query_as(
            "SELECT e.transaction_id::text::bigint AS xid, e.global_position, \
               (coalesce(v.version >= e.stream_version, false) \
                OR EXISTS (SELECT 1 FROM projector_parked p WHERE p.ce_id = e.event_id::text)) AS done \
             FROM events_public e LEFT JOIN user_views v ON v.id = e.stream_id \
             WHERE (e.transaction_id, e.global_position) > ($1::bigint::text::xid8, $2) \
               AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY e.transaction_id, e.global_position LIMIT $3",
        )
        .bind(frontier.transaction_id)
        .bind(frontier.global_position)
        .bind(SCAN)
        .fetch_all(pool)
        .await?;
        let scanned = rows.len() as i64;
        let mut blocked = false;
        for row in rows {
            if !row.done {
                blocked = true;
                break;
            }
            frontier = Checkpoint {
                transaction_id: row.xid,
                global_position: row.global_position,
            };
        }
        if blocked || scanned < SCAN {
            break;
        }
    }
    if frontier > start {
        // Never backwards, whoever else moves it.
        sqlx::query(
            "UPDATE projection_state SET applied_xid = $1, applied_position = $2 \
             WHERE singleton AND (applied_xid, applied_position) < ($1, $2)",
        )
        .bind(frontier.transaction_id)
        .bind(frontier.global_position)
        .execute(pool)
        .await?;
    }
    Ok(frontier)
}

/// Advances the frontier after each batch commit (`commits` changes) and
/// every [`TICK`], until shutdown. Errors are logged and retried on the next
/// round: the frontier only waits.
pub async fn run_until_stopped(
    pool: PgPool,
    mut commits: watch::Receiver<u64>,
    mut shutdown: Shutdown,
) {
    loop {
        match advance(&pool).await {
            Ok(frontier) => {
                metrics::gauge!("projector_frontier_position").set(frontier.global_position as f64)
            }
            Err(error) => {
                metrics::counter!("projector_frontier_errors_total").increment(1);
                tracing::warn!(error = %error_chain(&error), "cannot advance the read-your-writes frontier; retrying");
            }
        }
        tokio::select! {
            changed = commits.changed() => {
                if changed.is_err() {
                    return; // The read model is gone: the process is ending.
                }
            }
            () = tokio::time::sleep(TICK) => {}
            () = shutdown.requested() => return,
        }
    }
}
