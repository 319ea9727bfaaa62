//! Roles and locks on the read side, with the real binaries on the real
//! stack. Identity events are appended straight to the log (so that every
//! kind is covered whatever the commands decide): the relay publishes them in their contract, the
//! projector folds them into `user_views` and the cached Redis views, the
//! query API serves them as documented, `projector verify` compares them, and
//! `projector rebuild` reproduces them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use read_model::ViewCache;
use serde_json::{json, Value};
use userstream_tests::read_side::{
    append_raw as append, await_version, cached_body, get_documented, register,
};
use userstream_tests::{contract_violations, read_topic, redis_url, Service, TestEnv};
use uuid::Uuid;

/// A `user_views` row's id, version, roles and lock.
type StoredIdentity = (Uuid, i32, Vec<String>, Option<DateTime<Utc>>);

const DEADLINE: Duration = Duration::from_secs(60);
const COMMAND_DEADLINE: Duration = Duration::from_secs(180);

/// A logged hash, as a password change or a rehash records it.
const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA";

#[tokio::test]
async fn roles_and_locks_are_projected_served_verified_and_rebuilt() {
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
    for id in [rosa, theo] {
        let fresh = await_version(&http, &query, id, 1).await;
        assert_eq!(
            (&fresh["roles"], &fresh["locked_until"]),
            (&json!([]), &Value::Null)
        );
        // Cached now, so every later batch rewrites the Redis entry too.
        cached_body(&env, &cache, &query, id, 1).await;
    }

    // The lock's end carries nanoseconds, as a payload may; the read model
    // keeps microseconds, the same in every store.
    append(
        &env.pool,
        rosa,
        1,
        &[
            ("RoleGranted", json!({ "role": "support" })),
            ("RoleGranted", json!({ "role": "admin" })),
            ("PasswordCheckFailed", json!({})),
            ("PasswordCheckFailed", json!({})),
            (
                "UserLocked",
                json!({ "until": "2031-02-03T04:05:06.123456789Z" }),
            ),
            ("RoleRevoked", json!({ "role": "support" })),
            ("RoleGranted", json!({ "role": "auditor" })),
            ("PasswordRehashed", json!({ "password_hash": HASH })),
        ],
    )
    .await;
    append(
        &env.pool,
        theo,
        1,
        &[
            ("RoleGranted", json!({ "role": "ops" })),
            ("UserLocked", json!({ "until": "2030-01-01T00:00:00Z" })),
            ("UserUnlocked", json!({ "reason": "called the help desk" })),
            ("PasswordCheckSucceeded", json!({})),
            ("PasswordChanged", json!({ "password_hash": HASH })),
        ],
    )
    .await;
    let rosa_until = "2031-02-03T04:05:06.123456Z";
    let expected = [
        (rosa, 9, json!(["admin", "auditor"]), json!(rosa_until)),
        (theo, 6, json!(["ops"]), Value::Null),
    ];

    // Served from PostgreSQL and from Redis, by id and in lists, as documented.
    for (id, version, roles, locked_until) in &expected {
        await_version(&http, &query, *id, i64::from(*version)).await;
        let cached = cached_body(&env, &cache, &query, *id, *version).await;
        let served = get_documented(&query, &spec, "/users/{id}", &format!("/users/{id}")).await;
        assert_eq!(
            (&served["roles"], &served["locked_until"]),
            (roles, locked_until)
        );
        assert_eq!(cached, served, "Redis holds what is served");
        let username = served["username"].as_str().unwrap();
        let page = get_documented(
            &query,
            &spec,
            "/users",
            &format!("/users?username={username}"),
        )
        .await;
        assert_eq!(page["items"], json!([served]));
    }
    let page = get_documented(&query, &spec, "/users", "/users?status=active").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");

    // On the topic, every identity event in its contract, without a hash.
    let messages = read_topic(&env.topic, DEADLINE, |seen| seen.len() >= 15).await;
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
            "user.role_granted.v1",
            "user.role_granted.v1",
            "user.password_check_failed.v1",
            "user.password_check_failed.v1",
            "user.locked.v1",
            "user.role_revoked.v1",
            "user.role_granted.v1",
            "user.password_rehashed.v1",
        ]
    );
    assert_eq!(
        types(theo),
        [
            "user.registered.v1",
            "user.role_granted.v1",
            "user.locked.v1",
            "user.unlocked.v1",
            "user.password_check_succeeded.v1",
            "user.password_changed.v1",
        ]
    );
    for message in &messages {
        let problems = contract_violations(message);
        assert!(problems.is_empty(), "{problems:?} in {message:?}");
        assert!(!message.raw.contains("$argon2"), "{}", message.raw);
    }

    // `projector verify` compares the new columns in PostgreSQL and Redis.
    let clean = verify(&env).await;
    clean.assert_success();
    assert!(clean.stdout.contains("0 difference(s)"), "{clean}");
    sqlx::query("UPDATE user_views SET roles = '{support}', locked_until = NULL WHERE id = $1")
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
    assert!(
        line.contains(r#"roles ["support"] (log: ["admin", "auditor"])"#),
        "{line}"
    );
    assert!(
        line.contains("locked_until null (log: 2031-02-03T04:05:06.123456+00:00)"),
        "{line}"
    );
    assert!(tampered.stdout.contains("1 difference(s)"), "{tampered}");

    // `projector rebuild` reproduces both users from the log.
    let rebuilt = env
        .run(Service::Projector, &["rebuild"], &[], COMMAND_DEADLINE)
        .await;
    rebuilt.assert_success();
    let rows: Vec<StoredIdentity> =
        sqlx::query_as("SELECT id, version, roles, locked_until FROM user_views ORDER BY username")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            (
                rosa,
                9,
                vec!["admin".to_owned(), "auditor".to_owned()],
                Some(rosa_until.parse().unwrap())
            ),
            (theo, 6, vec!["ops".to_owned()], None),
        ]
    );
    let after = verify(&env).await;
    after.assert_success();
    assert!(after.stdout.contains("0 difference(s)"), "{after}");
    // Lists read PostgreSQL: the rebuilt table, served.
    let page = get_documented(&query, &spec, "/users", "/users?username=rosa").await;
    assert_eq!(
        (
            &page["items"][0]["roles"],
            &page["items"][0]["locked_until"]
        ),
        (&expected[0].2, &expected[0].3)
    );
}

async fn verify(env: &TestEnv) -> userstream_tests::Finished {
    env.run(Service::Projector, &["verify"], &[], COMMAND_DEADLINE)
        .await
}
