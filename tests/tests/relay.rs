//! The relay mirrors the log to Kafka: nothing skipped, nothing reordered,
//! one leader among replicas. Real PostgreSQL, real Kafka, real command-api
//! binaries as relays.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use events::domain::{UserDeactivated, UserReactivated, UserRegistered};
use events::{PasswordHash, UserEvent};
use futures::future::join_all;
use serde_json::{json, Value};
use sqlx::PgPool;
use userstream_tests::{
    contract_violations, eventually, read_topic, KafkaMessage, Running, Service, TestEnv,
};
use uuid::Uuid;

/// The n-th event of a user's stream: registration, then alternating status changes.
fn nth_event(version: i32, name: &str) -> UserEvent {
    match version {
        1 => UserEvent::Registered(UserRegistered {
            username: name.to_owned(),
            email: format!("{name}@example.com"),
            password_hash: PasswordHash::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
        }),
        v if v % 2 == 0 => UserEvent::Deactivated(UserDeactivated { reason: None }),
        _ => UserEvent::Reactivated(UserReactivated { reason: None }),
    }
}

/// Appends one event in its own transaction and returns its event id. When
/// `hold` is set the transaction stays open that long before committing, so
/// later transactions commit first with higher positions.
async fn append(
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
async fn writer(pool: PgPool, users: usize, versions: i32) -> Vec<(Uuid, i32, Uuid)> {
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
async fn read_all(
    env: &TestEnv,
    written: &[(Uuid, i32, Uuid)],
    deadline: Duration,
) -> Vec<KafkaMessage> {
    let expected: BTreeSet<String> = written.iter().map(|(_, _, id)| id.to_string()).collect();
    read_topic(&env.topic, deadline, |seen| {
        let ids: BTreeSet<&str> = seen
            .iter()
            .filter_map(|m| m.headers.get("ce_id").map(String::as_str))
            .collect();
        expected.iter().all(|id| ids.contains(id.as_str()))
    })
    .await
}

/// Per user, in topic order (one partition per key), the versions seen.
fn versions_by_user(messages: &[KafkaMessage]) -> HashMap<String, Vec<i64>> {
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

async fn relay_status(service: &Running) -> Value {
    let readyz: Value = reqwest::get(service.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    readyz["checks"]["relay"]["detail"].clone()
}

type Breakage = Box<dyn Fn(&mut KafkaMessage)>;

#[test]
fn the_contract_check_refuses_messages_that_break_the_contract() {
    let user = Uuid::new_v4().to_string();
    let good = KafkaMessage {
        key: Some(user.clone()),
        partition: 0,
        offset: 0,
        headers: BTreeMap::from([
            ("ce_specversion".into(), "1.0".into()),
            ("ce_id".into(), Uuid::new_v4().to_string()),
            ("ce_type".into(), "user.deactivated.v1".into()),
            ("ce_source".into(), "urn:test".into()),
            ("ce_time".into(), "2026-11-21T10:00:00.000000Z".into()),
            ("ce_subject".into(), user.clone()),
            ("content-type".into(), "application/json".into()),
        ]),
        body: json!({
            "user_id": user, "stream_version": 2, "global_position": 9,
            "occurred_at": "2026-11-21T10:00:00Z", "data": { "reason": null }
        }),
        raw: String::new(),
    };
    assert_eq!(contract_violations(&good), Vec::<String>::new());
    let broken: Vec<Breakage> = vec![
        Box::new(|m| m.body["data"]["password_hash"] = json!("$argon2id$")),
        Box::new(|m| m.body["stream_version"] = json!(1)),
        Box::new(|m| m.body["user_id"] = json!("not-a-uuid")),
        Box::new(|m| {
            m.headers.remove("ce_id");
        }),
        Box::new(|m| {
            m.headers.insert("ce_type".into(), "user.renamed.v1".into());
        }),
        Box::new(|m| m.key = Some(Uuid::new_v4().to_string())),
        Box::new(|m| {
            m.headers.insert("ce_time".into(), "yesterday".into());
        }),
    ];
    for (i, breaks) in broken.iter().enumerate() {
        let mut message = good.clone();
        breaks(&mut message);
        assert!(
            !contract_violations(&message).is_empty(),
            "breakage {i} went unnoticed"
        );
    }
}

#[tokio::test]
async fn every_event_of_eight_concurrent_writers_reaches_kafka_once_and_in_version_order() {
    let env = TestEnv::new().await;
    let relay = env.spawn(Service::CommandApi, &[]).await;
    // 8 writers × 25 users × 25 versions = 5,000 events.
    let written: Vec<_> = join_all((0..8).map(|_| writer(env.pool.clone(), 25, 25)))
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(written.len(), 5_000);

    let messages = read_all(&env, &written, Duration::from_secs(120)).await;
    let ids: Vec<&str> = messages
        .iter()
        .map(|m| m.headers["ce_id"].as_str())
        .collect();
    let distinct: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 5_000);
    assert_eq!(ids.len(), 5_000, "no duplicates without a crash");
    for (user, versions) in versions_by_user(&messages) {
        assert_eq!(versions, (1..=25).collect::<Vec<i64>>(), "user {user}");
    }
    for message in &messages {
        let problems = contract_violations(message);
        assert!(problems.is_empty(), "{problems:?}");
        // The log's payloads carry a hash; the topic never does.
        assert!(!message.raw.contains("$argon2"), "{}", message.raw);
        assert!(!format!("{:?}", message.headers).contains("$argon2"));
    }
    let status = relay_status(&relay).await;
    assert_eq!(status["leader"], true);
    let metrics = reqwest::get(relay.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let published = metrics
        .lines()
        .find_map(|l| l.strip_prefix("relay_events_published_total "))
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(published, Some(5_000.0), "{metrics}");
}

#[tokio::test]
async fn a_second_replica_takes_over_within_seconds_when_the_leader_dies_mid_stream() {
    let env = TestEnv::new().await;
    let fast = [("RELAY_LEADER_RETRY_MS", "200"), ("RELAY_BATCH_SIZE", "50")];
    let first = env.spawn(Service::CommandApi, &fast).await;
    eventually(
        "the first replica to lead",
        Duration::from_secs(20),
        || async { (relay_status(&first).await["leader"] == true).then_some(()) },
    )
    .await;
    let second = env.spawn(Service::CommandApi, &fast).await;
    assert_eq!(
        relay_status(&second).await["leader"],
        false,
        "one leader only"
    );

    // Stream events while the leader is killed.
    let pool = env.pool.clone();
    let writing = tokio::spawn(async move {
        // 2 writers × 50 users × 20 versions = 2,000 events.
        join_all((0..2).map(|_| writer(pool.clone(), 50, 20)))
            .await
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
    });
    eventually(
        "the leader to publish something",
        Duration::from_secs(30),
        || async {
            let published: i64 = sqlx::query_scalar(
                "SELECT coalesce(max(global_position), 0) FROM relay_checkpoints",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap();
            (published > 0).then_some(())
        },
    )
    .await;
    let killed_at = Instant::now();
    first.kill();
    eventually(
        "the second replica to lead",
        Duration::from_secs(10),
        || async { (relay_status(&second).await["leader"] == true).then_some(()) },
    )
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        takeover < Duration::from_secs(5),
        "takeover took {takeover:?}"
    );

    let written = writing.await.unwrap();
    assert!(
        !writing_was_done_before(&written, killed_at),
        "the kill happened mid-stream"
    );
    let messages = read_all(&env, &written, Duration::from_secs(120)).await;
    // At least once: a crash may repeat events, always with the same ce_id and
    // in the same order per user, so deduplicating by ce_id restores the stream.
    let mut first_copy: HashMap<String, String> = HashMap::new();
    for m in &messages {
        let copy = first_copy
            .entry(m.headers["ce_id"].clone())
            .or_insert_with(|| m.raw.clone());
        assert_eq!(copy, &m.raw, "a duplicate must be the same event");
    }
    let mut seen = BTreeSet::new();
    let deduplicated: Vec<KafkaMessage> = messages
        .into_iter()
        .filter(|m| seen.insert(m.headers["ce_id"].clone()))
        .collect();
    assert_eq!(deduplicated.len(), written.len());
    for (user, versions) in versions_by_user(&deduplicated) {
        assert_eq!(versions, (1..=20).collect::<Vec<i64>>(), "user {user}");
    }
}

/// True when every event was already committed before `at` (the kill was too late).
fn writing_was_done_before(written: &[(Uuid, i32, Uuid)], at: Instant) -> bool {
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
