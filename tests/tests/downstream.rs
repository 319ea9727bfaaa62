//! The downstream consumer example reads the topic from the beginning and
//! delivers each event once, even when the topic holds it twice.

use std::process::Command;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use userstream_tests::kafka_brokers;
use uuid::Uuid;

async fn publish(producer: &FutureProducer, topic: &str, ce_id: Uuid, user: Uuid, version: i64) {
    let ce_type = if version == 1 {
        "user.registered.v1"
    } else {
        "user.deactivated.v1"
    };
    let data = if version == 1 {
        json!({ "username": "zed", "email": "zed@example.com" })
    } else {
        json!({ "reason": null })
    };
    let body = json!({ "user_id": user, "stream_version": version, "global_position": version,
        "occurred_at": "2026-11-21T10:00:00Z", "data": data })
    .to_string();
    let key = user.to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "ce_id",
            value: Some(&ce_id.to_string()),
        })
        .insert(Header {
            key: "ce_type",
            value: Some(ce_type),
        });
    producer
        .send(
            FutureRecord::to(topic)
                .key(&key)
                .payload(&body)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

#[tokio::test]
async fn the_example_consumer_delivers_each_event_once_despite_redeliveries() {
    let topic = format!("test.downstream.{}", Uuid::new_v4().simple());
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap();
    let user = Uuid::new_v4();
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    publish(&producer, &topic, first, user, 1).await;
    publish(&producer, &topic, first, user, 1).await; // a redelivery
    publish(&producer, &topic, second, user, 2).await;

    let example = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("examples/downstream_consumer"))
        .filter(|p| p.exists())
        .expect(
            "the example is built: `cargo build --workspace --examples`, which `make test` does",
        );
    let output = tokio::task::spawn_blocking(move || {
        Command::new(example)
            .args([
                "--brokers",
                &kafka_brokers(),
                "--topic",
                &topic,
                "--exit-when-idle",
                "5",
            ])
            .output()
            .expect("run the example consumer")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = lines.iter().map(|l| l["ce_id"].as_str().unwrap()).collect();
    assert_eq!(ids, [first.to_string(), second.to_string()]);
    assert_eq!(lines[1]["stream_version"], 2);
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 duplicates skipped"));
}
