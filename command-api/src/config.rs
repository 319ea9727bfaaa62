//! command-api settings, read once from the environment.

use std::net::SocketAddr;
use std::time::Duration;

use platform::config::{parse, string, InvalidSetting};
use platform::db::DatabaseSettings;
use platform::kafka::KafkaClientSettings;
use secrecy::SecretString;

use std::sync::Arc;

use events::codes::CodeKey;

use crate::domain::codes::IssuePolicy;
use crate::domain::sign_in::LockoutPolicy;
use crate::tokens::TokenSettings;

#[derive(Debug, Clone)]
pub struct Settings {
    /// `BIND_ADDR`, default `127.0.0.1:3001`.
    pub bind_addr: SocketAddr,
    /// `DATABASE_URL`, `DATABASE_MAX_CONNECTIONS` (default 20).
    pub database: DatabaseSettings,
    /// `ADMIN_TOKEN`: required, at least 16 characters; there is no built-in one.
    pub admin_token: SecretString,
    /// `HASH_CONCURRENCY`: argon2 hashes computed at once, default the number of cores.
    pub hash_concurrency: usize,
    /// `HASH_QUEUE_CAPACITY`: hashes that may wait for a hashing thread,
    /// default 16 × `HASH_CONCURRENCY` (about a quarter of a second of work at
    /// ~15 ms a hash). A registration that finds the queue full answers 503
    /// `overloaded` with `Retry-After` at once instead of waiting in line.
    pub hash_queue_capacity: usize,
    /// `REGISTRATION_RATE_PER_MINUTE` (default 20, 0 disables) and
    /// `REGISTRATION_BURST` (default 10): `POST /users` per client address.
    pub registration_limit: ClientQuota,
    /// `SIGN_IN_RATE_PER_MINUTE` (default 60, 0 disables) and `SIGN_IN_BURST`
    /// (default 20): password grants and password-reset requests and
    /// completions per client address, together.
    pub sign_in_limit: ClientQuota,
    /// `REQUEST_TIMEOUT_MS`, default 10 000.
    pub request_timeout: Duration,
    /// `IDEMPOTENCY_TTL_SECS`: how long an Idempotency-Key answers retries, default 24 h.
    pub idempotency_ttl: Duration,
    pub kafka: KafkaSettings,
    pub relay: RelaySettings,
    pub identity: IdentitySettings,
    pub codes: CodeSettings,
}

/// Codes that go by mail (email verification, password reset).
#[derive(Debug, Clone)]
pub struct CodeSettings {
    /// `MAIL_CODE_KEY_FILE` (a file holding the key) or `MAIL_CODE_KEY`: 32
    /// random bytes in base64 (`openssl rand -base64 32`), shared with the
    /// notifier and nobody else; there is no built-in one.
    pub key: Arc<CodeKey>,
    /// `EMAIL_CODE_TTL_SECS` (how long an email verification code is valid,
    /// default 24 h) and `EMAIL_RESEND_SECS` (default 60: no second
    /// verification mail for a user within this time).
    pub email: IssuePolicy,
    /// `RESET_CODE_TTL_SECS` (default 1800) and `RESET_RESEND_SECS` (default
    /// 60: no second reset mail to a user within this time).
    pub reset: IssuePolicy,
    /// `CODE_MAX_ATTEMPTS`: wrong tries of one code before it is dead, default 5.
    pub max_attempts: u32,
}

/// Sign-in, tokens and lockout.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// `JWT_SIGNING_KEY_FILE` (a PKCS#8 PEM Ed25519 private key, e.g. from
    /// `openssl genpkey -algorithm ed25519`) or `JWT_SIGNING_KEY` (the PEM
    /// itself): required; there is no built-in key. As (where from, PEM).
    pub signing_key: (String, SecretString),
    /// `JWT_PREVIOUS_KEY_FILES`: comma-separated PEM files (private or
    /// public) of earlier signing keys, kept in the JWKS and for verification
    /// until the tokens they signed have expired.
    pub previous_keys: Vec<(String, String)>,
    /// `JWT_ISSUER`, `JWT_AUDIENCE`, `ACCESS_TOKEN_TTL_SECS` (default 300),
    /// `REFRESH_TOKEN_TTL_SECS` (default 14 days).
    pub tokens: TokenSettings,
    /// `LOCKOUT_MAX_FAILURES` (default 5) consecutive failed password checks
    /// lock the account for `LOCKOUT_SECONDS` (default 900).
    pub lockout: LockoutPolicy,
}

/// A per-client rate limit (a GCRA token bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientQuota {
    /// Requests a client may make per minute, sustained; 0 disables the limit.
    pub per_minute: u32,
    /// How many a client may make at once before the rate applies (at least 1).
    pub burst: u32,
}

#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `KAFKA_BROKERS`, default `127.0.0.1:9092`.
    pub brokers: String,
    /// `KAFKA_TOPIC`, default `users.events.v1`.
    pub topic: String,
    /// `KAFKA_TOPIC_PARTITIONS` used when the relay creates the topic, default 6.
    pub topic_partitions: i32,
    /// `KAFKA_TOPIC_REPLICATION` used when the relay creates the topic, default 1 (one local broker).
    pub topic_replication: i32,
    /// `CE_SOURCE`: the CloudEvents `source` attribute, default `urn:userstream:command-api`.
    pub ce_source: String,
    /// `KAFKA_CONFIG_*` and the security shorthands (`KAFKA_SECURITY_PROTOCOL`,
    /// `KAFKA_SASL_*`, `KAFKA_SSL_*`): librdkafka properties for the relay's
    /// producer and admin client. Its `Debug` hides secrets.
    pub client: KafkaClientSettings,
}

#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// `RELAY_ENABLED`, default true. Replicas compete for one leader lock.
    pub enabled: bool,
    /// `RELAY_BATCH_SIZE`: most events read and published per round trip,
    /// default 5000. A batch waits for all its acknowledgements, so larger
    /// batches amortise that wait when a backlog drains; a quiet log gives
    /// small batches anyway.
    pub batch_size: i64,
    /// `RELAY_POLL_INTERVAL_MS`: fallback poll when no notification arrives, default 500.
    pub poll_interval: Duration,
    /// `RELAY_LEADER_RETRY_MS`: how often a follower tries to take the lock, default 1000.
    pub leader_retry: Duration,
    /// `RELAY_STATEMENT_TIMEOUT_MS`: the longest any statement on the leader's
    /// lock connection may take (server `statement_timeout`, and the client
    /// gives up a second later), default 10 000.
    pub statement_timeout: Duration,
    /// `RELAY_SESSION_CHECK_MS`: while the leader waits, how often it checks
    /// that its lock connection still answers, default 1000.
    pub session_check: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, InvalidSetting> {
        let admin_token = string("ADMIN_TOKEN", "");
        if admin_token.chars().count() < 16 {
            return Err(InvalidSetting {
                name: "ADMIN_TOKEN",
                value: "<hidden>".into(),
                reason: "must be set to at least 16 characters".into(),
            });
        }
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let hash_concurrency = parse("HASH_CONCURRENCY", cores)?.max(1);
        Ok(Self {
            bind_addr: parse("BIND_ADDR", SocketAddr::from(([127, 0, 0, 1], 3001)))?,
            database: DatabaseSettings::from_env(20, "userstream_command")?,
            admin_token: admin_token.into(),
            hash_concurrency,
            hash_queue_capacity: parse("HASH_QUEUE_CAPACITY", 16 * hash_concurrency)?.max(1),
            registration_limit: ClientQuota {
                per_minute: parse("REGISTRATION_RATE_PER_MINUTE", 20)?,
                burst: parse("REGISTRATION_BURST", 10)?.max(1),
            },
            sign_in_limit: ClientQuota {
                per_minute: parse("SIGN_IN_RATE_PER_MINUTE", 60)?,
                burst: parse("SIGN_IN_BURST", 20)?.max(1),
            },
            request_timeout: Duration::from_millis(parse("REQUEST_TIMEOUT_MS", 10_000)?),
            idempotency_ttl: Duration::from_secs(parse("IDEMPOTENCY_TTL_SECS", 86_400)?),
            kafka: KafkaSettings {
                brokers: string("KAFKA_BROKERS", "127.0.0.1:9092"),
                topic: string("KAFKA_TOPIC", "users.events.v1"),
                topic_partitions: parse("KAFKA_TOPIC_PARTITIONS", 6)?,
                topic_replication: parse("KAFKA_TOPIC_REPLICATION", 1)?,
                ce_source: string("CE_SOURCE", "urn:userstream:command-api"),
                client: KafkaClientSettings::from_env()?,
            },
            identity: IdentitySettings::from_env()?,
            codes: CodeSettings::from_env()?,
            relay: RelaySettings {
                enabled: parse("RELAY_ENABLED", true)?,
                batch_size: parse("RELAY_BATCH_SIZE", 5000)?,
                poll_interval: Duration::from_millis(parse("RELAY_POLL_INTERVAL_MS", 500)?),
                leader_retry: Duration::from_millis(parse("RELAY_LEADER_RETRY_MS", 1000)?),
                statement_timeout: Duration::from_millis(
                    parse::<u64>("RELAY_STATEMENT_TIMEOUT_MS", 10_000)?.max(100),
                ),
                session_check: Duration::from_millis(
                    parse::<u64>("RELAY_SESSION_CHECK_MS", 1000)?.max(10),
                ),
            },
        })
    }
}

impl IdentitySettings {
    fn from_env() -> Result<Self, InvalidSetting> {
        let signing_key = match (
            string("JWT_SIGNING_KEY_FILE", ""),
            string("JWT_SIGNING_KEY", ""),
        ) {
            (path, _) if !path.is_empty() => {
                (path.clone(), read_key("JWT_SIGNING_KEY_FILE", &path)?)
            }
            (_, pem) if !pem.is_empty() => ("JWT_SIGNING_KEY".to_owned(), pem),
            _ => {
                return Err(InvalidSetting {
                    name: "JWT_SIGNING_KEY_FILE",
                    value: String::new(),
                    reason: "must name an Ed25519 private key (PEM); there is no built-in one"
                        .into(),
                })
            }
        };
        let previous_keys = string("JWT_PREVIOUS_KEY_FILES", "")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|path| Ok((path.to_owned(), read_key("JWT_PREVIOUS_KEY_FILES", path)?)))
            .collect::<Result<_, InvalidSetting>>()?;
        let max_failures: u32 = parse("LOCKOUT_MAX_FAILURES", 5)?;
        Ok(Self {
            signing_key: (signing_key.0, signing_key.1.into()),
            previous_keys,
            tokens: TokenSettings {
                issuer: string("JWT_ISSUER", "http://127.0.0.1:3001"),
                audience: string("JWT_AUDIENCE", "userstream"),
                access_ttl: Duration::from_secs(parse::<u64>("ACCESS_TOKEN_TTL_SECS", 300)?.max(1)),
                refresh_ttl: Duration::from_secs(
                    parse::<u64>("REFRESH_TOKEN_TTL_SECS", 14 * 86_400)?.max(1),
                ),
            },
            lockout: LockoutPolicy {
                max_failures: max_failures.max(1),
                lock_for: chrono::Duration::seconds(parse::<i64>("LOCKOUT_SECONDS", 900)?.max(1)),
            },
        })
    }
}

impl CodeSettings {
    fn from_env() -> Result<Self, InvalidSetting> {
        let (name, encoded) = match (string("MAIL_CODE_KEY_FILE", ""), string("MAIL_CODE_KEY", "")) {
            (path, _) if !path.is_empty() => ("MAIL_CODE_KEY_FILE", read_key("MAIL_CODE_KEY_FILE", &path)?),
            (_, key) if !key.is_empty() => ("MAIL_CODE_KEY", key),
            _ => {
                return Err(InvalidSetting {
                    name: "MAIL_CODE_KEY_FILE",
                    value: String::new(),
                    reason: "must name a file with the key that seals mailed codes (32 bytes, base64); there is no built-in one".into(),
                })
            }
        };
        let key = CodeKey::from_base64(&encoded).map_err(|error| InvalidSetting {
            name,
            value: "<hidden>".into(),
            reason: error.to_string(),
        })?;
        let seconds = |name, default| -> Result<chrono::Duration, InvalidSetting> {
            Ok(chrono::Duration::seconds(
                parse::<i64>(name, default)?.max(1),
            ))
        };
        Ok(Self {
            key: Arc::new(key),
            email: IssuePolicy {
                ttl: seconds("EMAIL_CODE_TTL_SECS", 86_400)?,
                resend_after: chrono::Duration::seconds(
                    parse::<i64>("EMAIL_RESEND_SECS", 60)?.max(0),
                ),
            },
            reset: IssuePolicy {
                ttl: seconds("RESET_CODE_TTL_SECS", 1800)?,
                resend_after: chrono::Duration::seconds(
                    parse::<i64>("RESET_RESEND_SECS", 60)?.max(0),
                ),
            },
            max_attempts: parse::<u32>("CODE_MAX_ATTEMPTS", 5)?.max(1),
        })
    }
}

fn read_key(name: &'static str, path: &str) -> Result<String, InvalidSetting> {
    std::fs::read_to_string(path).map_err(|error| InvalidSetting {
        name,
        value: path.to_owned(),
        reason: format!("cannot read it: {error}"),
    })
}
