//! Profiles, email verification and password resets on the read side, with
//! the real binaries on the real stack. Their events are appended straight
//! to the log (so that every kind is covered whatever the commands decide): the relay
//! publishes them in their contract, the projector folds them into
//! `user_views` and the cached Redis views, the query API serves them as
//! documented, `projector verify` compares them, and `projector rebuild`
//! reproduces them. Mailed codes are in the log only sealed, and nowhere on
//! the read side: not in `events_public`, a row, a Redis value, an answer or
//! a message.

use std::time::Duration;

use read_model::ViewCache;
use serde_json::{json, Value};
use userstream_tests::read_side::{
    append_raw as append, await_version, cached_body, get_documented, register,
};
use userstream_tests::{contract_violations, read_topic, redis_url, Service, TestEnv};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);
const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

/// A logged hash, as a password reset records it.
const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA";

/// The sealed codes in the log's payloads: found anywhere on the read side,
/// a secret leaked. Distinct from everything else the tests write.
const SEALED: [&str; 3] = [
    "v1.sealed-REGISTRATION-c0de",
    "v1.sealed-VERIFICATION-c0de",
    "v1.sealed-RESET-c0de",
];

/// Every value under the test's Redis prefix, as text.
async fn redis_values(env: &TestEnv) -> Vec<String> {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", env.redis_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut values = Vec::with_capacity(keys.len());
    for key in keys {
        // Only strings hold views; anything else is read as its key alone.
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap_or(None);
        values.push(format!(
            "{key} {}",
            String::from_utf8_lossy(&value.unwrap_or_default())
        ));
    }
    values
}

/// Every `user_views` row as JSON, by id: all columns, whatever they are.
async fn stored_rows(pool: &sqlx::PgPool) -> Vec<Value> {
    sqlx::query_scalar("SELECT to_jsonb(v) FROM user_views v ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn assert_no_sealed_code(place: &str, text: &str) {
    for sealed in SEALED {
        assert!(
            !text.contains(sealed),
            "{place} holds a sealed code: {text}"
        );
    }
    assert!(!text.contains("sealed_code"), "{place}: {text}");
}

#[tokio::test]
async fn profiles_verification_and_resets_are_projected_served_verified_and_rebuilt() {
    let env = TestEnv::new().await;
    let command = env.spawn(Service::CommandApi, &[]).await;
    let _projector = env.spawn(Service::Projector, &[]).await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let http = reqwest::Client::new();
    let spec: Value = reqwest::get(query.url("/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cache = ViewCache::new(
        &redis_url(),
        env.redis_prefix.clone(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .unwrap();

    let rosa = register(&http, &command, "rosa").await.id;
    let theo = register(&http, &command, "theo").await.id;
    // A registration that mailed a verification code, as the command API
    // will append it: the code sealed in the payload.
    let lena = Uuid::new_v4();
    append(
        &env.pool,
        lena,
        0,
        &[(
            "UserRegistered",
            json!({
                "username": "lena", "email": "lena@example.com", "password_hash": HASH,
                "sealed_code": SEALED[0], "code_expires_at": "2031-01-01T00:00:00Z",
            }),
        )],
    )
    .await;
    for id in [rosa, theo, lena] {
        let fresh = await_version(&http, &query, id, 1).await;
        assert_eq!(fresh["email_verified"], false);
        assert_eq!(
            fresh["profile"],
            json!({ "display_name": null, "locale": null, "time_zone": null, "preferences": {} })
        );
        // Cached now, so every later batch rewrites the Redis entry too.
        cached_body(&env, &cache, &query, id, 1).await;
    }

    // Rosa sets a profile (text that COPY and JSON must escape), changes it
    // (each event carries the whole profile), then verifies a new address.
    let profile = json!({
        "display_name": "Rosa \"R\" P\\érez\tjr",
        "locale": "es-MX",
        "time_zone": null,
        "preferences": {
            "theme": "dark", "digest": true, "page_size": 50, "ratio": 0.75,
            "quote": "line\nbreak",
        },
    });
    append(
        &env.pool,
        rosa,
        1,
        &[
            (
                "ProfileChanged",
                json!({ "display_name": "Rosa", "locale": null, "time_zone": "UTC",
                        "preferences": { "theme": "light" } }),
            ),
            ("ProfileChanged", profile.clone()),
            (
                "EmailVerificationRequested",
                json!({ "email": "rosa@new.example", "sealed_code": SEALED[1],
                        "expires_at": "2031-01-01T00:00:00Z" }),
            ),
            ("EmailCodeFailed", json!({})),
            ("EmailVerified", json!({ "email": "rosa@new.example" })),
        ],
    )
    .await;
    // Theo is locked out, and lifts the lock with a reset by mail.
    append(
        &env.pool,
        theo,
        1,
        &[
            ("UserLocked", json!({ "until": "2031-02-03T04:05:06Z" })),
            (
                "PasswordResetRequested",
                json!({ "email": "theo@example.com", "sealed_code": SEALED[2],
                        "expires_at": "2031-01-01T00:00:00Z" }),
            ),
            ("PasswordResetFailed", json!({})),
        ],
    )
    .await;
    let locked = await_version(&http, &query, theo, 4).await;
    assert_eq!(locked["locked_until"], "2031-02-03T04:05:06Z");
    append(
        &env.pool,
        theo,
        4,
        &[("PasswordReset", json!({ "password_hash": HASH }))],
    )
    .await;
    // Lena verifies the address she registered with.
    append(
        &env.pool,
        lena,
        1,
        &[("EmailVerified", json!({ "email": "lena@example.com" }))],
    )
    .await;

    // The public form of the log has no code; the log itself still has them.
    let public: Vec<Value> = sqlx::query_scalar("SELECT payload FROM events_public")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_no_sealed_code("events_public", &json!(public).to_string());
    let sealed_in_log: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE payload ? 'sealed_code'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    // Three appended here, and one in each of the two registrations made
    // through the command API.
    assert_eq!(sealed_in_log, 5);

    // Served from PostgreSQL and from Redis, by id and in lists, as documented.
    let expected = [
        (
            rosa,
            6,
            "rosa@new.example",
            true,
            profile.clone(),
            Value::Null,
        ),
        (
            theo,
            5,
            "theo@example.com",
            false,
            json!({ "display_name": null, "locale": null, "time_zone": null, "preferences": {} }),
            Value::Null,
        ),
        (
            lena,
            2,
            "lena@example.com",
            true,
            json!({ "display_name": null, "locale": null, "time_zone": null, "preferences": {} }),
            Value::Null,
        ),
    ];
    let mut served_views = Vec::new();
    for (id, version, email, verified, profile, locked_until) in &expected {
        await_version(&http, &query, *id, i64::from(*version)).await;
        let cached = cached_body(&env, &cache, &query, *id, *version).await;
        let served = get_documented(&query, &spec, "/users/{id}", &format!("/users/{id}")).await;
        assert_eq!(served["email"], *email, "{served}");
        assert_eq!(served["email_verified"], *verified, "{served}");
        assert_eq!(served["profile"], *profile, "{served}");
        assert_eq!(served["locked_until"], *locked_until, "{served}");
        assert_eq!(cached, served, "Redis holds what is served");
        assert_no_sealed_code("an answer", &served.to_string());
        let page = get_documented(&query, &spec, "/users", &format!("/users?email={email}")).await;
        assert_eq!(page["items"], json!([served]));
        served_views.push(served);
    }
    // The swapped address is Rosa's now; the old one finds nobody.
    let old = get_documented(&query, &spec, "/users", "/users?email=rosa@example.com").await;
    assert_eq!(old["items"], json!([]));
    let page = get_documented(&query, &spec, "/users", "/users?status=active").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3, "{page}");
    assert_no_sealed_code("a page", &page.to_string());

    // On the topic, every event in its contract (the schemas of
    // events/schema), without a code or a hash.
    let messages = read_topic(&env.topic, DEADLINE, |seen| seen.len() >= 13).await;
    let types = |id: Uuid| -> Vec<String> {
        messages
            .iter()
            .filter(|m| m.key.as_deref() == Some(id.to_string().as_str()))
            .map(|m| m.headers["ce_type"].clone())
            .collect()
    };
    assert_eq!(
        types(rosa),
        [
            "user.registered.v1",
            "user.profile_changed.v1",
            "user.profile_changed.v1",
            "user.email_verification_requested.v1",
            "user.email_code_failed.v1",
            "user.email_verified.v1",
        ]
    );
    assert_eq!(
        types(theo),
        [
            "user.registered.v1",
            "user.locked.v1",
            "user.password_reset_requested.v1",
            "user.password_reset_failed.v1",
            "user.password_reset.v1",
        ]
    );
    assert_eq!(
        types(lena),
        ["user.registered.v1", "user.email_verified.v1"]
    );
    for message in &messages {
        let problems = contract_violations(message);
        assert!(problems.is_empty(), "{problems:?} in {message:?}");
        assert!(!message.raw.contains("$argon2"), "{}", message.raw);
        assert_no_sealed_code("a message", &message.raw);
    }
    let profile_message = messages
        .iter()
        .rfind(|m| m.headers["ce_type"] == "user.profile_changed.v1")
        .unwrap();
    assert_eq!(profile_message.body["data"], profile);

    // No code in a row or in Redis.
    let rows = stored_rows(&env.pool).await;
    assert_eq!(rows.len(), 3);
    assert_no_sealed_code("user_views", &json!(rows).to_string());
    let values = redis_values(&env).await;
    assert!(!values.is_empty());
    for value in &values {
        assert_no_sealed_code("Redis", value);
    }

    // `projector verify` compares the new columns in PostgreSQL and Redis.
    let clean = verify(&env).await;
    clean.assert_success();
    assert!(clean.stdout.contains("0 difference(s)"), "{clean}");
    assert!(
        !clean.stdout.contains("not compared"),
        "Redis compared: {clean}"
    );
    sqlx::query(
        "UPDATE user_views SET email_verified = false, display_name = 'Rosa', \
                preferences = preferences || '{\"theme\": \"light\"}' WHERE id = $1",
    )
    .bind(rosa)
    .execute(&env.pool)
    .await
    .unwrap();
    let tampered = verify(&env).await;
    assert!(!tampered.status.success(), "{tampered}");
    let line = tampered
        .stdout
        .lines()
        .find(|l| l.contains(&rosa.to_string()))
        .unwrap_or_else(|| panic!("no line names rosa:\n{tampered}"));
    for what in [
        "email_verified false (log: true)",
        r#"profile.display_name Some("Rosa") (log: Some("#,
        r#""theme":"light""#,
    ] {
        assert!(line.contains(what), "{what} in {line}");
    }
    assert!(!line.contains("profile.locale"), "{line}");
    assert!(tampered.stdout.contains("1 difference(s)"), "{tampered}");

    // `projector rebuild` reproduces every row from the log, the tampered
    // one as it was before.
    let rebuilt = env
        .run(Service::Projector, &["rebuild"], &[], COMMAND_DEADLINE)
        .await;
    rebuilt.assert_success();
    assert_eq!(stored_rows(&env.pool).await, rows);
    let after = verify(&env).await;
    after.assert_success();
    assert!(after.stdout.contains("0 difference(s)"), "{after}");
    // Lists read PostgreSQL: the rebuilt table, served.
    for served in &served_views {
        let email = served["email"].as_str().unwrap();
        let page = get_documented(&query, &spec, "/users", &format!("/users?email={email}")).await;
        assert_eq!(page["items"], json!([served]));
    }
}

async fn verify(env: &TestEnv) -> userstream_tests::Finished {
    env.run(Service::Projector, &["verify"], &[], COMMAND_DEADLINE)
        .await
}

/// Invariant 10 for mailed codes: the read side's roles reach the log only
/// through `events_public`, which has no sealed code, and cannot read the
/// notifier's `mail_codes`.
#[tokio::test]
async fn the_read_side_roles_cannot_read_a_sealed_code() {
    use sqlx::Connection;
    use userstream_tests::Role;

    let env = TestEnv::new().await;
    let user = Uuid::new_v4();
    append(
        &env.pool,
        user,
        0,
        &[
            (
                "UserRegistered",
                json!({
                    "username": "mira", "email": "mira@example.com", "password_hash": HASH,
                    "sealed_code": SEALED[0], "code_expires_at": "2031-01-01T00:00:00Z",
                }),
            ),
            (
                "EmailVerificationRequested",
                json!({ "email": "mira@new.example", "sealed_code": SEALED[1],
                        "expires_at": "2031-01-01T00:00:00Z" }),
            ),
            (
                "PasswordResetRequested",
                json!({ "email": "mira@example.com", "sealed_code": SEALED[2],
                        "expires_at": "2031-01-01T00:00:00Z" }),
            ),
        ],
    )
    .await;
    let mut projector = sqlx::PgConnection::connect(&env.url_as(Role::Projector))
        .await
        .unwrap();
    let payloads: Vec<String> =
        sqlx::query_scalar("SELECT payload::text FROM events_public ORDER BY global_position")
            .fetch_all(&mut projector)
            .await
            .unwrap();
    assert_eq!(payloads.len(), 3);
    for payload in &payloads {
        assert_no_sealed_code("events_public", payload);
    }
    // The rest of the public data is all there.
    assert!(payloads[1].contains("mira@new.example"), "{payloads:?}");
    for role in [Role::Projector, Role::Query] {
        let mut conn = sqlx::PgConnection::connect(&env.url_as(role))
            .await
            .unwrap();
        let error = sqlx::query("SELECT sealed_code FROM mail_codes")
            .execute(&mut conn)
            .await
            .expect_err("the read side may not read mail_codes");
        assert_eq!(
            error.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("42501"),
            "{} reads mail_codes: {error}",
            role.name()
        );
    }
}
