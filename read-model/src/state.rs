//! The `projection_state` row: which generation of the read model serves,
//! which Redis namespace may be trusted, and the last committed batch number.

use events::UserView;
use sqlx::{FromRow, PgConnection, PgExecutor, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::cache::Namespace;
use crate::rows::{ViewRow, COLUMNS};

/// NOTIFY channel raised whenever the row changes (a batch committed, the
/// namespace changed, a rebuild switched).
pub const STATE_CHANNEL: &str = "projection_state";

#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct ProjectionState {
    /// Generation of `user_views`; raised by `projector rebuild` when it switches.
    pub projection_version: i32,
    /// The trusted Redis namespace, or None while Redis cannot be trusted.
    pub cache_epoch: Option<i64>,
    /// Number of the last committed projection batch.
    pub batch_seq: i64,
    /// The frontier: every event up to here in publication order
    /// ([`eventlog::Checkpoint`]: transaction id, then position) is applied
    /// or parked. Moved by the projector's frontier task.
    pub applied_xid: i64,
    pub applied_position: i64,
}

impl ProjectionState {
    /// The frontier as a point in publication order.
    pub fn applied(&self) -> eventlog::Checkpoint {
        eventlog::Checkpoint {
            transaction_id: self.applied_xid,
            global_position: self.applied_position,
        }
    }

    /// The Redis namespace readers may use, if any.
    pub fn namespace(&self) -> Option<Namespace> {
        self.cache_epoch.map(|epoch| Namespace {
            projection_version: self.projection_version,
            epoch,
        })
    }
}

const SELECT: &str = "SELECT projection_version, cache_epoch, batch_seq, applied_xid, \
     applied_position FROM projection_state WHERE singleton";

/// The current state, without locking.
#[tracing::instrument(name = "sql_load_projection_state", skip_all)]
pub async fn load(db: impl PgExecutor<'_>) -> Result<ProjectionState, sqlx::Error> {
    sqlx::query_as(SELECT).fetch_one(db).await
}

/// Key of the transaction-level advisory lock that serialises every
/// projection batch, namespace change and rebuild switch ("projstat").
pub const LOCK_KEY: i64 = 0x7072_6f6a_7374_6174;

/// Starts a transaction already holding the state lock, in one round trip
/// (for [`sqlx::Pool::begin_with`]). An advisory lock, not `FOR UPDATE`: a row
/// lock gives the transaction an xid from its first statement, and an open
/// xid holds back the cluster's xmin, below which the relay publishes. A
/// batch takes its xid only with its first write, just before it commits.
pub const BEGIN_LOCKED: &str = "BEGIN; SELECT pg_advisory_xact_lock(8102661182587167092)";

/// Takes the state lock in a transaction already begun, then reads the
/// state: every projection batch, namespace change and rebuild switch takes
/// this lock first, so the state read here holds until the transaction ends.
/// (`lock_timeout` applies to the wait.)
#[tracing::instrument(name = "sql_lock_projection_state", skip_all)]
pub async fn lock(tx: &mut PgConnection) -> Result<ProjectionState, sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    load(tx).await
}

/// What a batch starts from ([`load_for_batch`]).
pub struct BatchStart {
    pub state: ProjectionState,
    /// The number the batch commits under if it changes views (drawn now to
    /// save a round trip; a number drawn by a batch that changes nothing is
    /// never used).
    pub next_seq: i64,
    /// The current views of the users asked for that have one.
    pub views: Vec<UserView>,
}

/// With the lock held ([`BEGIN_LOCKED`]), in one round trip: the state, the
/// batch's number, and the views of `users`. One row per view found, each
/// carrying the state; a single row with no view when none is. The views
/// are not row-locked: every writer of `user_views` holds the state lock for
/// its whole transaction, so two projector instances overlapping in a
/// rebalance cannot both apply the same event, and the read takes no xid.
#[tracing::instrument(name = "sql_load_for_batch", skip_all, fields(users = users.len()))]
pub async fn load_for_batch(
    tx: &mut PgConnection,
    users: &[Uuid],
) -> Result<BatchStart, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "WITH s AS (SELECT projection_version, cache_epoch, batch_seq, applied_xid, \
           applied_position, nextval('projection_batch_seq') AS next_seq \
           FROM projection_state WHERE singleton) \
         SELECT s.*, {COLUMNS} FROM s LEFT JOIN user_views ON id = ANY($1)"
    ))
    .bind(users)
    .fetch_all(tx)
    .await?;
    let first = rows.first().ok_or(sqlx::Error::RowNotFound)?;
    let state = ProjectionState::from_row(first)?;
    let next_seq = first.try_get("next_seq")?;
    let mut views = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.try_get::<Option<Uuid>, _>("id")?.is_some() {
            views.push(UserView::try_from(ViewRow::from_row(row)?)?);
        }
    }
    Ok(BatchStart {
        state,
        next_seq,
        views,
    })
}

/// Appends the statement that records what a batch committed to `query`
/// (for the projector's one write statement): its number, and the namespace
/// still trusted after it (None when Redis could not be told about the batch).
pub fn push_record_batch(
    query: &mut QueryBuilder<'_, Postgres>,
    batch_seq: i64,
    cache_epoch: Option<i64>,
) {
    query
        .push("UPDATE projection_state SET batch_seq = ")
        .push_bind(batch_seq)
        .push(", cache_epoch = ")
        .push_bind(cache_epoch)
        .push(", updated_at = now() WHERE singleton");
}

/// Sets the trusted namespace (None: stop trusting Redis).
#[tracing::instrument(name = "sql_set_cache_epoch", skip(tx))]
pub async fn set_cache_epoch(
    tx: &mut PgConnection,
    cache_epoch: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE projection_state SET cache_epoch = $1, updated_at = now() WHERE singleton")
        .bind(cache_epoch)
        .execute(tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_one_round_trip_begin_takes_the_same_lock() {
        assert!(super::BEGIN_LOCKED.ends_with(&format!("({})", super::LOCK_KEY)));
    }
}
