//! What this reader knows of `projection_state`: which Redis namespace may be
//! trusted and the last committed batch number, kept current by the NOTIFY
//! that every change raises (with a periodic re-read as a fallback).
//!
//! Redis is used only while that knowledge is current: after a Redis error
//! the gate distrusts Redis until it has re-read the state, so a Redis that
//! comes back from an older snapshot is compared against the newest batch
//! number before anything in it is served.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;
use read_model::state::{self, STATE_CHANNEL};
use read_model::{Namespace, ProjectionState};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};

/// Re-read the state at least this often, even without notifications.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Default)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    known: RwLock<Known>,
    reread: Notify,
    /// Bumped whenever the known state changes; read-your-writes waits on it.
    changes: watch::Sender<u64>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            known: RwLock::default(),
            reread: Notify::new(),
            changes: watch::channel(0).0,
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Known {
    state: Option<ProjectionState>,
    /// Redis failed since the state was last read from PostgreSQL.
    suspect: bool,
}

impl Gate {
    /// The namespace to read and the batch number it must have, when Redis
    /// may be used at all.
    pub fn namespace(&self) -> Option<(Namespace, i64)> {
        let known = *self.inner.known.read().expect("gate lock");
        if known.suspect {
            return None;
        }
        let state = known.state?;
        Some((state.namespace()?, state.batch_seq))
    }

    /// The projector's frontier as last heard: every event up to it in
    /// publication order is applied.
    pub fn applied(&self) -> Option<eventlog::Checkpoint> {
        let known = *self.inner.known.read().expect("gate lock");
        known.state.map(|state| state.applied())
    }

    /// Changes whenever the state does (a batch committed, the frontier moved).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// After a Redis error: stop using Redis until the state is re-read.
    pub fn suspect(&self) {
        self.inner.known.write().expect("gate lock").suspect = true;
        self.inner.reread.notify_one();
    }

    /// For /readyz.
    pub fn describe(&self) -> serde_json::Value {
        let known = *self.inner.known.read().expect("gate lock");
        match (known.state, known.suspect) {
            (None, _) => serde_json::json!({ "degraded": "projection state not read yet" }),
            (Some(_), true) => {
                serde_json::json!({ "degraded": "Redis failed; re-reading the projection state" })
            }
            (Some(s), false) if s.cache_epoch.is_none() => {
                serde_json::json!({ "degraded": "no trusted Redis namespace; reading PostgreSQL" })
            }
            (Some(s), false) => serde_json::json!({
                "projection_version": s.projection_version,
                "batch_seq": s.batch_seq,
            }),
        }
    }

    fn set(&self, state: Option<ProjectionState>, clear_suspect: bool) {
        let mut known = self.inner.known.write().expect("gate lock");
        known.state = state;
        if clear_suspect {
            known.suspect = false;
        }
        drop(known);
        self.inner.changes.send_modify(|n| *n += 1);
    }

    /// Reads the state once (at start-up, so the first requests may use Redis).
    pub async fn prime(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        self.set(Some(state::load(pool).await?), true);
        Ok(())
    }

    /// Follows the state until shutdown: LISTEN first, then read, so no
    /// change falls between the two.
    pub async fn run_until_stopped(self, pool: PgPool, mut shutdown: Shutdown) {
        loop {
            match self.follow(&pool, &mut shutdown).await {
                Ok(()) => return,
                Err(error) => {
                    // Without notifications the state may go stale: use no Redis.
                    self.set(None, false);
                    tracing::warn!(error = %error_chain(&error), "lost the projection state feed; reading PostgreSQL only until it is back");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = shutdown.requested() => return,
            }
        }
    }

    async fn follow(&self, pool: &PgPool, shutdown: &mut Shutdown) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(STATE_CHANNEL).await?;
        self.set(Some(state::load(pool).await?), true);
        loop {
            tokio::select! {
                notification = listener.recv() => {
                    let notification = notification?;
                    match parse(notification.payload()) {
                        Some(state) => self.set(Some(state), false),
                        None => self.set(Some(state::load(pool).await?), false),
                    }
                }
                () = self.inner.reread.notified() => self.set(Some(state::load(pool).await?), true),
                () = tokio::time::sleep(REFRESH_EVERY) => self.set(Some(state::load(pool).await?), true),
                () = shutdown.requested() => return Ok(()),
            }
        }
    }
}

/// "projection_version:cache_epoch:batch_seq:applied_xid:applied_position",
/// as the trigger sends it.
fn parse(payload: &str) -> Option<ProjectionState> {
    let mut parts = payload.split(':');
    let projection_version = parts.next()?.parse().ok()?;
    let epoch = parts.next()?;
    let cache_epoch = if epoch.is_empty() {
        None
    } else {
        Some(epoch.parse().ok()?)
    };
    let batch_seq = parts.next()?.parse().ok()?;
    let applied_xid = parts.next()?.parse().ok()?;
    let applied_position = parts.next()?.parse().ok()?;
    Some(ProjectionState {
        projection_version,
        cache_epoch,
        batch_seq,
        applied_xid,
        applied_position,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_carry_the_state() {
        assert_eq!(
            parse("2:77:15:900:31"),
            Some(ProjectionState {
                projection_version: 2,
                cache_epoch: Some(77),
                batch_seq: 15,
                applied_xid: 900,
                applied_position: 31,
            })
        );
        assert_eq!(parse("1::4:0:0").unwrap().cache_epoch, None);
        assert_eq!(parse("1::4"), None, "the old form is re-read, not guessed");
        assert_eq!(parse("garbage"), None);
    }

    #[test]
    fn a_redis_error_closes_the_gate_until_the_state_is_read_again() {
        let gate = Gate::default();
        let state = ProjectionState {
            projection_version: 1,
            cache_epoch: Some(9),
            batch_seq: 3,
            applied_xid: 0,
            applied_position: 0,
        };
        gate.set(Some(state), true);
        assert!(gate.namespace().is_some());
        gate.suspect();
        assert!(gate.namespace().is_none());
        // A notification alone does not reopen it: only a fresh read does.
        gate.set(Some(state), false);
        assert!(gate.namespace().is_none());
        gate.set(Some(state), true);
        assert_eq!(gate.namespace().unwrap().1, 3);
    }
}
