//! Profiles, email verification, email change and password reset on the
//! real command API and PostgreSQL. The codes are read from the log and
//! opened with the test key, as the notifier does; the mail itself is
//! tested end to end in `notifier.rs` and `e2e.rs`.

use events::codes::Purpose;
use futures::future::join_all;
use serde_json::{json, Value};
use std::time::Duration;
use userstream_tests::eventually;
use userstream_tests::identity::{
    code, last_code, make_admin, password_grant, sign_in, Api, PASSWORD,
};
use uuid::Uuid;

async fn send(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, Value) {
    let mut request = api.http.request(method, api.service.url(path)).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(api: &Api, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    send(api, reqwest::Method::POST, path, token, &[], body).await
}

async fn patch_profile(api: &Api, id: Uuid, token: &str, body: Value) -> (u16, Value) {
    send(
        api,
        reqwest::Method::PATCH,
        &format!("/users/{id}/profile"),
        Some(token),
        &[],
        body,
    )
    .await
}

async fn count(api: &Api, id: Uuid, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1 AND event_type = $2")
        .bind(id)
        .bind(event_type)
        .fetch_one(&api.env.pool)
        .await
        .unwrap()
}

/// Waits for the code a `POST /password-resets` issues after its 202.
async fn reset_code_issued(api: &Api, id: Uuid) {
    eventually(
        "the reset code is issued",
        Duration::from_secs(5),
        || async { (count(api, id, "PasswordResetRequested").await == 1).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn the_registration_code_verifies_the_email_once() {
    let api = Api::start(&[]).await;
    let (id, name) = api.user().await;
    let token = sign_in(&api.http, &api.service, &name).await;
    let path = format!("/users/{id}/email/verify");

    // Sealed in the log; the read side's way in does not show it at all.
    let plain: Option<String> = sqlx::query_scalar(
        "SELECT payload::text FROM events WHERE stream_id = $1 AND stream_version = 1",
    )
    .bind(id)
    .fetch_one(&api.env.pool)
    .await
    .unwrap();
    let sent = last_code(&api.env.pool, id, Purpose::EmailVerification).await;
    assert!(!plain.unwrap().contains(&sent), "the code is stored sealed");
    let public: Value =
        sqlx::query_scalar("SELECT payload FROM events_public WHERE stream_id = $1")
            .bind(id)
            .fetch_one(&api.env.pool)
            .await
            .unwrap();
    assert_eq!(public.get("sealed_code"), None);

    let (status, body) = post(&api, &path, Some(&token), json!({"code": "00000000"})).await;
    assert_eq!((status, code(&body)), (400, "invalid_code"), "{body}");
    let (status, body) = post(&api, &path, Some(&token), json!({"code": sent})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(&api, &path, Some(&token), json!({"code": sent})).await;
    assert_eq!(
        (status, code(&body)),
        (400, "invalid_code"),
        "a used code: {body}"
    );
    assert_eq!(
        api.event_types(id).await,
        ["UserRegistered", "EmailCodeFailed", "EmailVerified"]
    );

    // Verified already: asking again for the same address is refused.
    let (status, body) = post(
        &api,
        &format!("/users/{id}/email"),
        Some(&token),
        json!({"email": format!("{name}@example.com")}),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "email_unchanged"));
}

#[tokio::test]
async fn racing_wrong_codes_never_get_more_than_the_allowed_tries() {
    let api = Api::start(&[("CODE_MAX_ATTEMPTS", "3")]).await;
    let (id, name) = api.user().await;
    let token = sign_in(&api.http, &api.service, &name).await;
    let path = format!("/users/{id}/email/verify");
    let sent = last_code(&api.env.pool, id, Purpose::EmailVerification).await;
    let guesses = join_all((0..30).map(|i| {
        let (api, path, token) = (&api, &path, &token);
        async move { post(api, path, Some(token), json!({"code": format!("{i:08}x")})).await }
    }))
    .await;
    // Each is refused: a wrong code, the tries used up, or (having lost the
    // race to the stream three times) concurrent_modification.
    for (status, body) in &guesses {
        assert!(
            *status == 400 || (*status == 409 && code(body) == "concurrent_modification"),
            "{status} {body}"
        );
    }
    assert_eq!(
        count(&api, id, "EmailCodeFailed").await,
        3,
        "exactly the allowed tries were compared"
    );
    let (status, body) = post(&api, &path, Some(&token), json!({"code": sent})).await;
    assert_eq!(
        (status, code(&body)),
        (400, "too_many_attempts"),
        "the right code is dead once the tries are used up"
    );
}

#[tokio::test]
async fn an_expired_email_code_is_refused() {
    let api = Api::start(&[("EMAIL_CODE_TTL_SECS", "1")]).await;
    let (id, name) = api.user().await;
    let token = sign_in(&api.http, &api.service, &name).await;
    let sent = last_code(&api.env.pool, id, Purpose::EmailVerification).await;
    let path = format!("/users/{id}/email/verify");
    wait_until_expired(&api, id, "UserRegistered", "code_expires_at").await;
    let (status, body) = post(&api, &path, Some(&token), json!({"code": sent})).await;
    assert_eq!((status, code(&body)), (400, "code_expired"));
    assert_eq!(api.event_types(id).await, ["UserRegistered"]);
}

#[tokio::test]
async fn an_email_change_reserves_the_new_address_and_swaps_it_only_when_confirmed() {
    let api = Api::start(&[]).await;
    let (id, name) = api.user().await;
    let token = sign_in(&api.http, &api.service, &name).await;
    let old = format!("{name}@example.com");
    let new = format!("{name}@new.example");

    let (status, body) = post(
        &api,
        &format!("/users/{id}/email"),
        Some(&token),
        json!({"email": new.to_uppercase()}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Reserved like a registration's address...
    let (status, body) = post(
        &api,
        "/users",
        None,
        json!({"username": format!("{name}x"), "email": new, "password": PASSWORD}),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "email_taken"));
    // ...while the old address stays the user's.
    assert_eq!(
        password_grant(&api.http, &api.service, &old, PASSWORD)
            .await
            .0,
        200
    );
    assert_eq!(
        password_grant(&api.http, &api.service, &new, PASSWORD)
            .await
            .0,
        400
    );

    let sent = last_code(&api.env.pool, id, Purpose::EmailVerification).await;
    let (status, body) = post(
        &api,
        &format!("/users/{id}/email/verify"),
        Some(&token),
        json!({"code": sent}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        password_grant(&api.http, &api.service, &new, PASSWORD)
            .await
            .0,
        200
    );
    assert_eq!(
        password_grant(&api.http, &api.service, &old, PASSWORD)
            .await
            .0,
        400
    );
    // The old address is free again.
    let (status, body) = post(
        &api,
        "/users",
        None,
        json!({"username": format!("{name}y"), "email": old, "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn no_second_email_code_goes_out_within_the_resend_interval() {
    let api = Api::start(&[("EMAIL_RESEND_SECS", "3600")]).await;
    let (id, name) = api.user().await;
    let token = sign_in(&api.http, &api.service, &name).await;
    let before = count(&api, id, "EmailVerificationRequested").await;
    // The registration's code went out just now: neither the same address
    // nor another one gets a mail (a user cannot have someone else's inbox
    // mailed over and over).
    for address in [format!("{name}@example.com"), "victim@example.net".into()] {
        let response = api
            .http
            .post(api.service.url(&format!("/users/{id}/email")))
            .bearer_auth(&token)
            .json(&json!({ "email": address }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429, "{address}");
        let retry: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((3500..=3600).contains(&retry), "Retry-After {retry}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(code(&body), "rate_limited");
    }
    assert_eq!(count(&api, id, "EmailVerificationRequested").await, before);
    // Nothing was reserved: someone else may register that address.
    let (status, body) = post(
        &api,
        "/users",
        None,
        json!({"username": format!("{name}v"), "email": "victim@example.net", "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_second_change_releases_the_first_address_and_taken_addresses_are_refused() {
    let api = Api::start(&[]).await;
    let (id, name) = api.user().await;
    let (_, other) = api.user().await;
    let token = sign_in(&api.http, &api.service, &name).await;
    let path = format!("/users/{id}/email");
    let (status, body) = post(
        &api,
        &path,
        Some(&token),
        json!({"email": format!("{other}@example.com")}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (409, "email_taken"),
        "another user's address"
    );
    let first = format!("{name}@first.example");
    assert_eq!(
        post(&api, &path, Some(&token), json!({"email": first}))
            .await
            .0,
        200
    );
    assert_eq!(
        post(
            &api,
            &path,
            Some(&token),
            json!({"email": format!("{name}@second.example")})
        )
        .await
        .0,
        200
    );
    let (status, body) = post(
        &api,
        "/users",
        None,
        json!({"username": format!("{name}z"), "email": first, "password": PASSWORD}),
    )
    .await;
    assert_eq!(
        status, 201,
        "the first change's address was released: {body}"
    );
    // Someone else's token cannot change this user's address.
    let other_token = sign_in(&api.http, &api.service, &other).await;
    let (status, body) = post(
        &api,
        &path,
        Some(&other_token),
        json!({"email": "x@example.com"}),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "forbidden"));
}

#[tokio::test]
async fn a_password_reset_replaces_the_password_ends_sessions_and_lifts_a_lock() {
    let api = Api::start(&[("LOCKOUT_MAX_FAILURES", "2"), ("RESET_RESEND_SECS", "3600")]).await;
    let (id, name) = api.user().await;
    let email = format!("{name}@example.com");
    let (_, signed_in) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    for _ in 0..2 {
        password_grant(&api.http, &api.service, &name, "someone guessing").await;
    }
    assert_eq!(
        password_grant(&api.http, &api.service, &name, PASSWORD)
            .await
            .1["error"],
        "invalid_grant",
        "locked"
    );

    // Known and unknown addresses get the same answer.
    let (status, known) = post(
        &api,
        "/password-resets",
        None,
        json!({"email": email.to_uppercase()}),
    )
    .await;
    assert_eq!(status, 202);
    let (status, unknown) = post(
        &api,
        "/password-resets",
        None,
        json!({"email": "nobody@example.com"}),
    )
    .await;
    assert_eq!((status, &unknown), (202, &known));
    reset_code_issued(&api, id).await;
    // Within RESET_RESEND_SECS no second code goes out.
    assert_eq!(
        post(&api, "/password-resets", None, json!({"email": email}))
            .await
            .0,
        202
    );
    let sent = last_code(&api.env.pool, id, Purpose::PasswordReset).await;

    let complete = |code: &str, address: &str| json!({"email": address, "code": code, "new_password": "a brand new passphrase"});
    let (status, wrong) = post(
        &api,
        "/password-resets/complete",
        None,
        complete("00000000", &email),
    )
    .await;
    assert_eq!((status, code(&wrong)), (400, "invalid_code"));
    let (status, nobody) = post(
        &api,
        "/password-resets/complete",
        None,
        complete(&sent, "nobody@example.com"),
    )
    .await;
    assert_eq!(
        (status, &nobody["error"]["code"]),
        (400, &wrong["error"]["code"])
    );
    assert_eq!(nobody["error"]["message"], wrong["error"]["message"]);

    let (status, body) = post(
        &api,
        "/password-resets/complete",
        None,
        complete(&sent, &email),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(
        &api,
        "/password-resets/complete",
        None,
        complete(&sent, &email),
    )
    .await;
    assert_eq!((status, code(&body)), (400, "invalid_code"), "a used code");
    assert_eq!(count(&api, id, "PasswordResetRequested").await, 1);

    // The old session ends; the new password works at once (the lock is lifted).
    let refreshed = api
        .refresh(signed_in["refresh_token"].as_str().unwrap())
        .await;
    assert_eq!(refreshed.1["error"], "invalid_grant");
    assert_eq!(
        password_grant(&api.http, &api.service, &name, PASSWORD)
            .await
            .0,
        400
    );
    assert_eq!(
        password_grant(&api.http, &api.service, &name, "a brand new passphrase")
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn a_retried_reset_completion_with_its_key_gets_the_first_answer_only_for_its_password() {
    let api = Api::start(&[]).await;
    let (id, name) = api.user().await;
    let email = format!("{name}@example.com");
    assert_eq!(
        post(&api, "/password-resets", None, json!({"email": email}))
            .await
            .0,
        202
    );
    reset_code_issued(&api, id).await;
    let sent = last_code(&api.env.pool, id, Purpose::PasswordReset).await;
    let complete = |password: &str| json!({"email": email, "code": sent, "new_password": password});
    let keyed = |body: Value, key: &'static str| {
        let api = &api;
        async move {
            send(
                api,
                reqwest::Method::POST,
                "/password-resets/complete",
                None,
                &[("idempotency-key", key)],
                body,
            )
            .await
        }
    };

    let (status, first) = keyed(complete("a brand new passphrase"), "reset-1").await;
    assert_eq!(status, 200, "{first}");
    let events = count(&api, id, "PasswordReset").await;
    // The connection dropped; the client retries with the same key and body.
    let (status, again) = keyed(complete("a brand new passphrase"), "reset-1").await;
    assert_eq!((status, &again), (200, &first));
    // The same key, address and code with another password is no replay: the
    // code is used.
    let (status, other) = keyed(complete("another passphrase!!"), "reset-1").await;
    assert_eq!((status, code(&other)), (400, "invalid_code"));
    // Nor is the same body under another key, or none.
    let (status, other) = keyed(complete("a brand new passphrase"), "reset-2").await;
    assert_eq!((status, code(&other)), (400, "invalid_code"));
    assert_eq!(
        count(&api, id, "PasswordReset").await,
        events,
        "nothing appended twice"
    );
    assert_eq!(
        password_grant(&api.http, &api.service, &name, "a brand new passphrase")
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn an_expired_reset_code_is_refused_and_wrong_codes_are_counted() {
    let api = Api::start(&[("RESET_CODE_TTL_SECS", "2"), ("CODE_MAX_ATTEMPTS", "2")]).await;
    let (guessed, expired) = (api.user().await, api.user().await);
    let mut codes = Vec::new();
    for (id, name) in [&guessed, &expired] {
        post(
            &api,
            "/password-resets",
            None,
            json!({"email": format!("{name}@example.com")}),
        )
        .await;
        reset_code_issued(&api, *id).await;
        codes.push(last_code(&api.env.pool, *id, Purpose::PasswordReset).await);
    }
    let body = |name: &str, code: &str| json!({"email": format!("{name}@example.com"), "code": code, "new_password": "a brand new passphrase"});

    for _ in 0..3 {
        post(
            &api,
            "/password-resets/complete",
            None,
            body(&guessed.1, "11111111"),
        )
        .await;
    }
    assert_eq!(count(&api, guessed.0, "PasswordResetFailed").await, 2);
    let (status, answer) = post(
        &api,
        "/password-resets/complete",
        None,
        body(&guessed.1, &codes[0]),
    )
    .await;
    assert_eq!(
        (status, code(&answer)),
        (400, "invalid_code"),
        "the tries are used up"
    );
    assert_eq!(count(&api, guessed.0, "PasswordReset").await, 0);

    // Once its expiry has passed, the right code is refused.
    wait_until_expired(&api, expired.0, "PasswordResetRequested", "expires_at").await;
    let (status, answer) = post(
        &api,
        "/password-resets/complete",
        None,
        body(&expired.1, &codes[1]),
    )
    .await;
    assert_eq!((status, code(&answer)), (400, "invalid_code"));
    assert_eq!(count(&api, expired.0, "PasswordReset").await, 0);
}

/// Sleeps until the expiry recorded in the user's last `event_type` has
/// passed: expiry is the clock's business, there is nothing to wait for.
async fn wait_until_expired(api: &Api, id: Uuid, event_type: &str, field: &str) {
    let expires_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT (payload ->> $3)::timestamptz FROM events \
         WHERE stream_id = $1 AND event_type = $2 ORDER BY stream_version DESC LIMIT 1",
    )
    .bind(id)
    .bind(event_type)
    .bind(field)
    .fetch_one(&api.env.pool)
    .await
    .unwrap();
    let left = (expires_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(50)).await;
}

#[tokio::test]
async fn a_profile_is_changed_by_merge_patch_by_its_user_or_an_administrator() {
    let api = Api::start(&[]).await;
    let admin = make_admin(&api.http, &api.service).await;
    let (id, name) = api.user().await;
    let token = sign_in(&api.http, &api.service, &name).await;

    let (status, body) = patch_profile(
        &api,
        id,
        &token,
        json!({"display_name": "Alice", "locale": "pt-BR", "time_zone": "America/Sao_Paulo",
               "preferences": {"theme": "dark", "digest": true}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let version = body["version"].as_i64().unwrap();
    let (status, body) = patch_profile(
        &api,
        id,
        &admin.token,
        json!({"locale": null, "preferences": {"digest": null, "size": 12}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let profile: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE stream_id = $1 ORDER BY stream_version DESC LIMIT 1",
    )
    .bind(id)
    .fetch_one(&api.env.pool)
    .await
    .unwrap();
    assert_eq!(
        profile,
        json!({"display_name": "Alice", "locale": null, "time_zone": "America/Sao_Paulo",
               "preferences": {"size": 12, "theme": "dark"}})
    );

    // If-Match names the version the patch was written against.
    let (status, _) = send(
        &api,
        reqwest::Method::PATCH,
        &format!("/users/{id}/profile"),
        Some(&token),
        &[("If-Match", &format!("\"{version}\""))],
        json!({"display_name": "Bob"}),
    )
    .await;
    assert_eq!(status, 412);

    let (status, body) = patch_profile(
        &api,
        id,
        &token,
        json!({"display_name": "", "locale": "english", "time_zone": "Mars/Olympus", "nickname": "x",
               "preferences": {"Bad Key": 1, "nested": {"a": 1}}}),
    )
    .await;
    assert_eq!((status, code(&body)), (422, "validation_failed"));
    let fields: Vec<&String> = body["error"]["fields"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(
        fields,
        [
            "display_name",
            "locale",
            "nickname",
            "preferences",
            "time_zone"
        ]
    );

    let (_, other) = api.user().await;
    let other_token = sign_in(&api.http, &api.service, &other).await;
    let (status, body) =
        patch_profile(&api, id, &other_token, json!({"display_name": "Mallory"})).await;
    assert_eq!((status, code(&body)), (403, "forbidden"));
    assert_eq!(
        count(&api, id, "ProfileChanged").await,
        2,
        "refusals append nothing"
    );
}

#[tokio::test]
async fn no_code_shows_in_answers_history_or_logs() {
    let api = Api::start(&[]).await;
    let admin = make_admin(&api.http, &api.service).await;
    let (id, name) = api.user().await;
    let token = sign_in(&api.http, &api.service, &name).await;
    post(
        &api,
        &format!("/users/{id}/email"),
        Some(&token),
        json!({"email": format!("{name}@new.example")}),
    )
    .await;
    post(
        &api,
        "/password-resets",
        None,
        json!({"email": format!("{name}@example.com")}),
    )
    .await;
    reset_code_issued(&api, id).await;
    let email_code = last_code(&api.env.pool, id, Purpose::EmailVerification).await;
    let reset_code = last_code(&api.env.pool, id, Purpose::PasswordReset).await;
    let sealed: Vec<String> = sqlx::query_scalar(
        "SELECT payload ->> 'sealed_code' FROM events WHERE stream_id = $1 AND payload ? 'sealed_code'",
    )
    .bind(id)
    .fetch_all(&api.env.pool)
    .await
    .unwrap();
    assert_eq!(sealed.len(), 3);

    let history = api
        .http
        .get(api.service.url(&format!("/users/{id}/history")))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        history.contains("EmailVerificationRequested")
            || history.contains("email_verification_requested"),
        "{history}"
    );
    let logs = api.service.logs().join("\n");
    for secret in sealed.iter().chain([&email_code, &reset_code]) {
        assert!(!history.contains(secret.as_str()), "history shows a code");
        assert!(!logs.contains(secret.as_str()), "a log line shows a code");
    }
}
