//! Building and running the query API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use read_model::{ViewCache, ViewRows};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::Settings;
use crate::http::{self, AppState};

pub struct Application {
    listener: tokio::net::TcpListener,
    router: axum::Router,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let options: PgConnectOptions = settings
            .database_url()
            .parse()
            .context("DATABASE_URL is not a valid PostgreSQL URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(settings.database_max_connections)
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(options.application_name("query-api"))
            .await
            .context("cannot connect to PostgreSQL")?;
        let cache = ViewCache::new(
            settings.redis_url(),
            settings.redis_key_prefix.clone(),
            settings.redis_view_ttl,
            settings.redis_timeout,
        )
        .context("REDIS_URL is invalid")?;
        let state = AppState {
            rows: ViewRows::new(pool),
            cache,
        };
        let listener = tokio::net::TcpListener::bind(settings.bind_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.bind_addr))?;
        Ok(Self {
            listener,
            router: http::router(state, settings.request_timeout),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let addr = self.local_addr()?;
        tracing::info!(%addr, service = "query-api", "listening");
        platform::http::serve(self.listener, self.router, platform::shutdown::signal())
            .await
            .context("the HTTP server failed")
    }
}
