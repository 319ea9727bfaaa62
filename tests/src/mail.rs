//! Helpers of the notifier tests: the development SMTP server's mailbox (a
//! Maildir written by scripts/stack's aiosmtpd), events with sealed codes
//! written straight into the log, and the SMTP component's start and stop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use events::codes::{Code, CodeKey, Purpose};
use events::domain::{EmailVerificationRequested, PasswordResetRequested, UserRegistered};
use events::{PasswordHash, UserEvent};
use sqlx::PgPool;
use uuid::Uuid;

use crate::eventually;

/// The `MAIL_CODE_KEY` of the services a test starts: 32 bytes of 0x42 in
/// base64. A test value, not a secret.
pub const TEST_MAIL_CODE_KEY: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";

/// A different key, for codes the notifier must not be able to open.
pub const OTHER_MAIL_CODE_KEY: &str = "Q0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0M=";

pub fn test_key() -> CodeKey {
    CodeKey::from_base64(TEST_MAIL_CODE_KEY).expect("the test key is valid")
}

pub fn smtp_host() -> String {
    std::env::var("TEST_SMTP_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}

pub fn smtp_port() -> String {
    std::env::var("TEST_SMTP_PORT").unwrap_or_else(|_| "2525".into())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Maildir the SMTP server writes: scripts/stack's, or `TEST_SMTP_MAILDIR`.
pub fn maildir() -> PathBuf {
    std::env::var_os("TEST_SMTP_MAILDIR")
        .map_or_else(|| root().join(".state/smtp/Maildir"), PathBuf::from)
}

/// A recipient no other test uses, so parallel tests never see each
/// other's mail.
pub fn unique_address(tag: &str) -> String {
    format!("{tag}-{}@mail.test", Uuid::new_v4().simple())
}

/// One mail as the server stored it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub file: PathBuf,
    pub to: String,
    pub subject: String,
    pub message_id: String,
    pub body: String,
}

impl Mail {
    /// The code in the body: the first run of exactly eight digits.
    pub fn code(&self) -> Option<String> {
        self.body
            .split(|c: char| !c.is_ascii_digit())
            .find(|run| run.len() == events::codes::DIGITS)
            .map(str::to_owned)
    }
}

/// Every mail in the mailbox (`new/` and `cur/`) addressed to `address`.
pub fn mails_to(address: &str) -> Vec<Mail> {
    let mut found = Vec::new();
    for folder in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(maildir().join(folder)) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            if let Some(mail) = parse(&entry.path(), &text) {
                if mail.to.contains(address) {
                    found.push(mail);
                }
            }
        }
    }
    found
}

/// Waits (polling the mailbox, at most `deadline`) until `address` has at
/// least `count` mails; returns them all.
pub async fn wait_for_mails(address: &str, count: usize, deadline: Duration) -> Vec<Mail> {
    eventually(&format!("{count} mail(s) to {address}"), deadline, || {
        let mails = mails_to(address);
        async move { (mails.len() >= count).then_some(mails) }
    })
    .await
}

/// Headers (unfolded) and body of a stored message; the body decoded from
/// quoted-printable when it says so.
fn parse(file: &Path, text: &str) -> Option<Mail> {
    let text = text.replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n")?;
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = headers.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let body = if header("content-transfer-encoding").eq_ignore_ascii_case("quoted-printable") {
        quoted_printable(body)
    } else {
        body.to_owned()
    };
    Some(Mail {
        file: file.to_owned(),
        to: header("to"),
        subject: header("subject"),
        message_id: header("message-id"),
        body,
    })
}

fn quoted_printable(text: &str) -> String {
    let joined = text.replace("=\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' && i + 2 < bytes.len() {
            if let Some(byte) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends `event` at `version` of `user`'s stream, as the owner of the
/// test database; returns its event id (the topic's `ce_id`).
pub async fn append<'e>(
    db: impl sqlx::PgExecutor<'e>,
    user: Uuid,
    version: i32,
    event: &UserEvent,
) -> Uuid {
    let event_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         VALUES ($1, $2, $3, $4, 1, $5)",
    )
    .bind(user)
    .bind(version)
    .bind(event_id)
    .bind(event.event_type())
    .bind(event.payload())
    .execute(db)
    .await
    .expect("append an event");
    event_id
}

/// A registration of `email`, with a verification code sealed under `key`
/// valid for `valid_for`, or without a code (as before codes existed).
pub fn registered(email: &str, code: Option<(&CodeKey, Uuid, &Code, DateTime<Utc>)>) -> UserEvent {
    UserEvent::Registered(UserRegistered {
        username: email.split('@').next().unwrap_or("user").replace('-', "_"),
        email: email.to_owned(),
        password_hash: PasswordHash::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
        sealed_code: code
            .map(|(key, user, code, _)| key.seal(Purpose::EmailVerification, user, code)),
        code_expires_at: code.map(|(_, _, _, at)| at),
    })
}

pub fn reset_requested(
    key: &CodeKey,
    user: Uuid,
    email: &str,
    code: &Code,
    expires_at: DateTime<Utc>,
) -> UserEvent {
    UserEvent::PasswordResetRequested(PasswordResetRequested {
        email: email.to_owned(),
        sealed_code: key.seal(Purpose::PasswordReset, user, code),
        expires_at,
    })
}

pub fn verification_requested(
    key: &CodeKey,
    user: Uuid,
    email: &str,
    code: &Code,
    expires_at: DateTime<Utc>,
) -> UserEvent {
    UserEvent::EmailVerificationRequested(EmailVerificationRequested {
        email: email.to_owned(),
        sealed_code: key.seal(Purpose::EmailVerification, user, code),
        expires_at,
    })
}

/// `scripts/stack start|stop smtp`: the real server goes away and comes back.
pub fn smtp_component(action: &str) {
    let status = std::process::Command::new(root().join("scripts/stack"))
        .args([action, "smtp"])
        .status()
        .expect("run scripts/stack");
    assert!(status.success(), "scripts/stack {action} smtp failed");
}

/// The status of the mail of `event_id` in `notifier_mails`.
pub async fn mail_status(pool: &PgPool, event_id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM notifier_mails WHERE event_id = $1")
        .bind(event_id)
        .fetch_optional(pool)
        .await
        .expect("read notifier_mails")
}
