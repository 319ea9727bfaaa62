//! The command API over HTTP, on the real binary and a real PostgreSQL:
//! validation, uniqueness under races, optimistic concurrency, idempotency,
//! admin auth, metadata, secrets, and every answer checked against the
//! API's own /openapi.json.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::join_all;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use userstream_tests::{eventually, schema_errors, Running, Service, TestEnv, TEST_ADMIN_TOKEN};
use uuid::Uuid;

const PASSWORD: &str = "correct horse battery staple";

/// One answer, already checked against the OpenAPI document.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
    text: String,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

struct Api {
    env: TestEnv,
    service: Running,
    http: reqwest::Client,
    spec: Value,
}

impl Api {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    async fn start_with(extra: &[(&str, &str)]) -> Self {
        let env = TestEnv::new().await;
        // No relay: these tests are about the write path and its log.
        let mut vars = vec![("RELAY_ENABLED", "false")];
        vars.extend_from_slice(extra);
        let service = env.spawn(Service::CommandApi, &vars).await;
        let http = reqwest::Client::new();
        let spec = http
            .get(service.url("/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Self {
            env,
            service,
            http,
            spec,
        }
    }

    /// Sends `request` (to an operation of `template`) and checks that the
    /// status is documented and the body matches the documented schema.
    async fn send(&self, template: &str, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let documented = &self.spec["paths"][template]["post"]["responses"][status.to_string()];
        assert!(
            !documented.is_null(),
            "POST {template} answered {status}, which /openapi.json does not document: {text}"
        );
        let errors = schema_errors(&self.spec, documented, &body);
        assert!(
            errors.is_empty(),
            "POST {template} {status} body does not match /openapi.json: {errors:?}\n{text}"
        );
        assert!(
            !text.contains("$argon2"),
            "a response carried a hash: {text}"
        );
        Answer {
            status,
            headers,
            body,
            text,
        }
    }

    async fn register(&self, username: &str, email: &str, password: &str) -> Answer {
        let request = self
            .http
            .post(self.service.url("/users"))
            .json(&json!({ "username": username, "email": email, "password": password }));
        self.send("/users", request).await
    }

    async fn register_new(&self) -> Uuid {
        let name = format!("u{}", &Uuid::new_v4().simple().to_string()[..12]);
        let answer = self
            .register(&name, &format!("{name}@example.com"), PASSWORD)
            .await;
        assert_eq!(answer.status, 201, "{}", answer.text);
        answer.body["id"].as_str().unwrap().parse().unwrap()
    }

    fn status_request(&self, id: &str, verb: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.service.url(&format!("/users/{id}/{verb}")))
            .bearer_auth(TEST_ADMIN_TOKEN)
    }

    async fn status(&self, verb: &str, request: reqwest::RequestBuilder) -> Answer {
        self.send(&format!("/users/{{id}}/{verb}"), request).await
    }

    async fn deactivate(&self, id: Uuid) -> Answer {
        self.status(
            "deactivate",
            self.status_request(&id.to_string(), "deactivate"),
        )
        .await
    }

    async fn reactivate(&self, id: Uuid) -> Answer {
        self.status(
            "reactivate",
            self.status_request(&id.to_string(), "reactivate"),
        )
        .await
    }

    async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.env.pool)
            .await
            .unwrap()
    }

    async fn versions_of(&self, id: Uuid) -> Vec<(i32, String)> {
        sqlx::query_as(
            "SELECT stream_version, event_type FROM events WHERE stream_id = $1 ORDER BY stream_version",
        )
        .bind(id)
        .fetch_all(&self.env.pool)
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn the_schema_check_refuses_bodies_that_do_not_match() {
    let api = Api::start().await;
    let created = &api.spec["paths"]["/users"]["post"]["responses"]["201"];
    let good = json!({ "id": Uuid::new_v4(), "version": 1, "position": 7 });
    assert!(schema_errors(&api.spec, created, &good).is_empty());
    for bad in [
        json!({ "id": Uuid::new_v4(), "version": "1", "position": 7 }),
        json!({ "id": Uuid::new_v4(), "position": 7 }),
        json!({ "error": { "code": "x", "message": "y" } }),
    ] {
        assert!(
            !schema_errors(&api.spec, created, &bad).is_empty(),
            "{bad} passed"
        );
    }
    let conflict = &api.spec["paths"]["/users"]["post"]["responses"]["409"];
    assert!(!schema_errors(&api.spec, conflict, &good).is_empty());
}

#[tokio::test]
async fn register_answers_201_with_id_version_position_and_location() {
    let api = Api::start().await;
    let answer = api
        .register(" Alice.Smith ", " Alice@Example.COM ", PASSWORD)
        .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    let id = answer.body["id"].as_str().unwrap();
    assert_eq!(answer.body["version"], 1);
    assert!(answer.body["position"].as_i64().unwrap() >= 1);
    assert_eq!(answer.headers["location"], format!("/users/{id}").as_str());
    assert_eq!(answer.headers["etag"], "\"1\"");
    let (username, email): (String, String) =
        sqlx::query_as("SELECT username, email FROM user_identities")
            .fetch_one(&api.env.pool)
            .await
            .unwrap();
    assert_eq!(
        (username.as_str(), email.as_str()),
        ("alice.smith", "alice@example.com")
    );
}

#[tokio::test]
async fn refused_registrations_get_a_clear_4xx_and_append_nothing() {
    let api = Api::start().await;
    let url = api.service.url("/users");
    let ok = json!({ "username": "bob", "email": "bob@example.com", "password": PASSWORD });
    let with = |field: &str, value: Value| {
        let mut body = ok.clone();
        body[field] = value;
        body
    };
    let json_cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
        (
            with("username", json!("ab")),
            422,
            "validation_failed",
            Some("username"),
        ),
        (
            with("username", json!("a".repeat(33))),
            422,
            "validation_failed",
            Some("username"),
        ),
        (
            with("username", json!("bad name!")),
            422,
            "validation_failed",
            Some("username"),
        ),
        (
            with("username", json!(5)),
            422,
            "validation_failed",
            Some("username"),
        ),
        (
            with("email", json!("not-an-email")),
            422,
            "validation_failed",
            Some("email"),
        ),
        (
            with("email", json!("a@b")),
            422,
            "validation_failed",
            Some("email"),
        ),
        (
            with("password", json!("x".repeat(11))),
            422,
            "validation_failed",
            Some("password"),
        ),
        (
            with("password", json!("x".repeat(129))),
            422,
            "validation_failed",
            Some("password"),
        ),
        (with("extra", json!(true)), 422, "validation_failed", None),
        (
            json!({ "username": "bob", "email": "bob@example.com" }),
            422,
            "validation_failed",
            None,
        ),
        (json!([1, 2, 3]), 422, "validation_failed", None),
    ];
    for (body, status, code, field) in json_cases {
        let answer = api.send("/users", api.http.post(&url).json(&body)).await;
        assert_eq!(
            (answer.status, answer.code()),
            (status, code),
            "{body}: {}",
            answer.text
        );
        if let Some(field) = field {
            assert!(
                answer.body["error"]["fields"][field].is_string(),
                "{body}: no message for {field}: {}",
                answer.text
            );
        }
    }
    let raw_cases: Vec<(&str, String, u16, &str)> = vec![
        ("application/json", "{\"username\":".into(), 400, "malformed_json"),
        ("application/json", "not json".into(), 400, "malformed_json"),
        ("text/plain", ok.to_string(), 415, "unsupported_media_type"),
        (
            "application/json",
            json!({ "username": "bob", "email": "bob@example.com", "password": "p".repeat(17_000) })
                .to_string(),
            413,
            "payload_too_large",
        ),
    ];
    for (content_type, body, status, code) in raw_cases {
        let request = api
            .http
            .post(&url)
            .header("content-type", content_type)
            .body(body.clone());
        let answer = api.send("/users", request).await;
        assert_eq!(
            (answer.status, answer.code()),
            (status, code),
            "{}",
            answer.text
        );
    }
    let no_content_type = api.http.post(&url).body(ok.to_string());
    assert_eq!(api.send("/users", no_content_type).await.status, 415);
    let long_key = api
        .http
        .post(&url)
        .header("idempotency-key", "k".repeat(256))
        .json(&ok);
    let answer = api.send("/users", long_key).await;
    assert_eq!((answer.status, answer.code()), (400, "invalid_header"));

    assert_eq!(
        api.event_count().await,
        0,
        "a refused command appended an event"
    );
    // The same body, valid, is then accepted: the refusals were about the input.
    assert_eq!(
        api.register("bob", "bob@example.com", PASSWORD)
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn password_length_counts_characters_not_bytes() {
    let api = Api::start().await;
    let twelve_wide_chars = "é".repeat(12);
    assert_eq!(
        api.register("carol", "carol@example.com", &twelve_wide_chars)
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn fifty_racing_registrations_of_one_username_let_exactly_one_win() {
    let api = Api::start().await;
    let answers = join_all((0..50).map(|i| {
        let email = format!("racer{i}@example.com");
        let api = &api;
        async move { api.register("racer", &email, PASSWORD).await }
    }))
    .await;
    assert_eq!(answers.iter().filter(|a| a.status == 201).count(), 1);
    assert!(answers
        .iter()
        .filter(|a| a.status != 201)
        .all(|a| a.status == 409 && a.code() == "username_taken"));
    let registered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'UserRegistered' AND payload->>'username' = 'racer'",
    )
    .fetch_one(&api.env.pool)
    .await
    .unwrap();
    assert_eq!(registered, 1);
    assert_eq!(api.event_count().await, 1);
}

#[tokio::test]
async fn fifty_racing_registrations_of_one_email_let_exactly_one_win() {
    let api = Api::start().await;
    let answers = join_all((0..50).map(|i| {
        let username = format!("mail{i}");
        let api = &api;
        async move {
            api.register(&username, "Shared@Example.com", PASSWORD)
                .await
        }
    }))
    .await;
    assert_eq!(answers.iter().filter(|a| a.status == 201).count(), 1);
    assert!(answers
        .iter()
        .filter(|a| a.status != 201)
        .all(|a| a.status == 409 && a.code() == "email_taken"));
    assert_eq!(api.event_count().await, 1);
}

#[tokio::test]
async fn status_commands_need_the_admin_token() {
    let api = Api::start().await;
    let id = api.register_new().await.to_string();
    let url = api.service.url(&format!("/users/{id}/deactivate"));
    let missing = api.status("deactivate", api.http.post(&url)).await;
    assert_eq!((missing.status, missing.code()), (401, "unauthenticated"));
    assert_eq!(missing.headers["www-authenticate"], "Bearer");
    let wrong = api
        .status(
            "deactivate",
            api.http.post(&url).bearer_auth("not-the-admin-token"),
        )
        .await;
    assert_eq!((wrong.status, wrong.code()), (403, "forbidden"));
    let basic = api
        .status(
            "deactivate",
            api.http
                .post(&url)
                .basic_auth("admin", Some(TEST_ADMIN_TOKEN)),
        )
        .await;
    assert_eq!(basic.status, 401);
    assert_eq!(api.event_count().await, 1);
}

#[tokio::test]
async fn deactivate_and_reactivate_follow_the_users_state() {
    let api = Api::start().await;
    let id = api.register_new().await;

    let off = api.deactivate(id).await;
    assert_eq!((off.status, off.body["version"].as_i64()), (200, Some(2)));
    assert_eq!(off.body["id"], id.to_string());
    let again = api.deactivate(id).await;
    assert_eq!((again.status, again.code()), (409, "already_deactivated"));

    let on = api.reactivate(id).await;
    assert_eq!((on.status, on.body["version"].as_i64()), (200, Some(3)));
    let again = api.reactivate(id).await;
    assert_eq!((again.status, again.code()), (409, "already_active"));

    let unknown = api.deactivate(Uuid::new_v4()).await;
    assert_eq!((unknown.status, unknown.code()), (404, "user_not_found"));
    let invalid = api
        .status("deactivate", api.status_request("not-a-uuid", "deactivate"))
        .await;
    assert_eq!((invalid.status, invalid.code()), (400, "invalid_id"));
    let unknown_field = api
        .status(
            "deactivate",
            api.status_request(&id.to_string(), "deactivate")
                .json(&json!({ "reason": "x", "force": true })),
        )
        .await;
    assert_eq!(unknown_field.status, 422);
    let long_reason = api
        .status(
            "deactivate",
            api.status_request(&id.to_string(), "deactivate")
                .json(&json!({ "reason": "r".repeat(501) })),
        )
        .await;
    assert_eq!(
        (long_reason.status, long_reason.code()),
        (422, "validation_failed")
    );

    let kinds: Vec<String> = api
        .versions_of(id)
        .await
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(
        kinds,
        ["UserRegistered", "UserDeactivated", "UserReactivated"]
    );
}

#[tokio::test]
async fn if_match_makes_a_command_conditional_on_the_version() {
    let api = Api::start().await;
    let id = api.register_new().await.to_string();
    let stale = api
        .status(
            "deactivate",
            api.status_request(&id, "deactivate")
                .header("if-match", "\"7\""),
        )
        .await;
    assert_eq!((stale.status, stale.code()), (412, "precondition_failed"));
    let garbled = api
        .status(
            "deactivate",
            api.status_request(&id, "deactivate")
                .header("if-match", "seven"),
        )
        .await;
    assert_eq!((garbled.status, garbled.code()), (400, "invalid_header"));
    assert_eq!(api.event_count().await, 1);

    let current = api
        .status(
            "deactivate",
            api.status_request(&id, "deactivate")
                .header("if-match", "\"1\""),
        )
        .await;
    assert_eq!(current.status, 200);
    assert_eq!(current.headers["etag"], "\"2\"");
}

/// Many admins toggle one user at once. Each request either appends exactly
/// one event (possibly after deciding again on fresh state) or is refused
/// with 409; the stream stays 1, 2, 3… and ends in the state of its last event.
#[tokio::test]
async fn concurrent_status_commands_never_append_two_events_at_one_version() {
    let api = Api::start().await;
    let id = api.register_new().await;
    let answers = join_all((0..40).map(|i| {
        let api = &api;
        async move {
            if i % 2 == 0 {
                api.deactivate(id).await
            } else {
                api.reactivate(id).await
            }
        }
    }))
    .await;
    let accepted: Vec<i64> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.body["version"].as_i64().unwrap())
        .collect();
    assert!(
        answers.iter().all(|a| a.status == 200 || a.status == 409),
        "only 200 or 409"
    );
    assert!(answers.iter().filter(|a| a.status == 409).all(|a| matches!(
        a.code(),
        "already_deactivated" | "already_active" | "concurrent_modification"
    )));

    let stream = api.versions_of(id).await;
    let versions: Vec<i32> = stream.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, (1..=stream.len() as i32).collect::<Vec<_>>());
    assert_eq!(accepted.len(), stream.len() - 1, "one event per 200");
    assert_eq!(
        accepted.iter().collect::<BTreeSet<_>>().len(),
        accepted.len(),
        "no two answers share a version"
    );
    // Status events alternate: no deactivation follows a deactivation.
    for pair in stream.windows(2).skip(1) {
        assert_ne!(pair[0].1, pair[1].1, "{stream:?}");
    }
    // The next command is decided on the true final state.
    let last_was_deactivate = stream.last().unwrap().1 == "UserDeactivated";
    let next = if last_was_deactivate {
        api.deactivate(id).await
    } else {
        api.reactivate(id).await
    };
    assert_eq!(next.status, 409, "the final state is what the log says");
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_gets_the_first_answer_and_appends_nothing() {
    let api = Api::start().await;
    let url = api.service.url("/users");
    let body = json!({ "username": "dora", "email": "dora@example.com", "password": PASSWORD });
    let send = |key: &str, body: &Value| {
        api.send(
            "/users",
            api.http
                .post(&url)
                .header("idempotency-key", key)
                .json(body),
        )
    };
    let first = send("key-1", &body).await;
    assert_eq!(first.status, 201);
    let retry = send("key-1", &body).await;
    assert_eq!((retry.status, &retry.body), (first.status, &first.body));
    assert_eq!(retry.headers["location"], first.headers["location"]);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(api.event_count().await, 1);

    let other_body =
        json!({ "username": "dora2", "email": "dora@example.com", "password": PASSWORD });
    let reused = send("key-1", &other_body).await;
    assert_eq!(
        (reused.status, reused.code()),
        (422, "idempotency_key_reused")
    );
    let other_password = json!({ "username": "dora", "email": "dora@example.com", "password": "another password 123" });
    let reused = send("key-1", &other_password).await;
    assert_eq!(
        (reused.status, reused.code()),
        (422, "idempotency_key_reused")
    );

    // Status commands too.
    let id = first.body["id"].as_str().unwrap();
    let deactivate = || {
        api.status(
            "deactivate",
            api.status_request(id, "deactivate")
                .header("idempotency-key", "key-2")
                .json(&json!({ "reason": "retry me" })),
        )
    };
    let first_off = deactivate().await;
    let retried_off = deactivate().await;
    assert_eq!(first_off.status, 200);
    assert_eq!(
        (retried_off.status, &retried_off.body),
        (200, &first_off.body)
    );
    assert_eq!(api.event_count().await, 2);
    let key: Option<String> = sqlx::query_scalar(
        "SELECT metadata->>'idempotency_key' FROM events WHERE stream_version = 2",
    )
    .fetch_one(&api.env.pool)
    .await
    .unwrap();
    assert_eq!(key.as_deref(), Some("key-2"));
}

#[tokio::test]
async fn concurrent_requests_with_one_idempotency_key_append_once_and_agree() {
    let api = Api::start().await;
    let url = api.service.url("/users");
    let body = json!({ "username": "eli", "email": "eli@example.com", "password": PASSWORD });
    let answers = join_all((0..10).map(|_| {
        api.send(
            "/users",
            api.http
                .post(&url)
                .header("idempotency-key", "same")
                .json(&body),
        )
    }))
    .await;
    assert!(answers.iter().all(|a| a.status == 201), "{answers:?}");
    let ids: BTreeSet<_> = answers.iter().map(|a| a.body["id"].to_string()).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(api.event_count().await, 1);
}

#[tokio::test]
async fn idempotency_keys_expire_after_the_configured_time() {
    let api = Api::start_with(&[("IDEMPOTENCY_TTL_SECS", "1")]).await;
    let url = api.service.url("/users");
    let body = json!({ "username": "fay", "email": "fay@example.com", "password": PASSWORD });
    let send = || {
        api.send(
            "/users",
            api.http
                .post(&url)
                .header("idempotency-key", "short-lived")
                .json(&body),
        )
    };
    assert_eq!(send().await.status, 201);
    // Once the key expired the command runs again, and the username is taken.
    let after = eventually("the key to expire", Duration::from_secs(15), || async {
        let answer = send().await;
        (answer.status != 201).then_some(answer)
    })
    .await;
    assert_eq!((after.status, after.code()), (409, "username_taken"));
    assert_eq!(api.event_count().await, 1);
}

#[tokio::test]
async fn events_carry_correlation_causation_actor_and_schema_version() {
    let api = Api::start().await;
    let request = api
        .http
        .post(api.service.url("/users"))
        .header("x-request-id", "req-123")
        .json(&json!({ "username": "gus", "email": "gus@example.com", "password": PASSWORD }));
    let answer = api.send("/users", request).await;
    assert_eq!(answer.headers["x-request-id"], "req-123");
    let id: Uuid = answer.body["id"].as_str().unwrap().parse().unwrap();
    let generated = api.deactivate(id).await;
    let generated_id = generated.headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        !generated_id.is_empty(),
        "a request id is generated and returned"
    );

    let rows: Vec<(Value, i16)> = sqlx::query_as(
        "SELECT metadata, schema_version FROM events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(id)
    .fetch_all(&api.env.pool)
    .await
    .unwrap();
    assert_eq!(rows[0].0["correlation_id"], "req-123");
    assert_eq!(rows[0].0["causation_id"], "req-123");
    assert_eq!(rows[0].0["actor"], "anonymous");
    assert_eq!(rows[1].0["correlation_id"], generated_id.as_str());
    assert_eq!(rows[1].0["actor"], "admin");
    assert!(rows.iter().all(|(_, schema)| *schema == 1));
}

#[tokio::test]
async fn neither_responses_nor_logs_carry_the_hash_the_password_or_the_admin_token() {
    let api = Api::start_with(&[("RUST_LOG", "debug")]).await;
    let id = api.register_new().await;
    api.deactivate(id).await;
    api.register("hal", "hal@example.com", PASSWORD).await;
    api.register("hal", "hal2@example.com", PASSWORD).await; // 409
    api.status(
        "reactivate",
        api.http
            .post(api.service.url(&format!("/users/{id}/reactivate")))
            .bearer_auth("wrong-token-value"),
    )
    .await;
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE payload->>'password_hash' LIKE '$argon2id$%'",
    )
    .fetch_one(&api.env.pool)
    .await
    .unwrap();
    assert_eq!(stored, 2, "the log does keep the hashes");
    let logs = api.service.logs();
    assert!(logs.len() > 5, "debug logging produced lines");
    for line in logs {
        assert!(!line.contains("$argon2"), "hash in a log line: {line}");
        assert!(!line.contains(PASSWORD), "password in a log line: {line}");
        assert!(
            !line.contains(TEST_ADMIN_TOKEN),
            "admin token in a log line: {line}"
        );
    }
}

#[tokio::test]
async fn openapi_describes_exactly_the_routes_served() {
    let api = Api::start().await;
    let paths: BTreeSet<&str> = api.spec["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        paths,
        BTreeSet::from([
            "/users",
            "/users/{id}/deactivate",
            "/users/{id}/reactivate",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ])
    );
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let response = api.http.get(api.service.url(path)).send().await.unwrap();
        let status = response.status().as_u16().to_string();
        assert!(
            !api.spec["paths"][path]["get"]["responses"][&status].is_null(),
            "GET {path} answered {status}, undocumented"
        );
    }
    assert_eq!(
        api.spec["paths"]["/users/{id}/deactivate"]["post"]["security"][0]["admin_token"],
        json!([])
    );
}

#[tokio::test]
async fn status_commands_refuse_oversized_and_non_json_bodies() {
    let api = Api::start().await;
    let id = api.register_new().await.to_string();
    let text = api
        .status(
            "deactivate",
            api.status_request(&id, "deactivate")
                .header("content-type", "text/plain")
                .body("reason=spam"),
        )
        .await;
    assert_eq!((text.status, text.code()), (415, "unsupported_media_type"));
    let huge = api
        .status(
            "reactivate",
            api.status_request(&id, "reactivate")
                .json(&json!({ "reason": "r".repeat(20_000) })),
        )
        .await;
    assert_eq!((huge.status, huge.code()), (413, "payload_too_large"));
    let malformed = api
        .status(
            "deactivate",
            api.status_request(&id, "deactivate")
                .header("content-type", "application/json")
                .body("{"),
        )
        .await;
    assert_eq!(
        (malformed.status, malformed.code()),
        (400, "malformed_json")
    );
    assert_eq!(api.event_count().await, 1);
}

#[tokio::test]
async fn the_api_answers_503_and_is_unready_when_its_database_is_gone() {
    let api = Api::start().await;
    api.register_new().await;
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&userstream_tests::admin_database_url())
            .await
            .unwrap();
    sqlx::query(&format!(
        "DROP DATABASE {} WITH (FORCE)",
        api.env.database_name
    ))
    .execute(&mut admin)
    .await
    .unwrap();

    let answer = api.register("ivy", "ivy@example.com", PASSWORD).await;
    assert_eq!(
        (answer.status, answer.code()),
        (503, "unavailable"),
        "{}",
        answer.text
    );
    let readyz = api
        .http
        .get(api.service.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    let healthz = api
        .http
        .get(api.service.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200, "alive, just not ready");
    assert!(
        api.service
            .logs()
            .iter()
            .any(|l| l.contains("request failed") && l.contains("unavailable")),
        "the 503 is logged with its cause"
    );
}
