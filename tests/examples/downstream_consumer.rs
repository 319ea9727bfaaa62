//! A downstream consumer of `users.events.v1`, as another team would write it:
//! reads the topic from the beginning, skips redeliveries by `ce_id` (the
//! topic is at-least-once), and prints one JSON line per event.
//!
//!     cargo run -p userstream-tests --example downstream_consumer -- \
//!         --brokers 127.0.0.1:9092 --topic users.events.v1 [--exit-when-idle 5]
//!
//! A real consumer keeps the seen ids (or, equivalently, the last
//! `stream_version` per user) durably, next to the effects it applies.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message};

struct Args {
    brokers: String,
    topic: String,
    exit_when_idle: Option<Duration>,
}

fn args() -> Args {
    let mut args = Args {
        brokers: "127.0.0.1:9092".into(),
        topic: "users.events.v1".into(),
        exit_when_idle: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--brokers" => args.brokers = value,
            "--topic" => args.topic = value,
            "--exit-when-idle" => {
                args.exit_when_idle = value.parse().ok().map(Duration::from_secs);
            }
            other => {
                eprintln!("unknown flag {other}; use --brokers, --topic, --exit-when-idle SECONDS");
                std::process::exit(2);
            }
        }
    }
    args
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args();
    // A fresh group reads from the beginning; a long-lived consumer would keep one name.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set(
            "group.id",
            format!("downstream-example-{}", uuid::Uuid::new_v4()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&args.topic])?;

    let mut seen = HashSet::new();
    let (mut delivered, mut duplicates) = (0u64, 0u64);
    loop {
        let received = match args.exit_when_idle {
            Some(idle) => match tokio::time::timeout(idle, consumer.recv()).await {
                Ok(received) => received,
                Err(_) => break,
            },
            None => consumer.recv().await,
        };
        let message = received?;
        let header = |name: &str| {
            message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        let Some(ce_id) = header("ce_id") else {
            eprintln!(
                "skipping a message without ce_id at offset {}",
                message.offset()
            );
            continue;
        };
        if !seen.insert(ce_id.clone()) {
            duplicates += 1;
            continue;
        }
        let body: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default()).unwrap_or_default();
        println!(
            "{}",
            serde_json::json!({
                "ce_id": ce_id,
                "ce_type": header("ce_type"),
                "user_id": body["user_id"],
                "stream_version": body["stream_version"],
                "data": body["data"],
            })
        );
        delivered += 1;
    }
    eprintln!("{delivered} events, {duplicates} duplicates skipped");
    Ok(())
}
