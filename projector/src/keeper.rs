//! Keeps the Redis namespace trustworthy: when `projection_state` names none
//! (Redis could not be told of a batch, or a rebuild switched), or the named
//! one has lost writes (restarted from an older snapshot, flushed), it opens a
//! fresh, empty namespace as soon as Redis answers. Readers fall back to
//! PostgreSQL meanwhile; this loop bounds how long that lasts.

use std::time::Duration;

use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;
use read_model::{state, Namespace};

use crate::batch::ReadModel;

/// How often the namespace is checked: the bound on how long readers go
/// without Redis after it answers again.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);

/// What one [`step`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The named namespace has every committed batch.
    Trusted,
    /// A fresh namespace was opened.
    Opened(Namespace),
    /// Redis does not answer; nothing to do until it does.
    Unreachable,
}

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

/// Checks the namespace once and opens a fresh one if needed.
#[tracing::instrument(name = "cache_keeper_step", skip_all)]
pub async fn step(model: &ReadModel) -> Result<Check, KeeperError> {
    let current = state::load(model.rows.pool()).await?;
    if let Some(ns) = current.namespace() {
        match model.cache.through(ns).await {
            Ok(Some(through)) if through >= current.batch_seq => return Ok(Check::Trusted),
            Ok(found) => {
                tracing::warn!(epoch = ns.epoch, through = ?found, committed = current.batch_seq,
                    "the Redis namespace lost writes (restart from a snapshot, flush); opening a fresh one");
            }
            Err(_) => return Ok(Check::Unreachable),
        }
    } else if model.cache.ping().await.is_err() {
        return Ok(Check::Unreachable);
    }
    // Under the state lock, so no batch commits between reading the batch
    // number and naming the new namespace.
    let mut tx = model.rows.pool().begin().await?;
    let locked = state::lock(&mut tx).await?;
    let ns = Namespace {
        projection_version: locked.projection_version,
        epoch: random_epoch(),
    };
    match model.cache.open(ns, locked.batch_seq).await {
        Ok(true) => {}
        Ok(false) | Err(_) => return Ok(Check::Unreachable),
    }
    state::set_cache_epoch(&mut tx, Some(ns.epoch)).await?;
    tx.commit().await?;
    metrics::counter!("projector_cache_namespaces_opened_total").increment(1);
    tracing::info!(
        epoch = ns.epoch,
        projection_version = ns.projection_version,
        "opened a fresh Redis namespace"
    );
    Ok(Check::Opened(ns))
}

/// A namespace name that was never used: random, so not even a restored
/// database can bring back an old one.
fn random_epoch() -> i64 {
    (uuid::Uuid::new_v4().as_u128() as i64) & i64::MAX
}

/// Runs [`step`] every [`CHECK_EVERY`] until shutdown.
pub async fn run_until_stopped(model: ReadModel, mut shutdown: Shutdown) {
    let mut trusted = true;
    loop {
        match step(&model).await {
            Ok(Check::Trusted) | Ok(Check::Opened(_)) => trusted = true,
            Ok(Check::Unreachable) => {
                if trusted {
                    tracing::warn!("Redis is unreachable; readers use PostgreSQL until it answers");
                }
                trusted = false;
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot check the Redis namespace")
            }
        }
        metrics::gauge!("projector_cache_trusted").set(if trusted { 1.0 } else { 0.0 });
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            () = shutdown.requested() => return,
        }
    }
}
