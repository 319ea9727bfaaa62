//! Identity: password-grant sign-ins against the argon2 limit, refresh-token
//! grants against pgbench running the same SQL, and how fast a downstream
//! service verifies access tokens with the JWKS (fetched once, cached).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::future::join_all;
use serde_json::Value;
use userstream_tests::{Running, Service, TestEnv};

use crate::stats::median;
use crate::writes::{hash_seconds, pgbench};
use crate::Plan;

/// Concurrent sign-ins: enough to keep every hashing thread busy.
const SIGN_IN_CLIENTS: usize = 8;
/// Concurrent refresh-token clients, each with its own session.
const REFRESH_CLIENTS: usize = 8;
/// Seeded users: sign-ins go round them, so no two wait for one user's turn.
const USERS: i64 = 2_000;
const PASSWORD: &str = "bench password 123";

const QUIET: [(&str, &str); 3] = [
    ("RELAY_ENABLED", "false"),
    ("RUST_LOG", "warn,platform::service=info"),
    ("DATABASE_MAX_CONNECTIONS", "32"),
];

/// `USERS` registered users with one real hash of [`PASSWORD`], written as
/// the command API writes them (reservation row and UserRegistered).
const SEED_USERS: &str = "WITH n AS (SELECT generate_series(0, $1 - 1) AS n), \
    ids AS (INSERT INTO user_identities (user_id, username, email) \
      SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, 'bench' || n, \
             'bench' || n || '@example.com' FROM n RETURNING user_id, username, email) \
    INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) \
    SELECT user_id, 1, gen_random_uuid(), 'UserRegistered', 1, \
           jsonb_build_object('username', username, 'email', email, 'password_hash', $2::text), \
           '{\"actor\": \"anonymous\"}' FROM ids";

/// For pgbench: one live session per user, with a refresh token whose
/// digest it can compute (`sha256('seed' || n)`).
const SEED_SESSIONS: &str = "WITH n AS (SELECT generate_series(0, $1 - 1) AS n), \
    s AS (INSERT INTO refresh_sessions (session_id, user_id, client_id) \
      SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, \
             ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, 'public' FROM n) \
    INSERT INTO refresh_tokens (digest, session_id, expires_at) \
    SELECT sha256(('seed' || n)::bytea), ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, \
           now() + interval '14 days' FROM n";

/// What the command API does per refresh grant (`sessions.rs`, `http/oauth.rs`):
/// look the token up with its session, fold the user's stream, then in one
/// transaction lock the session, mark the token used and insert the next.
const PGBENCH_REFRESH: &str = r#"\set n random(0, :users - 1)
SELECT s.session_id, s.user_id, s.client_id, t.used_at IS NOT NULL AS used, (s.revoked_at IS NULL AND t.expires_at > now()) AS live FROM refresh_tokens t JOIN refresh_sessions s USING (session_id) WHERE t.digest = sha256(('seed' || :n)::bytea);
SELECT global_position, event_type, schema_version, payload FROM events WHERE stream_id = ('00000000-0000-4000-8000-' || lpad(to_hex(:n), 12, '0'))::uuid ORDER BY stream_version;
BEGIN;
UPDATE refresh_sessions SET last_used_at = now() WHERE session_id = ('00000000-0000-4000-8000-' || lpad(to_hex(:n), 12, '0'))::uuid AND revoked_at IS NULL;
UPDATE refresh_tokens SET used_at = now() WHERE digest = sha256(('seed' || :n)::bytea) AND used_at IS NULL AND expires_at > now();
INSERT INTO refresh_tokens (digest, session_id, expires_at) VALUES (sha256((random()::text || clock_timestamp()::text)::bytea), ('00000000-0000-4000-8000-' || lpad(to_hex(:n), 12, '0'))::uuid, now() + interval '14 days');
COMMIT;
"#;

pub struct Identity {
    /// Password-grant sign-ins per second.
    pub sign_ins: f64,
    /// cores ÷ the median time of one hash (the registration bench's limit).
    pub argon2_limit: f64,
    pub refreshes: f64,
    pub pgbench: f64,
    /// Access-token verifications per second on all cores, JWKS cached.
    pub verifications: f64,
}

async fn seeded(hash: &str, sessions: bool) -> anyhow::Result<TestEnv> {
    let env = TestEnv::new().await;
    sqlx::query(SEED_USERS)
        .bind(USERS)
        .bind(hash)
        .execute(&env.pool)
        .await
        .context("seed users")?;
    if sessions {
        sqlx::query(SEED_SESSIONS)
            .bind(USERS)
            .execute(&env.pool)
            .await
            .context("seed sessions")?;
    }
    for table in [
        "events",
        "user_identities",
        "refresh_sessions",
        "refresh_tokens",
    ] {
        sqlx::query(&format!("VACUUM ANALYZE {table}"))
            .execute(&env.pool)
            .await?;
    }
    Ok(env)
}

async fn grant(
    http: &reqwest::Client,
    api: &Running,
    form: &[(&str, &str)],
) -> anyhow::Result<Value> {
    let response = http.post(api.url("/oauth/token")).form(form).send().await?;
    let status = response.status();
    if status != 200 {
        bail!("/oauth/token answered {status}: {}", response.text().await?);
    }
    Ok(response.json().await?)
}

pub async fn identity(plan: &Plan, run: usize) -> anyhow::Result<Identity> {
    let _ = run;
    let mut hash_times = hash_seconds(15).await?;
    let hash = command_api::password::hash_blocking(PASSWORD)?;
    let api_env = seeded(hash.expose(), false).await?;
    let pg_env = seeded(hash.expose(), true).await?;
    let api = api_env.spawn(Service::CommandApi, &QUIET).await;
    let http = reqwest::Client::new();
    let window = Duration::from_secs(plan.seconds);

    // 1. Sign-ins, each client going round its own share of the users.
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let clients = (0..SIGN_IN_CLIENTS).map(|_| {
        let (http, api, next) = (http.clone(), &api, Arc::clone(&next));
        async move {
            let mut signed_in = 0u64;
            while started.elapsed() < window {
                let n = next.fetch_add(1, Ordering::Relaxed) % USERS as u64;
                let username = format!("bench{n}");
                grant(
                    &http,
                    api,
                    &[
                        ("grant_type", "password"),
                        ("username", &username),
                        ("password", PASSWORD),
                    ],
                )
                .await?;
                signed_in += 1;
            }
            anyhow::Ok(signed_in)
        }
    });
    let signed_in: u64 = join_all(clients)
        .await
        .into_iter()
        .sum::<anyhow::Result<u64>>()?;
    let sign_ins = signed_in as f64 / started.elapsed().as_secs_f64();
    hash_times.extend(hash_seconds(15).await?);

    // 2. Refresh grants: each client signs in once, then refreshes in a loop.
    let mut sessions = Vec::new();
    for client in 0..REFRESH_CLIENTS {
        let username = format!("bench{client}");
        let tokens = grant(
            &http,
            &api,
            &[
                ("grant_type", "password"),
                ("username", &username),
                ("password", PASSWORD),
            ],
        )
        .await?;
        sessions.push(
            tokens["refresh_token"]
                .as_str()
                .context("refresh token")?
                .to_owned(),
        );
    }
    let access_token = grant(
        &http,
        &api,
        &[
            ("grant_type", "password"),
            ("username", "bench0"),
            ("password", PASSWORD),
        ],
    )
    .await?["access_token"]
        .as_str()
        .context("access token")?
        .to_owned();
    let started = Instant::now();
    let clients = sessions.into_iter().map(|mut refresh_token| {
        let (http, api) = (http.clone(), &api);
        async move {
            let mut refreshed = 0u64;
            while started.elapsed() < window {
                let tokens = grant(
                    &http,
                    api,
                    &[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", &refresh_token),
                    ],
                )
                .await?;
                refresh_token = tokens["refresh_token"]
                    .as_str()
                    .context("refresh token")?
                    .to_owned();
                refreshed += 1;
            }
            anyhow::Ok(refreshed)
        }
    });
    let refreshed: u64 = join_all(clients)
        .await
        .into_iter()
        .sum::<anyhow::Result<u64>>()?;
    let refreshes = refreshed as f64 / started.elapsed().as_secs_f64();

    // 3. A downstream service: the JWKS once, then verify on every core.
    let jwks: jsonwebtoken::jwk::JwkSet = http
        .get(api.url("/.well-known/jwks.json"))
        .send()
        .await?
        .json()
        .await?;
    drop(api);
    let verifications = tokio::task::spawn_blocking(move || {
        verify_rate(&jwks, &access_token, Duration::from_secs(3))
    })
    .await??;

    let pgbench = pgbench(
        &pg_env.database_url,
        plan.seconds,
        REFRESH_CLIENTS,
        PGBENCH_REFRESH,
        &[format!("users={USERS}")],
    )?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    Ok(Identity {
        sign_ins,
        argon2_limit: cores / median(&hash_times),
        refreshes,
        pgbench,
        verifications,
    })
}

/// Verifications per second of `token` (signature, expiry, audience) with
/// one thread per core, as a resource server would after caching the JWKS.
fn verify_rate(
    jwks: &jsonwebtoken::jwk::JwkSet,
    token: &str,
    window: Duration,
) -> anyhow::Result<f64> {
    let kid = jsonwebtoken::decode_header(token)?.kid.context("kid")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(&kid).context("kid in JWKS")?)?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&["userstream"]);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let started = Instant::now();
    let verified: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..cores)
            .map(|_| {
                scope.spawn(|| {
                    let mut n = 0u64;
                    while started.elapsed() < window {
                        if jsonwebtoken::decode::<Value>(token, &key, &validation).is_ok() {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    if verified == 0 {
        bail!("the access token did not verify");
    }
    Ok(verified as f64 / started.elapsed().as_secs_f64())
}
