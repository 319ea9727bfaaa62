//! The sender: takes due mails from `notifier_mails`, opens their codes,
//! sends them and records each outcome.
//!
//! A mail is claimed with `FOR UPDATE SKIP LOCKED` and its row stays locked
//! until its outcome is committed, so several notifiers share the queue and
//! never send one mail at the same time. The one window left: a crash (or a
//! failed commit) after the server accepted the mail but before the outcome
//! is committed sends it again later. It goes with the same `Message-ID`
//! (`<event id@userstream>`), so mail systems can drop the copy.
//!
//! Nothing here logs a code, a body or a whole address: the recipient's
//! domain at most.

use std::sync::{Arc, Mutex};

use chrono::Utc;
use events::codes::CodeKey;
use events::domain::SealedCode;
use platform::shutdown::Shutdown;
use platform::telemetry::error_chain;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::config::{backoff, Settings};
use crate::mail::{self, Kind};
use crate::smtp::{Mailer, SendError};
use crate::store::{self, Claimed};

/// What one [`Sender::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing was due.
    Idle,
    Sent,
    /// The send failed; it is tried again later.
    WillRetry,
    /// Not sent and never will be without `notifier retry`.
    Parked,
    /// Its code ran out before it could go.
    Expired,
}

/// How the last SMTP attempt went, for `/readyz`.
#[derive(Debug, Default)]
pub struct SmtpState {
    /// The error of the last attempt, None after a success.
    pub last_error: Option<String>,
    /// Failed attempts since the last success.
    pub failures_in_a_row: u64,
}

#[derive(Clone)]
pub struct Sender {
    pool: PgPool,
    mailer: Mailer,
    key: Arc<CodeKey>,
    settings: Arc<Settings>,
    smtp: Arc<Mutex<SmtpState>>,
}

impl Sender {
    pub fn new(pool: PgPool, mailer: Mailer, settings: Arc<Settings>) -> Self {
        Self {
            pool,
            mailer,
            key: Arc::clone(&settings.code_key),
            settings,
            smtp: Arc::default(),
        }
    }

    /// The SMTP state `/readyz` reports.
    pub fn smtp_state(&self) -> Arc<Mutex<SmtpState>> {
        Arc::clone(&self.smtp)
    }

    /// Sends every due mail, then waits to be woken (`wake`, by the
    /// consumer) or for the poll interval (retries come due, other
    /// notifiers' rows), until shutdown.
    pub async fn run_until_stopped(self, wake: Arc<Notify>, mut shutdown: Shutdown) {
        tracing::info!("notifier sender running");
        let mut database_ok = true;
        loop {
            loop {
                if shutdown.is_requested() {
                    return;
                }
                match self.step().await {
                    Ok(Step::Idle) => {
                        database_ok = true;
                        break;
                    }
                    Ok(_) => database_ok = true,
                    Err(error) => {
                        metrics::counter!("notifier_database_errors_total", "task" => "sender")
                            .increment(1);
                        if database_ok {
                            tracing::error!(error = %error_chain(&error), "cannot read or record the mail queue; retrying");
                        }
                        database_ok = false;
                        break;
                    }
                }
            }
            publish_gauges(&self.pool).await;
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll_every) => {}
                () = shutdown.requested() => return,
            }
        }
    }

    /// Claims one due mail and sends it (or parks or expires it), recording
    /// the outcome in the same transaction that holds the claim.
    #[tracing::instrument(name = "sender_step", skip_all, fields(event_id, kind))]
    pub async fn step(&self) -> Result<Step, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let Some(claimed) = store::claim(&mut tx).await? else {
            tx.rollback().await?;
            return Ok(Step::Idle);
        };
        let span = tracing::Span::current();
        span.record("event_id", tracing::field::display(claimed.event_id));
        span.record("kind", claimed.kind.as_str());
        let (status, reason) = match self.prepare(&mut tx, &claimed).await? {
            Prepared::Send(kind, rendered) => {
                let sent = self
                    .mailer
                    .send(
                        &claimed.recipient,
                        mail::message_id(claimed.event_id),
                        rendered,
                    )
                    .await;
                let step = self.record(&mut tx, &claimed, kind, sent).await?;
                tx.commit().await?;
                return Ok(step);
            }
            Prepared::Park(reason) => ("parked", reason),
            Prepared::Expire => (
                "expired",
                "the code expired before it could be sent".to_owned(),
            ),
        };
        store::mark_final(&mut tx, claimed.event_id, status, false, &reason).await?;
        tx.commit().await?;
        if status == "parked" {
            metrics::counter!("notifier_mails_parked_total").increment(1);
            tracing::warn!(event_id = %claimed.event_id, reason, "mail parked");
            Ok(Step::Parked)
        } else {
            metrics::counter!("notifier_mails_expired_total").increment(1);
            tracing::info!(event_id = %claimed.event_id, "mail not sent: its code expired");
            Ok(Step::Expired)
        }
    }

    /// The mail to send, or why it must not go.
    async fn prepare(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        claimed: &Claimed,
    ) -> Result<Prepared, sqlx::Error> {
        let Some(kind) = Kind::parse(&claimed.kind) else {
            return Ok(Prepared::Park(format!("unknown kind {:?}", claimed.kind)));
        };
        let sealed = store::sealed_code(tx, claimed.event_id).await?;
        let code = match sealed {
            None if kind.needs_code() => {
                return Ok(Prepared::Park(
                    "the log holds no code for this event".into(),
                ))
            }
            None => None,
            Some(row) => {
                let sealed = SealedCode::new(row.sealed_code);
                // The seal binds the user: a row that names another user
                // (it cannot, the event id is unique) would fail here too.
                match self.key.open(kind.purpose(), claimed.user_id, &sealed) {
                    Ok(code) => Some((code, claimed.code_expires_at.or(row.code_expires_at))),
                    Err(error) => {
                        return Ok(Prepared::Park(format!(
                            "{error} (MAIL_CODE_KEY differs from the command API's?)"
                        )))
                    }
                }
            }
        };
        if let Some((_, Some(expires_at))) = &code {
            if *expires_at <= Utc::now() {
                return Ok(Prepared::Expire);
            }
        }
        let rendered = mail::render(kind, code.as_ref().map(|(code, at)| (code.expose(), *at)));
        Ok(Prepared::Send(kind, rendered))
    }

    /// Records a send's outcome: sent; or one more attempt and a later try;
    /// or parked after the last attempt or a permanent refusal.
    async fn record(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        claimed: &Claimed,
        kind: Kind,
        sent: Result<(), SendError>,
    ) -> Result<Step, sqlx::Error> {
        let domain = mail::domain(&claimed.recipient);
        let error = match sent {
            Ok(()) => {
                store::mark_sent(tx, claimed.event_id).await?;
                metrics::counter!("notifier_mails_sent_total", "kind" => kind.as_str())
                    .increment(1);
                *self.smtp.lock().expect("smtp state lock") = SmtpState::default();
                tracing::info!(event_id = %claimed.event_id, kind = kind.as_str(), domain, "mail sent");
                return Ok(Step::Sent);
            }
            Err(error) => error,
        };
        let permanent = matches!(error, SendError::Permanent(_));
        metrics::counter!("notifier_send_failures_total",
            "reason" => if permanent { "permanent" } else { "transient" })
        .increment(1);
        {
            let mut state = self.smtp.lock().expect("smtp state lock");
            state.last_error = Some(error.to_string());
            state.failures_in_a_row += 1;
        }
        let attempts = claimed.attempts + 1;
        if permanent || attempts >= self.settings.max_attempts {
            store::mark_final(tx, claimed.event_id, "parked", true, &error.to_string()).await?;
            metrics::counter!("notifier_mails_parked_total").increment(1);
            tracing::warn!(event_id = %claimed.event_id, kind = kind.as_str(), domain, attempts,
                error = %error, "mail parked: not sent");
            return Ok(Step::Parked);
        }
        let wait = backoff(attempts, self.settings.retry_base, self.settings.retry_max);
        store::mark_retry(tx, claimed.event_id, wait, &error.to_string()).await?;
        tracing::warn!(event_id = %claimed.event_id, kind = kind.as_str(), domain, attempts,
            retry_in_ms = wait.as_millis() as u64, error = %error, "mail not sent; will retry");
        Ok(Step::WillRetry)
    }
}

enum Prepared {
    Send(Kind, mail::Rendered),
    Park(String),
    Expire,
}

/// Sets the pending and parked gauges from the table.
async fn publish_gauges(pool: &PgPool) {
    if let Ok(counts) = store::count_by_status(pool).await {
        for status in ["pending", "parked"] {
            let count = counts.get(status).copied().unwrap_or(0);
            metrics::gauge!("notifier_mails", "status" => status).set(count as f64);
        }
    }
}
