//! Building and running the notifier: the consumer, the sender and a small
//! HTTP server for /healthz, /readyz and /metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use platform::tasks::Tasks;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::config::Settings;
use crate::consumer::Worker;
use crate::sender::{Sender, SmtpState};
use crate::smtp::Mailer;
use crate::store;

pub struct Application {
    listener: tokio::net::TcpListener,
    router: Router,
    worker: Worker,
    sender: Sender,
    wake: Arc<Notify>,
    tasks: Tasks,
}

#[derive(Clone)]
struct Health {
    pool: PgPool,
    tasks: Tasks,
    smtp: Arc<Mutex<SmtpState>>,
}

/// The notifier's pool (role `userstream_notifier`).
pub async fn connect(settings: &Settings, name: &str) -> anyhow::Result<PgPool> {
    settings
        .database
        .connect(Duration::from_secs(5), name)
        .await
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        let pool = connect(&settings, "notifier").await?;
        let mailer = Mailer::new(&settings.smtp).context("invalid SMTP settings")?;
        let wake = Arc::new(Notify::new());
        let worker = Worker::new(&settings, pool.clone(), Arc::clone(&wake))
            .context("cannot create the Kafka consumer")?;
        let sender = Sender::new(pool.clone(), mailer, Arc::clone(&settings));
        let (trigger, shutdown) = platform::shutdown::channel();
        let tasks = Tasks::new(trigger, shutdown);
        let router = Router::new()
            .route("/healthz", get(platform::http::healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(platform::http::metrics))
            .with_state(Health {
                pool,
                tasks: tasks.clone(),
                smtp: sender.smtp_state(),
            });
        let listener = tokio::net::TcpListener::bind(settings.bind_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.bind_addr))?;
        Ok(Self {
            listener,
            router: platform::http::layers(router, Duration::from_secs(5)),
            worker,
            sender,
            wake,
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
            "sender",
            self.sender.run_until_stopped(self.wake, tasks.shutdown()),
        );
        let finish = platform::consumer::stopped(consumer);
        platform::service::serve_until_stopped(
            "notifier",
            self.listener,
            self.router,
            &tasks,
            finish,
        )
        .await
    }
}

/// Ready when PostgreSQL answers and every task runs. Parked mails and a
/// failing mail server are reported as degraded but ready: the queue keeps
/// what could not go, and a notifier restart would not help.
#[tracing::instrument(name = "readyz", skip_all)]
async fn readyz(State(health): State<Health>) -> Response {
    let postgres = platform::db::ping(&health.pool).await;
    let parked = match store::count_by_status(&health.pool).await {
        Ok(counts) => {
            let parked = counts.get("parked").copied().unwrap_or(0);
            let pending = counts.get("pending").copied().unwrap_or(0);
            Ok(if parked == 0 {
                serde_json::json!({ "parked": 0, "pending": pending })
            } else {
                serde_json::json!({ "degraded": { "parked": parked, "pending": pending } })
            })
        }
        Err(error) => Err(platform::telemetry::error_chain(&error)),
    };
    let smtp = {
        let state = health.smtp.lock().expect("smtp state lock");
        match &state.last_error {
            None => serde_json::json!("last send succeeded or none tried"),
            Some(error) => serde_json::json!({ "degraded": {
                "last_error": error,
                "failures_in_a_row": state.failures_in_a_row,
            } }),
        }
    };
    platform::http::readiness(BTreeMap::from([
        ("postgres", postgres),
        ("tasks", health.tasks.check()),
        ("mails", parked),
        ("smtp", Ok(smtp)),
    ]))
}
