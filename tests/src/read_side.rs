//! Helpers for the read-side tests: a private Redis a test may stop, pause
//! and restart without disturbing other tests, and typed calls to the
//! command and query APIs.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::{eventually, Running, TestEnv};

/// A redis-server of one test's own, on a free port, with its snapshot in a
/// folder of its own (RDB only, so a restart comes back from the last SAVE).
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("userstream-redis-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("redis folder");
        let mut redis = Self {
            port,
            dir,
            child: None,
        };
        redis.run().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--dir", self.dir.to_str().expect("utf-8 path")])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/stack installs it)");
        self.child = Some(child);
        let url = self.url();
        eventually(
            "the private redis to answer",
            Duration::from_secs(10),
            || {
                let url = url.clone();
                async move { ping(&url).await.then_some(()) }
            },
        )
        .await;
    }

    /// Runs a command on this Redis and returns its answer.
    pub async fn cmd(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("private redis answers");
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut conn).await.expect("redis command")
    }

    /// Writes the snapshot a later [`Self::restart`] comes back from.
    pub async fn save(&self) {
        self.cmd(&["SAVE"]).await;
    }

    /// Kills the server outright: what it held since the last SAVE is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, from the last snapshot.
    pub async fn restart(&mut self) {
        self.kill();
        self.run().await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(Ok(mut conn)) = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}

/// What a command answered: the consistency token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub id: Uuid,
    pub version: i64,
    pub position: i64,
}

fn written(body: &Value) -> Written {
    Written {
        id: body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("id"),
        version: body["version"].as_i64().expect("version"),
        position: body["position"].as_i64().expect("position"),
    }
}

/// Registers `name` through the command API.
pub async fn register(http: &reqwest::Client, command: &Running, name: &str) -> Written {
    let response = http
        .post(command.url("/users"))
        .json(&json!({
            "username": name,
            "email": format!("{name}@example.com"),
            "password": "correct horse battery staple",
        }))
        .send()
        .await
        .expect("command API answers");
    assert_eq!(response.status(), 201, "register {name}");
    written(&response.json().await.expect("json"))
}

/// Deactivates (`true`) or reactivates a user through the command API.
pub async fn set_active(
    http: &reqwest::Client,
    command: &Running,
    id: Uuid,
    active: bool,
) -> Written {
    let action = if active { "reactivate" } else { "deactivate" };
    let token = crate::identity::admin_token(http, command).await;
    let response = http
        .post(command.url(&format!("/users/{id}/{action}")))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .expect("command API answers");
    assert_eq!(response.status(), 200, "{action} {id}");
    written(&response.json().await.expect("json"))
}

/// `GET /users/{id}` on the query API: (status, body).
pub async fn read_user(http: &reqwest::Client, query: &Running, id: Uuid) -> (u16, Value) {
    let response = http
        .get(query.url(&format!("/users/{id}")))
        .send()
        .await
        .expect("query API answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until the query API serves `id` at `version` or later.
pub async fn await_version(
    http: &reqwest::Client,
    query: &Running,
    id: Uuid,
    version: i64,
) -> Value {
    eventually(
        &format!("user {id} at version {version}"),
        Duration::from_secs(30),
        || async move {
            let (status, body) = read_user(http, query, id).await;
            (status == 200 && body["version"].as_i64() >= Some(version)).then_some(body)
        },
    )
    .await
}

/// Appends `events` (type, payload) to `user`'s stream after `version`, in
/// one transaction, as the command API would: for events a test needs in
/// the log as they are, whatever a command would decide.
pub async fn append_raw(pool: &sqlx::PgPool, user: Uuid, version: i32, events: &[(&str, Value)]) {
    let types: Vec<&str> = events.iter().map(|(t, _)| *t).collect();
    let payloads: Vec<Value> = events.iter().map(|(_, p)| p.clone()).collect();
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         SELECT $1, $2 + e.n::int, gen_random_uuid(), e.event_type, 1, e.payload \
         FROM UNNEST($3::text[], $4::jsonb[]) WITH ORDINALITY AS e(event_type, payload, n) \
         ORDER BY e.n",
    )
    .bind(user)
    .bind(version)
    .bind(&types)
    .bind(&payloads)
    .execute(pool)
    .await
    .expect("append to the log");
}

/// `GET path` on the query API, checked against its own /openapi.json
/// (`spec`), where `route` is the documented path.
pub async fn get_documented(query: &Running, spec: &Value, route: &str, path: &str) -> Value {
    let response = reqwest::get(query.url(path)).await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "GET {path}: {body}");
    let documented = &spec["paths"][route]["get"]["responses"]["200"];
    let errors = crate::schema_errors(spec, documented, &body);
    assert!(errors.is_empty(), "GET {path}: {errors:?} {body}");
    body
}

/// The settled Redis entry of `id` at `version` in the trusted namespace.
/// Reads through the query API meanwhile: only a read fills the cache, and
/// the keeper may open the namespace after the first read.
pub async fn cached_body(
    env: &TestEnv,
    cache: &read_model::ViewCache,
    query: &Running,
    id: Uuid,
    version: i32,
) -> Value {
    let http = reqwest::Client::new();
    eventually(
        &format!("Redis to hold {id} at version {version}"),
        Duration::from_secs(60),
        || async {
            read_user(&http, query, id).await;
            let current = read_model::state::load(&env.pool).await.ok()?;
            match cache.get(current.namespace()?, id, 0).await.ok()? {
                read_model::Lookup::Hit(hit) if hit.version == version => {
                    serde_json::from_str(&hit.body).ok()
                }
                _ => None,
            }
        },
    )
    .await
}

#[derive(sqlx::FromRow)]
struct LoggedEvent {
    global_position: i64,
    stream_version: i32,
    event_id: Uuid,
    event_type: String,
    schema_version: i16,
    payload: Value,
    recorded_at: chrono::DateTime<chrono::Utc>,
}

/// The messages the relay publishes for `user`, built from the log, in version order.
pub async fn logged_events(pool: &sqlx::PgPool, user: Uuid) -> Vec<events::IntegrationEvent> {
    let rows: Vec<LoggedEvent> = sqlx::query_as(
        "SELECT global_position, stream_version, event_id, event_type, schema_version, payload, \
                recorded_at FROM events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(user)
    .fetch_all(pool)
    .await
    .expect("read the log");
    rows.into_iter()
        .map(|r| {
            events::IntegrationEvent::from_recorded(&events::domain::RecordedEvent {
                global_position: r.global_position,
                stream_id: user,
                stream_version: r.stream_version,
                event_id: r.event_id,
                recorded_at: r.recorded_at,
                event: events::UserEvent::decode(&r.event_type, r.schema_version, r.payload)
                    .expect("logged events decode"),
            })
        })
        .collect()
}

/// Produces one message to `topic` as the relay would (headers + body), or
/// with `body` replaced.
pub async fn produce(topic: &str, event: &events::IntegrationEvent, body: Option<&[u8]>) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", crate::kafka_brokers())
        .set("partitioner", "murmur2_random")
        .create()
        .expect("kafka producer");
    let mut headers = OwnedHeaders::new();
    for (name, value) in event.headers("urn:userstream:test") {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    let key = event.key();
    let encoded = event.body();
    let record = FutureRecord::to(topic)
        .key(&key)
        .payload(body.unwrap_or(&encoded))
        .headers(headers);
    producer
        .send(record, Duration::from_secs(30))
        .await
        .expect("kafka accepts the message");
}

/// A cache on the test's Redis prefix with namespace `p1:e1` opened and named
/// in `projection_state`, as the projector's keeper would: the query API then
/// trusts Redis without a projector running.
pub async fn open_namespace(env: &TestEnv) -> (read_model::ViewCache, read_model::Namespace) {
    let cache = read_model::ViewCache::new(
        &crate::redis_url(),
        env.redis_prefix.clone(),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .unwrap();
    let ns = read_model::Namespace {
        projection_version: 1,
        epoch: 1,
    };
    assert!(cache.open(ns, 0).await.unwrap());
    sqlx::query("UPDATE projection_state SET cache_epoch = 1")
        .execute(&env.pool)
        .await
        .unwrap();
    (cache, ns)
}
