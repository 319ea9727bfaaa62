//! The notifier on the real stack: events with sealed codes written into the
//! log, published by a real command API's relay, consumed by the real
//! notifier binary and delivered by the real development SMTP server, whose
//! Maildir the tests read.

use std::time::Duration;

use chrono::Utc;
use events::codes::{Code, CodeKey};
use serde_json::Value;
use userstream_tests::mail::{
    self, append, mail_status, mails_to, registered, reset_requested, smtp_component, test_key,
    unique_address, verification_requested, wait_for_mails, Mail,
};
use userstream_tests::{eventually, kafka_brokers, Running, Service, TestEnv};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

/// Quick retries, so a test that stops the mail server waits seconds, not
/// minutes, once it is back; and no parking by attempts meanwhile.
const QUICK_RETRIES: [(&str, &str); 4] = [
    ("NOTIFIER_RETRY_BASE_MS", "100"),
    ("NOTIFIER_RETRY_MAX_MS", "1000"),
    ("NOTIFIER_MAX_ATTEMPTS", "1000"),
    ("NOTIFIER_POLL_MS", "200"),
];

async fn notifier(env: &TestEnv) -> Running {
    env.spawn(Service::Notifier, &QUICK_RETRIES).await
}

async fn readyz(service: &Running) -> (u16, Value) {
    let response = reqwest::get(service.url("/readyz")).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn in_minutes(minutes: i64) -> chrono::DateTime<Utc> {
    Utc::now() + chrono::Duration::minutes(minutes)
}

/// The one mail to `address`, checked: its Message-ID names the event.
fn only_mail(mails: &[Mail], address: &str, event_id: Uuid) -> Mail {
    assert_eq!(mails.len(), 1, "exactly one mail to {address}: {mails:#?}");
    let mail = mails[0].clone();
    assert_eq!(mail.message_id, format!("<{event_id}@userstream>"));
    mail
}

/// Waits until no row of the notifier's queue is pending: every mail has its
/// outcome, and nothing more will be sent.
async fn queue_drained(env: &TestEnv) {
    eventually("the notifier's queue to drain", DEADLINE, || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notifier_mails WHERE status = 'pending'")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        (pending == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn each_mail_arrives_once_with_its_code_and_a_redelivery_sends_nothing_more() {
    let env = TestEnv::new().await;
    let key = test_key();
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let alice_at = unique_address("alice");
    let alice_new = unique_address("alice-new");
    let bob_at = unique_address("bob");
    let welcome_code = Code::generate();
    let reset_code = Code::generate();
    let verify_code = Code::generate();
    let welcome = append(
        &env.pool,
        alice,
        1,
        &registered(
            &alice_at,
            Some((&key, alice, &welcome_code, in_minutes(60))),
        ),
    )
    .await;
    let reset = append(
        &env.pool,
        alice,
        2,
        &reset_requested(&key, alice, &alice_at, &reset_code, in_minutes(30)),
    )
    .await;
    let verify = append(
        &env.pool,
        alice,
        3,
        &verification_requested(&key, alice, &alice_new, &verify_code, in_minutes(30)),
    )
    .await;
    // Registered before codes existed: a welcome without one.
    let legacy = append(&env.pool, bob, 1, &registered(&bob_at, None)).await;

    let _relay = env.spawn(Service::CommandApi, &[]).await;
    let first = notifier(&env).await;

    let to_alice = wait_for_mails(&alice_at, 2, DEADLINE).await;
    let welcome_mail = to_alice
        .iter()
        .find(|m| m.message_id == format!("<{welcome}@userstream>"))
        .expect("the welcome mail");
    assert_eq!(welcome_mail.code().as_deref(), Some(welcome_code.expose()));
    let reset_mail = to_alice
        .iter()
        .find(|m| m.message_id == format!("<{reset}@userstream>"))
        .expect("the reset mail");
    assert_eq!(reset_mail.code().as_deref(), Some(reset_code.expose()));
    assert!(
        reset_mail.subject.contains("password reset"),
        "{reset_mail:?}"
    );
    // The verification goes to the new address, not the current one.
    let to_new = wait_for_mails(&alice_new, 1, DEADLINE).await;
    let verify_mail = only_mail(&to_new, &alice_new, verify);
    assert_eq!(verify_mail.code().as_deref(), Some(verify_code.expose()));
    let to_bob = wait_for_mails(&bob_at, 1, DEADLINE).await;
    assert_eq!(only_mail(&to_bob, &bob_at, legacy).code(), None);
    for id in [welcome, reset, verify, legacy] {
        assert_eq!(mail_status(&env.pool, id).await.as_deref(), Some("sent"));
    }
    // No code in the notifier's own logs.
    let logs = first.logs().join("\n");
    for code in [&welcome_code, &reset_code, &verify_code] {
        assert!(!logs.contains(code.expose()), "a code was logged");
    }
    assert!(!logs.contains(&alice_at), "a whole address was logged");
    assert_eq!(first.metric("notifier_mails_sent_total").await, 4.0);
    first.stop().await;

    // Redelivery: a notifier in a fresh group reads the whole topic again.
    let again = env
        .spawn(
            Service::Notifier,
            &[(
                "NOTIFIER_GROUP_ID",
                &format!("{}-again", env.notifier_group_id),
            )],
        )
        .await;
    eventually(
        "the redelivered messages to be consumed",
        DEADLINE,
        || async {
            // Queued or found already there: the four mail messages were read.
            (again.metric("notifier_messages_total").await >= 4.0).then_some(())
        },
    )
    .await;
    // Once nothing is pending, nothing more can go out: a wrongly re-queued
    // mail (a dedup broken on purpose, ON CONFLICT … DO UPDATE) is sent
    // before the queue is empty, and counted below.
    queue_drained(&env).await;
    assert_eq!(mails_to(&alice_at).len(), 2);
    assert_eq!(mails_to(&alice_new).len(), 1);
    assert_eq!(mails_to(&bob_at).len(), 1);
    assert_eq!(again.metric("notifier_mails_sent_total").await, 0.0);
    assert_eq!(
        again
            .metric("notifier_messages_total{outcome=\"duplicate\"}")
            .await,
        4.0
    );
}

#[tokio::test]
async fn an_expired_code_is_not_sent_and_a_foreign_seal_is_parked_until_retried() {
    let env = TestEnv::new().await;
    let key = test_key();
    let other = CodeKey::from_base64(mail::OTHER_MAIL_CODE_KEY).unwrap();
    let (late, foreign) = (Uuid::now_v7(), Uuid::now_v7());
    let late_at = unique_address("late");
    let foreign_at = unique_address("foreign");
    append(&env.pool, late, 1, &registered(&late_at, None)).await;
    let expired = append(
        &env.pool,
        late,
        2,
        &reset_requested(&key, late, &late_at, &Code::generate(), in_minutes(-1)),
    )
    .await;
    let parked = append(
        &env.pool,
        foreign,
        1,
        &registered(
            &foreign_at,
            Some((&other, foreign, &Code::generate(), in_minutes(60))),
        ),
    )
    .await;

    let _relay = env.spawn(Service::CommandApi, &[]).await;
    let notifier = notifier(&env).await;
    eventually("the expired mail to be skipped", DEADLINE, || async {
        (mail_status(&env.pool, expired).await.as_deref() == Some("expired")).then_some(())
    })
    .await;
    eventually("the foreign seal to be parked", DEADLINE, || async {
        (mail_status(&env.pool, parked).await.as_deref() == Some("parked")).then_some(())
    })
    .await;
    // Only the welcome went to `late`; nothing to `foreign`.
    let to_late = wait_for_mails(&late_at, 1, DEADLINE).await;
    assert_eq!(to_late.len(), 1);
    assert!(!to_late[0].message_id.contains(&expired.to_string()));
    assert!(mails_to(&foreign_at).is_empty());

    let (status, body) = readyz(&notifier).await;
    assert_eq!(
        status, 200,
        "parked mails degrade, they do not fail: {body}"
    );
    assert_eq!(
        body["checks"]["mails"]["detail"]["degraded"]["parked"], 1,
        "{body}"
    );
    assert!(notifier.metric("notifier_mails{status=\"parked\"}").await >= 1.0);
    notifier.stop().await;

    // `notifier retry` makes it pending again (the service is stopped, so
    // nobody parks it again before we look).
    let retried = env
        .run(
            Service::Notifier,
            &["retry", &parked.to_string()],
            &[],
            DEADLINE,
        )
        .await;
    retried.assert_success();
    assert!(
        retried.stdout.contains("1 parked mail(s) pending again"),
        "{retried}"
    );
    assert_eq!(
        mail_status(&env.pool, parked).await.as_deref(),
        Some("pending")
    );
    let none_left = env.run(Service::Notifier, &["retry"], &[], DEADLINE).await;
    assert!(none_left.stdout.contains("0 parked"), "{none_left}");
}

/// The development SMTP server stopped (`scripts/stack stop smtp`) until
/// dropped, even when the test fails: the other tests need it back.
struct SmtpOutage;

impl SmtpOutage {
    fn begin() -> Self {
        smtp_component("stop");
        Self
    }
}

impl Drop for SmtpOutage {
    fn drop(&mut self) {
        smtp_component("start");
    }
}

#[tokio::test]
async fn mails_wait_out_a_mail_server_outage_and_then_arrive_exactly_once() {
    let env = TestEnv::new().await;
    let key = test_key();
    let _relay = env.spawn(Service::CommandApi, &[]).await;
    let notifier = notifier(&env).await;

    let outage = SmtpOutage::begin();
    let mut expected = Vec::new();
    for i in 0..5 {
        let user = Uuid::now_v7();
        let address = unique_address(&format!("outage{i}"));
        let code = Code::generate();
        let id = append(
            &env.pool,
            user,
            1,
            &registered(&address, Some((&key, user, &code, in_minutes(60)))),
        )
        .await;
        expected.push((address, id, code));
    }
    let degraded = eventually(
        "readyz to show the failing mail server",
        DEADLINE,
        || async {
            let (status, body) = readyz(&notifier).await;
            (status == 200 && !body["checks"]["smtp"]["detail"]["degraded"].is_null())
                .then_some(body)
        },
    )
    .await;
    drop(outage);
    assert!(
        degraded["checks"]["smtp"]["detail"]["degraded"]["failures_in_a_row"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(notifier.metric("notifier_send_failures_total").await >= 1.0);

    for (address, id, code) in &expected {
        let mails = wait_for_mails(address, 1, DEADLINE).await;
        assert_eq!(
            only_mail(&mails, address, *id).code().as_deref(),
            Some(code.expose())
        );
    }
    eventually(
        "readyz to clear once a send succeeded",
        DEADLINE,
        || async {
            let (_, body) = readyz(&notifier).await;
            body["checks"]["smtp"]["detail"]["degraded"]
                .is_null()
                .then_some(())
        },
    )
    .await;
    queue_drained(&env).await;
    for (address, _, _) in &expected {
        assert_eq!(mails_to(address).len(), 1, "{address} got a copy");
    }
}

#[tokio::test]
async fn a_notifier_killed_mid_stream_loses_no_mail() {
    let env = TestEnv::new().await;
    let _relay = env.spawn(Service::CommandApi, &[]).await;
    let first = notifier(&env).await;
    let writer = {
        let pool = env.pool.clone();
        let key = mail::TEST_MAIL_CODE_KEY;
        tokio::spawn(async move {
            let key = CodeKey::from_base64(key).unwrap();
            let mut written = Vec::new();
            for i in 0..40 {
                let user = Uuid::now_v7();
                let address = unique_address(&format!("crash{i}"));
                let code = Code::generate();
                let id = append(
                    &pool,
                    user,
                    1,
                    &registered(&address, Some((&key, user, &code, in_minutes(60)))),
                )
                .await;
                written.push((address, id));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            written
        })
    };
    // Kill it once some, not all, mails went out.
    eventually("some mails to be sent", DEADLINE, || async {
        (first.metric("notifier_mails_sent_total").await >= 5.0).then_some(())
    })
    .await;
    first.kill();
    let second = notifier(&env).await;
    let written = writer.await.unwrap();
    for (address, id) in &written {
        let mails = wait_for_mails(address, 1, DEADLINE).await;
        // A kill between a send and its record may send it again, with the
        // same Message-ID (the one documented window): never another.
        assert!(mails.len() <= 2, "{address}: {mails:#?}");
        for mail in &mails {
            assert_eq!(mail.message_id, format!("<{id}@userstream>"));
        }
    }
    let copies: usize = written
        .iter()
        .map(|(address, _)| mails_to(address).len() - 1)
        .sum();
    assert!(copies <= 1, "{copies} copies after one kill");
    drop(second);
}

#[tokio::test]
async fn an_undecodable_mail_message_is_counted_and_skipped_and_the_next_mail_goes() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let env = TestEnv::new().await;
    let _relay = env.spawn(Service::CommandApi, &[]).await;
    let notifier = notifier(&env).await;
    // A message that claims to be a registration but is not one.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .unwrap();
    let bad_id = Uuid::new_v4().to_string();
    producer
        .send(
            FutureRecord::to(&env.topic)
                .key("not-a-user")
                .payload("{not json")
                .headers(
                    OwnedHeaders::new()
                        .insert(Header {
                            key: "ce_id",
                            value: Some(&bad_id),
                        })
                        .insert(Header {
                            key: "ce_type",
                            value: Some("user.registered.v1"),
                        }),
                ),
            Duration::from_secs(10),
        )
        .await
        .expect("produce the bad message");
    let user = Uuid::now_v7();
    let address = unique_address("after-bad");
    let id = append(&env.pool, user, 1, &registered(&address, None)).await;
    let mails = wait_for_mails(&address, 1, DEADLINE).await;
    only_mail(&mails, &address, id);
    eventually("the bad message to be counted", DEADLINE, || async {
        (notifier.metric("notifier_bad_messages_total").await == 1.0).then_some(())
    })
    .await;
    let logs = notifier.logs().join("\n");
    assert!(logs.contains("undecodable mail message skipped"), "{logs}");
}

/// Runs `sql` on the stack's admin database (not the test's own).
async fn admin(sql: &str) {
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&userstream_tests::admin_database_url())
            .await
            .unwrap();
    sqlx::query(sql).execute(&mut admin).await.unwrap();
}

#[tokio::test]
async fn a_database_outage_holds_mail_back_without_losing_the_group_or_a_mail() {
    let env = TestEnv::new().await;
    let key = test_key();
    let _relay = env.spawn(Service::CommandApi, &[]).await;
    let mut settings = QUICK_RETRIES.to_vec();
    // librdkafka drops a consumer that stops polling for this long.
    settings.extend([
        ("KAFKA_SESSION_TIMEOUT_MS", "6000"),
        ("KAFKA_CONFIG_MAX_POLL_INTERVAL_MS", "6000"),
    ]);
    let notifier = env.spawn(Service::Notifier, &settings).await;
    let mail = |i: usize| {
        let user = Uuid::now_v7();
        let address = unique_address(&format!("dbdown{i}"));
        let code = Code::generate();
        let event = registered(&address, Some((&key, user, &code, in_minutes(60))));
        (user, address, event)
    };
    let (user, first, event) = mail(0);
    append(&env.pool, user, 1, &event).await;
    wait_for_mails(&first, 1, DEADLINE).await;

    // The notifier's database goes away: no new connection is allowed and
    // its sessions are ended. (The test's writer and the relay keep the
    // connections they have, so the log still grows and is published.)
    let database = &env.database_name;
    let mut writer = <sqlx::PgConnection as sqlx::Connection>::connect(&env.database_url)
        .await
        .unwrap();
    admin(&format!(
        "ALTER DATABASE {database} ALLOW_CONNECTIONS false"
    ))
    .await;
    admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{database}' AND usename = 'userstream_notifier'"
    ))
    .await;
    let mut expected = Vec::new();
    for i in 1..=5 {
        let (user, address, event) = mail(i);
        append(&mut writer, user, 1, &event).await;
        expected.push(address);
    }
    eventually("the consumer to fail to queue", DEADLINE, || async {
        let errors = notifier
            .metric("notifier_database_errors_total{task=\"consumer\"}")
            .await;
        (errors >= 1.0).then_some(())
    })
    .await;
    let (status, _) = readyz(&notifier).await;
    assert_eq!(status, 503, "PostgreSQL unreachable is not ready");
    // The outage outlasts the poll interval librdkafka allows.
    tokio::time::sleep(Duration::from_secs(8)).await;
    admin(&format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true")).await;

    for address in &expected {
        wait_for_mails(address, 1, DEADLINE).await;
    }
    queue_drained(&env).await;
    for address in expected.iter().chain([&first]) {
        assert_eq!(mails_to(address).len(), 1, "{address}");
    }
    let left_group: Vec<String> = notifier
        .logs()
        .into_iter()
        .filter(|l| l.contains("poll interval") || l.contains("MAXPOLL"))
        .collect();
    assert!(left_group.is_empty(), "{left_group:#?}");
    assert_eq!(readyz(&notifier).await.0, 200);
}
