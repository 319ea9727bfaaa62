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
