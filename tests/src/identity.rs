//! Signing in and making administrators in tests, through the real endpoints.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::{Running, Service, TestEnv, TEST_ADMIN_TOKEN};

/// The Ed25519 key the command APIs of tests sign access tokens with.
/// TEST KEY ONLY: generated for this repository's tests, never used anywhere else.
pub const TEST_SIGNING_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIHTlCtD2pg6j+YyztTIam7Ap4u7cfBolXamS/5LFyrzD
-----END PRIVATE KEY-----
";

/// The password of users the helpers register.
pub const PASSWORD: &str = "correct horse battery staple";

/// An administrator: their user id and an access token with the admin scope.
#[derive(Debug, Clone)]
pub struct Admin {
    pub id: Uuid,
    pub token: String,
}

/// Registers a user with [`PASSWORD`]; returns their id.
pub async fn register(http: &reqwest::Client, api: &Running, username: &str) -> Uuid {
    let response = http
        .post(api.url("/users"))
        .json(&json!({
            "username": username,
            "email": format!("{username}@example.com"),
            "password": PASSWORD,
        }))
        .send()
        .await
        .expect("register");
    let status = response.status();
    let body: Value = response.json().await.expect("registration answer");
    assert_eq!(status, 201, "registration of {username}: {body}");
    body["id"].as_str().unwrap().parse().unwrap()
}

/// `POST /oauth/token` with the password grant; the status and the body.
pub async fn password_grant(
    http: &reqwest::Client,
    api: &Running,
    username: &str,
    password: &str,
) -> (u16, Value) {
    let response = http
        .post(api.url("/oauth/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", username),
            ("password", password),
        ])
        .send()
        .await
        .expect("token request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Signs in and returns the access token; panics unless it succeeds.
pub async fn sign_in(http: &reqwest::Client, api: &Running, username: &str) -> String {
    let (status, body) = password_grant(http, api, username, PASSWORD).await;
    assert_eq!(status, 200, "sign-in of {username}: {body}");
    body["access_token"].as_str().unwrap().to_owned()
}

/// Grants `role` with the bootstrap `ADMIN_TOKEN`.
pub async fn grant_with_bootstrap(http: &reqwest::Client, api: &Running, id: Uuid, role: &str) {
    let response = http
        .post(api.url(&format!("/users/{id}/roles")))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .json(&json!({ "role": role }))
        .send()
        .await
        .expect("grant a role");
    assert_eq!(
        response.status(),
        200,
        "{}",
        response.text().await.unwrap_or_default()
    );
}

/// Makes a new administrator the documented way: register, grant `admin`
/// with the bootstrap token, sign in.
pub async fn make_admin(http: &reqwest::Client, api: &Running) -> Admin {
    let username = format!("admin{}", &Uuid::new_v4().simple().to_string()[..12]);
    let id = register(http, api, &username).await;
    grant_with_bootstrap(http, api, id, "admin").await;
    Admin {
        id,
        token: sign_in(http, api, &username).await,
    }
}

/// An administrator's access token for the command API `api`, made on first
/// use and kept for the rest of the test run (tests give their command APIs
/// an hour-long token lifetime).
pub async fn admin_token(http: &reqwest::Client, api: &Running) -> String {
    kept_admin(http, api).await.token
}

/// The administrator [`admin_token`] uses for `api`, made on first use.
pub async fn kept_admin(http: &reqwest::Client, api: &Running) -> Admin {
    static ADMINS: tokio::sync::Mutex<BTreeMap<String, Admin>> =
        tokio::sync::Mutex::const_new(BTreeMap::new());
    let mut admins = ADMINS.lock().await;
    let key = api.url("");
    if let Some(admin) = admins.get(&key) {
        return admin.clone();
    }
    let admin = make_admin(http, api).await;
    admins.insert(key, admin.clone());
    admin
}

/// A command API of its own (relay off) on a fresh database, and a client.
pub struct Api {
    pub env: TestEnv,
    pub service: Running,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        let env = TestEnv::new().await;
        let mut vars = vec![("RELAY_ENABLED", "false")];
        vars.extend_from_slice(extra);
        let service = env.spawn(Service::CommandApi, &vars).await;
        Self {
            env,
            service,
            http: reqwest::Client::new(),
        }
    }

    pub async fn user(&self) -> (Uuid, String) {
        let name = format!("u{}", &Uuid::new_v4().simple().to_string()[..12]);
        (register(&self.http, &self.service, &name).await, name)
    }

    pub async fn token(&self, form: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = self
            .http
            .post(self.service.url("/oauth/token"))
            .form(form)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (
            status,
            headers,
            response.json().await.unwrap_or(Value::Null),
        )
    }

    pub async fn refresh(&self, refresh_token: &str) -> (u16, Value) {
        let (status, _, body) = self
            .token(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .await;
        (status, body)
    }

    pub async fn verifies(&self) -> f64 {
        self.service
            .metric("argon2_operations_total{op=\"verify\"}")
            .await
    }

    pub async fn event_types(&self, id: Uuid) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM events WHERE stream_id = $1 ORDER BY stream_version",
        )
        .bind(id)
        .fetch_all(&self.env.pool)
        .await
        .unwrap()
    }

    pub async fn post_as(&self, token: &str, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.service.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// The error code of an answer in the API's error shape.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// The code last sealed in `user_id`'s stream for `purpose`, opened with
/// the test key: what the notifier would mail.
pub async fn last_code(
    pool: &sqlx::PgPool,
    user_id: Uuid,
    purpose: events::codes::Purpose,
) -> String {
    let event_type = match purpose {
        events::codes::Purpose::PasswordReset => vec!["PasswordResetRequested"],
        events::codes::Purpose::EmailVerification => {
            vec!["UserRegistered", "EmailVerificationRequested"]
        }
    };
    let sealed: String = sqlx::query_scalar(
        "SELECT payload ->> 'sealed_code' FROM events \
         WHERE stream_id = $1 AND event_type = ANY($2) AND payload ? 'sealed_code' \
         ORDER BY stream_version DESC LIMIT 1",
    )
    .bind(user_id)
    .bind(&event_type)
    .fetch_one(pool)
    .await
    .expect("a sealed code in the stream");
    crate::mail::test_key()
        .open(purpose, user_id, &events::domain::SealedCode::new(sealed))
        .expect("sealed with the test key")
        .expose()
        .to_owned()
}
