//! Sign-in sessions and their rotating refresh tokens, in PostgreSQL
//! (`refresh_sessions`, `refresh_tokens`; see migration 09).

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::tokens::refresh_token_digest;

/// Which of a user's sessions a command ends, in its own transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoke {
    /// None: most commands.
    Nothing,
    /// Every session of the user: deactivation.
    All { because: &'static str },
    /// Every session but the caller's: a password change.
    AllBut {
        session: Uuid,
        because: &'static str,
    },
}

/// A session a refresh token belongs to, while it is live.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Session {
    pub session_id: Uuid,
    pub user_id: Uuid,
    pub client_id: String,
}

/// What a presented refresh token turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    /// Unused, unexpired, in a live session.
    Live(Session),
    /// Already used: a copy. Its session has been revoked.
    Reused,
    /// Unknown, expired, or of a revoked session.
    Invalid,
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    session_id: Uuid,
    user_id: Uuid,
    client_id: String,
    used: bool,
    live: bool,
}

#[derive(Clone)]
pub struct Sessions {
    pool: PgPool,
    ttl: Duration,
}

impl Sessions {
    /// Refresh tokens live `ttl` from their issue.
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        Self { pool, ttl }
    }

    /// Starts a session for `user_id` with its first refresh token.
    #[tracing::instrument(name = "sql_start_session", skip_all, fields(%user_id))]
    pub async fn start(
        &self,
        user_id: Uuid,
        client_id: &str,
        token: &str,
    ) -> Result<Uuid, sqlx::Error> {
        let session_id = Uuid::now_v7();
        sqlx::query(
            "WITH session AS ( \
               INSERT INTO refresh_sessions (session_id, user_id, client_id) VALUES ($1, $2, $3) \
               RETURNING session_id) \
             INSERT INTO refresh_tokens (digest, session_id, expires_at) \
             SELECT $4, session_id, now() + make_interval(secs => $5) FROM session",
        )
        .bind(session_id)
        .bind(user_id)
        .bind(client_id)
        .bind(refresh_token_digest(token))
        .bind(self.ttl.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(session_id)
    }

    /// Looks a presented token up; a used one revokes its session at once.
    #[tracing::instrument(name = "sql_present_refresh_token", skip_all)]
    pub async fn present(&self, token: &str) -> Result<Presented, sqlx::Error> {
        let row: Option<TokenRow> = sqlx::query_as(
            "SELECT s.session_id, s.user_id, s.client_id, t.used_at IS NOT NULL AS used, \
                    (s.revoked_at IS NULL AND t.expires_at > now()) AS live \
             FROM refresh_tokens t JOIN refresh_sessions s USING (session_id) \
             WHERE t.digest = $1",
        )
        .bind(refresh_token_digest(token))
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Presented::Invalid,
            Some(row) if row.used => {
                self.revoke_session(row.session_id, "refresh token reused")
                    .await?;
                tracing::warn!(session_id = %row.session_id, user_id = %row.user_id,
                    "a used refresh token was presented again: session revoked");
                metrics::counter!("refresh_token_reuse_total").increment(1);
                Presented::Reused
            }
            Some(row) if !row.live => Presented::Invalid,
            Some(row) => Presented::Live(Session {
                session_id: row.session_id,
                user_id: row.user_id,
                client_id: row.client_id,
            }),
        })
    }

    /// Uses `old` and issues `new` in its session, atomically. `false` when
    /// `old` was used meanwhile (a concurrent copy: the session is revoked)
    /// or the session was revoked.
    #[tracing::instrument(name = "sql_rotate_refresh_token", skip_all, fields(session_id = %session.session_id))]
    pub async fn rotate(
        &self,
        session: &Session,
        old: &str,
        new: &str,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // Locks the session row until commit: a revocation waits for this
        // rotation, then revokes the new token with the rest.
        let live = sqlx::query(
            "UPDATE refresh_sessions SET last_used_at = now() \
             WHERE session_id = $1 AND revoked_at IS NULL",
        )
        .bind(session.session_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !live {
            return Ok(false);
        }
        let used = sqlx::query(
            "UPDATE refresh_tokens SET used_at = now() \
             WHERE digest = $1 AND used_at IS NULL AND expires_at > now()",
        )
        .bind(refresh_token_digest(old))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !used {
            drop(tx);
            self.revoke_session(session.session_id, "refresh token reused")
                .await?;
            metrics::counter!("refresh_token_reuse_total").increment(1);
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO refresh_tokens (digest, session_id, expires_at) \
             VALUES ($1, $2, now() + make_interval(secs => $3))",
        )
        .bind(refresh_token_digest(new))
        .bind(session.session_id)
        .bind(self.ttl.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    #[tracing::instrument(name = "sql_revoke_session", skip(self))]
    pub async fn revoke_session(&self, session_id: Uuid, because: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE refresh_sessions SET revoked_at = now(), revoked_because = $2 \
             WHERE session_id = $1 AND revoked_at IS NULL",
        )
        .bind(session_id)
        .bind(because)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// RFC 7009: revokes the session of `token`, whatever state it is in.
    #[tracing::instrument(name = "sql_revoke_by_token", skip_all)]
    pub async fn revoke_by_token(&self, token: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE refresh_sessions SET revoked_at = now(), revoked_because = 'revoked by client' \
             WHERE session_id = (SELECT session_id FROM refresh_tokens WHERE digest = $1) \
               AND revoked_at IS NULL",
        )
        .bind(refresh_token_digest(token))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes sessions whose every token has expired; returns how many.
    /// Used tokens stay until they expire, so reuse is detected until then.
    #[tracing::instrument(name = "sql_sweep_sessions", skip_all)]
    pub async fn sweep(&self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM refresh_sessions s WHERE NOT EXISTS ( \
               SELECT 1 FROM refresh_tokens t \
               WHERE t.session_id = s.session_id AND t.expires_at > now())",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

/// Ends sessions as `revoke` says, inside the transaction appending the
/// command's events.
#[tracing::instrument(name = "sql_revoke_sessions", skip(tx))]
pub async fn revoke_in(
    tx: &mut Transaction<'_, Postgres>,
    user_id: Uuid,
    revoke: Revoke,
) -> Result<u64, sqlx::Error> {
    let (except, because) = match revoke {
        Revoke::Nothing => return Ok(0),
        Revoke::All { because } => (None, because),
        Revoke::AllBut { session, because } => (Some(session), because),
    };
    let done = sqlx::query(
        "UPDATE refresh_sessions SET revoked_at = now(), revoked_because = $3 \
         WHERE user_id = $1 AND revoked_at IS NULL AND session_id IS DISTINCT FROM $2",
    )
    .bind(user_id)
    .bind(except)
    .bind(because)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}
