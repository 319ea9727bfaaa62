//! What `/readyz` and the gauges show of the relay.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;
use sqlx::PgPool;

use super::log::{lag, Checkpoint, Lag};

/// The relay's state in this process; cheap to clone and share.
#[derive(Clone, Default)]
pub struct RelayStatus(Arc<Mutex<StatusInner>>);

#[derive(Default)]
pub(super) struct StatusInner {
    pub enabled: bool,
    pub leader: bool,
    pub checkpoint: Checkpoint,
    pub last_published_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub lag: Option<Lag>,
}

impl RelayStatus {
    pub(super) fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        if let Ok(mut inner) = self.0.lock() {
            f(&mut inner);
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let Ok(s) = self.0.lock() else {
            return serde_json::json!({ "error": "status unavailable" });
        };
        serde_json::json!({
            "enabled": s.enabled,
            "leader": s.leader,
            "checkpoint_position": s.checkpoint.global_position,
            "last_published_at": s.last_published_at,
            "last_error": s.last_error,
            "lag_events": s.lag.map(|l| l.events),
            "lag_events_estimated": s.lag.map(|l| l.estimated),
            "lag_seconds": s.lag.map(|l| l.seconds),
        })
    }

    /// Measures the lag from the shared checkpoint every `every`, for
    /// `/readyz` and the `relay_lag_*` gauges. Runs in every replica, leader
    /// or not, since it reads only the log and the checkpoint.
    pub async fn monitor_lag(
        self,
        pool: PgPool,
        relay: String,
        every: Duration,
        mut shutdown: Shutdown,
    ) {
        loop {
            match lag(&pool, &relay).await {
                Ok(lag) => {
                    metrics::gauge!("relay_lag_events").set(lag.events as f64);
                    metrics::gauge!("relay_lag_seconds").set(lag.seconds);
                    self.update(|s| s.lag = Some(lag));
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "could not measure the relay lag");
                    self.update(|s| s.lag = None);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.requested() => return,
            }
        }
    }
}
