//! Mail end to end: the real command API (with its relay), projector, query
//! API and notifier on the real stack, mail delivered by the development SMTP
//! server and read from its Maildir, codes typed back from the mails.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::RwLock;
use userstream_tests::identity::{code, password_grant, sign_in, PASSWORD};
use userstream_tests::mail::{mails_to, smtp_component, unique_address, wait_for_mails, Mail};
use userstream_tests::read_side::await_version;
use userstream_tests::{eventually, Running, Service, TestEnv};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

/// Tests here that need the mail server take a read lock; the one that
/// stops it takes the write lock, so it never delays the others' mail.
static SMTP: RwLock<()> = RwLock::const_new(());

struct Stack {
    env: TestEnv,
    command: Running,
    query: Running,
    _projector: Running,
    notifier: Running,
    http: reqwest::Client,
}

impl Stack {
    async fn start(command_extra: &[(&str, &str)]) -> Self {
        let env = TestEnv::new().await;
        let command = env.spawn(Service::CommandApi, command_extra).await;
        let projector = env.spawn(Service::Projector, &[]).await;
        let query = env.spawn(Service::QueryApi, &[]).await;
        let notifier = env
            .spawn(
                Service::Notifier,
                &[
                    ("NOTIFIER_RETRY_BASE_MS", "100"),
                    ("NOTIFIER_RETRY_MAX_MS", "1000"),
                    ("NOTIFIER_MAX_ATTEMPTS", "1000"),
                    ("NOTIFIER_POLL_MS", "200"),
                ],
            )
            .await;
        Self {
            env,
            command,
            query,
            _projector: projector,
            notifier,
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = self.http.post(self.command.url(path)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Registers `username` at `email`; the user id.
    async fn register(&self, username: &str, email: &str) -> Uuid {
        let (status, body) = self
            .post(
                "/users",
                None,
                json!({"username": username, "email": email, "password": PASSWORD}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().parse().unwrap()
    }

    /// The view once it has reached `version`, polled: the projector's new
    /// consumer group may still be waiting for its partitions, longer than a
    /// `min_version` read waits.
    async fn view(&self, id: Uuid, version: i64) -> Value {
        await_version(&self.http, &self.query, id, version).await
    }

    /// Mails nobody is still waiting for: every row of the notifier's queue
    /// has its outcome.
    async fn notifier_idle(&self) {
        eventually("the notifier to finish its queue", DEADLINE, || async {
            let pending: i64 =
                sqlx::query_scalar("SELECT count(*) FROM notifier_mails WHERE status = 'pending'")
                    .fetch_one(&self.env.pool)
                    .await
                    .unwrap();
            (pending == 0).then_some(())
        })
        .await;
    }
}

fn username() -> String {
    format!("m{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// The one mail to `address` whose subject mentions `about`.
fn mail_about(address: &str, about: &str) -> Mail {
    let mails: Vec<Mail> = mails_to(address)
        .into_iter()
        .filter(|m| m.subject.to_lowercase().contains(about))
        .collect();
    assert_eq!(mails.len(), 1, "one {about} mail to {address}: {mails:#?}");
    mails.into_iter().next().unwrap()
}

#[tokio::test]
async fn register_verify_change_and_reset_through_the_mailbox() {
    let _smtp = SMTP.read().await;
    let stack = Stack::start(&[]).await;
    let name = username();
    let first = unique_address("first");
    let id = stack.register(&name, &first).await;

    // The welcome mail carries the code that verifies the address.
    let welcome = wait_for_mails(&first, 1, DEADLINE).await.remove(0);
    let token = sign_in(&stack.http, &stack.command, &name).await;
    let (status, verified) = stack
        .post(
            &format!("/users/{id}/email/verify"),
            Some(&token),
            json!({"code": welcome.code().unwrap()}),
        )
        .await;
    assert_eq!(status, 200, "{verified}");
    let view = stack.view(id, verified["version"].as_i64().unwrap()).await;
    assert_eq!(
        (view["email"].as_str(), &view["email_verified"]),
        (Some(first.as_str()), &json!(true))
    );

    // An email change: the code goes to the new address, the view keeps the
    // old one until it is confirmed.
    let second = unique_address("second");
    let (status, asked) = stack
        .post(
            &format!("/users/{id}/email"),
            Some(&token),
            json!({"email": second}),
        )
        .await;
    assert_eq!(status, 200, "{asked}");
    let view = stack.view(id, asked["version"].as_i64().unwrap()).await;
    assert_eq!(view["email"].as_str(), Some(first.as_str()));
    let change = wait_for_mails(&second, 1, DEADLINE).await.remove(0);
    let (status, swapped) = stack
        .post(
            &format!("/users/{id}/email/verify"),
            Some(&token),
            json!({"code": change.code().unwrap()}),
        )
        .await;
    assert_eq!(status, 200, "{swapped}");
    let view = stack.view(id, swapped["version"].as_i64().unwrap()).await;
    assert_eq!(
        (view["email"].as_str(), &view["email_verified"]),
        (Some(second.as_str()), &json!(true))
    );

    // A password reset, to the current address: a wrong code, the right one,
    // the same one again.
    let (status, _) = stack
        .post("/password-resets", None, json!({"email": second}))
        .await;
    assert_eq!(status, 202);
    wait_for_mails(&second, 2, DEADLINE).await;
    let reset = mail_about(&second, "reset");
    let complete = |code: &str| json!({"email": second, "code": code, "new_password": "a brand new passphrase"});
    let (status, body) = stack
        .post("/password-resets/complete", None, complete("00000000"))
        .await;
    assert_eq!((status, code(&body)), (400, "invalid_code"));
    let (status, body) = stack
        .post(
            "/password-resets/complete",
            None,
            complete(&reset.code().unwrap()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = stack
        .post(
            "/password-resets/complete",
            None,
            complete(&reset.code().unwrap()),
        )
        .await;
    assert_eq!((status, code(&body)), (400, "invalid_code"), "a used code");
    assert_eq!(
        password_grant(&stack.http, &stack.command, &name, "a brand new passphrase")
            .await
            .0,
        200
    );

    // Nothing went twice, and nothing to the old address but the welcome.
    stack.notifier_idle().await;
    assert_eq!(mails_to(&first).len(), 1);
    assert_eq!(mails_to(&second).len(), 2);
}

#[tokio::test]
async fn an_expired_reset_code_from_the_mailbox_is_refused() {
    let _smtp = SMTP.read().await;
    let stack = Stack::start(&[("RESET_CODE_TTL_SECS", "3")]).await;
    let name = username();
    let address = unique_address("expiring");
    let id = stack.register(&name, &address).await;
    stack
        .post("/password-resets", None, json!({"email": address}))
        .await;
    wait_for_mails(&address, 2, DEADLINE).await;
    let reset = mail_about(&address, "reset");
    // Expiry is the clock's business: sleep until the recorded expiry.
    let expires_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT (payload ->> 'expires_at')::timestamptz FROM events \
         WHERE stream_id = $1 AND event_type = 'PasswordResetRequested'",
    )
    .bind(id)
    .fetch_one(&stack.env.pool)
    .await
    .unwrap();
    let left = (expires_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(50)).await;
    let (status, body) = stack
        .post(
            "/password-resets/complete",
            None,
            json!({"email": address, "code": reset.code().unwrap(), "new_password": "a brand new passphrase"}),
        )
        .await;
    assert_eq!((status, code(&body)), (400, "invalid_code"));
    assert_eq!(
        password_grant(&stack.http, &stack.command, &name, PASSWORD)
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn users_registered_while_the_mail_server_is_down_get_their_mail_exactly_once() {
    let _smtp = SMTP.write().await;
    let stack = Stack::start(&[]).await;
    smtp_component("stop");
    struct Restart;
    impl Drop for Restart {
        fn drop(&mut self) {
            smtp_component("start");
        }
    }
    let restart = Restart;
    let addresses: Vec<String> = (0..10)
        .map(|i| unique_address(&format!("down{i}")))
        .collect();
    for address in &addresses {
        stack.register(&username(), address).await;
    }
    eventually("readyz to report the mail server", DEADLINE, || async {
        let body: Value = reqwest::get(stack.notifier.url("/readyz"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (!body["checks"]["smtp"]["detail"]["degraded"].is_null()).then_some(())
    })
    .await;
    assert!(addresses.iter().all(|a| mails_to(a).is_empty()));
    drop(restart);

    for address in &addresses {
        wait_for_mails(address, 1, DEADLINE).await;
    }
    stack.notifier_idle().await;
    for address in &addresses {
        assert_eq!(mails_to(address).len(), 1, "{address}");
    }
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM notifier_mails WHERE status = 'sent'")
        .fetch_one(&stack.env.pool)
        .await
        .unwrap();
    assert_eq!(sent, 10);
}
