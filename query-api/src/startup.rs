//! Building and running the query API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use platform::tasks::Tasks;
use read_model::{ViewCache, ViewRows};

use crate::coalesce::Loads;
use crate::config::Settings;
use crate::consistency::VersionWaiters;
use crate::gate::Gate;
use crate::http::{self, AppState, CacheOutcomes};

pub struct Application {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    state: Arc<AppState>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = settings
            .database
            .connect_for_reads(Duration::from_secs(2), "query-api")
            .await?;
        let cache = ViewCache::from_settings(&settings.cache).context("REDIS_URL is invalid")?;
        let (trigger, shutdown) = platform::shutdown::channel();
        let state = Arc::new(AppState {
            rows: ViewRows::new(pool),
            cache,
            gate: Gate::default(),
            tasks: Tasks::new(trigger, shutdown),
            token: settings.token.clone(),
            waiters: VersionWaiters::default(),
            read_wait: settings.read_wait,
            loads: Loads::new(settings.database.max_connections as usize),
            outcomes: CacheOutcomes::register(),
        });
        if let Err(error) = state.gate.prime(state.rows.pool()).await {
            // The feed task retries; until then reads use PostgreSQL only.
            tracing::warn!(error = %platform::telemetry::error_chain(&error), "cannot read the projection state yet");
        }
        let listener = tokio::net::TcpListener::bind(settings.bind_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.bind_addr))?;
        Ok(Self {
            listener,
            router: http::router(state.clone(), settings.request_timeout),
            state,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until SIGINT/SIGTERM, or until a background task (the
    /// projection-state feed, the version waiters) fails: then /readyz fails at once and the process ends with an error.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let tasks = self.state.tasks.clone();
        tasks.spawn(
            "projection_state_feed",
            self.state
                .gate
                .clone()
                .run_until_stopped(self.state.rows.pool().clone(), tasks.shutdown()),
        );
        tasks.spawn(
            "version_waiters",
            self.state.waiters.clone().run_until_stopped(
                self.state.rows.pool().clone(),
                self.state.gate.clone(),
                tasks.shutdown(),
            ),
        );
        platform::service::serve_until_stopped(
            "query-api",
            self.listener,
            self.router,
            &tasks,
            async {},
        )
        .await
    }
}
