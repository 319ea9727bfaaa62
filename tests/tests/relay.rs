//! The relay mirrors the log to Kafka: nothing skipped, nothing reordered,
//! one leader among replicas. Real PostgreSQL, real Kafka, real command-api
//! binaries as relays.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use events::{IntegrationEvent, Profile, PublicChange};
use futures::future::join_all;
use serde_json::json;
use userstream_tests::relay::{
    assert_each_stream_complete_and_in_order, leader_and_standby, read_all, relay_status,
    stream_events, versions_by_user, writer, writing_was_done_before,
};
use userstream_tests::{contract_violations, eventually, KafkaMessage, Service, TestEnv};
use uuid::Uuid;

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

/// The message the relay would publish for `event`.
fn message_of(event: &IntegrationEvent) -> KafkaMessage {
    let raw = String::from_utf8(event.body()).unwrap();
    KafkaMessage {
        key: Some(event.key()),
        partition: 0,
        offset: 0,
        headers: event
            .headers("urn:test")
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
        body: serde_json::from_str(&raw).unwrap(),
        raw,
    }
}

/// Every public change, encoded as the relay encodes it, is accepted by the
/// schema of its ce_type; and each schema refuses what its type must not
/// carry. Covers the types the command API cannot produce yet, without
/// services.
#[test]
fn every_public_change_encodes_to_a_body_its_schema_accepts() {
    let until = "2031-02-03T04:05:06.123456Z".parse().unwrap();
    let recorded: DateTime<Utc> = "2026-11-21T10:00:00.654321Z".parse().unwrap();
    let changes = [
        PublicChange::Registered {
            username: "rosa".into(),
            email: "rosa@example.com".into(),
        },
        PublicChange::Deactivated { reason: None },
        PublicChange::Reactivated {
            reason: Some("appeal".into()),
        },
        PublicChange::PasswordCheckFailed,
        PublicChange::PasswordCheckSucceeded,
        PublicChange::Locked { until },
        PublicChange::Unlocked {
            reason: Some("called the help desk".into()),
        },
        PublicChange::Unlocked { reason: None },
        PublicChange::PasswordChanged,
        PublicChange::PasswordRehashed,
        PublicChange::RoleGranted {
            role: "support_2nd-line".into(),
        },
        PublicChange::RoleRevoked {
            role: "admin".into(),
        },
        PublicChange::ProfileChanged(Profile {
            display_name: Some("Rosa P.".into()),
            locale: Some("es-MX".into()),
            time_zone: None,
            preferences: [
                ("theme".to_owned(), json!("dark")),
                ("digest".to_owned(), json!(true)),
                ("page_size".to_owned(), json!(50)),
                ("ratio".to_owned(), json!(0.75)),
            ]
            .into(),
        }),
        PublicChange::ProfileChanged(Profile::default()),
        PublicChange::EmailVerificationRequested {
            email: "rosa@new.example".into(),
            expires_at: until,
        },
        PublicChange::EmailCodeFailed,
        PublicChange::EmailVerified {
            email: "rosa@new.example".into(),
        },
        PublicChange::PasswordResetRequested {
            email: "rosa@new.example".into(),
            expires_at: until,
        },
        PublicChange::PasswordResetFailed,
        PublicChange::PasswordReset,
    ];
    let user = Uuid::new_v4();
    let events: Vec<IntegrationEvent> = changes
        .into_iter()
        .zip(1..)
        .map(|(change, version)| IntegrationEvent {
            event_id: Uuid::new_v4(),
            user_id: user,
            stream_version: version,
            global_position: i64::from(version) + 40,
            // Recorded times have microseconds, as ce_time does.
            occurred_at: recorded,
            change,
        })
        .collect();
    let covered: BTreeSet<&str> = events.iter().map(IntegrationEvent::ce_type).collect();
    let produced: BTreeSet<&str> = IntegrationEvent::TYPES.iter().copied().collect();
    assert_eq!(covered, produced, "one event of every type");
    for event in &events {
        let problems = contract_violations(&message_of(event));
        assert!(problems.is_empty(), "{}: {problems:?}", event.ce_type());
    }

    let by_type = |ce_type: &str| {
        message_of(
            events
                .iter()
                .find(|e| e.ce_type() == ce_type)
                .expect("an event of this type"),
        )
    };
    let refused: Vec<(&str, Breakage)> = vec![
        (
            "user.password_check_failed.v1",
            Box::new(|m| m.body["data"]["password_hash"] = json!("$argon2id$")),
        ),
        (
            "user.password_check_succeeded.v1",
            Box::new(|m| m.body["stream_version"] = json!(1)),
        ),
        (
            "user.locked.v1",
            Box::new(|m| m.body["data"]["until"] = json!("tomorrow")),
        ),
        ("user.locked.v1", Box::new(|m| m.body["data"] = json!({}))),
        (
            "user.unlocked.v1",
            Box::new(|m| m.body["data"]["reason"] = json!("x".repeat(501))),
        ),
        (
            "user.password_changed.v1",
            Box::new(|m| m.body["data"]["password_hash"] = json!("$argon2id$")),
        ),
        (
            "user.password_rehashed.v1",
            Box::new(|m| m.body["data"]["hash"] = json!("$argon2id$")),
        ),
        (
            "user.role_granted.v1",
            Box::new(|m| m.body["data"]["role"] = json!("Admin")),
        ),
        (
            "user.role_granted.v1",
            Box::new(|m| m.body["data"]["role"] = json!(format!("a{}", "b".repeat(32)))),
        ),
        (
            "user.role_revoked.v1",
            Box::new(|m| m.body["data"]["role"] = json!(null)),
        ),
        (
            "user.profile_changed.v1",
            Box::new(|m| m.body["data"]["preferences"]["nested"] = json!({ "a": 1 })),
        ),
        (
            "user.profile_changed.v1",
            Box::new(|m| m.body["data"]["preferences"]["list"] = json!([1])),
        ),
        (
            "user.profile_changed.v1",
            Box::new(|m| m.body["data"]["display_name"] = json!(7)),
        ),
        (
            "user.profile_changed.v1",
            Box::new(|m| {
                m.body["data"].as_object_mut().unwrap().remove("locale");
            }),
        ),
        // A mailed code is never on the topic, not even sealed.
        (
            "user.email_verification_requested.v1",
            Box::new(|m| m.body["data"]["sealed_code"] = json!("v1.sealed")),
        ),
        (
            "user.email_verification_requested.v1",
            Box::new(|m| m.body["data"]["expires_at"] = json!("soon")),
        ),
        (
            "user.password_reset_requested.v1",
            Box::new(|m| m.body["data"]["sealed_code"] = json!("v1.sealed")),
        ),
        (
            "user.password_reset_requested.v1",
            Box::new(|m| m.body["data"]["email"] = json!("not an address")),
        ),
        (
            "user.email_verified.v1",
            Box::new(|m| m.body["data"] = json!({})),
        ),
        (
            "user.email_code_failed.v1",
            Box::new(|m| m.body["data"]["code"] = json!("123456")),
        ),
        (
            "user.password_reset_failed.v1",
            Box::new(|m| m.body["data"]["code"] = json!("123456")),
        ),
        (
            "user.password_reset.v1",
            Box::new(|m| m.body["data"]["password_hash"] = json!("$argon2id$")),
        ),
    ];
    for (ce_type, breaks) in &refused {
        let mut message = by_type(ce_type);
        breaks(&mut message);
        assert!(
            !contract_violations(&message).is_empty(),
            "{ce_type}: {} went unnoticed",
            message.body
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

    let messages = read_all(&env.topic, &written, Duration::from_secs(120)).await;
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
    let (first, second) = leader_and_standby(&env, &fast).await;

    // Stream events while the leader is killed.
    let pool = env.pool.clone();
    let writing = stream_events(pool);
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
    let messages = read_all(&env.topic, &written, Duration::from_secs(120)).await;
    // At least once: a crash may repeat events, always with the same ce_id and
    // in the same order per user, so deduplicating by ce_id restores the stream.
    assert_each_stream_complete_and_in_order(&messages, &written, 20);
}
