//! Leadership of the relay: a leader whose lock session is killed while its
//! process lives steps down within seconds and another replica takes over,
//! nothing skipped or reordered; relays of two topics on one database lead
//! side by side. Real PostgreSQL, real Kafka, real command-api binaries.

use std::time::{Duration, Instant};

use userstream_tests::relay::{
    assert_each_stream_complete_and_in_order, leader_and_standby, read_all, relay_status,
    stream_events, writer, writing_was_done_before,
};
use userstream_tests::{eventually, Service, TestEnv};

const FAST: [(&str, &str); 3] = [
    ("RELAY_LEADER_RETRY_MS", "200"),
    ("RELAY_BATCH_SIZE", "50"),
    ("RELAY_SESSION_CHECK_MS", "200"),
];

/// The backend holding a relay leader lock in this test's database.
async fn leader_backends(env: &TestEnv) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted \
           AND a.datname = current_database() AND a.application_name = $1",
    )
    .bind(command_api::relay::session::APPLICATION_NAME)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_leader_whose_lock_session_is_killed_steps_down_and_another_takes_over_in_order() {
    let env = TestEnv::new().await;
    let (first, second) = leader_and_standby(&env, &FAST).await;

    let pool = env.pool.clone();
    let writing = stream_events(pool);
    eventually(
        "the leader to publish something",
        Duration::from_secs(30),
        || async { (first.metric("relay_events_published_total").await > 0.0).then_some(()) },
    )
    .await;

    // Only this test's database: the lock session of the first replica.
    let backends = leader_backends(&env).await;
    assert_eq!(backends.len(), 1, "one lock holder: {backends:?}");
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(backends[0])
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(killed);
    let killed_at = Instant::now();

    eventually(
        "the old leader to step down",
        Duration::from_secs(5),
        || async { (relay_status(&first).await["leader"] == false).then_some(()) },
    )
    .await;
    let stepped_down = killed_at.elapsed();
    let published_by_first = first.metric("relay_events_published_total").await;
    eventually(
        "the second replica to lead",
        Duration::from_secs(10),
        || async { (relay_status(&second).await["leader"] == true).then_some(()) },
    )
    .await;
    let takeover = killed_at.elapsed();
    assert!(
        stepped_down < Duration::from_secs(3),
        "stepping down took {stepped_down:?}"
    );
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
    assert_each_stream_complete_and_in_order(&messages, &written, 20);
    // The old leader published nothing after it stepped down, and the new one
    // holds the lock.
    assert_eq!(
        first.metric("relay_events_published_total").await,
        published_by_first
    );
    assert_eq!(relay_status(&first).await["leader"], false);
    assert!(second.metric("relay_events_published_total").await > 0.0);
    assert_eq!(leader_backends(&env).await.len(), 1);
}

#[tokio::test]
async fn relays_of_two_topics_on_one_database_both_lead_and_publish_at_once() {
    let env = TestEnv::new().await;
    let other_topic = format!("{}.other", env.topic);
    let one = env.spawn(Service::CommandApi, &FAST).await;
    let mut extra = FAST.to_vec();
    extra.push(("KAFKA_TOPIC", other_topic.as_str()));
    let two = env.spawn(Service::CommandApi, &extra).await;
    for relay in [&one, &two] {
        eventually("both relays to lead", Duration::from_secs(20), || async {
            (relay_status(relay).await["leader"] == true).then_some(())
        })
        .await;
    }
    let written = writer(env.pool.clone(), 20, 5).await;
    for topic in [&env.topic, &other_topic] {
        let messages = read_all(topic, &written, Duration::from_secs(60)).await;
        assert_each_stream_complete_and_in_order(&messages, &written, 5);
    }
    let checkpoints: i64 = sqlx::query_scalar("SELECT count(*) FROM relay_checkpoints")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(checkpoints, 2, "one checkpoint per topic");
}
