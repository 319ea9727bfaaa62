//! Building and running the projector: the consumer task and a small HTTP
//! server for /healthz, /readyz and /metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use read_model::{ViewCache, ViewRows};

use crate::apply::ReadModel;
use crate::config::Settings;
use crate::worker::Worker;

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    worker: Worker,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = settings
            .database
            .connect(Duration::from_secs(5), "projector")
            .await?;
        let cache = ViewCache::from_settings(&settings.cache).context("REDIS_URL is invalid")?;
        let model = ReadModel {
            rows: ViewRows::new(pool),
            cache,
        };
        let worker =
            Worker::new(&settings, model.clone()).context("cannot create the Kafka consumer")?;
        let router = Router::new()
            .route("/healthz", get(platform::http::healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(platform::http::metrics))
            .with_state(model);
        let listener = tokio::net::TcpListener::bind(settings.bind_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.bind_addr))?;
        Ok(Self {
            listener,
            router: platform::http::layers(router, Duration::from_secs(5)),
            worker,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let addr = self.local_addr()?;
        let (trigger, shutdown) = platform::shutdown::channel();
        let worker = tokio::spawn(self.worker.run_until_stopped(shutdown));
        tracing::info!(%addr, service = "projector", "listening");
        let served = platform::http::serve(self.listener, self.router, async move {
            platform::shutdown::signal().await;
            trigger.fire();
        })
        .await;
        worker.await.context("the consumer task panicked")?;
        served.context("the HTTP server failed")
    }
}

/// Ready when PostgreSQL answers. Redis is reported but optional: without it
/// the projection goes on and the query API reads PostgreSQL.
#[tracing::instrument(name = "readyz", skip_all)]
async fn readyz(State(model): State<ReadModel>) -> Response {
    let postgres = platform::db::ping(model.rows.pool()).await;
    let redis = match model.cache.ping().await {
        Ok(()) => serde_json::json!("reachable"),
        Err(error) => serde_json::json!({ "degraded": error.to_string() }),
    };
    platform::http::readiness(BTreeMap::from([
        ("postgres", postgres),
        ("redis", Ok(redis)),
    ]))
}
