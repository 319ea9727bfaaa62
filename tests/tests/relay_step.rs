//! The relay's `step` driven directly against real PostgreSQL and Kafka:
//! queue, publish, idle, and the checkpoint moving only after Kafka's
//! acknowledgements; and the fatal-error path of the gapless producer.

use std::time::Duration;

use command_api::config::{KafkaSettings, RelaySettings};
use command_api::relay::log::{lag, load_checkpoint, LAG_COUNT_CAP};
use command_api::relay::{Checkpoint, Progress, Relay, RelayStatus, Step};
use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
use sqlx::{Connection, PgConnection};
use userstream_tests::relay::{append, assert_each_stream_complete_and_in_order, read_all};
use userstream_tests::{create_topic, eventually, kafka_admin, kafka_brokers, Service, TestEnv};
use uuid::Uuid;

fn kafka(brokers: &str, topic: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: brokers.to_owned(),
        topic: topic.to_owned(),
        topic_partitions: 3,
        topic_replication: 1,
        ce_source: "urn:userstream:test".into(),
        client: Default::default(),
    }
}

fn settings(batch_size: i64) -> RelaySettings {
    RelaySettings {
        enabled: true,
        batch_size,
        poll_interval: Duration::from_millis(500),
        leader_retry: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(5),
        session_check: Duration::from_millis(200),
    }
}

/// Where the log's read order puts the `n`-th event (1-based).
async fn position_in_read_order(conn: &mut PgConnection, n: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT global_position FROM events ORDER BY transaction_id, global_position OFFSET $1 LIMIT 1",
    )
    .bind(n - 1)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// Waits until every event appended so far is readable by the relay: the
/// relay reads only below the cluster's xmin, which any open transaction
/// (another test's, on another database) holds back for a while.
async fn until_readable(conn: &mut PgConnection) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let readable: bool = sqlx::query_scalar(
            "SELECT coalesce(max(transaction_id) < pg_snapshot_xmin(pg_current_snapshot()), true) FROM events",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        if readable {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "the log never became readable"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn step_queues_publishes_and_checkpoints_only_after_kafka_acknowledged() {
    let env = TestEnv::new().await;
    let user = Uuid::now_v7();
    let mut written = Vec::new();
    for version in 1..=3 {
        written.push((
            user,
            version,
            append(&env.pool, user, version, "stepper", None).await,
        ));
    }
    let relay = Relay::new(
        env.pool.clone(),
        kafka(&kafka_brokers(), &env.topic),
        settings(2),
        RelayStatus::default(),
    )
    .unwrap();
    relay.ensure_topic().await.unwrap();
    let mut conn = PgConnection::connect(&env.database_url).await.unwrap();
    let mut progress = Progress::new(load_checkpoint(&mut conn, &env.topic).await.unwrap());
    until_readable(&mut conn).await;

    // Two batches are queued before the first must be acknowledged; nothing
    // is checkpointed while they are only queued.
    assert_eq!(
        relay.step(&mut conn, &mut progress).await.unwrap(),
        Step::Queued(2)
    );
    assert_eq!(
        relay.step(&mut conn, &mut progress).await.unwrap(),
        Step::Queued(1)
    );
    assert_eq!(progress.in_flight(), 2);
    assert_eq!(
        load_checkpoint(&mut conn, &env.topic).await.unwrap(),
        Checkpoint::default()
    );

    assert_eq!(
        relay.step(&mut conn, &mut progress).await.unwrap(),
        Step::Published(2)
    );
    let saved = load_checkpoint(&mut conn, &env.topic).await.unwrap();
    assert_eq!(saved, progress.checkpoint());
    assert_eq!(
        saved.global_position,
        position_in_read_order(&mut conn, 2).await
    );
    assert_eq!(
        relay.step(&mut conn, &mut progress).await.unwrap(),
        Step::Published(1)
    );
    let saved = load_checkpoint(&mut conn, &env.topic).await.unwrap();
    assert_eq!(
        saved.global_position,
        position_in_read_order(&mut conn, 3).await
    );
    assert_eq!(
        relay.step(&mut conn, &mut progress).await.unwrap(),
        Step::Idle
    );
    let messages = read_all(&env.topic, &written, Duration::from_secs(30)).await;
    assert_each_stream_complete_and_in_order(&messages, &written, 3);

    // A broker that never answers: the event is queued, never acknowledged,
    // and the checkpoint stays where it was.
    append(&env.pool, user, 4, "stepper", None).await;
    let unreachable = Relay::new(
        env.pool.clone(),
        kafka("127.0.0.1:1", &env.topic),
        settings(2),
        RelayStatus::default(),
    )
    .unwrap();
    let mut progress = Progress::new(saved);
    until_readable(&mut conn).await;
    assert_eq!(
        unreachable.step(&mut conn, &mut progress).await.unwrap(),
        Step::Queued(1)
    );
    // A NOTIFY while that batch waits ends the wait, and the batch stays in
    // flight, first in line; the next step reads and queues behind it.
    let woken = tokio::time::timeout(
        Duration::from_secs(3),
        unreachable.step_or_wake(&mut conn, &mut progress, std::future::ready(())),
    )
    .await;
    assert_eq!(woken.expect("woken at once").unwrap(), Step::Woken);
    assert_eq!(progress.in_flight(), 1);
    append(&env.pool, user, 5, "stepper", None).await;
    until_readable(&mut conn).await;
    assert_eq!(
        unreachable.step(&mut conn, &mut progress).await.unwrap(),
        Step::Queued(1)
    );
    // With the pipeline full, a NOTIFY does not end the wait.
    let full = tokio::time::timeout(
        Duration::from_secs(2),
        unreachable.step_or_wake(&mut conn, &mut progress, std::future::ready(())),
    )
    .await;
    assert!(
        full.is_err(),
        "a full pipeline waits for acknowledgements: {full:?}"
    );
    let waiting = tokio::time::timeout(
        Duration::from_secs(3),
        unreachable.step(&mut conn, &mut progress),
    )
    .await;
    assert!(waiting.is_err(), "no acknowledgement, no step: {waiting:?}");
    assert_eq!(load_checkpoint(&mut conn, &env.topic).await.unwrap(), saved);
}

/// A registration whose message is far larger than the topic accepts.
fn huge_name() -> String {
    (0..1_000)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect()
}

#[tokio::test]
async fn a_fatal_producer_error_replaces_the_producer_and_resends_from_the_checkpoint_in_order() {
    let env = TestEnv::new().await;
    // The topic refuses records over 20 kB: a permanent error for the huge
    // event, which the gapless producer turns into a fatal error.
    create_topic(&env.topic, 3, &[("max.message.bytes", "20000")]).await;

    let users: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let mut written = Vec::new();
    for version in 1..=6 {
        for (i, user) in users.iter().enumerate() {
            let name = if i == 1 && version == 1 {
                huge_name()
            } else {
                format!("fatal{i}")
            };
            written.push((
                *user,
                version,
                append(&env.pool, *user, version, &name, None).await,
            ));
        }
    }
    let relay = env
        .spawn(Service::CommandApi, &[("RELAY_BATCH_SIZE", "3")])
        .await;
    eventually(
        "a fatal producer error",
        Duration::from_secs(30),
        || async { (relay.metric("relay_producers_replaced_total").await >= 1.0).then_some(()) },
    )
    .await;
    assert!(
        relay.logs().iter().any(|l| l.contains("gap-less")),
        "librdkafka named the gapless guarantee"
    );
    // The operator raises the limit; the relay, with a fresh producer, sends
    // everything after its checkpoint again.
    let raise =
        AlterConfig::new(ResourceSpecifier::Topic(&env.topic)).set("max.message.bytes", "1048588");
    for altered in kafka_admin()
        .alter_configs([&raise], &AdminOptions::new())
        .await
        .unwrap()
    {
        altered.unwrap();
    }
    let messages = read_all(&env.topic, &written, Duration::from_secs(60)).await;
    assert_each_stream_complete_and_in_order(&messages, &written, 6);
}

#[tokio::test]
async fn the_lag_is_exact_up_to_the_cap_and_an_estimate_beyond_it() {
    let env = TestEnv::new().await;
    let user = Uuid::now_v7();
    for version in 1..=3 {
        append(&env.pool, user, version, "lagging", None).await;
    }
    let exact = lag(&env.pool, &env.topic).await.unwrap();
    assert_eq!((exact.events, exact.estimated), (3, false));
    assert!(exact.seconds >= 0.0);

    // A backlog past the cap, one user per event, in one transaction.
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         SELECT gen_random_uuid(), 1, gen_random_uuid(), 'UserDeactivated', 1, '{\"reason\": null}'::jsonb \
         FROM generate_series(1, $1)",
    )
    .bind(LAG_COUNT_CAP)
    .execute(&env.pool)
    .await
    .unwrap();
    let estimated = lag(&env.pool, &env.topic).await.unwrap();
    assert!(estimated.estimated);
    assert_eq!(estimated.events, LAG_COUNT_CAP + 3);

    // Once everything is checkpointed, the lag is exactly zero.
    let mut conn = PgConnection::connect(&env.database_url).await.unwrap();
    let last: (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM events \
         ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let checkpoint = Checkpoint {
        transaction_id: last.0,
        global_position: last.1,
    };
    command_api::relay::log::save_checkpoint(&mut conn, &env.topic, checkpoint)
        .await
        .unwrap();
    let none = lag(&env.pool, &env.topic).await.unwrap();
    assert_eq!((none.events, none.estimated, none.seconds), (0, false, 0.0));
}
