//! One generation of the read model as a table: `user_views_g{n}`, built
//! beside the serving `user_views` by `projector rebuild` and renamed into its
//! place when it is ready.
//!
//! The table is created like `user_views` (columns, defaults, CHECKs) without
//! indexes, bulk-loaded with COPY, then given the serving table's indexes,
//! named with the generation so they never clash with the serving ones.

use std::fmt::Write as _;

use chrono::SecondsFormat;
use events::UserView;
use read_model::rows::{self, roles_literal, COLUMNS};
use sqlx::{PgConnection, PgPool};

/// Bytes sent per COPY message: large enough to amortise the round of
/// framing, small enough not to hold the whole table in memory.
const COPY_CHUNK: usize = 1 << 20;

/// Rows per upsert statement in the catch-up.
const UPSERT_CHUNK: usize = 10_000;

/// The table of generation `n`.
pub fn table(n: i32) -> String {
    format!("user_views_g{n}")
}

/// What the table serving as generation `n` is renamed to when replaced.
pub fn retired(n: i32) -> String {
    format!("user_views_g{n}_retired")
}

/// Creates an empty table for generation `n` shaped like `user_views`,
/// dropping a leftover of an earlier, failed rebuild first.
#[tracing::instrument(name = "sql_create_generation", skip(conn))]
pub async fn create(conn: &mut PgConnection, n: i32) -> Result<(), sqlx::Error> {
    let table = table(n);
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&mut *conn)
        .await?;
    // LIKE copies NOT NULLs, defaults and CHECKs, but no index: loading into
    // a bare heap and indexing once afterwards is much faster.
    sqlx::query(&format!(
        "CREATE TABLE {table} (LIKE user_views INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    ))
    .execute(&mut *conn)
    .await?;
    copy_grants(conn, &table).await
}

#[derive(sqlx::FromRow)]
struct Grant {
    /// `PUBLIC` or a quoted role name.
    grantee: String,
    privilege: String,
    grantable: bool,
}

/// Grants on the new table what `user_views` grants, so every service role
/// keeps exactly its access after the switch.
#[tracing::instrument(name = "sql_copy_grants", skip(conn))]
async fn copy_grants(conn: &mut PgConnection, table: &str) -> Result<(), sqlx::Error> {
    let grants: Vec<Grant> = sqlx::query_as(
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee, \
                a.privilege_type AS privilege, a.is_grantable AS grantable \
         FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a \
         LEFT JOIN pg_roles r ON r.oid = a.grantee \
         WHERE c.oid = 'user_views'::regclass AND a.grantee <> c.relowner",
    )
    .fetch_all(&mut *conn)
    .await?;
    for grant in grants {
        // Privilege names come from aclexplode (SELECT, INSERT, …), roles are quoted.
        let option = if grant.grantable {
            " WITH GRANT OPTION"
        } else {
            ""
        };
        sqlx::query(&format!(
            "GRANT {} ON {table} TO {}{option}",
            grant.privilege, grant.grantee
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Bulk-loads `views` into generation `n` with COPY (text format), in
/// `streams` concurrent COPYs on connections of `pool`: PostgreSQL parses
/// and inserts each stream on its own core. Returns the number of rows.
#[tracing::instrument(name = "sql_copy_views", skip_all, fields(generation = n, views = views.len()))]
pub async fn copy(
    pool: &PgPool,
    n: i32,
    views: &[&UserView],
    streams: usize,
) -> Result<u64, sqlx::Error> {
    let per_stream = views.len().div_ceil(streams.max(1)).max(1);
    let copies = views.chunks(per_stream).map(|part| async move {
        let mut conn = pool.acquire().await?;
        copy_stream(&mut conn, n, part).await
    });
    Ok(futures::future::try_join_all(copies)
        .await?
        .into_iter()
        .sum())
}

/// One COPY of `views` into generation `n`.
async fn copy_stream(
    conn: &mut PgConnection,
    n: i32,
    views: &[&UserView],
) -> Result<u64, sqlx::Error> {
    let mut copy = conn
        .copy_in_raw(&format!("COPY {} ({COLUMNS}) FROM STDIN", table(n)))
        .await?;
    let mut buffer = String::with_capacity(COPY_CHUNK + 4096);
    for view in views {
        write_copy_row(&mut buffer, view);
        if buffer.len() >= COPY_CHUNK {
            copy.send(buffer.as_bytes()).await?;
            buffer.clear();
        }
    }
    if !buffer.is_empty() {
        copy.send(buffer.as_bytes()).await?;
    }
    copy.finish().await
}

/// One row in COPY's text format, in [`COLUMNS`] order.
fn write_copy_row(out: &mut String, view: &UserView) {
    let _ = write!(out, "{}\t", view.id);
    escape_copy_text(out, &view.username);
    out.push('\t');
    escape_copy_text(out, &view.email);
    let _ = write!(
        out,
        "\t{}\t{}\t{}\t{}\t",
        view.status.as_str(),
        view.version,
        view.registered_at
            .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        view.updated_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
    );
    // An array column takes its literal form, escaped like any text.
    escape_copy_text(out, &roles_literal(&view.roles));
    match view.locked_until {
        Some(until) => {
            let _ = writeln!(
                out,
                "\t{}",
                until.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            );
        }
        None => out.push_str("\t\\N\n"),
    }
}

/// COPY text escaping: backslash, and the characters that delimit fields
/// and rows. Usernames and emails are validated, but the loader must not
/// depend on that.
fn escape_copy_text(out: &mut String, text: &str) {
    if !text.contains(['\\', '\t', '\n', '\r']) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

#[derive(sqlx::FromRow)]
struct IndexDef {
    name: String,
    definition: String,
    primary: bool,
}

/// Gives generation `n` the indexes `user_views` has (its primary key
/// included), read from the catalog so a migration that adds an index is
/// followed without a change here. Index `user_views[_gK]_{suffix}` becomes
/// `user_views_g{n}_{suffix}`. The indexes are built concurrently, one
/// connection of `pool` each (CREATE INDEX takes a SHARE lock, which does
/// not conflict with itself).
#[tracing::instrument(name = "sql_index_generation", skip(pool))]
pub async fn build_indexes(pool: &PgPool, n: i32) -> Result<Vec<String>, sqlx::Error> {
    let table = table(n);
    let indexes: Vec<IndexDef> = sqlx::query_as(
        "SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition, \
                i.indisprimary AS primary \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = 'user_views'::regclass ORDER BY i.indisprimary DESC, c.relname",
    )
    .fetch_all(pool)
    .await?;
    let planned = indexes
        .iter()
        .map(|index| {
            let name = format!("{table}_{}", index_suffix(&index.name));
            let definition = retarget(index, &name, &table)?;
            Ok((name, definition))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let builds = planned.iter().map(|(_, definition)| async move {
        let mut conn = pool.acquire().await?;
        // Sorting in memory instead of in temporary files; per build.
        sqlx::query("SET maintenance_work_mem = '256MB'")
            .execute(&mut *conn)
            .await?;
        let built = sqlx::query(definition).execute(&mut *conn).await;
        sqlx::query("RESET maintenance_work_mem")
            .execute(&mut *conn)
            .await?;
        built
    });
    futures::future::try_join_all(builds).await?;
    let mut conn = pool.acquire().await?;
    for (index, (name, _)) in indexes.iter().zip(&planned) {
        if index.primary {
            sqlx::query(&format!(
                "ALTER TABLE {table} ADD CONSTRAINT {name} PRIMARY KEY USING INDEX {name}"
            ))
            .execute(&mut *conn)
            .await?;
        }
    }
    // Fresh statistics, so the first queries after the switch plan well.
    sqlx::query(&format!("ANALYZE {table}"))
        .execute(&mut *conn)
        .await?;
    Ok(planned.into_iter().map(|(name, _)| name).collect())
}

/// `username_idx` from `user_views_username_idx` or `user_views_g7_username_idx`.
fn index_suffix(name: &str) -> &str {
    let rest = name.strip_prefix("user_views_").unwrap_or(name);
    match rest.split_once('_') {
        Some((generation, suffix))
            if generation.len() > 1
                && generation.starts_with('g')
                && generation[1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            suffix
        }
        _ => rest,
    }
}

/// The definition of `index` rewritten to create `name` on `table`. Fails
/// rather than guess when the catalog's text is not the expected shape.
fn retarget(index: &IndexDef, name: &str, table: &str) -> Result<String, sqlx::Error> {
    let unexpected = || {
        sqlx::Error::Protocol(format!(
            "cannot rewrite the definition of index {}: {}",
            index.name, index.definition
        ))
    };
    // "CREATE [UNIQUE] INDEX <name> ON [ONLY] <schema>.user_views USING …"
    let (head, rest) = index
        .definition
        .split_once(&format!(" INDEX {} ON ", index.name))
        .ok_or_else(unexpected)?;
    let (relation, tail) = rest.split_once(" USING ").ok_or_else(unexpected)?;
    let relation = relation.strip_prefix("ONLY ").unwrap_or(relation);
    if relation != "user_views" && !relation.ends_with(".user_views") {
        return Err(unexpected());
    }
    Ok(format!("{head} INDEX {name} ON {table} USING {tail}"))
}

/// Writes `views` into generation `n`, each unless the table already has
/// that user at the same or a newer version (catch-up after the bulk load).
#[tracing::instrument(name = "sql_upsert_generation", skip_all, fields(generation = n, views = views.len()))]
pub async fn upsert(
    conn: &mut PgConnection,
    n: i32,
    views: &[&UserView],
) -> Result<u64, sqlx::Error> {
    let table = table(n);
    let mut written = 0;
    for chunk in views.chunks(UPSERT_CHUNK) {
        written += rows::upsert_into(conn, &table, chunk).await?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_carry_the_generation() {
        assert_eq!(index_suffix("user_views_pkey"), "pkey");
        assert_eq!(index_suffix("user_views_status_id_idx"), "status_id_idx");
        assert_eq!(index_suffix("user_views_g12_email_idx"), "email_idx");
        assert_eq!(index_suffix("user_views_gone_idx"), "gone_idx");
    }

    #[test]
    fn definitions_are_moved_to_the_new_table() {
        let index = IndexDef {
            name: "user_views_g2_status_id_idx".into(),
            definition: "CREATE INDEX user_views_g2_status_id_idx ON public.user_views USING btree (status, id)".into(),
            primary: false,
        };
        assert_eq!(
            retarget(&index, "user_views_g3_status_id_idx", "user_views_g3").unwrap(),
            "CREATE INDEX user_views_g3_status_id_idx ON user_views_g3 USING btree (status, id)"
        );
        let elsewhere = IndexDef {
            definition: "CREATE INDEX x ON public.other USING btree (id)".into(),
            name: "x".into(),
            primary: false,
        };
        assert!(retarget(&elsewhere, "y", "user_views_g3").is_err());
    }

    #[test]
    fn copy_rows_carry_roles_as_an_array_and_no_lock_as_null() {
        let at: chrono::DateTime<chrono::Utc> = "2026-11-21T10:00:00.5Z".parse().unwrap();
        let mut view = UserView {
            id: uuid::Uuid::nil(),
            username: "ada".into(),
            email: "ada@example.com".into(),
            status: events::UserStatus::Active,
            version: 4,
            registered_at: at,
            updated_at: at,
            roles: vec!["admin".into(), "support".into()],
            locked_until: Some("2031-02-03T04:05:06.123456Z".parse().unwrap()),
            email_verified: false,
            profile: Default::default(),
        };
        let mut out = String::new();
        write_copy_row(&mut out, &view);
        assert_eq!(
            out,
            "00000000-0000-0000-0000-000000000000\tada\tada@example.com\tactive\t4\t\
             2026-11-21T10:00:00.500Z\t2026-11-21T10:00:00.500Z\t{\"admin\",\"support\"}\t\
             2031-02-03T04:05:06.123456Z\n"
        );
        view.roles = vec!["a\\b".into()];
        view.locked_until = None;
        out.clear();
        write_copy_row(&mut out, &view);
        // The array literal's backslash, escaped again for COPY; NULL as \N.
        assert!(out.ends_with("\t{\"a\\\\\\\\b\"}\t\\N\n"), "{out}");
    }

    #[test]
    fn copy_text_escapes_delimiters() {
        let mut out = String::new();
        escape_copy_text(&mut out, "a\tb\\c\nd");
        assert_eq!(out, "a\\tb\\\\c\\nd");
    }
}
