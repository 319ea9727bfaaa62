//! The rebuild's switch, and dropping tables that readers may still hold:
//! short transactions that wait for table locks only `LOCK_TIMEOUT` at a
//! time, and retry.

use std::time::{Duration, Instant};

use anyhow::Context;
use events::UserView;
use platform::telemetry::error_chain;
use read_model::state;
use sqlx::{Connection, PgConnection};

use super::generation;
use crate::fold::{Fold, BATCH_SIZE};

/// How long the switch and the drop wait for a table lock before giving up
/// and retrying. Readers queue behind a waiting ACCESS EXCLUSIVE request, so
/// this is also the longest a reader can be held up by a rebuild.
const LOCK_TIMEOUT: Duration = Duration::from_millis(1_000);

/// Attempts at the switch, and at dropping the retired table.
const ATTEMPTS: u32 = 8;

/// Retries the switch while it times out waiting for a lock.
pub(super) async fn switch_with_retries(
    conn: &mut PgConnection,
    fold: &mut Fold,
    serving: i32,
) -> anyhow::Result<Duration> {
    let mut attempt = 1;
    loop {
        match switch(conn, fold, serving).await {
            Ok(took) => return Ok(took),
            Err(SwitchError::Database(error)) if is_lock_timeout(&error) && attempt < ATTEMPTS => {
                tracing::warn!(attempt, error = %error_chain(&error), "switch timed out waiting for a lock; retrying");
                tokio::time::sleep(LOCK_TIMEOUT / 4 * attempt).await;
                attempt += 1;
            }
            Err(error) => return Err(error).context("cannot switch to the new generation"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SwitchError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("generation {0} started serving during the rebuild")]
    Moved(i32),
}

/// One attempt at the switch. On failure nothing changed, and the views
/// folded in it are kept as changed for the next attempt.
#[tracing::instrument(name = "rebuild_switch", skip_all, fields(serving = serving))]
async fn switch(
    conn: &mut PgConnection,
    fold: &mut Fold,
    serving: i32,
) -> Result<Duration, SwitchError> {
    let next = serving + 1;
    let mut tx = conn.begin().await?;
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        LOCK_TIMEOUT.as_millis()
    ))
    .execute(&mut *tx)
    .await?;
    // From here live batches wait, and user_views stops changing.
    let locked_at = Instant::now();
    let current = state::lock(&mut tx).await?;
    if current.projection_version != serving {
        return Err(SwitchError::Moved(current.projection_version));
    }
    fold.fold_log(&mut tx, BATCH_SIZE).await?;
    let changed = fold.take_changed();
    let result = async {
        let views: Vec<&UserView> = changed.iter().filter_map(|id| fold.views.get(id)).collect();
        generation::upsert(&mut tx, next, &views).await?;
        for statement in [
            format!(
                "ALTER TABLE user_views RENAME TO {}",
                generation::retired(serving)
            ),
            format!(
                "ALTER TABLE {} RENAME TO user_views",
                generation::table(next)
            ),
        ] {
            sqlx::query(&statement).execute(&mut *tx).await?;
        }
        sqlx::query(
            "UPDATE projection_state SET projection_version = $1, cache_epoch = NULL, \
             updated_at = now() WHERE singleton",
        )
        .bind(next)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }
    .await;
    match result {
        Ok(()) => Ok(locked_at.elapsed()),
        Err(error) => {
            fold.restore_changed(changed);
            Err(error.into())
        }
    }
}

fn is_lock_timeout(error: &sqlx::Error) -> bool {
    // 55P03 lock_not_available: lock_timeout expired.
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("55P03"))
}

/// Drops retired tables an earlier rebuild could not drop.
#[tracing::instrument(name = "sql_drop_leftovers", skip_all)]
pub(super) async fn drop_leftovers(conn: &mut PgConnection) -> anyhow::Result<()> {
    let leftovers: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables \
         WHERE schemaname = current_schema() AND tablename ~ '^user_views_g[0-9]+_retired$'",
    )
    .fetch_all(&mut *conn)
    .await?;
    for table in leftovers {
        drop_table(conn, &table)
            .await
            .with_context(|| format!("cannot drop {table}, left by an earlier rebuild"))?;
    }
    Ok(())
}

/// Drops `table`, retrying while readers still hold it (a query that
/// started before the switch may still be reading the retired table).
#[tracing::instrument(name = "sql_drop_table", skip(conn))]
pub(super) async fn drop_table(conn: &mut PgConnection, table: &str) -> Result<(), sqlx::Error> {
    let mut attempt = 1;
    loop {
        let mut tx = conn.begin().await?;
        let dropped = async {
            sqlx::query(&format!(
                "SET LOCAL lock_timeout = '{}ms'",
                LOCK_TIMEOUT.as_millis()
            ))
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        .await;
        match dropped {
            Ok(()) => {
                tracing::info!(table, "dropped");
                return Ok(());
            }
            Err(error) if is_lock_timeout(&error) && attempt < ATTEMPTS => {
                tracing::warn!(table, attempt, "table still in use; retrying the drop");
                tokio::time::sleep(LOCK_TIMEOUT / 4 * attempt).await;
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}
