//! Read-your-writes: `?min_position=P` (every read) and `?min_version=N`
//! (`GET /users/{id}`) hold a request until the read model has caught up,
//! for at most `READ_WAIT_MAX_MS`.
//!
//! Neither polls PostgreSQL per waiting request. A position is looked up once
//! (`event_order`: where it lies in publication order) and then compared with
//! the projector's frontier, which arrives with every `projection_state`
//! NOTIFY ([`Gate`]). Versions are checked by one task for all waiters at
//! once: after each change of the state (a batch committed) it reads the
//! versions of every awaited user in one query and wakes those that reached
//! theirs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventlog::Checkpoint;
use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

use crate::gate::Gate;
use crate::http::ApiError;

/// Where `position` lies in publication order, if there is such an event.
#[tracing::instrument(name = "sql_event_order", skip(pool))]
async fn locate(pool: &PgPool, position: i64) -> Result<Option<Checkpoint>, sqlx::Error> {
    let xid: Option<i64> =
        sqlx::query_scalar("SELECT transaction_id FROM event_order WHERE global_position = $1")
            .bind(position)
            .fetch_optional(pool)
            .await?;
    Ok(xid.map(|transaction_id| Checkpoint {
        transaction_id,
        global_position: position,
    }))
}

/// Waits until the projector has applied every event up to `position` in
/// publication order (so every write that finished before that one began),
/// or `deadline` passes.
pub async fn await_position(
    pool: &PgPool,
    gate: &Gate,
    position: i64,
    deadline: Instant,
) -> Result<(), ApiError> {
    let target = locate(pool, position)
        .await
        .map_err(ApiError::database)?
        .ok_or(ApiError::UnknownPosition)?;
    let mut changes = gate.changes();
    loop {
        changes.borrow_and_update();
        if gate.applied().is_some_and(|applied| applied >= target) {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return Err(ApiError::NotCaughtUp),
        }
    }
}

#[derive(sqlx::FromRow)]
struct Reached {
    id: Uuid,
    version: i32,
}

type Waiting = HashMap<Uuid, Vec<(i32, oneshot::Sender<()>)>>;

/// Requests waiting for a user's view to reach a version.
#[derive(Clone, Default)]
pub struct VersionWaiters {
    waiting: Arc<Mutex<Waiting>>,
}

impl VersionWaiters {
    /// Registers interest before the caller reads, so that a batch committing
    /// between the read and the wait still wakes it.
    pub fn register(&self, id: Uuid, version: i32) -> oneshot::Receiver<()> {
        let (wake, woken) = oneshot::channel();
        self.waiting
            .lock()
            .expect("waiters lock")
            .entry(id)
            .or_default()
            .push((version, wake));
        woken
    }

    /// After every state change, one query for all awaited users; wakes the
    /// waiters whose user reached their version and forgets abandoned ones.
    pub async fn run_until_stopped(self, pool: PgPool, gate: Gate, mut shutdown: Shutdown) {
        let mut changes = gate.changes();
        loop {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = shutdown.requested() => return,
            }
            if let Err(error) = self.sweep(&pool).await {
                tracing::warn!(error = %error_chain(&error), "cannot check awaited versions; waiting requests time out if this lasts");
            }
        }
    }

    #[tracing::instrument(name = "sweep_version_waiters", skip_all)]
    async fn sweep(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let ids: Vec<Uuid> = {
            let mut waiting = self.waiting.lock().expect("waiters lock");
            waiting.retain(|_, waiters| {
                waiters.retain(|(_, wake)| !wake.is_closed());
                !waiters.is_empty()
            });
            waiting.keys().copied().collect()
        };
        if ids.is_empty() {
            return Ok(());
        }
        let reached: Vec<Reached> =
            sqlx::query_as("SELECT id, version FROM user_views WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(pool)
                .await?;
        let mut waiting = self.waiting.lock().expect("waiters lock");
        for Reached { id, version } in reached {
            if let Some(waiters) = waiting.get_mut(&id) {
                let (ready, still): (Vec<_>, Vec<_>) = waiters
                    .drain(..)
                    .partition(|(wanted, _)| *wanted <= version);
                *waiters = still;
                for (_, wake) in ready {
                    let _ = wake.send(());
                }
            }
        }
        waiting.retain(|_, waiters| !waiters.is_empty());
        Ok(())
    }
}

/// The deadline of a read that waits at most `max`.
pub fn deadline(max: Duration) -> Instant {
    Instant::now() + max
}
