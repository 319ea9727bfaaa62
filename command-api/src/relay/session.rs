//! The leader's session: the one connection that holds the leader lock and
//! through which the leader reads the log and moves the checkpoint.
//!
//! Losing it must be noticed within seconds, whichever side fails:
//! * the server drops a silent client: TCP keepalives and `tcp_user_timeout`
//!   are set on the server side of this connection (sqlx has no client-side
//!   keepalive setting), so a leader whose host vanished frees the lock;
//! * the leader notices a dead or hung session: every statement on it is
//!   bounded (`statement_timeout` on the server, the same bound plus a margin
//!   on the client), and while the leader waits (for acknowledgements, for
//!   new events, during a backoff) it checks the session every
//!   `RELAY_SESSION_CHECK_MS` with a `SELECT 1`.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::{Connection, PgPool};

use super::RelayError;

/// `application_name` of the lock connection in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "command-api-relay-lock";

/// Server-side keepalives of the lock connection: idle seconds before the
/// first probe, seconds between probes, probes lost before the server drops
/// the session (5 + 2 × 3 = 11 s), and the most milliseconds sent data may
/// stay unacknowledged.
const KEEPALIVE: [(&str, &str); 4] = [
    ("tcp_keepalives_idle", "5"),
    ("tcp_keepalives_interval", "2"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "10000"),
];

/// How much longer than `statement_timeout` the client waits for an answer
/// before it declares the session dead (the server's own cancel comes first).
const CLIENT_MARGIN: Duration = Duration::from_secs(1);

/// The advisory lock key of the relay of `topic`: a stable 64-bit FNV-1a hash
/// of a fixed prefix and the topic, so relays of different topics on one
/// database have different leaders, and every build agrees on the key.
pub fn lock_key(topic: &str) -> i64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = "userstream.relay/"
        .bytes()
        .chain(topic.bytes())
        .fold(OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        });
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// A new connection with the pool's target and credentials (`sslmode`
/// included), named [`APPLICATION_NAME`], with keepalives and timeouts.
#[tracing::instrument(name = "relay_session_connect", skip_all)]
pub async fn connect(
    pool: &PgPool,
    statement_timeout: Duration,
) -> Result<PgConnection, sqlx::Error> {
    let timeout_ms = statement_timeout.as_millis().to_string();
    let options = (*pool.connect_options())
        .clone()
        .application_name(APPLICATION_NAME)
        .options(KEEPALIVE)
        .options([
            ("statement_timeout", timeout_ms.as_str()),
            ("idle_in_transaction_session_timeout", timeout_ms.as_str()),
        ]);
    PgConnection::connect_with(&options).await
}

/// Runs one statement on the session, giving up after `timeout` plus a margin:
/// an unanswered session is as good as lost.
pub async fn bounded<T, E>(
    timeout: Duration,
    statement: impl Future<Output = Result<T, E>>,
) -> Result<T, RelayError>
where
    RelayError: From<E>,
{
    match tokio::time::timeout(timeout + CLIENT_MARGIN, statement).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RelayError::SessionTimedOut(timeout + CLIENT_MARGIN)),
    }
}

/// Tries the leader lock of `key` once.
#[tracing::instrument(name = "sql_relay_try_lock", skip(conn))]
pub async fn try_lock(
    conn: &mut PgConnection,
    key: i64,
    timeout: Duration,
) -> Result<bool, RelayError> {
    bounded(
        timeout,
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(conn),
    )
    .await
}

/// Checks that the session still answers.
#[tracing::instrument(name = "sql_relay_session_check", skip_all)]
pub async fn check(conn: &mut PgConnection, timeout: Duration) -> Result<(), RelayError> {
    bounded(timeout, conn.ping()).await
}

#[cfg(test)]
mod tests {
    use super::lock_key;

    #[test]
    fn the_lock_key_is_stable_and_differs_by_topic() {
        // Pinned: replicas of different builds must agree on it.
        assert_eq!(lock_key("users.events.v1"), lock_key("users.events.v1"));
        assert_eq!(lock_key("users.events.v1"), 2_590_030_585_472_480_512);
        assert_ne!(lock_key("users.events.v1"), lock_key("users.events.v2"));
    }
}
