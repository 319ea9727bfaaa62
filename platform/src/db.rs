//! The PostgreSQL pool every service opens the same way.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// A pool for `url`, named `application_name` in `pg_stat_activity`. Fails
/// fast when PostgreSQL is unreachable at start-up; later, waiting for a
/// connection gives up after `acquire_timeout` (a 503 for the APIs).
pub async fn connect(
    url: &str,
    max_connections: u32,
    acquire_timeout: Duration,
    application_name: &str,
) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect_with(options.application_name(application_name))
        .await
        .context("cannot connect to PostgreSQL")
}
