//! The read side under bad input and crashes, with the real binaries on the
//! real stack: one poisoned message affects one user at most, a gap heals from
//! the log, a dead consumer task takes the projector down, and a projector
//! killed mid-stream ends equal to a fold of the log.

use std::time::Duration;

use events::{IntegrationEvent, PublicChange};
use serde_json::Value;
use userstream_tests::read_side::{
    await_version, logged_events, produce, read_user, register, set_active,
};
use userstream_tests::{eventually, Service, TestEnv};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn poisoned_messages_affect_one_user_at_most_and_a_gap_heals_from_the_log() {
    let env = TestEnv::new().await;
    let http = reqwest::Client::new();
    // Write without a relay first, so the test decides what reaches the topic.
    let quiet = env
        .spawn(Service::CommandApi, &[("RELAY_ENABLED", "false")])
        .await;
    let gwen = register(&http, &quiet, "gwen").await.id;
    set_active(&http, &quiet, gwen, false).await;
    set_active(&http, &quiet, gwen, true).await;
    quiet.stop().await;
    let log = logged_events(&env.pool, gwen).await;
    assert_eq!(log.len(), 3);

    // Version 1, then version 3: version 2 never arrives on the topic.
    produce(&env.topic, &log[0], None).await;
    produce(&env.topic, &log[2], None).await;
    // A reactivation at version 4 whose event is not in the log (the kcat message).
    let forged = IntegrationEvent {
        event_id: Uuid::new_v4(),
        stream_version: 4,
        change: PublicChange::Reactivated { reason: None },
        ..log[2].clone()
    };
    produce(&env.topic, &forged, None).await;
    // Headers of a user event, a body that is not one.
    let garbled = IntegrationEvent {
        event_id: Uuid::new_v4(),
        ..log[1].clone()
    };
    produce(&env.topic, &garbled, Some(b"\x00\x01 not json")).await;

    let projector = env.spawn(Service::Projector, &[]).await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let healed = await_version(&http, &query, gwen, 3).await;
    assert_eq!(healed["status"], "active");

    // Everyone else keeps being projected, through the real relay.
    let command = env.spawn(Service::CommandApi, &[]).await;
    let mut users = Vec::new();
    for i in 0..100 {
        users.push(register(&http, &command, &format!("user{i:03}")).await);
    }
    for user in &users {
        let view = await_version(&http, &query, user.id, user.version).await;
        assert_eq!(view["status"], "active");
    }
    assert_eq!(read_user(&http, &query, gwen).await.1["version"], 3);

    // The two that cannot apply are parked, counted and reported; nothing else.
    let parked: Vec<(String, Option<Uuid>)> =
        sqlx::query_as("SELECT reason, user_id FROM projector_parked ORDER BY reason")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        parked,
        [
            ("not_in_log".to_owned(), Some(gwen)),
            ("undecodable".to_owned(), None)
        ]
    );
    let readyz: Value = reqwest::get(projector.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(readyz["ready"], true, "{readyz}");
    assert_eq!(
        readyz["checks"]["parked"]["detail"]["degraded"]["count"], 2,
        "{readyz}"
    );
    assert_eq!(projector.metric("projector_parked_total").await, 2.0);
    assert!(projector.metric("projector_events_healed_total").await >= 1.0);

    // `projector status` and the gauges it feeds report the same.
    let status = env
        .run(Service::Projector, &["status", "--json"], &[], DEADLINE)
        .await;
    status.assert_success();
    let status: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["parked_total"], 2, "{status}");
    assert_eq!(status["parked"]["not_in_log"], 1, "{status}");
    eventually("the parked gauge", DEADLINE, || async {
        (projector.metric("projector_parked_messages").await == 2.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_long_database_outage_does_not_cost_the_consumer_its_group_membership() {
    let env = TestEnv::new().await;
    let http = reqwest::Client::new();
    let command = env.spawn(Service::CommandApi, &[]).await;
    // The first 8 attempts at every batch fail, as if PostgreSQL were down:
    // with backoff that is about 11 s, longer than the 6 s poll interval.
    let projector = env
        .spawn(
            Service::Projector,
            &[
                ("FAILPOINTS", "projector::apply_batch=8*return->off"),
                ("KAFKA_SESSION_TIMEOUT_MS", "6000"),
                ("KAFKA_MAX_POLL_INTERVAL_MS", "6000"),
            ],
        )
        .await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    let ivy = register(&http, &command, "ivy").await;
    await_version(&http, &query, ivy.id, 1).await;
    assert!(projector.metric("projector_apply_errors_total").await >= 8.0);
    // librdkafka reports a consumer that stopped polling as MaxPollExceeded
    // ("maximum application poll interval exceeded") and leaves the group.
    let left_group = projector
        .logs()
        .into_iter()
        .filter(|l| l.contains("poll interval") || l.contains("MAXPOLL"))
        .collect::<Vec<_>>();
    assert!(left_group.is_empty(), "{left_group:#?}");
}

#[tokio::test]
async fn a_consumer_task_that_dies_makes_the_projector_unready_and_exit_non_zero() {
    let env = TestEnv::new().await;
    let http = reqwest::Client::new();
    let command = env.spawn(Service::CommandApi, &[]).await;
    let projector = env
        .spawn(
            Service::Projector,
            &[("FAILPOINTS", "projector::consume=panic")],
        )
        .await;
    register(&http, &command, "hank").await;
    let url = projector.url("/readyz");
    let readyz: Value = eventually("the projector to report unready", DEADLINE, || {
        let url = url.clone();
        async move {
            let response = reqwest::get(url).await.ok()?;
            (response.status() == 503).then_some(())?;
            response.json().await.ok()
        }
    })
    .await;
    assert_eq!(readyz["checks"]["tasks"]["error"], "task consumer panicked");
    let status = projector.wait_exit(DEADLINE).await;
    assert!(!status.success(), "exited with {status}");
}

/// Appends `users` users of four events each (registered, deactivated,
/// reactivated, deactivated) straight into the log, one transaction.
async fn append_users(pool: &sqlx::PgPool, users: i64) {
    sqlx::query(
        "WITH u AS (SELECT gen_random_uuid() AS id, n FROM generate_series(1, $1) AS n) \
         INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
         SELECT u.id, v.version, gen_random_uuid(), v.event_type, 1, \
                CASE WHEN v.version = 1 THEN jsonb_build_object( \
                       'username', 'bulk' || replace(u.id::text, '-', ''), \
                       'email', replace(u.id::text, '-', '') || '@example.com', \
                       'password_hash', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA') \
                     ELSE '{\"reason\": null}'::jsonb END \
         FROM u CROSS JOIN (VALUES (1, 'UserRegistered'), (2, 'UserDeactivated'), \
                                   (3, 'UserReactivated'), (4, 'UserDeactivated')) AS v(version, event_type) \
         ORDER BY u.n, v.version",
    )
    .bind(users)
    .execute(pool)
    .await
    .unwrap();
}

/// Views that differ from a fold of the log done in SQL: the last version,
/// the status of the last status event, the registered name and address.
async fn views_unlike_the_log(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "WITH folded AS ( \
           SELECT stream_id, max(stream_version) AS version, \
                  (array_agg(event_type ORDER BY stream_version DESC))[1] AS last_type, \
                  max(payload->>'username') AS username, max(payload->>'email') AS email \
           FROM events GROUP BY stream_id) \
         SELECT count(*) FROM folded f FULL JOIN user_views v ON v.id = f.stream_id \
         WHERE v.id IS NULL OR f.stream_id IS NULL OR v.version <> f.version \
            OR v.username <> f.username OR v.email <> f.email \
            OR v.status <> CASE f.last_type WHEN 'UserDeactivated' THEN 'deactivated' ELSE 'active' END",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_projector_killed_mid_stream_ends_equal_to_a_fold_of_the_log() {
    let env = TestEnv::new().await;
    let _command = env.spawn(Service::CommandApi, &[]).await;
    // The broker's smallest session: the dead member's partitions move sooner.
    let session = [("KAFKA_SESSION_TIMEOUT_MS", "6000")];
    let projector = env.spawn(Service::Projector, &session).await;
    // 10,000 events in 25 transactions; the projector is killed part-way.
    for _ in 0..8 {
        append_users(&env.pool, 100).await;
    }
    eventually("the projector to be part-way", DEADLINE, || async {
        let views: i64 = sqlx::query_scalar("SELECT count(*) FROM user_views")
            .fetch_one(&env.pool)
            .await
            .ok()?;
        (views > 0).then_some(())
    })
    .await;
    projector.kill();
    for _ in 8..25 {
        append_users(&env.pool, 100).await;
    }
    let part_way: i64 = sqlx::query_scalar("SELECT coalesce(sum(version), 0) FROM user_views")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(
        part_way < 10_000,
        "killed before the end ({part_way} applied)"
    );

    let projector = env.spawn(Service::Projector, &session).await;
    eventually(
        "every event to be applied",
        Duration::from_secs(120),
        || async {
            let applied: i64 =
                sqlx::query_scalar("SELECT coalesce(sum(version), 0) FROM user_views")
                    .fetch_one(&env.pool)
                    .await
                    .ok()?;
            (applied == 10_000).then_some(())
        },
    )
    .await;
    assert_eq!(views_unlike_the_log(&env.pool).await, 0);
    assert_eq!(
        projector.metric("projector_parked_total").await,
        0.0,
        "nothing parked"
    );
}
