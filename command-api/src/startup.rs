//! Building and running the command API: the HTTP server and the relay task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;

use platform::tasks::Tasks;

use crate::config::Settings;
use crate::http::rate_limit::{ClientLimiter, Limits};
use crate::http::{self, AppState};
use crate::password::Hasher;
use crate::relay::{Relay, RelayStatus};
use crate::sessions::Sessions;
use crate::signin::SignIn;
use crate::store::EventStore;
use crate::tokens::Keys;
use secrecy::{ExposeSecret, SecretString};

/// The shared migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub struct Application {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    relay: Option<Relay>,
    limits: Limits,
    lag_monitor: Option<(PgPool, String, RelayStatus)>,
    store: EventStore,
    sessions: Sessions,
    tasks: Tasks,
}

/// How often the relay lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(2);

/// How often expired idempotency keys are deleted.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A connection pool for `settings`, failing fast when PostgreSQL is unreachable.
pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    settings
        .database
        .connect(Duration::from_secs(5), "command-api")
        .await
}

/// Applies pending migrations (concurrent callers serialise on sqlx's lock).
/// Run as the owner role (`command-api migrate`), never as a service's role.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("cannot apply the migrations")
}

/// Refuses to start on a database that lacks migrations this build needs:
/// the service's role cannot apply them, the owner must (`command-api migrate`).
#[tracing::instrument(name = "sql_check_migrations", skip_all)]
pub async fn ensure_migrated(pool: &PgPool) -> anyhow::Result<()> {
    let needed = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> = sqlx::query_scalar(
        "SELECT max(version) FROM _sqlx_migrations WHERE success",
    )
    .fetch_one(pool)
    .await
    .context(
        "cannot read the applied migrations (run `command-api migrate` as the owner role first)",
    )?;
    let applied = applied.unwrap_or(0);
    anyhow::ensure!(
        applied >= needed,
        "the database is migrated to {applied}, this build needs {needed}: run `command-api migrate` (MIGRATION_DATABASE_URL, the owner role)"
    );
    Ok(())
}

impl Application {
    /// Connects, checks the schema, binds the listener (port 0 picks a free
    /// one) and prepares the relay; nothing is served until
    /// [`Self::run_until_stopped`].
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = connect(&settings).await?;
        ensure_migrated(&pool).await?;
        let status = RelayStatus::default();
        let lag_monitor = settings
            .relay
            .enabled
            .then(|| (pool.clone(), settings.kafka.topic.clone(), status.clone()));
        let relay = if settings.relay.enabled {
            Some(
                Relay::new(
                    pool.clone(),
                    settings.kafka.clone(),
                    settings.relay.clone(),
                    status.clone(),
                )
                .context("cannot create the Kafka producer")?,
            )
        } else {
            None
        };
        let (what, pem) = &settings.identity.signing_key;
        let keys = Keys::new(
            (what, pem.expose_secret()),
            &settings.identity.previous_keys,
            settings.identity.tokens.clone(),
        )
        .context("cannot load the token signing keys")?;
        let sessions = Sessions::new(pool.clone(), settings.identity.tokens.refresh_ttl);
        let store = EventStore::new(pool);
        let hasher = Hasher::new(settings.hash_concurrency, settings.hash_queue_capacity);
        // Unknown users are checked against this, at the cost of a known one.
        let decoy = hasher
            .hash(SecretString::from(crate::tokens::new_refresh_token()))
            .await
            .context("cannot make the decoy password hash")?;
        let sign_in = SignIn::new(
            store.clone(),
            hasher.clone(),
            settings.identity.lockout,
            decoy,
        );
        let limits = Limits {
            registration: ClientLimiter::new("registration", settings.registration_limit),
            sign_in: ClientLimiter::new("sign_in", settings.sign_in_limit),
        };
        let (trigger, shutdown) = platform::shutdown::channel();
        let tasks = Tasks::new(trigger, shutdown);
        let state = AppState {
            store: store.clone(),
            hasher,
            admin_token: Arc::new(settings.admin_token.clone()),
            codes: settings.codes.clone(),
            reset_requests: Default::default(),
            keys: Arc::new(keys),
            sessions: sessions.clone(),
            sign_in,
            relay: status,
            idempotency_ttl: settings.idempotency_ttl,
            limits: limits.clone(),
            tasks: tasks.clone(),
        };
        let listener = tokio::net::TcpListener::bind(settings.bind_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.bind_addr))?;
        Ok(Self {
            listener,
            router: http::router(state, settings.request_timeout),
            relay,
            limits,
            lag_monitor,
            store,
            sessions,
            tasks,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until SIGINT/SIGTERM, then drains requests and stops the relay;
    /// or until a background task (relay, lag monitor, sweepers) ends or
    /// panics: then /readyz fails at once and the process ends with an error.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let tasks = self.tasks;
        let relay = self
            .relay
            .map(|relay| tasks.spawn("relay", relay.run_until_stopped(tasks.shutdown())));
        if let Some((pool, relay_name, status)) = self.lag_monitor {
            tasks.spawn(
                "relay_lag_monitor",
                status.monitor_lag(pool, relay_name, LAG_EVERY, tasks.shutdown()),
            );
        }
        tasks.spawn(
            "rate_limit_sweeper",
            forget_idle_clients(self.limits, tasks.shutdown()),
        );
        tasks.spawn(
            "idempotency_sweeper",
            sweep_idempotency_keys(self.store, self.sessions, tasks.shutdown()),
        );
        let finish = async {
            if let Some(relay) = relay {
                // The relay hands its lead back and stops publishing.
                let _ = relay.await;
            }
        };
        platform::service::serve_until_stopped(
            "command-api",
            self.listener,
            self.router,
            &tasks,
            finish,
        )
        .await
    }
}

/// Deletes expired idempotency keys and sessions whose refresh tokens have all
/// expired, now and then (lookups already ignore them; this only bounds the
/// tables). Every replica may sweep: the DELETEs are idempotent.
async fn sweep_idempotency_keys(
    store: EventStore,
    sessions: Sessions,
    mut shutdown: platform::shutdown::Shutdown,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            () = shutdown.requested() => return,
        }
        match store.sweep_idempotency_keys().await {
            Ok(0) => {}
            Ok(swept) => tracing::debug!(swept, "expired idempotency keys deleted"),
            Err(error) => tracing::warn!(
                error = %platform::telemetry::error_chain(&error),
                "could not sweep idempotency keys"
            ),
        }
        match sessions.sweep().await {
            Ok(0) => {}
            Ok(swept) => tracing::debug!(swept, "expired sessions deleted"),
            Err(error) => tracing::warn!(
                error = %platform::telemetry::error_chain(&error),
                "could not sweep sessions"
            ),
        }
    }
}

/// Drops the rate-limit state of clients that have been quiet long enough for
/// their quota to refill, so it takes memory only for recent clients.
async fn forget_idle_clients(limits: Limits, mut shutdown: platform::shutdown::Shutdown) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => limits.forget_idle(),
            () = shutdown.requested() => return,
        }
    }
}
