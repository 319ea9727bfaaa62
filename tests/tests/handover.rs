//! Consumer offsets: what a consumer commits is the next message to read, so
//! a member that takes over a partition (after a restart, a hand-over or a
//! rebalance) neither skips a message nor falls off the end of the log.

use std::convert::Infallible;
use std::time::Duration;

use platform::consumer::BatchConsumer;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use userstream_tests::read_side::{await_version, register};
use userstream_tests::{create_topic, kafka_brokers, Service, TestEnv};

const WAIT: Duration = Duration::from_secs(10);

async fn produce(topic: &str, payloads: &[&str]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap();
    for payload in payloads {
        let record = FutureRecord::<str, str>::to(topic)
            .partition(0)
            .payload(payload);
        producer
            .send(record, WAIT)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

fn subscribe(topic: &str, group: &str) -> BatchConsumer {
    let config = platform::consumer::config(&kafka_brokers(), group, "handover-test", 10_000);
    BatchConsumer::subscribe(&config, topic, "handover_test_consume_errors_total").unwrap()
}

/// Consumes `n` messages as one service would (apply, then store), commits,
/// and returns their offsets.
async fn consume(consumer: &mut BatchConsumer, n: usize) -> Vec<i64> {
    let (_trigger, mut shutdown) = platform::shutdown::channel();
    let mut offsets = Vec::new();
    while offsets.len() < n {
        let batch =
            tokio::time::timeout(WAIT, consumer.next_batch(n - offsets.len(), &mut shutdown))
                .await
                .expect("messages arrive")
                .expect("no shutdown");
        consumer
            .until_committed(
                &batch,
                &mut shutdown,
                || async { Ok::<_, Infallible>(()) },
                |_, _| {},
            )
            .await
            .expect("applied");
        offsets.extend(batch.iter().map(|m| m.offset));
    }
    consumer.commit();
    offsets
}

fn committed(topic: &str, group: &str) -> Offset {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(topic, 0);
    let committed = consumer.committed_offsets(wanted, WAIT).unwrap();
    committed.find_partition(topic, 0).unwrap().offset()
}

#[tokio::test]
async fn the_committed_offset_is_the_next_message_and_a_new_member_starts_there() {
    let env = TestEnv::new().await;
    create_topic(&env.topic, 1, &[]).await;
    produce(&env.topic, &["a", "b", "c"]).await;
    let mut first = subscribe(&env.topic, &env.group_id);
    assert_eq!(consume(&mut first, 3).await, [0, 1, 2]);
    assert_eq!(committed(&env.topic, &env.group_id), Offset::Offset(3));
    drop(first);

    // Two more arrive before the next member of the group starts: it reads
    // both, from the committed offset on.
    produce(&env.topic, &["d", "e"]).await;
    let mut next = subscribe(&env.topic, &env.group_id);
    assert_eq!(consume(&mut next, 2).await, [3, 4]);
    assert_eq!(committed(&env.topic, &env.group_id), Offset::Offset(5));
}

/// The symptom, through the real binaries: a projector that takes over a
/// stopped one's group projects every user registered afterwards, and no
/// partition's offset had to be reset.
#[tokio::test]
async fn a_projector_taking_over_the_group_projects_every_user_registered_after() {
    let env = TestEnv::new().await;
    let http = reqwest::Client::new();
    let command = env.spawn(Service::CommandApi, &[]).await;
    let first = env.spawn(Service::Projector, &[]).await;
    let query = env.spawn(Service::QueryApi, &[]).await;
    // Registers 12 users (spread over the partitions) and waits until the
    // query API shows every one.
    let register_visible = |prefix: &'static str| {
        let (http, command, query) = (&http, &command, &query);
        async move {
            let mut ids = Vec::new();
            for i in 0..12 {
                ids.push(register(http, command, &format!("{prefix}{i}")).await.id);
            }
            for id in ids {
                await_version(http, query, id, 1).await;
            }
        }
    };
    register_visible("before").await;
    first.stop().await;
    let second = env.spawn(Service::Projector, &[]).await;
    register_visible("after").await;
    let resets: Vec<String> = second
        .logs()
        .into_iter()
        .filter(|l| l.contains("offset reset"))
        .collect();
    assert!(resets.is_empty(), "{resets:#?}");
}
