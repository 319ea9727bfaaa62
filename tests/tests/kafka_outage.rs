//! Kafka goes away: commands are still accepted (the log is the buffer), the
//! lag shows in /readyz and /metrics, and when Kafka returns the backlog drains
//! by itself. This stops the shared broker, so it is its own test binary
//! (cargo runs test binaries one after another).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use userstream_tests::{eventually, read_topic, Service, TestEnv};

fn stack(action: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack");
    let status = Command::new(script)
        .args([action, "kafka"])
        .status()
        .expect("run scripts/stack");
    assert!(status.success(), "scripts/stack {action} kafka failed");
}

/// Restarts Kafka however the test ends, so later tests find it up.
struct KafkaStopped;

impl KafkaStopped {
    fn stop() -> Self {
        stack("stop");
        Self
    }
}

impl Drop for KafkaStopped {
    fn drop(&mut self) {
        stack("start");
    }
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn the_log_buffers_while_kafka_is_down_and_drains_in_order_when_it_returns() {
    let env = TestEnv::new().await;
    let command = env.spawn(Service::CommandApi, &[]).await;
    let http = reqwest::Client::new();

    let outage = KafkaStopped::stop();
    let answers = join_all((0..100).map(|i| {
        let http = http.clone();
        let url = command.url("/users");
        async move {
            let response = http
                .post(url)
                .json(&json!({ "username": format!("outage{i}"), "email": format!("outage{i}@example.com"), "password": "correct horse battery staple" }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201, "commands are accepted while Kafka is down");
            let body: Value = response.json().await.unwrap();
            body["id"].as_str().unwrap().to_owned()
        }
    }))
    .await;
    let ids: BTreeSet<String> = answers.into_iter().collect();
    // A second event for some users, still during the outage.
    let deactivated: Vec<String> = ids.iter().take(20).cloned().collect();
    let token = userstream_tests::identity::admin_token(&http, &command).await;
    for id in &deactivated {
        let response = http
            .post(command.url(&format!("/users/{id}/deactivate")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    let readyz = eventually(
        "the lag to show in /readyz",
        Duration::from_secs(20),
        || async {
            let response = http.get(command.url("/readyz")).send().await.ok()?;
            let status = response.status();
            let body: Value = response.json().await.ok()?;
            (body["checks"]["relay"]["detail"]["lag_events"].as_i64()? >= 100)
                .then_some((status, body))
        },
    )
    .await;
    assert_eq!(readyz.0, 200, "the API stays ready: the log buffers");
    assert!(
        readyz.1["checks"]["relay"]["detail"]["lag_seconds"]
            .as_f64()
            .unwrap()
            >= 0.0
    );
    let metrics = http
        .get(command.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        gauge(&metrics, "relay_lag_events").unwrap() >= 100.0,
        "{metrics}"
    );

    drop(outage); // Kafka starts again.
    let expected = ids.len() + deactivated.len();
    // The administrator's own events are on the topic too; count the users'.
    let messages = read_topic(&env.topic, Duration::from_secs(120), |seen| {
        let distinct: BTreeSet<&str> = seen
            .iter()
            .filter(|m| m.key.as_ref().is_some_and(|key| ids.contains(key)))
            .map(|m| m.headers["ce_id"].as_str())
            .collect();
        distinct.len() >= expected
    })
    .await;
    for id in &ids {
        // In topic order, deduplicated by ce_id: the user's stream, in version order.
        let mut seen = BTreeSet::new();
        let versions: Vec<i64> = messages
            .iter()
            .filter(|m| m.key.as_deref() == Some(id.as_str()))
            .filter(|m| seen.insert(m.headers["ce_id"].clone()))
            .map(|m| m.body["stream_version"].as_i64().unwrap())
            .collect();
        let want: Vec<i64> = if deactivated.contains(id) {
            vec![1, 2]
        } else {
            vec![1]
        };
        assert_eq!(versions, want, "user {id}");
    }
    eventually(
        "the lag to return to zero",
        Duration::from_secs(30),
        || async {
            let metrics = http
                .get(command.url("/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let published = gauge(&metrics, "relay_lag_events")?;
            (published == 0.0).then_some(())
        },
    )
    .await;
}
