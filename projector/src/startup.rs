//! Building and running the projector: the consumer task, the cache keeper,
//! and a small HTTP server for /healthz, /readyz and /metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use platform::tasks::Tasks;
use read_model::{ViewCache, ViewRows};

use crate::batch::ReadModel;
use crate::config::Settings;
use crate::worker::Worker;
use crate::{frontier, keeper, parked, status};

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    worker: Worker,
    model: ReadModel,
    settings: Settings,
    tasks: Tasks,
}

#[derive(Clone)]
struct Health {
    model: ReadModel,
    tasks: Tasks,
}

/// The read model `settings` describe (connects to PostgreSQL; Redis lazily).
pub async fn read_model(settings: &Settings) -> anyhow::Result<ReadModel> {
    let pool = settings
        .database
        .connect(Duration::from_secs(5), "projector")
        .await?;
    let cache = ViewCache::from_settings(&settings.cache).context("REDIS_URL is invalid")?;
    Ok(ReadModel::new(ViewRows::new(pool), cache))
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let model = read_model(&settings).await?;
        let worker =
            Worker::new(&settings, model.clone()).context("cannot create the Kafka consumer")?;
        let (trigger, shutdown) = platform::shutdown::channel();
        let tasks = Tasks::new(trigger, shutdown);
        let router = Router::new()
            .route("/healthz", get(platform::http::healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(platform::http::metrics))
            .with_state(Health {
                model: model.clone(),
                tasks: tasks.clone(),
            });
        let listener = tokio::net::TcpListener::bind(settings.bind_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.bind_addr))?;
        Ok(Self {
            listener,
            router: platform::http::layers(router, Duration::from_secs(5)),
            worker,
            model,
            settings,
            tasks,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until SIGINT/SIGTERM, or until a background task fails: then
    /// /readyz fails at once and the process ends with an error.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let tasks = self.tasks;
        let consumer = tasks.spawn("consumer", self.worker.run_until_stopped(tasks.shutdown()));
        tasks.spawn(
            "cache_keeper",
            keeper::run_until_stopped(self.model.clone(), tasks.shutdown()),
        );
        tasks.spawn(
            "frontier",
            frontier::run_until_stopped(
                self.model.rows.pool().clone(),
                self.model.commits(),
                tasks.shutdown(),
            ),
        );
        tasks.spawn(
            "status_metrics",
            status::publish_until_stopped(
                self.model.rows.pool().clone(),
                self.settings,
                tasks.shutdown(),
            ),
        );
        let finish = platform::consumer::stopped(consumer);
        platform::service::serve_until_stopped(
            "projector",
            self.listener,
            self.router,
            &tasks,
            finish,
        )
        .await
    }
}

/// Ready when PostgreSQL answers and every task runs. Redis and parked
/// messages are reported, degraded but ready: the projection goes on for
/// every other user and the query API reads PostgreSQL without Redis.
#[tracing::instrument(name = "readyz", skip_all)]
async fn readyz(State(health): State<Health>) -> Response {
    let postgres = platform::db::ping(health.model.rows.pool()).await;
    let redis = match health.model.cache.ping().await {
        Ok(()) => serde_json::json!("reachable"),
        Err(error) => serde_json::json!({ "degraded": error.to_string() }),
    };
    let parked = match parked::count_by_reason(health.model.rows.pool()).await {
        Ok(counts) if counts.is_empty() => Ok(serde_json::json!("none")),
        Ok(counts) => {
            let total: i64 = counts.values().sum();
            Ok(serde_json::json!({ "degraded": { "count": total, "by_reason": counts } }))
        }
        Err(error) => Err(platform::telemetry::error_chain(&error)),
    };
    platform::http::readiness(BTreeMap::from([
        ("postgres", postgres),
        ("redis", Ok(redis)),
        ("tasks", health.tasks.check()),
        ("parked", parked),
    ]))
}
