//! The relay draining a backlog, against a plain librdkafka producer sending
//! the same messages with the same settings to the same broker.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use command_api::config::KafkaSettings;
use command_api::relay::{producer_config, read_batch, Checkpoint};
use events::IntegrationEvent;
use futures::future::try_join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sqlx::{Connection, PgConnection};
use userstream_tests::{kafka_brokers, Service, TestEnv};

use crate::{Plan, PATIENCE};

pub struct Drain {
    pub relay: f64,
    pub plain: f64,
    pub events: i64,
}

/// A backlog of `events` events: users of four events each (registered,
/// deactivated, reactivated, deactivated), one transaction per version.
const SEED: &str = "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload) \
    SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, $2, gen_random_uuid(), \
      CASE $2 WHEN 1 THEN 'UserRegistered' WHEN 3 THEN 'UserReactivated' ELSE 'UserDeactivated' END, 1, \
      CASE $2 WHEN 1 THEN jsonb_build_object('username', 'drain' || n, 'email', 'drain' || n || '@example.com', \
                                          'password_hash', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA') \
              ELSE '{\"reason\": \"bench\"}'::jsonb END \
    FROM generate_series(0, $1 - 1) AS n";

fn kafka(topic: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: kafka_brokers(),
        topic: topic.to_owned(),
        topic_partitions: 6,
        topic_replication: 1,
        ce_source: "urn:userstream:command-api".into(),
        client: Default::default(),
    }
}

async fn create_topic(topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()?;
    let new = NewTopic::new(topic, 6, TopicReplication::Fixed(1));
    for result in admin.create_topics([&new], &AdminOptions::new()).await? {
        if let Err((topic, code)) = result {
            bail!("create {topic}: {code}");
        }
    }
    Ok(())
}

/// The baseline: the same messages, built before the clock starts, sent by a
/// bare producer that only waits for acknowledgements.
async fn plain_producer(env: &TestEnv, topic: &str) -> anyhow::Result<f64> {
    let mut conn = PgConnection::connect(&env.database_url).await?;
    let mut after = Checkpoint::default();
    let mut messages = Vec::new();
    loop {
        let batch = read_batch(&mut conn, after, 10_000).await?;
        let Some((xid, last)) = batch.last() else {
            break;
        };
        after = Checkpoint {
            transaction_id: *xid,
            global_position: last.global_position,
        };
        for (_, recorded) in &batch {
            let event = IntegrationEvent::from_recorded(recorded);
            let headers: Vec<(&'static str, String)> =
                event.headers("urn:userstream:command-api").into();
            messages.push((event.key(), event.body(), headers));
        }
    }
    create_topic(topic).await?;
    let producer: FutureProducer = producer_config(&kafka(topic)).create()?;
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(messages.len());
    for (key, body, headers) in &messages {
        let headers = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        });
        let mut record = FutureRecord::to(topic)
            .key(key)
            .payload(body)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
    for delivery in try_join_all(deliveries).await? {
        if let Err((error, _)) = delivery {
            return Err(error.into());
        }
    }
    Ok(messages.len() as f64 / started.elapsed().as_secs_f64())
}

/// Writes a log of `users` × 4 events (see [`SEED`]) in four transactions,
/// one per version, and returns the last position.
pub async fn seed_log(env: &TestEnv, users: i64) -> anyhow::Result<i64> {
    for version in 1..=4 {
        sqlx::query(SEED)
            .bind(users)
            .bind(version)
            .execute(&env.pool)
            .await
            .context("seed the backlog")?;
    }
    sqlx::query("VACUUM ANALYZE events")
        .execute(&env.pool)
        .await?;
    Ok(
        sqlx::query_scalar("SELECT max(global_position) FROM events")
            .fetch_one(&env.pool)
            .await?,
    )
}

pub async fn drain(plan: &Plan, run: usize) -> anyhow::Result<Drain> {
    let env = TestEnv::new().await;
    let last = seed_log(&env, plan.backlog / 4).await?;

    let plain = plain_producer(&env, &format!("{}.plain{run}", env.topic)).await?;

    let relay = env
        .spawn(
            Service::CommandApi,
            &[("RUST_LOG", "warn,platform::service=info")],
        )
        .await;
    let checkpoint = || async {
        sqlx::query_scalar::<_, i64>("SELECT global_position FROM relay_checkpoints")
            .fetch_optional(&env.pool)
            .await
    };
    let give_up = Instant::now() + PATIENCE;
    // The clock starts at the first checkpoint, so start-up is not counted.
    let (first, started) = loop {
        if let Some(position) = checkpoint().await? {
            break (position, Instant::now());
        }
        if Instant::now() > give_up {
            bail!("the relay published nothing");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    loop {
        if checkpoint().await? == Some(last) {
            break;
        }
        if Instant::now() > give_up {
            bail!("the relay did not drain the backlog");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let relay_rate = (last - first) as f64 / started.elapsed().as_secs_f64();
    drop(relay);
    Ok(Drain {
        relay: relay_rate,
        plain,
        events: plan.backlog,
    })
}
