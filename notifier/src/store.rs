//! The `notifier_mails` table: the deduplication of consumed events (keyed by
//! the event id, the topic's `ce_id`) and the sender's work queue. Every
//! statement is a small traced function.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::mail::{Kind, NewMail};

/// A pending mail claimed by the sender, locked until its transaction ends.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub event_id: Uuid,
    pub user_id: Uuid,
    pub kind: String,
    pub recipient: String,
    pub code_expires_at: Option<DateTime<Utc>>,
    pub attempts: i32,
}

/// The sealed code of one event, read through the `mail_codes` view.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SealedRow {
    pub stream_id: Uuid,
    pub sealed_code: String,
    pub code_expires_at: Option<DateTime<Utc>>,
}

/// Inserts the mails of one consumed batch in one transaction. A mail whose
/// event is already there (a redelivery) is left alone: that is the
/// deduplication by `ce_id`. Returns how many were new.
#[tracing::instrument(name = "insert_mails", skip_all, fields(mails = mails.len()))]
pub async fn insert(pool: &PgPool, mails: &[NewMail]) -> Result<u64, sqlx::Error> {
    if mails.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    let mut inserted = 0;
    for mail in mails {
        inserted += sqlx::query(
            "INSERT INTO notifier_mails (event_id, user_id, kind, recipient, code_expires_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(mail.event_id)
        .bind(mail.user_id)
        .bind(mail.kind.as_str())
        .bind(&mail.recipient)
        .bind(mail.code_expires_at)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Claims the most overdue pending mail, skipping rows another sender holds,
/// so several notifiers share the queue without sending a mail twice.
#[tracing::instrument(name = "claim_mail", skip_all)]
pub async fn claim(tx: &mut Transaction<'_, Postgres>) -> Result<Option<Claimed>, sqlx::Error> {
    sqlx::query_as::<_, Claimed>(
        "SELECT event_id, user_id, kind, recipient, code_expires_at, attempts \
         FROM notifier_mails \
         WHERE status = 'pending' AND next_attempt_at <= now() \
         ORDER BY next_attempt_at \
         LIMIT 1 \
         FOR UPDATE SKIP LOCKED",
    )
    .fetch_optional(&mut **tx)
    .await
}

/// The sealed code the log holds for `event_id`, if any.
#[tracing::instrument(name = "load_sealed_code", skip_all)]
pub async fn sealed_code(
    tx: &mut Transaction<'_, Postgres>,
    event_id: Uuid,
) -> Result<Option<SealedRow>, sqlx::Error> {
    sqlx::query_as::<_, SealedRow>(
        "SELECT stream_id, sealed_code, code_expires_at FROM mail_codes WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_optional(&mut **tx)
    .await
}

/// Marks a claimed mail sent.
#[tracing::instrument(name = "mark_sent", skip_all)]
pub async fn mark_sent(
    tx: &mut Transaction<'_, Postgres>,
    event_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE notifier_mails SET status = 'sent', attempts = attempts + 1, last_error = NULL, \
         updated_at = now() WHERE event_id = $1",
    )
    .bind(event_id)
    .execute(&mut **tx)
    .await
    .map(drop)
}

/// Ends a claimed mail without sending it: `expired` or `parked`, with why.
#[tracing::instrument(name = "mark_final", skip_all, fields(status))]
pub async fn mark_final(
    tx: &mut Transaction<'_, Postgres>,
    event_id: Uuid,
    status: &'static str,
    attempted: bool,
    reason: &str,
) -> Result<(), sqlx::Error> {
    tracing::Span::current().record("status", status);
    sqlx::query(
        "UPDATE notifier_mails SET status = $2, attempts = attempts + $3, last_error = $4, \
         updated_at = now() WHERE event_id = $1",
    )
    .bind(event_id)
    .bind(status)
    .bind(i32::from(attempted))
    .bind(reason)
    .execute(&mut **tx)
    .await
    .map(drop)
}

/// Counts a failed send and sets the next attempt `wait` from now.
#[tracing::instrument(name = "mark_retry", skip_all)]
pub async fn mark_retry(
    tx: &mut Transaction<'_, Postgres>,
    event_id: Uuid,
    wait: Duration,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE notifier_mails SET attempts = attempts + 1, last_error = $2, \
         next_attempt_at = now() + make_interval(secs => $3), updated_at = now() \
         WHERE event_id = $1",
    )
    .bind(event_id)
    .bind(reason)
    .bind(wait.as_secs_f64())
    .execute(&mut **tx)
    .await
    .map(drop)
}

/// `notifier retry`: parked mails (those of `ids`, or all) become pending
/// again with a fresh count of attempts. Returns how many.
#[tracing::instrument(name = "retry_parked", skip_all)]
pub async fn retry_parked(pool: &PgPool, ids: Option<&[Uuid]>) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "UPDATE notifier_mails SET status = 'pending', attempts = 0, next_attempt_at = now(), \
         updated_at = now() \
         WHERE status = 'parked' AND ($1::uuid[] IS NULL OR event_id = ANY($1))",
    )
    .bind(ids.map(<[Uuid]>::to_vec))
    .execute(pool)
    .await
    .map(|done| done.rows_affected())
}

/// How many mails are in each status (`pending`, `parked`, …).
#[tracing::instrument(name = "count_mails", skip_all)]
pub async fn count_by_status(pool: &PgPool) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM notifier_mails GROUP BY status")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Welcome => "welcome",
            Self::EmailVerification => "email_verification",
            Self::PasswordReset => "password_reset",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "welcome" => Some(Self::Welcome),
            "email_verification" => Some(Self::EmailVerification),
            "password_reset" => Some(Self::PasswordReset),
            _ => None,
        }
    }
}
