//! Read-your-writes across services: a client that writes through the
//! command API and reads through the query API with the answer's `version`
//! (`?min_version`) or `position` (`?min_position`) sees its write, every
//! time, with the relay, Kafka and the projector in between.

use std::time::{Duration, Instant};

use serde_json::Value;
use userstream_tests::read_side::{await_version, open_namespace, read_user, register, set_active};
use userstream_tests::{eventually, Service, TestEnv};

async fn get(http: &reqwest::Client, url: String) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = http.get(url).send().await.expect("query API answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_write_is_read_at_once_with_its_version_or_its_position_200_times_each() {
    let env = TestEnv::new().await;
    let command = env.spawn(Service::CommandApi, &[]).await;
    let _projector = env.spawn(Service::Projector, &[]).await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let http = reqwest::Client::new();
    // A new consumer group is assigned its partitions after the broker's
    // initial rebalance delay (3 s by default): wait for the projector to run.
    let first = register(&http, &command, "warmup").await;
    await_version(&http, &query, first.id, first.version).await;

    for i in 0..200 {
        let written = register(&http, &command, &format!("ryw{i}")).await;
        let url = query.url(&format!(
            "/users/{}?min_version={}",
            written.id, written.version
        ));
        let (status, _, body) = get(&http, url).await;
        assert_eq!(status, 200, "registration {i}: {body}");
        assert_eq!(body["version"].as_i64(), Some(written.version), "{body}");
    }
    for i in 0..200 {
        let name = format!("byname{i}");
        let written = register(&http, &command, &name).await;
        let url = query.url(&format!(
            "/users?username={name}&min_position={}",
            written.position
        ));
        let (status, _, body) = get(&http, url).await;
        assert_eq!(status, 200, "look-up {i}: {body}");
        let items = body["items"].as_array().expect("items");
        assert_eq!(items.len(), 1, "look-up {i} found the user: {body}");
        assert_eq!(items[0]["id"], written.id.to_string());
        assert_eq!(items[0]["version"].as_i64(), Some(written.version));
    }
    // A status change, read by version and by position.
    let written = register(&http, &command, "flipper").await;
    for round in 0..20 {
        let active = round % 2 == 1;
        let changed = set_active(&http, &command, written.id, active).await;
        let expected = if active { "active" } else { "deactivated" };
        for url in [
            format!("/users/{}?min_version={}", written.id, changed.version),
            format!("/users/{}?min_position={}", written.id, changed.position),
        ] {
            let (status, _, body) = get(&http, query.url(&url)).await;
            assert_eq!(status, 200, "{url}: {body}");
            assert_eq!(body["status"], expected, "{url}: {body}");
            assert_eq!(body["version"].as_i64(), Some(changed.version), "{url}");
        }
    }
}

#[tokio::test]
async fn a_read_the_read_model_cannot_serve_in_time_answers_409_with_retry_after() {
    let env = TestEnv::new().await;
    let command = env.spawn(Service::CommandApi, &[]).await;
    // A projector that consumes but whose every batch fails: its frontier
    // task runs, and must not pass what is not applied.
    let _projector = env
        .spawn(
            Service::Projector,
            &[("FAILPOINTS", "projector::apply_batch=return")],
        )
        .await;
    let query = env
        .spawn(Service::QueryApi, &[("READ_WAIT_MAX_MS", "300")])
        .await;
    let http = reqwest::Client::new();
    let written = register(&http, &command, "waiting").await;
    for path in [
        format!("/users/{}?min_version=1", written.id),
        format!("/users/{}?min_position={}", written.id, written.position),
        format!("/users?username=waiting&min_position={}", written.position),
        format!("/users?status=active&min_position={}", written.position),
    ] {
        let started = Instant::now();
        let (status, headers, body) = get(&http, query.url(&path)).await;
        let waited = started.elapsed();
        assert_eq!(status, 409, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_caught_up", "{path}");
        assert_eq!(headers["retry-after"], "1", "{path}");
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
            "{path}: waited {waited:?}"
        );
    }
    let unknown = query.url("/users?username=waiting&min_position=999999999");
    let (status, _, body) = get(&http, unknown).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_position"))
    );
    for (path, code) in [
        ("/users?username=waiting&min_position=0", "invalid_query"),
        (
            "/users/00000000-0000-0000-0000-000000000001?min_version=0",
            "invalid_query",
        ),
        (
            "/users/00000000-0000-0000-0000-000000000001?min_version=x",
            "invalid_query",
        ),
        (
            "/users/00000000-0000-0000-0000-000000000001?since=1",
            "invalid_query",
        ),
    ] {
        let (status, _, body) = get(&http, query.url(path)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some(code)),
            "{path}"
        );
    }
}

/// A read before the projector has the user caches its absence. That never
/// hides the user once its registration is projected: a read with the write's
/// version finds it, and so does a plain read right after, although the
/// absence was cached for a minute.
#[tokio::test]
async fn a_cached_absence_never_hides_a_user_once_registered() {
    let env = TestEnv::new().await;
    open_namespace(&env).await;
    let command = env.spawn(Service::CommandApi, &[]).await;
    let query = env
        .spawn(Service::QueryApi, &[("REDIS_NEGATIVE_TTL_SECS", "60")])
        .await;
    let http = reqwest::Client::new();
    let written = register(&http, &command, "early").await;

    // No projector yet: not found, and once the absence is cached it is
    // served from Redis, without PostgreSQL.
    eventually(
        "the absence to be cached",
        Duration::from_secs(10),
        || async {
            let (status, body) = read_user(&http, &query, written.id).await;
            assert_eq!(status, 404, "{body}");
            let absent = query.metric("query_cache_total{result=\"absent\"}").await;
            (absent >= 1.0).then_some(())
        },
    )
    .await;
    let loads = query.metric("query_view_loads_total").await;
    for _ in 0..20 {
        assert_eq!(read_user(&http, &query, written.id).await.0, 404);
    }
    assert_eq!(
        query.metric("query_view_loads_total").await,
        loads,
        "absences are served from Redis"
    );

    let _projector = env.spawn(Service::Projector, &[]).await;
    // A new consumer group is assigned its partitions after the broker's
    // initial rebalance delay: wait for the projector to run.
    let warmup = register(&http, &command, "warmup").await;
    await_version(&http, &query, warmup.id, warmup.version).await;
    let url = query.url(&format!(
        "/users/{}?min_version={}",
        written.id, written.version
    ));
    let (status, _, body) = get(&http, url).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"].as_i64(), Some(written.version));
    let (status, body) = read_user(&http, &query, written.id).await;
    assert_eq!(status, 200, "a plain read right after: {body}");
}
