//! notifier settings, read once from the environment.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use events::codes::CodeKey;
use platform::config::{parse, string, InvalidSetting};
use platform::db::DatabaseSettings;
use secrecy::SecretString;

/// How the connection to the mail server is secured (`SMTP_TLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain SMTP: the local development server only.
    None,
    /// Plain connect, then STARTTLS (required, not opportunistic).
    StartTls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
}

impl FromStr for SmtpTls {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "starttls" => Ok(Self::StartTls),
            "tls" => Ok(Self::Tls),
            _ => Err("use none, starttls or tls".to_owned()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// `SMTP_HOST`, default `127.0.0.1` (scripts/stack's development server).
    pub host: String,
    /// `SMTP_PORT`, default 2525.
    pub port: u16,
    /// `SMTP_TLS`: none (default, development), starttls or tls.
    pub tls: SmtpTls,
    /// `SMTP_USERNAME` and `SMTP_PASSWORD`, both or neither.
    pub credentials: Option<(String, SecretString)>,
    /// `MAIL_FROM`, default `userstream <no-reply@userstream.localhost>`.
    pub from: String,
    /// `SMTP_TIMEOUT_MS`, default 15 000: the deadline of one send, connect
    /// to QUIT, so a hung server costs one attempt, not the sender task.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// `BIND_ADDR` for /healthz, /readyz and /metrics, default `127.0.0.1:3004`.
    pub bind_addr: SocketAddr,
    /// `DATABASE_URL` (role `userstream_notifier`), `DATABASE_MAX_CONNECTIONS` (default 5).
    pub database: DatabaseSettings,
    /// `KAFKA_BROKERS`, default `127.0.0.1:9092`.
    pub kafka_brokers: String,
    /// `KAFKA_TOPIC`, default `users.events.v1`.
    pub kafka_topic: String,
    /// `NOTIFIER_GROUP_ID`, default `userstream-notifier`: its own group, so
    /// it reads every event whatever the projector does.
    pub kafka_group_id: String,
    /// `KAFKA_SESSION_TIMEOUT_MS`, default 10 000.
    pub kafka_session_timeout_ms: u32,
    pub smtp: SmtpSettings,
    /// `MAIL_CODE_KEY` (required): opens the codes sealed in the log. Shared
    /// with the command API only.
    pub code_key: Arc<CodeKey>,
    /// `NOTIFIER_MAX_ATTEMPTS`, default 8: a mail still failing after this
    /// many sends is parked.
    pub max_attempts: i32,
    /// `NOTIFIER_RETRY_BASE_MS`, default 1 000: the wait after the first
    /// failure, doubled after each further one ...
    pub retry_base: Duration,
    /// ... up to `NOTIFIER_RETRY_MAX_MS`, default 300 000 (5 minutes).
    pub retry_max: Duration,
    /// `NOTIFIER_POLL_MS`, default 1 000: how often the sender looks for due
    /// mails without being woken (retries, other notifiers' rows).
    pub poll_every: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, InvalidSetting> {
        let username = string("SMTP_USERNAME", "");
        let password = string("SMTP_PASSWORD", "");
        let credentials = match (username.is_empty(), password.is_empty()) {
            (true, true) => None,
            (false, false) => Some((username, SecretString::from(password))),
            _ => {
                return Err(InvalidSetting {
                    name: "SMTP_USERNAME",
                    value: username,
                    reason: "SMTP_USERNAME and SMTP_PASSWORD are set together or not at all".into(),
                })
            }
        };
        let key = std::env::var("MAIL_CODE_KEY").unwrap_or_default();
        let code_key = CodeKey::from_base64(&key).map_err(|error| InvalidSetting {
            name: "MAIL_CODE_KEY",
            // Never echo a key, even a malformed one.
            value: "<redacted>".into(),
            reason: if key.trim().is_empty() {
                "is required (the key the command API seals codes with)".into()
            } else {
                error.to_string()
            },
        })?;
        let max_attempts: i32 = parse("NOTIFIER_MAX_ATTEMPTS", 8)?;
        if max_attempts < 1 {
            return Err(InvalidSetting {
                name: "NOTIFIER_MAX_ATTEMPTS",
                value: max_attempts.to_string(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            bind_addr: parse("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 3004)))?,
            database: DatabaseSettings::from_env(5, "userstream_notifier")?,
            kafka_brokers: string("KAFKA_BROKERS", "127.0.0.1:9092"),
            kafka_topic: string("KAFKA_TOPIC", "users.events.v1"),
            kafka_group_id: string("NOTIFIER_GROUP_ID", "userstream-notifier"),
            kafka_session_timeout_ms: parse("KAFKA_SESSION_TIMEOUT_MS", 10_000)?,
            smtp: SmtpSettings {
                host: string("SMTP_HOST", "127.0.0.1"),
                port: parse("SMTP_PORT", 2525)?,
                tls: parse("SMTP_TLS", SmtpTls::None)?,
                credentials,
                from: string("MAIL_FROM", "userstream <no-reply@userstream.localhost>"),
                timeout: Duration::from_millis(parse("SMTP_TIMEOUT_MS", 15_000)?),
            },
            code_key: Arc::new(code_key),
            max_attempts,
            retry_base: Duration::from_millis(parse("NOTIFIER_RETRY_BASE_MS", 1_000)?),
            retry_max: Duration::from_millis(parse("NOTIFIER_RETRY_MAX_MS", 300_000)?),
            poll_every: Duration::from_millis(parse("NOTIFIER_POLL_MS", 1_000)?),
        })
    }
}

/// The wait before attempt `attempts + 1` after `attempts` failed ones:
/// `base · 2^(attempts−1)`, at most `max`.
pub fn backoff(attempts: i32, base: Duration, max: Duration) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    base.saturating_mul(1u32 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        let waits: Vec<u64> = (1..=11).map(|a| backoff(a, base, max).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(1_000, base, max), max);
    }

    #[test]
    fn tls_modes_parse() {
        assert_eq!("STARTTLS".parse::<SmtpTls>(), Ok(SmtpTls::StartTls));
        assert!("ssl".parse::<SmtpTls>().is_err());
    }
}
