//! The `projection_state` row: which generation of the read model serves,
//! which Redis namespace may be trusted, and the last committed batch number.

use sqlx::{PgConnection, PgExecutor};

use crate::cache::Namespace;

/// NOTIFY channel raised whenever the row changes (a batch committed, the
/// namespace changed, a rebuild switched).
pub const STATE_CHANNEL: &str = "projection_state";

#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct ProjectionState {
    /// Generation of `user_views`; raised by `projector rebuild` when it switches.
    pub projection_version: i32,
    /// The trusted Redis namespace, or None while Redis cannot be trusted.
    pub cache_epoch: Option<i64>,
    /// Number of the last committed projection batch.
    pub batch_seq: i64,
}

impl ProjectionState {
    /// The Redis namespace readers may use, if any.
    pub fn namespace(&self) -> Option<Namespace> {
        self.cache_epoch.map(|epoch| Namespace {
            projection_version: self.projection_version,
            epoch,
        })
    }
}

const SELECT: &str =
    "SELECT projection_version, cache_epoch, batch_seq FROM projection_state WHERE singleton";

/// The current state, without locking.
#[tracing::instrument(name = "sql_load_projection_state", skip_all)]
pub async fn load(db: impl PgExecutor<'_>) -> Result<ProjectionState, sqlx::Error> {
    sqlx::query_as(SELECT).fetch_one(db).await
}

/// The current state, locked until the transaction ends: every projection
/// batch, namespace change and rebuild switch takes this lock first.
#[tracing::instrument(name = "sql_lock_projection_state", skip_all)]
pub async fn lock(tx: &mut PgConnection) -> Result<ProjectionState, sqlx::Error> {
    sqlx::query_as(&format!("{SELECT} FOR UPDATE"))
        .fetch_one(tx)
        .await
}

/// Draws the number of a batch about to commit (never reused, even after a
/// rollback). Call with the state locked.
#[tracing::instrument(name = "sql_next_batch_seq", skip_all)]
pub async fn next_batch_seq(tx: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT nextval('projection_batch_seq')")
        .fetch_one(tx)
        .await
}

/// Records what a batch committed: its number, and the namespace still
/// trusted after it (None when Redis could not be told about the batch).
#[tracing::instrument(name = "sql_record_batch", skip(tx))]
pub async fn record_batch(
    tx: &mut PgConnection,
    batch_seq: i64,
    cache_epoch: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_state SET batch_seq = $1, cache_epoch = $2, updated_at = now() \
         WHERE singleton",
    )
    .bind(batch_seq)
    .bind(cache_epoch)
    .execute(tx)
    .await?;
    Ok(())
}

/// Sets the trusted namespace (None: stop trusting Redis).
#[tracing::instrument(name = "sql_set_cache_epoch", skip(tx))]
pub async fn set_cache_epoch(
    tx: &mut PgConnection,
    cache_epoch: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE projection_state SET cache_epoch = $1, updated_at = now() WHERE singleton")
        .bind(cache_epoch)
        .execute(tx)
        .await?;
    Ok(())
}
