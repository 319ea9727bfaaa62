//! The query API on the real binary: views from PostgreSQL and Redis, ETags,
//! errors, Redis being unreachable, and every answer checked against its own
//! /openapi.json.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use events::{Profile, UserStatus, UserView};
use read_model::{Lookup, ViewRows};
use serde_json::Value;
use userstream_tests::read_side::open_namespace;
use userstream_tests::{eventually, schema_errors, Running, Service, TestEnv};
use uuid::Uuid;

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn get(query: &Running, spec: &Value, path: &str, etag: Option<&str>) -> Answer {
    let mut request = reqwest::Client::new().get(query.url(path));
    if let Some(etag) = etag {
        request = request.header("if-none-match", etag);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let documented = &spec["paths"]["/users/{id}"]["get"]["responses"][status.to_string()];
    assert!(
        !documented.is_null(),
        "GET {path} answered {status}, undocumented"
    );
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status != 304 {
        let errors = schema_errors(spec, documented, &body);
        assert!(errors.is_empty(), "GET {path} {status}: {errors:?} {text}");
    }
    Answer {
        status,
        headers,
        body,
    }
}

async fn spec(query: &Running) -> Value {
    reqwest::get(query.url("/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The lock of [`stored_view`], at the microseconds PostgreSQL keeps.
const LOCKED_UNTIL: &str = "2031-02-03T04:05:06.123456Z";

/// A view of "quinn", with roles and a lock, written straight into `user_views`.
async fn stored_view(env: &TestEnv) -> UserView {
    let view = UserView {
        id: Uuid::new_v4(),
        username: "quinn".into(),
        email: "quinn@example.com".into(),
        status: UserStatus::Active,
        version: 1,
        registered_at: Utc::now(),
        updated_at: Utc::now(),
        roles: vec!["admin".into(), "support".into()],
        locked_until: Some(LOCKED_UNTIL.parse().unwrap()),
        email_verified: true,
        profile: Profile {
            display_name: Some("Quinn \"Q\" O'Neil".into()),
            locale: Some("en-IE".into()),
            time_zone: None,
            preferences: [
                ("digest".to_owned(), serde_json::json!(false)),
                ("page_size".to_owned(), serde_json::json!(50)),
            ]
            .into(),
        },
    };
    assert!(ViewRows::new(env.pool.clone())
        .store_next(&view)
        .await
        .unwrap());
    view
}

#[tokio::test]
async fn a_view_is_read_from_postgres_cached_in_redis_and_revalidated_by_etag() {
    let env = TestEnv::new().await;
    let view = stored_view(&env).await;
    let (cache, ns) = open_namespace(&env).await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let spec = spec(&query).await;
    let path = format!("/users/{}", view.id);

    let first = get(&query, &spec, &path, None).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["etag"], "\"1\"");
    assert_eq!(first.body["username"], "quinn");
    assert_eq!(first.body["status"], "active");
    assert_eq!(first.body["roles"], serde_json::json!(["admin", "support"]));
    assert_eq!(first.body["locked_until"], LOCKED_UNTIL);
    assert_eq!(first.body["email_verified"], true);
    assert_eq!(
        first.body["profile"],
        serde_json::json!({
            "display_name": "Quinn \"Q\" O'Neil", "locale": "en-IE", "time_zone": null,
            "preferences": { "digest": false, "page_size": 50 }
        })
    );

    // The miss filled Redis, through the version-guarded write.
    let cached = eventually("the cache fill", Duration::from_secs(10), || async {
        match cache.get(ns, view.id, 0).await.unwrap() {
            Lookup::Hit(cached) => Some(cached),
            _ => None,
        }
    })
    .await;
    assert_eq!(cached.version, 1);
    let cached: Value = serde_json::from_str(&cached.body).unwrap();
    assert_eq!(cached, first.body, "Redis holds the whole view");
    let second = get(&query, &spec, &path, None).await;
    assert_eq!((second.status, &second.body), (200, &first.body));

    let unchanged = get(&query, &spec, &path, Some("\"1\"")).await;
    assert_eq!(unchanged.status, 304);
    let changed = get(&query, &spec, &path, Some("\"0\"")).await;
    assert_eq!(changed.status, 200);
}

#[tokio::test]
async fn unknown_and_invalid_ids_get_clear_errors() {
    let env = TestEnv::new().await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let spec = spec(&query).await;
    let unknown = get(&query, &spec, &format!("/users/{}", Uuid::new_v4()), None).await;
    assert_eq!(
        (unknown.status, unknown.body["error"]["code"].as_str()),
        (404, Some("user_not_found"))
    );
    let invalid = get(&query, &spec, "/users/not-a-uuid", None).await;
    assert_eq!(
        (invalid.status, invalid.body["error"]["code"].as_str()),
        (400, Some("invalid_id"))
    );
}

#[tokio::test]
async fn answers_still_come_from_postgres_when_redis_is_unreachable() {
    let env = TestEnv::new().await;
    let view = stored_view(&env).await;
    // A namespace is named, so the query API tries Redis first.
    sqlx::query("UPDATE projection_state SET cache_epoch = 1")
        .execute(&env.pool)
        .await
        .unwrap();
    // Nothing listens on port 1: every Redis call fails at once.
    let query = env
        .spawn(Service::QueryApi, &[("REDIS_URL", "redis://127.0.0.1:1")])
        .await;
    let spec = spec(&query).await;
    for _ in 0..3 {
        let answer = get(&query, &spec, &format!("/users/{}", view.id), None).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body["email"], "quinn@example.com");
    }
    let readyz = reqwest::get(query.url("/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 200, "still ready: Redis is optional");
    let readyz: Value = readyz.json().await.unwrap();
    assert!(
        readyz["checks"]["redis"]["detail"]["degraded"].is_string(),
        "{readyz}"
    );
    let metrics = reqwest::get(query.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("query_cache_total{result=\"error\"}")),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_query_api_documents_exactly_the_routes_it_serves() {
    let env = TestEnv::new().await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let spec = spec(&query).await;
    let paths: BTreeSet<&str> = spec["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        paths,
        BTreeSet::from([
            "/users",
            "/users/{id}",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json"
        ])
    );
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let status = reqwest::get(query.url(path))
            .await
            .unwrap()
            .status()
            .as_u16()
            .to_string();
        assert!(
            !spec["paths"][path]["get"]["responses"][&status].is_null(),
            "GET {path} {status}"
        );
    }
}

/// GETs `path` and checks the answer against `GET /users`'s documented
/// responses; returns the status and the body.
async fn list(query: &Running, spec: &Value, path: &str) -> (u16, Value) {
    let response = reqwest::get(query.url(path)).await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let documented = &spec["paths"]["/users"]["get"]["responses"][status.to_string()];
    assert!(
        !documented.is_null(),
        "GET {path} answered {status}, undocumented"
    );
    let errors = schema_errors(spec, documented, &body);
    assert!(errors.is_empty(), "GET {path} {status}: {errors:?} {body}");
    (status, body)
}

fn view(name: &str, status: UserStatus, version: i32) -> UserView {
    UserView {
        id: Uuid::new_v4(),
        username: name.into(),
        email: format!("{name}@example.com"),
        status,
        version,
        registered_at: Utc::now(),
        updated_at: Utc::now(),
        roles: Vec::new(),
        locked_until: None,
        email_verified: false,
        profile: Profile::default(),
    }
}

#[tokio::test]
async fn users_are_looked_up_by_username_or_email_as_normalised() {
    let env = TestEnv::new().await;
    let stored = stored_view(&env).await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let spec = spec(&query).await;
    for path in [
        "/users?username=quinn",
        "/users?username=%20QuInN%20",
        "/users?email=Quinn%40Example.com",
    ] {
        let (status, body) = list(&query, &spec, path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(body["items"].as_array().unwrap().len(), 1, "{path}");
        assert_eq!(body["items"][0]["id"], stored.id.to_string());
        assert_eq!(
            body["items"][0]["roles"],
            serde_json::json!(["admin", "support"])
        );
        assert_eq!(body["items"][0]["locked_until"], LOCKED_UNTIL);
        assert!(body["next"].is_null());
    }
    // Filters combine: every one given must match.
    for (path, found) in [
        ("/users?username=nobody", 0),
        (
            "/users?username=quinn&email=quinn%40example.com&status=active",
            1,
        ),
        ("/users?username=quinn&status=deactivated", 0),
        ("/users?username=quinn&email=other%40example.com", 0),
        ("/users?email=QUINN%40example.com&limit=1", 1),
        ("/users?email=qu%00inn%40example.com", 0),
    ] {
        let (status, body) = list(&query, &spec, path).await;
        let items = body["items"].as_array().unwrap().len();
        assert_eq!((status, items), (200, found), "{path}");
    }
    for (path, code) in [
        ("/users?username=", "invalid_query"),
        ("/users?nickname=quinn", "invalid_query"),
        ("/users?status=asleep", "invalid_query"),
        ("/users?limit=0", "invalid_query"),
        ("/users?limit=501", "invalid_query"),
        ("/users?limit=ten", "invalid_query"),
        ("/users?after=not-a-cursor", "invalid_cursor"),
    ] {
        let (status, body) = list(&query, &spec, path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some(code)),
            "{path}"
        );
    }
}

/// Pages of active users are walked while new users arrive and other users
/// change status: every user that stayed active is seen exactly once, in id
/// order, and no page repeats a user.
#[tokio::test]
async fn keyset_pages_stay_stable_while_users_are_added_and_change_status() {
    let env = TestEnv::new().await;
    let rows = ViewRows::new(env.pool.clone());
    let mut steady = BTreeSet::new();
    let mut flipping = Vec::new();
    for i in 0..90 {
        let status = if i % 3 == 0 {
            UserStatus::Deactivated
        } else {
            UserStatus::Active
        };
        let v = view(&format!("page{i}"), status, 1);
        assert!(rows.store_next(&v).await.unwrap());
        if i % 5 == 0 {
            flipping.push(v);
        } else if status == UserStatus::Active {
            steady.insert(v.id.to_string());
        }
    }
    let query = env.spawn(Service::QueryApi, &[]).await;
    let spec = spec(&query).await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            Some(cursor) => format!("/users?status=active&limit=7&after={cursor}"),
            None => "/users?status=active&limit=7".to_owned(),
        };
        let (status, body) = list(&query, &spec, &path).await;
        assert_eq!(status, 200, "{body}");
        let items = body["items"].as_array().unwrap();
        assert!(items.len() <= 7);
        for item in items {
            assert_eq!(item["status"], "active");
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        pages += 1;
        // Between pages: a user arrives, and the flipping users change status.
        assert!(rows
            .store_next(&view(&format!("late{pages}"), UserStatus::Active, 1))
            .await
            .unwrap());
        for v in &mut flipping {
            v.version += 1;
            v.status = match v.status {
                UserStatus::Active => UserStatus::Deactivated,
                UserStatus::Deactivated => UserStatus::Active,
            };
            assert!(rows.store_next(v).await.unwrap());
        }
        match body["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    let distinct: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(distinct.len(), seen.len(), "no user twice");
    let mut sorted = seen.clone();
    sorted.sort_by_key(|id| Uuid::parse_str(id).unwrap());
    assert_eq!(sorted, seen, "in id order");
    let missing: Vec<&String> = steady.difference(&distinct).collect();
    assert!(missing.is_empty(), "steady users skipped: {missing:?}");
    assert!(pages > 5, "{pages} pages");
}

#[tokio::test]
async fn with_a_query_api_token_reads_need_it_and_operations_do_not() {
    let env = TestEnv::new().await;
    let stored = stored_view(&env).await;
    let token = "query-token-for-tests-only";
    let query = env
        .spawn(Service::QueryApi, &[("QUERY_API_TOKEN", token)])
        .await;
    let http = reqwest::Client::new();
    for path in [
        format!("/users/{}", stored.id),
        "/users?username=quinn".into(),
    ] {
        for presented in [None, Some("wrong-token-of-enough-length"), Some("")] {
            let mut request = http.get(query.url(&path));
            if let Some(presented) = presented {
                request = request.bearer_auth(presented);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{path} with {presented:?}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthenticated");
        }
        let response = http
            .get(query.url(&path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let status = http.get(query.url(path)).send().await.unwrap().status();
        assert_eq!(status, 200, "{path}");
    }
    // A token too short to be one is refused at start-up.
    let (status, printed) = env
        .start_refused(Service::QueryApi, &[("QUERY_API_TOKEN", "short")])
        .await;
    assert!(!status.success());
    assert!(printed.contains("QUERY_API_TOKEN"), "{printed}");
    assert!(
        !printed.contains("short"),
        "the token is not printed: {printed}"
    );
}

/// Fifty concurrent misses for one user are one PostgreSQL read.
/// Holds every read of `user_views` back until the transaction ends.
async fn lock_views(env: &TestEnv) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = env.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE user_views IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    lock
}

/// No Redis (nothing listens on port 1): every read misses, with `pool`
/// PostgreSQL connections.
async fn without_redis(env: &TestEnv, pool: &str) -> Running {
    env.spawn(
        Service::QueryApi,
        &[
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("DATABASE_MAX_CONNECTIONS", pool),
        ],
    )
    .await
}

#[tokio::test]
async fn concurrent_misses_for_one_user_are_one_postgres_read() {
    let env = TestEnv::new().await;
    let stored = stored_view(&env).await;
    // No Redis (nothing listens on port 1): every read misses.
    let query = env
        .spawn(Service::QueryApi, &[("REDIS_URL", "redis://127.0.0.1:1")])
        .await;
    // The reads wait on this lock until all fifty have missed.
    let lock = lock_views(&env).await;
    let http = reqwest::Client::new();
    let url = query.url(&format!("/users/{}", stored.id));
    let reads: Vec<_> = (0..50)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { http.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    eventually("fifty reads to miss", Duration::from_secs(20), || async {
        (query.metric("query_cache_total").await >= 50.0).then_some(())
    })
    .await;
    lock.rollback().await.unwrap();
    for read in reads {
        assert_eq!(read.await.unwrap(), 200);
    }
    assert_eq!(query.metric("query_view_loads_total").await, 1.0);
}

/// While the pool's reads are busy, misses of different users wait and then
/// go to PostgreSQL together: 70 concurrent misses of 60 users and 10
/// unknown ids, with 4 connections, take a handful of statements, and each
/// request still gets its own user (or 404).
#[tokio::test]
async fn concurrent_misses_of_many_users_are_read_in_batches_and_each_gets_its_own() {
    let env = TestEnv::new().await;
    let rows = ViewRows::new(env.pool.clone());
    let mut users = Vec::new();
    for i in 0..60 {
        let stored = view(&format!("batch{i}"), UserStatus::Active, 1);
        assert!(rows.store_next(&stored).await.unwrap());
        users.push((stored.id, Some(stored.username)));
    }
    users.extend((0..10).map(|_| (Uuid::new_v4(), None)));
    let query = without_redis(&env, "4").await;
    // The reads wait on this lock until all seventy have missed.
    let lock = lock_views(&env).await;
    let http = reqwest::Client::new();
    let reads: Vec<_> = users
        .iter()
        .map(|(id, _)| {
            let (http, url) = (http.clone(), query.url(&format!("/users/{id}")));
            tokio::spawn(async move {
                let response = http.get(url).send().await.unwrap();
                let status = response.status().as_u16();
                (status, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    eventually("seventy reads to miss", Duration::from_secs(20), || async {
        (query.metric("query_cache_total").await >= 70.0).then_some(())
    })
    .await;
    lock.rollback().await.unwrap();
    for ((id, username), read) in users.iter().zip(reads) {
        let (status, body) = read.await.unwrap();
        match username {
            Some(username) => {
                assert_eq!(status, 200, "{id}: {body}");
                assert_eq!(body["id"], id.to_string());
                assert_eq!(body["username"], username.as_str());
            }
            None => assert_eq!(status, 404, "{id}: {body}"),
        }
    }
    // At most 4 statements were waiting on the lock; the rest waited for them
    // and went in one statement per reader.
    let loads = query.metric("query_view_loads_total").await;
    assert!(loads <= 8.0, "{loads} statements for 70 misses");
}

/// The query API's pool hands out connections without pinging them first
/// (`connect_for_reads`, one round trip less per read). When PostgreSQL drops
/// every session it holds, each dead connection fails at most the one read
/// that finds it (503, documented), and reads succeed again without a restart.
#[tokio::test]
async fn reads_recover_when_postgres_drops_every_session_of_the_query_api() {
    const POOL: usize = 4;
    let env = TestEnv::new().await;
    let view = stored_view(&env).await;
    // Redis unreachable: every read goes to PostgreSQL.
    let query = without_redis(&env, "4").await;
    let spec = spec(&query).await;
    let path = format!("/users/{}", view.id);
    // Concurrent reads open the whole pool.
    let warm = futures::future::join_all((0..16).map(|_| get(&query, &spec, &path, None))).await;
    assert!(warm.iter().all(|answer| answer.status == 200));

    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'query-api'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(killed >= 1, "the query API held sessions");

    let mut statuses = Vec::new();
    for _ in 0..POOL * 2 + 5 {
        statuses.push(get(&query, &spec, &path, None).await.status);
    }
    let failed = statuses.iter().filter(|status| **status == 503).count();
    assert!(
        statuses.iter().all(|status| [200, 503].contains(status)),
        "{statuses:?}"
    );
    assert!(
        failed <= POOL,
        "at most one failed read per dead connection: {statuses:?}"
    );
    assert!(
        statuses[statuses.len() - 5..]
            .iter()
            .all(|status| *status == 200),
        "reads succeed again: {statuses:?}"
    );
}
