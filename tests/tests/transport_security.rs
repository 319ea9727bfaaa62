//! Transport security is configuration: librdkafka properties from
//! `KAFKA_CONFIG_*` and the security shorthands reach every Kafka client,
//! invalid ones stop a service at start-up with librdkafka's own message,
//! TLS is compiled in for Kafka, PostgreSQL (`sslmode`) and Redis (`rediss://`).

use command_api::config::KafkaSettings;
use command_api::relay::{admin_config, producer_config};
use platform::kafka::KafkaClientSettings;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use userstream_tests::{kafka_brokers, Service, TestEnv};

fn kafka_with(vars: &[(&str, &str)]) -> KafkaSettings {
    KafkaSettings {
        brokers: kafka_brokers(),
        topic: "users.events.v1".into(),
        topic_partitions: 6,
        topic_replication: 1,
        ce_source: "urn:userstream:test".into(),
        client: KafkaClientSettings::from_vars(
            vars.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())),
        )
        .unwrap(),
    }
}

#[test]
fn kafka_settings_from_the_environment_reach_librdkafka_and_the_guarantees_win() {
    let kafka = kafka_with(&[
        ("KAFKA_CONFIG_CLIENT_RACK", "rack-7"),
        ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("KAFKA_SASL_USERNAME", "relay"),
        ("KAFKA_SASL_PASSWORD", "not-a-real-password"),
        ("KAFKA_CONFIG_ACKS", "1"),
        ("KAFKA_CONFIG_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION", "5"),
    ]);
    for config in [producer_config(&kafka), admin_config(&kafka)] {
        let native = config
            .create_native_config()
            .expect("librdkafka accepts them");
        assert_eq!(native.get("client.rack").unwrap(), "rack-7");
        // TLS and SCRAM need librdkafka built with OpenSSL.
        assert_eq!(native.get("security.protocol").unwrap(), "sasl_ssl");
        assert_eq!(native.get("sasl.mechanisms").unwrap(), "SCRAM-SHA-512");
        assert_eq!(native.get("sasl.username").unwrap(), "relay");
    }
    let producer = producer_config(&kafka).create_native_config().unwrap();
    assert_eq!(producer.get("acks").unwrap(), "-1", "acks=all wins");
    assert_eq!(producer.get("enable.gapless.guarantee").unwrap(), "true");
    assert_eq!(producer.get("enable.idempotence").unwrap(), "true");
    assert_eq!(producer.get("message.timeout.ms").unwrap(), "0");
    assert_eq!(
        producer
            .get("max.in.flight.requests.per.connection")
            .unwrap(),
        "1",
        "one produce request in flight wins"
    );
    // Defaults the environment may change: no linger, no Nagle.
    assert_eq!(producer.get("linger.ms").unwrap(), "0");
    assert_eq!(producer.get("socket.nagle.disable").unwrap(), "true");
    assert!(!format!("{kafka:?}").contains("not-a-real-password"));
}

#[tokio::test]
async fn an_invalid_kafka_setting_stops_each_service_at_start_up_with_a_clear_error() {
    let env = TestEnv::new().await;
    for service in [Service::CommandApi, Service::Projector] {
        let (status, printed) = env
            .start_refused(service, &[("KAFKA_SECURITY_PROTOCOL", "carrier_pigeon")])
            .await;
        assert!(!status.success(), "{service:?}: {printed}");
        assert!(
            printed.contains("security.protocol") && printed.contains("carrier_pigeon"),
            "{service:?}: {printed}"
        );
        let (status, printed) = env
            .start_refused(service, &[("KAFKA_CONFIG_NO_SUCH_PROPERTY", "1")])
            .await;
        assert!(!status.success(), "{service:?}: {printed}");
        assert!(
            printed.contains("no.such.property"),
            "{service:?}: {printed}"
        );
    }
}

#[tokio::test]
async fn postgres_sslmode_in_database_url_reaches_the_driver_with_tls_compiled_in() {
    let env = TestEnv::new().await;
    let options: PgConnectOptions = format!("{}?sslmode=require", env.database_url)
        .parse()
        .unwrap();
    assert!(matches!(
        options.get_ssl_mode(),
        sqlx::postgres::PgSslMode::Require
    ));
    // The local server may or may not offer TLS; either way the driver tries
    // it, which a build without TLS support would refuse to.
    match options.connect().await {
        Ok(conn) => conn.close().await.unwrap(),
        Err(error) => {
            let message = error.to_string();
            assert!(!message.contains("without TLS support"), "{message}");
            assert!(message.to_lowercase().contains("tls"), "{message}");
        }
    }
}

#[test]
fn rediss_urls_are_accepted() {
    redis::Client::open("rediss://127.0.0.1:6380/").expect("TLS support is compiled in");
}
