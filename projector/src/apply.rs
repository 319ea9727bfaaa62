//! Applying one event to the read model, exactly once in effect.
//!
//! The PostgreSQL row is the durable copy: the event is applied there only if
//! the row is at the event's version − 1 (a guarded write, so two projector
//! instances racing during a rebalance cannot both apply it). Redis follows,
//! through its own version compare; a Redis failure is counted and logged but
//! does not stop the projection (the query API falls back to PostgreSQL).

use events::{project, IntegrationEvent, Projection, UserView};
use platform::telemetry::error_chain;
use read_model::{ViewCache, ViewRows};

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The view moved to the event's version.
    Applied,
    /// The view already included the event (a redelivery).
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// Versions are missing before this event: something upstream lost events.
    #[error("gap in user {user_id}: view at version {current}, event at {event}")]
    Gap {
        user_id: uuid::Uuid,
        current: i32,
        event: i32,
    },
    /// The event cannot follow the view at all.
    #[error("event {event} of user {user_id} cannot follow version {current}")]
    Invalid {
        user_id: uuid::Uuid,
        current: i32,
        event: i32,
    },
}

#[derive(Clone)]
pub struct ReadModel {
    pub rows: ViewRows,
    pub cache: ViewCache,
}

impl ReadModel {
    /// Applies `event` to the row, then to the cache.
    #[tracing::instrument(name = "apply_event", skip_all, fields(user_id = %event.user_id, version = event.stream_version))]
    pub async fn apply(&self, event: &IntegrationEvent) -> Result<Applied, ApplyError> {
        loop {
            let current = self.rows.load(event.user_id).await?;
            match project(current.as_ref(), event) {
                Projection::Apply(view) => {
                    if self.rows.store_next(&view).await? {
                        self.refresh_cache(&view).await;
                        return Ok(Applied::Applied);
                    }
                    // Another writer moved the row meanwhile: look again.
                }
                Projection::AlreadyApplied => {
                    // The first delivery may have died between the row and the
                    // cache; putting the row again is harmless (version compare).
                    if let Some(view) = current {
                        self.refresh_cache(&view).await;
                    }
                    return Ok(Applied::Duplicate);
                }
                Projection::Gap { current, event: at } => {
                    return Err(ApplyError::Gap {
                        user_id: event.user_id,
                        current,
                        event: at,
                    })
                }
                Projection::Invalid { current, event: at } => {
                    return Err(ApplyError::Invalid {
                        user_id: event.user_id,
                        current,
                        event: at,
                    })
                }
            }
        }
    }

    async fn refresh_cache(&self, view: &UserView) {
        if let Err(error) = self.cache.put(view).await {
            metrics::counter!("projector_cache_errors_total").increment(1);
            tracing::warn!(error = %error_chain(&error), user_id = %view.id, "could not update the Redis view; readers fall back to PostgreSQL");
        }
    }
}
