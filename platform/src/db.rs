//! The PostgreSQL settings, pool and readiness check every service shares.

use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::{parse, string, InvalidSetting};

/// The local development URL of a service's role (scripts/stack creates each
/// role with its own name as password); production sets DATABASE_URL.
pub fn dev_database_url(role: &str) -> String {
    format!("postgres://{role}:{role}@127.0.0.1:5432/userstream")
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `DATABASE_URL`; it holds a password, so it never prints.
    pub url: SecretString,
    /// `DATABASE_MAX_CONNECTIONS`.
    pub max_connections: u32,
}

impl DatabaseSettings {
    /// Reads the variables; the pool size and the role differ by service.
    pub fn from_env(default_max_connections: u32, role: &str) -> Result<Self, InvalidSetting> {
        Ok(Self {
            url: string("DATABASE_URL", &dev_database_url(role)).into(),
            max_connections: parse("DATABASE_MAX_CONNECTIONS", default_max_connections)?,
        })
    }

    /// A pool named `application_name` in `pg_stat_activity`. Fails fast when
    /// PostgreSQL is unreachable at start-up; later, waiting for a connection
    /// gives up after `acquire_timeout` (a 503 for the APIs).
    pub async fn connect(
        &self,
        acquire_timeout: Duration,
        application_name: &str,
    ) -> anyhow::Result<PgPool> {
        self.pool(acquire_timeout, application_name, true).await
    }

    /// [`Self::connect`] for a pool that serves many short reads: a connection
    /// is handed out without pinging it first (sqlx pings by default, one more
    /// round trip than the read itself). The price: a connection that died
    /// while idle (PostgreSQL restarted) fails the one query that finds out,
    /// and is then replaced.
    pub async fn connect_for_reads(
        &self,
        acquire_timeout: Duration,
        application_name: &str,
    ) -> anyhow::Result<PgPool> {
        self.pool(acquire_timeout, application_name, false).await
    }

    async fn pool(
        &self,
        acquire_timeout: Duration,
        application_name: &str,
        test_before_acquire: bool,
    ) -> anyhow::Result<PgPool> {
        let options: PgConnectOptions = self
            .url
            .expose_secret()
            .parse()
            .context("DATABASE_URL is not a valid PostgreSQL URL")?;
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(acquire_timeout)
            .test_before_acquire(test_before_acquire)
            .connect_with(options.application_name(application_name))
            .await
            .context("cannot connect to PostgreSQL")
    }
}

/// The `/readyz` check of PostgreSQL: a `SELECT 1` within two seconds.
pub async fn ping(pool: &PgPool) -> Result<serde_json::Value, String> {
    match tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(pool),
    )
    .await
    {
        Ok(Ok(_)) => Ok(serde_json::json!("reachable")),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}
