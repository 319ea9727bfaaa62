//! The query API on the real binary: views from PostgreSQL and Redis, ETags,
//! errors, Redis being unreachable, and every answer checked against its own
//! /openapi.json.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use events::{UserStatus, UserView};
use read_model::{Lookup, Namespace, ViewCache, ViewRows};
use serde_json::Value;
use userstream_tests::{eventually, redis_url, schema_errors, Running, Service, TestEnv};
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

async fn stored_view(env: &TestEnv) -> UserView {
    let view = UserView {
        id: Uuid::new_v4(),
        username: "quinn".into(),
        email: "quinn@example.com".into(),
        status: UserStatus::Active,
        version: 1,
        registered_at: Utc::now(),
        updated_at: Utc::now(),
    };
    assert!(ViewRows::new(env.pool.clone())
        .store_next(&view)
        .await
        .unwrap());
    view
}

/// Opens a Redis namespace as the projector's keeper would (no projector runs here).
async fn open_namespace(env: &TestEnv, cache: &ViewCache) -> Namespace {
    let ns = Namespace {
        projection_version: 1,
        epoch: 1,
    };
    assert!(cache.open(ns, 0).await.unwrap());
    sqlx::query("UPDATE projection_state SET cache_epoch = 1")
        .execute(&env.pool)
        .await
        .unwrap();
    ns
}

#[tokio::test]
async fn a_view_is_read_from_postgres_cached_in_redis_and_revalidated_by_etag() {
    let env = TestEnv::new().await;
    let view = stored_view(&env).await;
    let cache = ViewCache::new(
        &redis_url(),
        env.redis_prefix.clone(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .unwrap();
    let ns = open_namespace(&env, &cache).await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let spec = spec(&query).await;
    let path = format!("/users/{}", view.id);

    let first = get(&query, &spec, &path, None).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["etag"], "\"1\"");
    assert_eq!(first.body["username"], "quinn");
    assert_eq!(first.body["status"], "active");

    // The miss filled Redis, through the version-guarded write.
    let cached = eventually("the cache fill", Duration::from_secs(10), || async {
        match cache.get(ns, view.id, 0).await.unwrap() {
            Lookup::Hit(cached) => Some(cached),
            _ => None,
        }
    })
    .await;
    assert_eq!(cached.version, 1);
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
