//! The PostgreSQL half of `projector verify`: every `user_views` row against
//! the fold, read in keyset pages inside the caller's snapshot.

use std::collections::HashSet;

use events::UserView;
use read_model::rows::{ViewRow, COLUMNS};
use uuid::Uuid;

use super::{describe, field_differences, Difference};
use crate::fold::Fold;

/// Rows per page when reading `user_views`: short statements, bounded memory.
const PAGE: i64 = 10_000;

/// Compares every row of `user_views` with the fold; returns the row count.
#[tracing::instrument(name = "sql_compare_views", skip_all)]
pub(super) async fn compare_rows(
    tx: &mut sqlx::PgConnection,
    fold: &Fold,
    differences: &mut Vec<Difference>,
) -> Result<u64, sqlx::Error> {
    let mut seen = HashSet::with_capacity(fold.views.len());
    let sql = format!("SELECT {COLUMNS} FROM user_views WHERE id > $1 ORDER BY id LIMIT $2");
    let mut after = Uuid::nil();
    loop {
        // Keyset pages along the primary key, all in the caller's snapshot.
        let page: Vec<ViewRow> = sqlx::query_as(&sql)
            .bind(after)
            .bind(PAGE)
            .fetch_all(&mut *tx)
            .await?;
        let Some(last) = page.last().map(|row| row.id) else {
            break;
        };
        after = last;
        for row in page {
            seen.insert(row.id);
            compare_row(row, fold, differences);
        }
    }
    for (user_id, view) in &fold.views {
        if !seen.contains(user_id) && !fold.problems.contains_key(user_id) {
            differences.push(Difference {
                user_id: *user_id,
                what: format!(
                    "missing from user_views (the log has version {})",
                    view.version
                ),
            });
        }
    }
    Ok(seen.len() as u64)
}

fn compare_row(row: ViewRow, fold: &Fold, differences: &mut Vec<Difference>) {
    let user_id = row.id;
    if fold.problems.contains_key(&user_id) {
        return; // Already reported; the row is whatever was applied before it.
    }
    let found = match UserView::try_from(row) {
        Ok(view) => view,
        Err(error) => {
            differences.push(Difference {
                user_id,
                what: format!("the user_views row cannot be read: {error}"),
            });
            return;
        }
    };
    let what = match fold.views.get(&user_id) {
        None => format!(
            "in user_views at version {} but not in the log",
            found.version
        ),
        Some(expected) if *expected == found => return,
        Some(expected) => format!(
            "user_views differs from the log: {}",
            describe(&field_differences(expected, &found))
        ),
    };
    differences.push(Difference { user_id, what });
}
