//! Identity on the real command API and PostgreSQL: OAuth 2.0 grants, token
//! rotation and revocation, the race-proof lockout, no enumeration, password
//! changes and rehashing, roles and scopes, history, and secrets kept out of
//! answers and logs.

use std::collections::BTreeSet;

use futures::future::join_all;
use serde_json::{json, Value};
use userstream_tests::identity::{
    code, grant_with_bootstrap, make_admin, password_grant, sign_in, Admin, Api, PASSWORD,
};
use userstream_tests::TEST_ADMIN_TOKEN;
use uuid::Uuid;

#[tokio::test]
async fn a_password_grant_issues_an_rfc_9068_token_that_verifies_with_the_jwks() {
    let api = Api::start(&[]).await;
    let (id, name) = api.user().await;
    for identifier in [
        name.clone(),
        format!(" {}@Example.com ", name.to_uppercase()),
    ] {
        let (status, headers, body) = api
            .token(&[
                ("grant_type", "password"),
                ("username", &identifier),
                ("password", PASSWORD),
                ("client_id", "cli"),
            ])
            .await;
        assert_eq!(status, 200, "{identifier}: {body}");
        assert_eq!(headers["cache-control"], "no-store");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["scope"], "user");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["refresh_token"].as_str().unwrap().len(), 43);

        // A downstream service: the JWKS is all it needs.
        let jwks: jsonwebtoken::jwk::JwkSet = api
            .http
            .get(api.service.url("/.well-known/jwks.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = body["access_token"].as_str().unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
        let jwk = jwks
            .find(header.kid.as_deref().unwrap())
            .expect("kid in the JWKS");
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        validation.set_audience(&["userstream"]);
        validation.set_issuer(&["http://127.0.0.1:3001"]);
        let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .unwrap()
            .claims;
        assert_eq!(claims["sub"], id.to_string());
        assert_eq!(claims["client_id"], "cli");
        assert_eq!(claims["scope"], "user");
        for claim in ["exp", "iat", "jti", "sid"] {
            assert!(!claims[claim].is_null(), "{claim} missing");
        }
    }
    // An ordinary sign-in appends nothing.
    assert_eq!(api.event_types(id).await, ["UserRegistered"]);
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_its_whole_session() {
    let api = Api::start(&[]).await;
    let (_, name) = api.user().await;
    let (_, first) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    let first = first["refresh_token"].as_str().unwrap().to_owned();

    let (status, second) = api.refresh(&first).await;
    assert_eq!(status, 200, "{second}");
    let second = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);

    // The first one again: a copy is in use somewhere; the session ends.
    let (status, body) = api.refresh(&first).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, _) = api.refresh(&second).await;
    assert_eq!(status, 400, "the rotated token died with its session");
    let reuse = api.service.metric("refresh_token_reuse_total").await;
    assert_eq!(reuse, 1.0);

    // Only digests are stored.
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT digest FROM refresh_tokens")
        .fetch_all(&api.env.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored
        .iter()
        .all(|d| d.len() == 32 && !first.as_bytes().windows(32).any(|w| w == d)));
}

#[tokio::test]
async fn a_revoked_refresh_token_stops_working_and_access_tokens_are_not_revocable() {
    let api = Api::start(&[]).await;
    let (_, name) = api.user().await;
    let (_, tokens) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    let revoke = |form: Vec<(&'static str, String)>| {
        let request = api.http.post(api.service.url("/oauth/revoke")).form(&form);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let refresh = tokens["refresh_token"].as_str().unwrap().to_owned();
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    assert_eq!(revoke(vec![("token", refresh.clone())]).await.0, 200);
    assert_eq!(api.refresh(&refresh).await.0, 400);
    // Unknown tokens get the same 200 (RFC 7009, 2.2).
    assert_eq!(revoke(vec![("token", "not-a-token".into())]).await.0, 200);
    let (status, body) = revoke(vec![("token", access)]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_token_type"))
    );
    let (status, body) = revoke(vec![]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn bad_token_requests_get_rfc_6749_errors() {
    let api = Api::start(&[]).await;
    let (_, name) = api.user().await;
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[], "invalid_request"),
        (
            &[("grant_type", "client_credentials")],
            "unsupported_grant_type",
        ),
        (
            &[("grant_type", "password"), ("username", &name)],
            "invalid_request",
        ),
        (&[("grant_type", "refresh_token")], "invalid_request"),
        (
            &[
                ("grant_type", "password"),
                ("username", &name),
                ("password", "wrong password!"),
            ],
            "invalid_grant",
        ),
        (
            &[("grant_type", "refresh_token"), ("refresh_token", "nope")],
            "invalid_grant",
        ),
    ];
    for (form, expected) in cases {
        let (status, headers, body) = api.token(form).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some(expected)),
            "{form:?}: {body}"
        );
        assert!(body["error_description"].is_string());
        assert_eq!(headers["cache-control"], "no-store");
    }
    // JSON is not a form.
    let response = api
        .http
        .post(api.service.url("/oauth/token"))
        .json(&json!({"grant_type": "password", "username": name, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
}

#[tokio::test]
async fn an_unknown_user_and_a_wrong_password_cost_one_verification_and_answer_alike() {
    let api = Api::start(&[]).await;
    let (_, name) = api.user().await;
    let before = api.verifies().await;
    let (wrong_status, wrong) =
        password_grant(&api.http, &api.service, &name, "not the password").await;
    let after_wrong = api.verifies().await;
    let (unknown_status, unknown) =
        password_grant(&api.http, &api.service, "nobody-here", "not the password").await;
    let after_unknown = api.verifies().await;
    // A name PostgreSQL cannot even hold (a NUL byte) is just another unknown user.
    let (nul_status, nul) =
        password_grant(&api.http, &api.service, "nobody\0here", "not the password").await;
    let after_nul = api.verifies().await;
    assert_eq!((wrong_status, &wrong), (unknown_status, &unknown));
    assert_eq!((wrong_status, &wrong), (nul_status, &nul));
    assert_eq!(after_nul - after_unknown, 1.0, "and a name with a NUL byte");
    assert_eq!(wrong["error"], "invalid_grant");
    assert_eq!(
        after_wrong - before,
        1.0,
        "a wrong password costs one verification"
    );
    assert_eq!(after_unknown - after_wrong, 1.0, "so does an unknown user");
}

#[tokio::test]
async fn fifty_parallel_wrong_guesses_run_at_most_five_verifications_and_lock_the_account() {
    let api = Api::start(&[("LOCKOUT_MAX_FAILURES", "5"), ("LOCKOUT_SECONDS", "600")]).await;
    let (id, name) = api.user().await;
    let before = api.verifies().await;
    let answers = join_all((0..50).map(|i| {
        let (http, service, name) = (&api.http, &api.service, &name);
        async move { password_grant(http, service, name, &format!("wrong guess {i}")).await }
    }))
    .await;
    let verified = api.verifies().await - before;
    assert!(verified <= 5.0, "{verified} verifications ran");
    assert!(answers
        .iter()
        .all(|(status, body)| *status == 400 && body["error"] == "invalid_grant"));
    let types = api.event_types(id).await;
    let failures = types.iter().filter(|t| *t == "PasswordCheckFailed").count();
    assert_eq!(failures, 5, "{types:?}");
    assert_eq!(types.last().map(String::as_str), Some("UserLocked"));

    // Locked: even the right password is refused, without a verification.
    let before = api.verifies().await;
    let (status, _) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    assert_eq!(status, 400);
    assert_eq!(api.verifies().await, before);

    // An administrator lifts the lock; then the right password works.
    let admin = make_admin(&api.http, &api.service).await;
    let (status, body) = api
        .post_as(
            &admin.token,
            &format!("/users/{id}/unlock"),
            json!({"reason": "called support"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api
        .post_as(&admin.token, &format!("/users/{id}/unlock"), json!({}))
        .await;
    assert_eq!((status, code(&body)), (409, "not_locked"));
    sign_in(&api.http, &api.service, &name).await;
}

#[tokio::test]
async fn a_success_between_failures_starts_the_count_again() {
    let api = Api::start(&[("LOCKOUT_MAX_FAILURES", "3")]).await;
    let (id, name) = api.user().await;
    for _ in 0..2 {
        password_grant(&api.http, &api.service, &name, "wrong password").await;
    }
    sign_in(&api.http, &api.service, &name).await;
    for _ in 0..2 {
        password_grant(&api.http, &api.service, &name, "wrong password").await;
    }
    sign_in(&api.http, &api.service, &name).await;
    let types = api.event_types(id).await;
    assert!(!types.contains(&"UserLocked".to_owned()), "{types:?}");
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == "PasswordCheckSucceeded")
            .count(),
        2
    );
}

#[tokio::test]
async fn deactivation_revokes_every_session_and_refuses_sign_in() {
    let api = Api::start(&[]).await;
    let admin = make_admin(&api.http, &api.service).await;
    let (id, name) = api.user().await;
    let (_, tokens) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    let (status, _) = api
        .post_as(&admin.token, &format!("/users/{id}/deactivate"), json!({}))
        .await;
    assert_eq!(status, 200);
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM refresh_sessions WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .fetch_one(&api.env.pool)
    .await
    .unwrap();
    assert_eq!(live, 0, "revoked in the deactivation's transaction");
    assert_eq!(
        api.refresh(tokens["refresh_token"].as_str().unwrap())
            .await
            .0,
        400
    );
    let (status, body) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
}

#[tokio::test]
async fn a_locked_user_cannot_refresh_until_the_lock_is_lifted() {
    let api = Api::start(&[("LOCKOUT_MAX_FAILURES", "2")]).await;
    let (id, name) = api.user().await;
    let (_, tokens) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    let refresh = tokens["refresh_token"].as_str().unwrap();
    for _ in 0..2 {
        password_grant(&api.http, &api.service, &name, "someone guessing").await;
    }
    let (status, body) = api.refresh(refresh).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    // Refused, not used: the session survives the lock.
    let admin = make_admin(&api.http, &api.service).await;
    let (status, _) = api
        .post_as(&admin.token, &format!("/users/{id}/unlock"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(api.refresh(refresh).await.0, 200);
}

#[tokio::test]
async fn a_password_change_needs_the_current_one_and_ends_the_other_sessions() {
    let api = Api::start(&[]).await;
    let (id, name) = api.user().await;
    let (_, this) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    let (_, other) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    let token = this["access_token"].as_str().unwrap();
    let path = format!("/users/{id}/password");
    let new = "a brand new passphrase";

    let (status, body) = api
        .post_as(
            token,
            &path,
            json!({"current_password": "wrong one", "new_password": new}),
        )
        .await;
    assert_eq!((status, code(&body)), (403, "wrong_password"));
    let (status, body) = api
        .post_as(
            token,
            &path,
            json!({"current_password": PASSWORD, "new_password": "short"}),
        )
        .await;
    assert_eq!((status, code(&body)), (422, "validation_failed"));
    assert!(body["error"]["fields"]["new_password"].is_string());
    let (_, stranger) = api.user().await;
    let stranger_token = sign_in(&api.http, &api.service, &stranger).await;
    let (status, _) = api
        .post_as(
            &stranger_token,
            &path,
            json!({"current_password": PASSWORD, "new_password": new}),
        )
        .await;
    assert_eq!(status, 403, "only the user themself");

    let (status, body) = api
        .post_as(
            token,
            &path,
            json!({"current_password": PASSWORD, "new_password": new}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        api.refresh(other["refresh_token"].as_str().unwrap())
            .await
            .0,
        400,
        "other session ended"
    );
    assert_eq!(
        api.refresh(this["refresh_token"].as_str().unwrap()).await.0,
        200,
        "this session goes on"
    );
    assert_eq!(
        password_grant(&api.http, &api.service, &name, PASSWORD)
            .await
            .0,
        400
    );
    assert_eq!(
        password_grant(&api.http, &api.service, &name, new).await.0,
        200
    );
    let types = api.event_types(id).await;
    assert_eq!(
        types,
        [
            "UserRegistered",
            "PasswordCheckFailed", // the wrong current password
            "PasswordCheckSucceeded",
            "PasswordChanged",
            "PasswordCheckFailed", // the old password, after the change
            "PasswordCheckSucceeded",
        ]
    );
}

#[tokio::test]
async fn a_password_change_is_refused_while_locked_or_deactivated() {
    let api = Api::start(&[("LOCKOUT_MAX_FAILURES", "2")]).await;
    let admin = make_admin(&api.http, &api.service).await;
    let change = json!({"current_password": PASSWORD, "new_password": "a brand new passphrase"});

    let (id, name) = api.user().await;
    let token = sign_in(&api.http, &api.service, &name).await;
    for _ in 0..2 {
        password_grant(&api.http, &api.service, &name, "someone guessing").await;
    }
    let (status, body) = api
        .post_as(&token, &format!("/users/{id}/password"), change.clone())
        .await;
    assert_eq!((status, code(&body)), (403, "account_locked"));

    let (id, name) = api.user().await;
    let token = sign_in(&api.http, &api.service, &name).await;
    let (status, _) = api
        .post_as(&admin.token, &format!("/users/{id}/deactivate"), json!({}))
        .await;
    assert_eq!(status, 200);
    let (status, body) = api
        .post_as(&token, &format!("/users/{id}/password"), change)
        .await;
    assert_eq!((status, code(&body)), (409, "user_deactivated"));
    assert_eq!(
        api.event_types(id).await,
        ["UserRegistered", "UserDeactivated"]
    );
}

#[tokio::test]
async fn a_hash_made_under_older_parameters_is_rehashed_at_sign_in() {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let api = Api::start(&[]).await;
    let weak = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(8 * 1024, 1, 1, None).unwrap(),
    );
    let old_hash = weak
        .hash_password(PASSWORD.as_bytes(), &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string();
    // A user registered by an older build, as its rows would be.
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO user_identities (user_id, username, email) VALUES ($1, 'olduser', 'old@example.com')")
        .bind(id)
        .execute(&api.env.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) \
         VALUES ($1, 1, $2, 'UserRegistered', 1, $3, '{\"actor\":\"anonymous\"}')",
    )
    .bind(id)
    .bind(Uuid::now_v7())
    .bind(json!({"username": "olduser", "email": "old@example.com", "password_hash": old_hash}))
    .execute(&api.env.pool)
    .await
    .unwrap();

    sign_in(&api.http, &api.service, "olduser").await;
    assert_eq!(
        api.event_types(id).await,
        ["UserRegistered", "PasswordRehashed"]
    );
    let new_hash: String = sqlx::query_scalar(
        "SELECT payload->>'password_hash' FROM events WHERE stream_id = $1 AND stream_version = 2",
    )
    .bind(id)
    .fetch_one(&api.env.pool)
    .await
    .unwrap();
    assert!(
        new_hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{new_hash}"
    );
    // Once is enough.
    sign_in(&api.http, &api.service, "olduser").await;
    assert_eq!(api.event_types(id).await.len(), 2);
}

#[tokio::test]
async fn roles_become_scopes_and_only_administrators_manage_them() {
    let api = Api::start(&[]).await;
    let admin = make_admin(&api.http, &api.service).await;
    let (id, name) = api.user().await;
    let roles = format!("/users/{id}/roles");

    let (status, body) = api
        .post_as(&admin.token, &roles, json!({"role": "support"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api
        .post_as(&admin.token, &roles, json!({"role": "support"}))
        .await;
    assert_eq!((status, code(&body)), (409, "role_already_granted"));
    let (status, body) = api
        .post_as(&admin.token, &roles, json!({"role": "Not Valid"}))
        .await;
    assert_eq!((status, code(&body)), (422, "validation_failed"));
    let (_, tokens) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    assert_eq!(tokens["scope"], "user support");

    // A user without the admin scope, and the bootstrap token, cannot do admin work.
    let user_token = tokens["access_token"].as_str().unwrap();
    let (status, body) = api
        .post_as(
            user_token,
            &format!("/users/{}/deactivate", admin.id),
            json!({}),
        )
        .await;
    assert_eq!((status, code(&body)), (403, "forbidden"));
    let (status, body) = api
        .post_as(user_token, &roles, json!({"role": "admin"}))
        .await;
    assert_eq!((status, code(&body)), (403, "forbidden"));
    let (status, body) = api
        .post_as(
            TEST_ADMIN_TOKEN,
            &format!("/users/{id}/deactivate"),
            json!({}),
        )
        .await;
    assert_eq!((status, code(&body)), (401, "invalid_token"));
    let delete = |token: String, role: &str| {
        let request = api
            .http
            .delete(api.service.url(&format!("/users/{id}/roles/{role}")))
            .bearer_auth(token);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    assert_eq!(delete(TEST_ADMIN_TOKEN.into(), "support").await.0, 401);
    assert_eq!(delete(admin.token.clone(), "support").await.0, 200);
    let (status, body) = delete(admin.token.clone(), "support").await;
    assert_eq!((status, code(&body)), (409, "role_not_granted"));

    // The actor of each change is recorded.
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE event_type IN ('RoleGranted', 'RoleRevoked') ORDER BY global_position",
    )
    .fetch_all(&api.env.pool)
    .await
    .unwrap();
    let admin_id = admin.id.to_string();
    assert_eq!(actors, ["bootstrap", admin_id.as_str(), admin_id.as_str()]);
}

#[tokio::test]
async fn an_admin_token_stops_working_when_its_user_loses_the_role() {
    let api = Api::start(&[]).await;
    let admin = make_admin(&api.http, &api.service).await;
    let other = make_admin(&api.http, &api.service).await;
    let (id, _) = api.user().await;
    let response = api
        .http
        .delete(api.service.url(&format!("/users/{}/roles/admin", admin.id)))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The token still says `admin`, but its user no longer is one.
    let (status, body) = api
        .post_as(&admin.token, &format!("/users/{id}/deactivate"), json!({}))
        .await;
    assert_eq!((status, code(&body)), (403, "forbidden"));
}

#[tokio::test]
async fn history_shows_public_parts_with_actor_and_correlation_id_in_pages() {
    let api = Api::start(&[]).await;
    let Admin {
        token: admin,
        id: admin_id,
    } = make_admin(&api.http, &api.service).await;
    let (id, name) = api.user().await;
    password_grant(&api.http, &api.service, &name, "wrong password").await;
    let response = api
        .http
        .post(api.service.url(&format!("/users/{id}/deactivate")))
        .bearer_auth(&admin)
        .header("X-Request-Id", "req-history-1")
        .json(&json!({"reason": "testing"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let page = |query: &str| {
        let request = api
            .http
            .get(api.service.url(&format!("/users/{id}/history{query}")))
            .bearer_auth(&admin);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let (status, text) = page("?limit=2").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        !text.contains("argon2") && !text.contains("password_hash"),
        "{text}"
    );
    let first: Value = serde_json::from_str(&text).unwrap();
    let types: Vec<&str> = first["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["user.registered.v1", "user.password_check_failed.v1"]
    );
    assert_eq!(first["events"][0]["actor"], "anonymous");
    assert_eq!(first["events"][0]["data"]["username"], name.as_str());
    assert_eq!(first["next_after"], 2);
    let (_, text) = page("?limit=2&after=2").await;
    let second: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(second["events"][0]["type"], "user.deactivated.v1");
    assert_eq!(second["events"][0]["actor"], admin_id.to_string());
    assert_eq!(second["events"][0]["correlation_id"], "req-history-1");
    assert_eq!(second["events"][0]["data"]["reason"], "testing");
    assert!(second["next_after"].is_null());

    let (status, _) = page("?limit=0").await;
    assert_eq!(status, 400);
    let user_token = {
        let (_, other) = api.user().await;
        sign_in(&api.http, &api.service, &other).await
    };
    let response = api
        .http
        .get(api.service.url(&format!("/users/{id}/history")))
        .bearer_auth(user_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = api
        .http
        .get(
            api.service
                .url(&format!("/users/{}/history", Uuid::now_v7())),
        )
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn no_password_hash_or_token_reaches_a_log_line() {
    let api = Api::start(&[("RUST_LOG", "debug")]).await;
    let (_, name) = api.user().await;
    let (_, tokens) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    let refresh = tokens["refresh_token"].as_str().unwrap();
    let access = tokens["access_token"].as_str().unwrap();
    let (_, rotated) = api.refresh(refresh).await;
    api.refresh(refresh).await; // reuse: logged as a warning, without the token
    password_grant(&api.http, &api.service, &name, "wrong password").await;
    let secrets: BTreeSet<&str> = [
        PASSWORD,
        refresh,
        access,
        rotated["refresh_token"].as_str().unwrap(),
        rotated["access_token"].as_str().unwrap(),
        "wrong password",
        "$argon2",
    ]
    .into();
    for line in api.service.logs() {
        for secret in &secrets {
            assert!(
                !line.contains(secret),
                "a log line carries a secret: {line}"
            );
        }
    }
}

#[tokio::test]
async fn the_bootstrap_token_only_grants_roles() {
    let api = Api::start(&[]).await;
    let (id, name) = api.user().await;
    grant_with_bootstrap(&api.http, &api.service, id, "admin").await;
    let token = sign_in(&api.http, &api.service, &name).await;
    let (other, _) = api.user().await;
    for verb in ["deactivate", "reactivate", "unlock"] {
        let (status, _) = api
            .post_as(
                TEST_ADMIN_TOKEN,
                &format!("/users/{other}/{verb}"),
                json!({}),
            )
            .await;
        assert_eq!(status, 401, "{verb} with the bootstrap token");
    }
    let response = api
        .http
        .get(api.service.url(&format!("/users/{other}/history")))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let (status, _) = api
        .post_as(&token, &format!("/users/{other}/deactivate"), json!({}))
        .await;
    assert_eq!(status, 200, "the administrator it made can");
}

#[tokio::test]
async fn password_grants_and_resets_over_a_clients_quota_get_429_without_a_verification() {
    let api = Api::start(&[("SIGN_IN_RATE_PER_MINUTE", "1"), ("SIGN_IN_BURST", "2")]).await;
    let (_, name) = api.user().await;
    // Two attempts of this client's quota: one sign-in, one wrong password.
    let (status, signed_in) = password_grant(&api.http, &api.service, &name, PASSWORD).await;
    assert_eq!(status, 200, "{signed_in}");
    let (status, wrong) = password_grant(&api.http, &api.service, &name, "wrong guess").await;
    assert_eq!(
        (status, wrong["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    let before = api.verifies().await;
    let (status, headers, limited) = api
        .token(&[
            ("grant_type", "password"),
            ("username", &name),
            ("password", PASSWORD),
        ])
        .await;
    assert_eq!(
        (status, limited["error"].as_str()),
        (429, Some("slow_down"))
    );
    assert_eq!(headers["cache-control"], "no-store");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(api.verifies().await, before, "no verification ran");

    // The reset endpoints draw on the same quota (a completion hashes too).
    for (path, body) in [
        (
            "/password-resets",
            json!({"email": format!("{name}@example.com")}),
        ),
        (
            "/password-resets/complete",
            json!({"email": format!("{name}@example.com"), "code": "12345678", "new_password": "another long passphrase"}),
        ),
    ] {
        let response = api
            .http
            .post(api.service.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429, "{path}");
        assert!(response.headers().contains_key("retry-after"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(code(&body), "rate_limited", "{path}");
    }

    // Refresh grants hash nothing and are not counted.
    let (status, refreshed) = api
        .refresh(signed_in["refresh_token"].as_str().unwrap())
        .await;
    assert_eq!(status, 200, "{refreshed}");

    // Another client (another loopback address) has its own quota.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let (status, body) = password_grant(&other, &api.service, &name, PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(api.verifies().await, before + 1.0);
}
