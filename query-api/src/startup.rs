//! Building and running the query API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use read_model::{ViewCache, ViewRows};

use crate::config::Settings;
use crate::http::{self, AppState};

pub struct Application {
    listener: tokio::net::TcpListener,
    router: axum::Router,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = settings
            .database
            .connect(Duration::from_secs(2), "query-api")
            .await?;
        let cache = ViewCache::from_settings(&settings.cache).context("REDIS_URL is invalid")?;
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
