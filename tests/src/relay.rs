//! Helpers of the relay tests: writing streams straight into the log, reading
//! them back from the topic, checking per-user order.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use events::domain::{UserDeactivated, UserReactivated, UserRegistered};
use events::{PasswordHash, UserEvent};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use futures::future::join_all;

use crate::{eventually, read_topic, KafkaMessage, Running, Service, TestEnv};

/// The n-th event of a user's stream: registration, then alternating status changes.
pub fn nth_event(version: i32, name: &str) -> UserEvent {
    match version {
        1 => UserEvent::Registered(UserRegistered {
            username: name.to_owned(),
            email: format!("{name}@example.com"),
            password_hash: PasswordHash::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
            sealed_code: None,
            code_expires_at: None,
        }),
        v if v % 2 == 0 => UserEvent::Deactivated(UserDeactivated { reason: None }),
        _ => UserEvent::Reactivated(UserReactivated { reason: None }),
    }
}

/// Appends one event in its own transaction and returns its event id. When
/// `hold` is set the transaction stays open that long before committing, so
/// later transactions commit first with higher positions.
pub async fn append(
    pool: &PgPool,
    user: Uuid,
    version: i32,
    name: &str,
    hold: Option<Duration>,
) -> Uuid {
    let event = nth_event(version, name);
    let event_id = Uuid::now_v7();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         VALUES ($1, $2, $3, $4, 1, $5)",
    )
    .bind(user)
    .bind(version)
    .bind(event_id)
    .bind(event.event_type())
    .bind(event.payload())
    .execute(&mut *tx)
    .await
    .unwrap();
    if let Some(hold) = hold {
        sqlx::query("SELECT pg_sleep($1)")
            .bind(hold.as_secs_f64())
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    event_id
}

/// One writer: `users` streams of `versions` events each, interleaved, with
/// every seventh transaction held open for a while.
pub async fn writer(pool: PgPool, users: usize, versions: i32) -> Vec<(Uuid, i32, Uuid)> {
    let ids: Vec<Uuid> = (0..users).map(|_| Uuid::now_v7()).collect();
    let mut written = Vec::new();
    for version in 1..=versions {
        for user in &ids {
            let name = format!("u{}", &user.simple().to_string()[20..]);
            let hold = (Uuid::new_v4().as_u128() % 7 == 0)
                .then(|| Duration::from_millis(20 + (Uuid::new_v4().as_u128() % 60) as u64));
            let event_id = append(&pool, *user, version, &name, hold).await;
            written.push((*user, version, event_id));
        }
    }
    written
}

/// Reads the topic until every written event id was seen; returns the messages.
pub async fn read_all(
    topic: &str,
    written: &[(Uuid, i32, Uuid)],
    deadline: Duration,
) -> Vec<KafkaMessage> {
    let expected: BTreeSet<String> = written.iter().map(|(_, _, id)| id.to_string()).collect();
    read_topic(topic, deadline, |seen| {
        let ids: BTreeSet<&str> = seen
            .iter()
            .filter_map(|m| m.headers.get("ce_id").map(String::as_str))
            .collect();
        expected.iter().all(|id| ids.contains(id.as_str()))
    })
    .await
}

/// Per user, in topic order (one partition per key), the versions seen.
pub fn versions_by_user(messages: &[KafkaMessage]) -> HashMap<String, Vec<i64>> {
    let mut by_user: HashMap<String, Vec<(i32, i64, i64)>> = HashMap::new();
    for m in messages {
        let key = m.key.clone().expect("every message has a key");
        let version = m.body["stream_version"].as_i64().unwrap();
        by_user
            .entry(key)
            .or_default()
            .push((m.partition, m.offset, version));
    }
    by_user
        .into_iter()
        .map(|(user, mut seen)| {
            let partitions: BTreeSet<i32> = seen.iter().map(|(p, _, _)| *p).collect();
            assert_eq!(
                partitions.len(),
                1,
                "user {user} spread over partitions {partitions:?}"
            );
            seen.sort_by_key(|(_, offset, _)| *offset);
            (user, seen.into_iter().map(|(_, _, v)| v).collect())
        })
        .collect()
}

pub async fn relay_status(service: &Running) -> Value {
    let readyz: Value = reqwest::get(service.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    readyz["checks"]["relay"]["detail"].clone()
}

/// At least once, in order: every written event is on the topic; a repeated
/// `ce_id` is a copy of the same message; deduplicated by `ce_id` in topic
/// order, each user's versions are exactly 1..=`versions`.
pub fn assert_each_stream_complete_and_in_order(
    messages: &[KafkaMessage],
    written: &[(Uuid, i32, Uuid)],
    versions: i32,
) {
    let mut first_copy: HashMap<String, String> = HashMap::new();
    for m in messages {
        let copy = first_copy
            .entry(m.headers["ce_id"].clone())
            .or_insert_with(|| m.raw.clone());
        assert_eq!(copy, &m.raw, "a duplicate must be the same event");
    }
    let mut seen = BTreeSet::new();
    let deduplicated: Vec<KafkaMessage> = messages
        .iter()
        .filter(|m| seen.insert(m.headers["ce_id"].clone()))
        .cloned()
        .collect();
    assert_eq!(deduplicated.len(), written.len());
    for (user, seen) in versions_by_user(&deduplicated) {
        let expected: Vec<i64> = (1..=i64::from(versions)).collect();
        if seen != expected {
            // Every copy of this user's messages, as the topic holds them.
            let copies: Vec<(i32, i64, i64, &str)> = messages
                .iter()
                .filter(|m| m.key.as_deref() == Some(user.as_str()))
                .map(|m| {
                    let version = m.body["stream_version"].as_i64().unwrap_or(-1);
                    (m.partition, m.offset, version, m.headers["ce_id"].as_str())
                })
                .collect();
            panic!("user {user}: first copies in order {seen:?}; all copies (partition, offset, version, ce_id): {copies:?}");
        }
    }
}

/// True when every event was already committed before `at` (the kill was too late).
pub fn writing_was_done_before(written: &[(Uuid, i32, Uuid)], at: Instant) -> bool {
    // Event ids are UUIDv7: their timestamp tells when they were written.
    let elapsed_ms = at.elapsed().as_millis() as u64;
    let kill_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - elapsed_ms;
    written.iter().all(|(_, _, id)| {
        let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
        secs * 1000 + u64::from(nanos) / 1_000_000 <= kill_ms
    })
}

/// Two command API replicas with `vars`: the first leads, the second stands by.
pub async fn leader_and_standby(env: &TestEnv, vars: &[(&str, &str)]) -> (Running, Running) {
    let first = env.spawn(Service::CommandApi, vars).await;
    eventually(
        "the first replica to lead",
        Duration::from_secs(20),
        || async { (relay_status(&first).await["leader"] == true).then_some(()) },
    )
    .await;
    let second = env.spawn(Service::CommandApi, vars).await;
    assert_eq!(
        relay_status(&second).await["leader"],
        false,
        "one leader only"
    );
    (first, second)
}

/// Streams 2 writers × 50 users × 20 versions = 2,000 events in the
/// background; the task answers what was written.
pub fn stream_events(pool: PgPool) -> tokio::task::JoinHandle<Vec<(Uuid, i32, Uuid)>> {
    tokio::spawn(async move {
        join_all((0..2).map(|_| writer(pool.clone(), 50, 20)))
            .await
            .into_iter()
            .flatten()
            .collect()
    })
}
