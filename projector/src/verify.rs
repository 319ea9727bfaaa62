//! `projector verify`: folds the whole log and compares the result with every
//! `user_views` row and, when Redis is trusted, with every settled entry of
//! the current namespace. The log is the truth; any departure is a difference.
//!
//! The log and the rows are read in one REPEATABLE READ snapshot, so a live
//! projector committing meanwhile cannot make them disagree. Redis is read
//! after; an entry found ahead of that snapshot is checked against the row as
//! it is by then.

pub mod cache;
mod rows;

use std::collections::HashMap;
use std::fmt;

use anyhow::Context;
use chrono::{DateTime, Utc};
use events::UserView;
use read_model::rows::{ViewRow, COLUMNS};
use read_model::{state, CacheSettings, Namespace};
use sqlx::PgPool;
use uuid::Uuid;

use crate::fold::{Fold, BATCH_SIZE};
use cache::CacheCheck;

/// One way in which a store departs from the log, for one user.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Difference {
    pub user_id: Uuid,
    /// What differs, in words.
    pub what: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user {}: {}", self.user_id, self.what)
    }
}

/// What verify found.
#[derive(Debug, Clone)]
pub struct Report {
    pub events: u64,
    pub users: usize,
    pub rows: u64,
    /// The Redis namespace compared, and what was found in it.
    pub cache: CacheCheck,
    /// Every difference, by user.
    pub differences: Vec<Difference>,
}

impl Report {
    pub fn is_consistent(&self) -> bool {
        self.differences.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "verify: {} events, {} users in the log; user_views: {} rows; {}; {} difference(s)",
            self.events,
            self.users,
            self.rows,
            self.cache,
            self.differences.len()
        )
    }
}

/// Folds the log and compares the read model and the Redis views with it.
pub async fn verify(pool: &PgPool, cache: &CacheSettings) -> anyhow::Result<Report> {
    let mut differences = Vec::new();
    let mut tx = pool.begin().await.context("cannot connect to PostgreSQL")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let snapshot_state = state::load(&mut *tx).await?;
    let mut fold = Fold::new();
    fold.fold_log(&mut tx, BATCH_SIZE)
        .await
        .context("cannot read the log")?;
    for problem in fold.problems.values() {
        differences.push(Difference {
            user_id: problem.user_id,
            what: format!("the log cannot be folded: {problem}"),
        });
    }
    let rows = rows::compare_rows(&mut tx, &fold, &mut differences)
        .await
        .context("cannot read user_views")?;
    tx.rollback().await.ok();

    let cache = match snapshot_state.namespace() {
        None => CacheCheck::Untrusted,
        Some(ns) => {
            compare_cache(
                pool,
                cache,
                ns,
                snapshot_state.batch_seq,
                &fold,
                &mut differences,
            )
            .await?
        }
    };
    differences.sort();
    Ok(Report {
        events: fold.events,
        users: fold.views.len(),
        rows,
        cache,
        differences,
    })
}

/// Compares the settled entries of `ns` with the fold; entries ahead of it
/// are checked against the current rows instead.
async fn compare_cache(
    pool: &PgPool,
    settings: &CacheSettings,
    ns: Namespace,
    batch_seq: i64,
    fold: &Fold,
    differences: &mut Vec<Difference>,
) -> anyhow::Result<CacheCheck> {
    let mut scan = cache::scan(settings, ns, batch_seq)
        .await
        .context("cannot read the Redis views")?;
    let Some(entries) = scan.entries.take() else {
        return Ok(scan.check);
    };
    let mut ahead = HashMap::new();
    for (user_id, entry) in entries {
        if fold.problems.contains_key(&user_id) {
            continue;
        }
        if entry.version == 0 {
            // A cached absence: true as long as the log has no such user.
            if let Some(expected) = fold.views.get(&user_id) {
                differences.push(Difference {
                    user_id,
                    what: format!(
                        "Redis caches the user as absent; the log has version {}",
                        expected.version
                    ),
                });
            }
            continue;
        }
        let Some(expected) = fold.views.get(&user_id) else {
            differences.push(Difference {
                user_id,
                what: format!(
                    "Redis holds version {} of a user the log does not have",
                    entry.version
                ),
            });
            continue;
        };
        if entry.version > expected.version {
            ahead.insert(user_id, entry);
            continue;
        }
        if let Some(what) = cache::entry_difference(expected, &entry) {
            differences.push(Difference { user_id, what });
        }
    }
    if !ahead.is_empty() {
        // The live projector moved on after the snapshot: compare with the
        // rows as they are now.
        let ids: Vec<Uuid> = ahead.keys().copied().collect();
        let now = current_views(pool, &ids).await?;
        for (user_id, entry) in ahead {
            let what = match now.get(&user_id) {
                Some(row) => cache::entry_difference(row, &entry),
                None => Some(format!(
                    "Redis holds version {} that user_views does not have",
                    entry.version
                )),
            };
            if let Some(what) = what {
                differences.push(Difference { user_id, what });
            }
        }
    }
    Ok(scan.check)
}

/// The views of `ids` as they are now (outside the verify snapshot).
#[tracing::instrument(name = "sql_load_current_views", skip_all, fields(users = ids.len()))]
async fn current_views(
    pool: &PgPool,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, UserView>, sqlx::Error> {
    let rows: Vec<ViewRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM user_views WHERE id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| UserView::try_from(row).ok().map(|v| (v.id, v)))
        .collect())
}

/// The fields in which `found` departs from `expected`, as `name found (log expected)`.
pub(crate) fn field_differences(expected: &UserView, found: &UserView) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, found: String, expected: String| {
        if found != expected {
            out.push(format!("{name} {found} (log: {expected})"));
        }
    };
    field(
        "username",
        format!("{:?}", found.username),
        format!("{:?}", expected.username),
    );
    field(
        "email",
        format!("{:?}", found.email),
        format!("{:?}", expected.email),
    );
    field(
        "status",
        format!("{:?}", found.status.as_str()),
        format!("{:?}", expected.status.as_str()),
    );
    field(
        "version",
        found.version.to_string(),
        expected.version.to_string(),
    );
    field(
        "registered_at",
        found.registered_at.to_rfc3339(),
        expected.registered_at.to_rfc3339(),
    );
    field(
        "updated_at",
        found.updated_at.to_rfc3339(),
        expected.updated_at.to_rfc3339(),
    );
    field(
        "roles",
        format!("{:?}", found.roles),
        format!("{:?}", expected.roles),
    );
    let instant =
        |t: Option<DateTime<Utc>>| t.map_or_else(|| "null".to_owned(), |t| t.to_rfc3339());
    field(
        "locked_until",
        instant(found.locked_until),
        instant(expected.locked_until),
    );
    field(
        "email_verified",
        found.email_verified.to_string(),
        expected.email_verified.to_string(),
    );
    let (found_profile, expected_profile) = (&found.profile, &expected.profile);
    field(
        "profile.display_name",
        format!("{:?}", found_profile.display_name),
        format!("{:?}", expected_profile.display_name),
    );
    field(
        "profile.locale",
        format!("{:?}", found_profile.locale),
        format!("{:?}", expected_profile.locale),
    );
    field(
        "profile.time_zone",
        format!("{:?}", found_profile.time_zone),
        format!("{:?}", expected_profile.time_zone),
    );
    // As JSON: what the row's jsonb and the Redis body hold.
    let json = |p: &std::collections::BTreeMap<String, serde_json::Value>| {
        serde_json::to_string(p).unwrap_or_default()
    };
    field(
        "profile.preferences",
        json(&found_profile.preferences),
        json(&expected_profile.preferences),
    );
    if found.id != expected.id {
        out.push(format!("id {} (log: {})", found.id, expected.id));
    }
    out
}

pub(crate) fn describe(fields: &[String]) -> String {
    fields.join(", ")
}
