//! The walking skeleton, end to end on the real stack: register → log → Kafka
//! → projector → query API, with the three real binaries.

use std::time::Duration;

use serde_json::{json, Value};
use userstream_tests::{contract_violations, eventually, read_topic, Service, TestEnv};

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_registered_then_deactivated_user_reaches_the_query_api_and_the_topic() {
    let env = TestEnv::new().await;
    let command = env.spawn(Service::CommandApi, &[]).await;
    let projector = env.spawn(Service::Projector, &[]).await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let http = reqwest::Client::new();
    let password = "correct horse battery staple";

    let registered = http
        .post(command.url("/users"))
        .json(&json!({ "username": "  Skeleton_User ", "email": "Skeleton@Example.com", "password": password }))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let location = registered.headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    let registered: Value = registered.json().await.unwrap();
    let id = registered["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/users/{id}"));
    assert_eq!(registered["version"], 1);
    assert!(registered["position"].as_i64().unwrap() >= 1);

    let token = userstream_tests::identity::admin_token(&http, &command).await;
    let deactivated = http
        .post(command.url(&format!("/users/{id}/deactivate")))
        .bearer_auth(token)
        .json(&json!({ "reason": "end-to-end test" }))
        .send()
        .await
        .unwrap();
    assert_eq!(deactivated.status(), 200);
    let deactivated: Value = deactivated.json().await.unwrap();
    assert_eq!(deactivated["version"], 2);
    assert!(deactivated["position"].as_i64() > registered["position"].as_i64());

    // Read side: eventually consistent, so poll until the view catches up.
    let view: Value = eventually("the query API to show the deactivation", DEADLINE, || {
        let http = http.clone();
        let url = query.url(&format!("/users/{id}"));
        async move {
            let response = http.get(url).send().await.ok()?;
            if response.status() != 200 {
                return None;
            }
            let view: Value = response.json().await.ok()?;
            (view["status"] == "deactivated").then_some(view)
        }
    })
    .await;
    assert_eq!(view["id"], id.as_str());
    assert_eq!(view["username"], "skeleton_user");
    assert_eq!(view["email"], "skeleton@example.com");
    assert_eq!(view["version"], 2);

    // The topic holds both events, keyed by the user id, in version order.
    let messages = read_topic(&env.topic, DEADLINE, |seen| {
        seen.iter()
            .filter(|m| m.key.as_deref() == Some(id.as_str()))
            .count()
            >= 2
    })
    .await;
    let mine: Vec<_> = messages
        .iter()
        .filter(|m| m.key.as_deref() == Some(id.as_str()))
        .collect();
    let types: Vec<_> = mine.iter().map(|m| m.headers["ce_type"].as_str()).collect();
    assert_eq!(types, ["user.registered.v1", "user.deactivated.v1"]);
    for message in &mine {
        let problems = contract_violations(message);
        assert!(problems.is_empty(), "{problems:?} in {message:?}");
    }
    for (message, version) in mine.iter().zip(1..) {
        assert_eq!(message.headers["ce_specversion"], "1.0");
        assert_eq!(message.headers["ce_subject"], id);
        assert_eq!(message.headers["content-type"], "application/json");
        assert_eq!(message.body["user_id"], id.as_str());
        assert_eq!(message.body["stream_version"], version);
    }
    assert_eq!(mine[0].body["data"]["username"], "skeleton_user");
    assert_eq!(mine[1].body["data"]["reason"], "end-to-end test");

    // The password and its hash stay on the write side.
    for message in &messages {
        let everything = format!("{:?} {}", message.headers, message.raw);
        assert!(
            !everything.contains("$argon2"),
            "hash leaked to Kafka: {everything}"
        );
        assert!(!everything.contains(password), "password leaked to Kafka");
    }
    let stored: String = sqlx::query_scalar(
        "SELECT payload->>'password_hash' FROM events WHERE stream_id = $1::uuid AND stream_version = 1",
    )
    .bind(&id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(stored.starts_with("$argon2id$"), "the log keeps the hash");
    for service in [&command, &projector, &query] {
        for line in service.logs() {
            assert!(
                !line.contains("$argon2"),
                "{:?} logged the hash: {line}",
                service.service
            );
            assert!(
                !line.contains(password),
                "{:?} logged the password",
                service.service
            );
        }
    }
}

#[tokio::test]
async fn services_stop_cleanly_on_sigterm() {
    let env = TestEnv::new().await;
    for service in [Service::CommandApi, Service::Projector, Service::QueryApi] {
        let running = env.spawn(service, &[]).await;
        let status = running.stop().await;
        assert!(status.success(), "{service:?} exited with {status}");
    }
}

#[tokio::test]
async fn roles_locks_and_password_changes_reach_the_query_api_and_the_topic_without_secrets() {
    use userstream_tests::identity::{make_admin, password_grant, register, PASSWORD};
    use userstream_tests::read_side::await_version;
    let env = TestEnv::new().await;
    let command = env
        .spawn(Service::CommandApi, &[("LOCKOUT_MAX_FAILURES", "2")])
        .await;
    let projector = env.spawn(Service::Projector, &[]).await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let http = reqwest::Client::new();
    let admin = make_admin(&http, &command).await;
    let id = register(&http, &command, "locksmith").await;
    let granted = http
        .post(command.url(&format!("/users/{id}/roles")))
        .bearer_auth(&admin.token)
        .json(&json!({ "role": "support" }))
        .send()
        .await
        .unwrap();
    assert_eq!(granted.status(), 200);
    let (_, tokens) = password_grant(&http, &command, "locksmith", PASSWORD).await;
    let new_password = "another long passphrase";
    let changed = http
        .post(command.url(&format!("/users/{id}/password")))
        .bearer_auth(tokens["access_token"].as_str().unwrap())
        .json(&json!({ "current_password": PASSWORD, "new_password": new_password }))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    for _ in 0..2 {
        password_grant(&http, &command, "locksmith", "not the password").await;
    }
    let (_, tokens) = password_grant(&http, &command, "locksmith", new_password).await;
    assert_eq!(tokens["error"], "invalid_grant", "locked");
    let (locked_until, version): (String, i32) = sqlx::query_as(
        "SELECT payload->>'until', stream_version FROM events WHERE stream_id = $1 AND event_type = 'UserLocked'",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap();

    // The projector's new consumer group may still be waiting for its
    // partitions (the broker's initial rebalance delay), longer than a
    // `min_version` read waits: poll until the view reaches the lock.
    let view = await_version(&http, &query, id, version.into()).await;
    assert_eq!(view["roles"], json!(["support"]));
    let shown: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(view["locked_until"].clone()).unwrap();
    let logged: chrono::DateTime<chrono::Utc> = locked_until.parse().unwrap();
    assert_eq!(shown, logged);
    assert_eq!(view["version"], version);

    let key = id.to_string();
    let messages = read_topic(&env.topic, DEADLINE, |seen| {
        seen.iter()
            .filter(|m| m.key.as_deref() == Some(key.as_str()))
            .count()
            >= version as usize
    })
    .await;
    let types: Vec<&str> = messages
        .iter()
        .filter(|m| m.key.as_deref() == Some(key.as_str()))
        .map(|m| m.headers["ce_type"].as_str())
        .collect();
    assert_eq!(
        types,
        [
            "user.registered.v1",
            "user.role_granted.v1",
            "user.password_changed.v1",
            "user.password_check_failed.v1",
            "user.password_check_failed.v1",
            "user.locked.v1"
        ]
    );
    for message in &messages {
        let problems = contract_violations(message);
        assert!(problems.is_empty(), "{problems:?} in {message:?}");
        let everything = format!("{:?} {}", message.headers, message.raw);
        assert!(!everything.contains("$argon2") && !everything.contains(PASSWORD));
        assert!(!everything.contains(new_password));
        assert!(!everything.contains(&admin.token), "a token on the topic");
    }
    // Nor in the read model, its Redis entries or what the query API serves.
    let rows: Vec<String> = sqlx::query_scalar("SELECT row_to_json(v)::text FROM user_views v")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    let mut redis = redis::Client::open(userstream_tests::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", env.redis_prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the read filled the cache");
    let mut cached = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let parts: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap()],
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap(),
            other => panic!("{key} is a {other}: look inside it too"),
        };
        cached.extend(
            parts
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
        );
    }
    for text in rows.iter().chain(&cached).chain([&view.to_string()]) {
        assert!(
            !text.contains("$argon2") && !text.contains("password_hash"),
            "{text}"
        );
    }
    for service in [&command, &projector, &query] {
        for line in service.logs() {
            assert!(
                !line.contains(&admin.token),
                "{:?} logged a token",
                service.service
            );
        }
    }
}
