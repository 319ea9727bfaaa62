//! OAuth 2.0: `POST /oauth/token` (RFC 6749 password and refresh-token
//! grants), `POST /oauth/revoke` (RFC 7009) and `GET /.well-known/jwks.json`.
//!
//! These endpoints answer errors as RFC 6749 section 5.2 says
//! (`{"error": "invalid_grant", "error_description": …}`), not in the API's
//! usual envelope, because OAuth clients parse them.

use axum::extract::rejection::FormRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use chrono::Utc;
use events::domain::{normalise, EventMetadata};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::ApiError;
use super::idempotency::ANONYMOUS;
use super::rate_limit::Client;
use super::AppState;
use crate::domain::roles::scopes;
use crate::domain::sign_in::{may_check, Refusal};
use crate::domain::User;
use crate::sessions::Presented;
use crate::signin::Checked;
use crate::tokens::new_refresh_token;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/oauth/token", post(token))
        .route("/oauth/revoke", post(revoke))
        .route("/.well-known/jwks.json", get(jwks))
}

/// The client id recorded for sessions of clients that send none.
const DEFAULT_CLIENT: &str = "public";

/// `POST /oauth/token`, form-encoded, as the handler reads it: every field
/// optional so that a missing one gets RFC 6749's `invalid_request` rather
/// than a generic rejection. Parameters it does not know are ignored (RFC
/// 6749, section 3.2). What is documented is [`TokenGrant`].
#[derive(Deserialize)]
pub struct TokenRequest {
    /// `password` or `refresh_token`.
    pub grant_type: Option<String>,
    /// With `password`: the username, or the email address (with an `@`).
    pub username: Option<String>,
    /// With `password`.
    pub password: Option<String>,
    /// With `refresh_token`: the refresh token last issued.
    pub refresh_token: Option<String>,
    /// Optional: 1–64 characters of `[A-Za-z0-9._:-]`, recorded with the session.
    pub client_id: Option<String>,
    /// Ignored: tokens carry every scope the user's roles give.
    pub scope: Option<String>,
}

/// The two grants, as documented.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // documentation only: see `TokenRequest`
pub enum TokenGrant {
    Password(PasswordGrant),
    RefreshToken(RefreshTokenGrant),
}

#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub enum PasswordGrantType {
    #[serde(rename = "password")]
    Password,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub enum RefreshTokenGrantType {
    #[serde(rename = "refresh_token")]
    RefreshToken,
}

/// `grant_type=password` (RFC 6749, section 4.3).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PasswordGrant {
    pub grant_type: PasswordGrantType,
    /// The username, or the email address (with an `@`); matched as
    /// normalised (trimmed, lower-cased).
    #[schema(min_length = 1, max_length = 254)]
    pub username: String,
    #[schema(min_length = 1, max_length = 128)]
    pub password: String,
    /// Recorded with the session; refresh grants must name the same one.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,64}$")]
    pub client_id: Option<String>,
    /// Ignored: tokens carry every scope the user's roles give.
    pub scope: Option<String>,
}

/// `grant_type=refresh_token` (RFC 6749, section 6).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct RefreshTokenGrant {
    pub grant_type: RefreshTokenGrantType,
    /// The refresh token last issued; each is used once.
    #[schema(min_length = 1, max_length = 128)]
    pub refresh_token: String,
    /// If sent, the client the session was started by.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,64}$")]
    pub client_id: Option<String>,
    /// Ignored.
    pub scope: Option<String>,
}

/// A successful token answer (RFC 6749, section 5.1).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    /// A JWT (RFC 9068) signed with EdDSA; verify it with the JWKS.
    pub access_token: String,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds the access token is valid.
    pub expires_in: u64,
    /// Opaque; use it once, with `grant_type=refresh_token`.
    pub refresh_token: String,
    /// Space-separated: `user`, plus one scope per role (`admin`, …).
    #[schema(example = "user admin")]
    pub scope: String,
}

/// An RFC 6749 error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OAuthErrorBody {
    /// `invalid_request`, `invalid_grant`, `unsupported_grant_type`,
    /// `unsupported_token_type`, `slow_down` (429), `temporarily_unavailable`
    /// or `server_error`.
    pub error: &'static str,
    pub error_description: String,
}

/// Why a token request failed.
#[derive(Debug)]
pub enum OAuthError {
    /// 400: a parameter is missing, repeated or malformed.
    InvalidRequest(String),
    /// 400: wrong credentials, unknown, locked or deactivated user, or a
    /// refresh token that is not live: one answer for all, so it tells
    /// nothing about which.
    InvalidGrant,
    /// 400.
    UnsupportedGrantType,
    /// 400 (RFC 7009): access tokens are JWTs that expire; they are not revoked.
    UnsupportedTokenType,
    /// Anything the API would answer 5xx for (logged there).
    Api(ApiError),
}

impl From<ApiError> for OAuthError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let (status, error, description) = match self {
            Self::InvalidRequest(why) => (StatusCode::BAD_REQUEST, "invalid_request", why),
            Self::InvalidGrant => (
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "the credentials or the refresh token are not valid".to_owned(),
            ),
            Self::UnsupportedGrantType => (
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be password or refresh_token".to_owned(),
            ),
            Self::UnsupportedTokenType => (
                StatusCode::BAD_REQUEST,
                "unsupported_token_type",
                "access tokens expire on their own and are not revoked".to_owned(),
            ),
            Self::Api(api) => {
                let status = api.status();
                let retry_after = api
                    .into_response()
                    .headers()
                    .get(header::RETRY_AFTER)
                    .cloned();
                let (error, description) = match status {
                    StatusCode::SERVICE_UNAVAILABLE => ("temporarily_unavailable", "try again later"),
                    // RFC 8628's code for a client that must slow down; 429
                    // and Retry-After say by how much.
                    StatusCode::TOO_MANY_REQUESTS => (
                        "slow_down",
                        "too many sign-in attempts from this client; retry after Retry-After seconds",
                    ),
                    _ => ("server_error", "try again later"),
                };
                let mut response = oauth_body(status, error, description.to_owned());
                if let Some(retry_after) = retry_after {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, retry_after);
                }
                return response;
            }
        };
        oauth_body(status, error, description)
    }
}

fn oauth_body(status: StatusCode, error: &'static str, error_description: String) -> Response {
    let mut response = (
        status,
        Json(OAuthErrorBody {
            error,
            error_description,
        }),
    )
        .into_response();
    no_store(&mut response);
    response
}

/// RFC 6749, section 5.1: token answers are never cached.
fn no_store(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn form<T>(form: Result<Form<T>, FormRejection>) -> Result<T, OAuthError> {
    form.map(|Form(t)| t).map_err(|rejection| {
        OAuthError::InvalidRequest(format!(
            "the body must be application/x-www-form-urlencoded with each parameter once: {}",
            rejection.body_text()
        ))
    })
}

fn required(value: Option<String>, name: &str) -> Result<String, OAuthError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| OAuthError::InvalidRequest(format!("{name} is required")))
}

fn client_id(value: Option<String>) -> Result<String, OAuthError> {
    match value {
        None => Ok(DEFAULT_CLIENT.to_owned()),
        Some(id)
            if (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b)) =>
        {
            Ok(id)
        }
        Some(_) => Err(OAuthError::InvalidRequest(
            "client_id must be 1–64 characters of [A-Za-z0-9._:-]".into(),
        )),
    }
}

/// Issues access and refresh tokens.
#[utoipa::path(post, path = "/oauth/token", tag = "oauth",
    request_body(content = TokenGrant, content_type = "application/x-www-form-urlencoded"),
    params(
        ("X-Request-Id" = Option<String>, Header, nullable = false, description = "Correlation id recorded with any event the request appends (failed checks, locks)"),
    ),
    responses(
        (status = 200, description = "Tokens issued", body = TokenResponse, headers(
            ("Cache-Control" = String, description = "no-store"))),
        (status = 400, description = "`invalid_request`, `invalid_grant` (wrong credentials, or an unknown, locked or deactivated user: one answer for all; or a refresh token that is unknown, expired, revoked or already used, which revokes its whole session) or `unsupported_grant_type`", body = OAuthErrorBody),
        (status = 413, description = "Body over 16 KiB", body = platform::http::ErrorBody),
        (status = 429, description = "`slow_down`: this client made more password grants and password-reset requests than its quota (refresh grants are not counted)", body = OAuthErrorBody, headers(
            ("Retry-After" = u64, description = "Seconds until this client may try again"))),
        (status = 500, description = "`server_error`", body = OAuthErrorBody),
        (status = 503, description = "`temporarily_unavailable`: the password hashing queue is full (with `Retry-After`) or PostgreSQL is unavailable", body = OAuthErrorBody),
    ))]
#[tracing::instrument(name = "oauth_token", skip_all)]
pub(crate) async fn token(
    State(state): State<AppState>,
    client: Client,
    headers: HeaderMap,
    body: Result<Form<TokenRequest>, FormRejection>,
) -> Result<Response, OAuthError> {
    let request = form(body)?;
    let grant_type = required(request.grant_type.clone(), "grant_type")?;
    let issued = match grant_type.as_str() {
        "password" => password_grant(&state, client, &headers, request).await,
        "refresh_token" => refresh_grant(&state, request).await,
        _ => Err(OAuthError::UnsupportedGrantType),
    };
    if let Err(OAuthError::InvalidGrant) = &issued {
        metrics::counter!("oauth_invalid_grant_total", "grant_type" => grant_type).increment(1);
    }
    let mut response = Json(issued?).into_response();
    no_store(&mut response);
    Ok(response)
}

async fn password_grant(
    state: &AppState,
    client: Client,
    headers: &HeaderMap,
    request: TokenRequest,
) -> Result<TokenResponse, OAuthError> {
    state.limits.sign_in.admit(client)?;
    let username = required(request.username, "username")?;
    let password = required(request.password, "password")?;
    let client_id = client_id(request.client_id)?;
    if username.chars().count() > 254 || password.chars().count() > 128 {
        return Err(OAuthError::InvalidRequest(
            "username is at most 254 and password at most 128 characters".into(),
        ));
    }
    let password = SecretString::from(password);
    let user_id = state
        .store
        .find_user(&normalise(&username))
        .await
        .map_err(ApiError::from)?;
    let checked = match user_id {
        None => state.sign_in.check_unknown(&password).await,
        Some(user_id) => {
            let metadata = sign_in_metadata(headers);
            state.sign_in.check(user_id, &password, &metadata).await
        }
    }
    .map_err(ApiError::from)?;
    let (Some(user_id), Checked::Passed(user)) = (user_id, checked) else {
        return Err(OAuthError::InvalidGrant);
    };
    let refresh_token = new_refresh_token();
    let session = state
        .sessions
        .start(user_id, &client_id, &refresh_token)
        .await
        .map_err(ApiError::from)?;
    tracing::info!(%user_id, %session, "signed in");
    Ok(issue(
        state,
        user_id,
        session,
        &client_id,
        &user,
        refresh_token,
    ))
}

async fn refresh_grant(
    state: &AppState,
    request: TokenRequest,
) -> Result<TokenResponse, OAuthError> {
    let presented = required(request.refresh_token, "refresh_token")?;
    let client = request
        .client_id
        .map(|id| client_id(Some(id)))
        .transpose()?;
    if presented.len() > 128 {
        return Err(OAuthError::InvalidGrant);
    }
    let session = match state
        .sessions
        .present(&presented)
        .await
        .map_err(ApiError::from)?
    {
        // A token is bound to the client it was issued to (RFC 6749, 6).
        Presented::Live(session) if client.is_none_or(|c| c == session.client_id) => session,
        Presented::Live(_) | Presented::Reused | Presented::Invalid => {
            return Err(OAuthError::InvalidGrant)
        }
    };
    // The user as they are now: a lock, a deactivation or a role change since
    // the last token counts.
    let user = User::from_events(
        &state
            .store
            .load(session.user_id)
            .await
            .map_err(ApiError::from)?,
    );
    match may_check(&user, Utc::now()) {
        Ok(()) => {}
        Err(Refusal::Locked { .. } | Refusal::Deactivated | Refusal::Unknown) => {
            return Err(OAuthError::InvalidGrant)
        }
    }
    let next = new_refresh_token();
    let rotated = state
        .sessions
        .rotate(&session, &presented, &next)
        .await
        .map_err(ApiError::from)?;
    if !rotated {
        return Err(OAuthError::InvalidGrant);
    }
    Ok(issue(
        state,
        session.user_id,
        session.session_id,
        &session.client_id,
        &user,
        next,
    ))
}

fn issue(
    state: &AppState,
    user_id: Uuid,
    session: Uuid,
    client_id: &str,
    user: &User,
    refresh_token: String,
) -> TokenResponse {
    let scopes = scopes(&user.roles);
    let access_token = state
        .keys
        .issue(user_id, session, client_id, &scopes, Utc::now());
    TokenResponse {
        access_token,
        token_type: "Bearer",
        expires_in: state.keys.settings().access_ttl.as_secs(),
        refresh_token,
        scope: scopes.join(" "),
    }
}

/// Events of a sign-in (failed checks, locks) are caused by its request.
fn sign_in_metadata(headers: &HeaderMap) -> EventMetadata {
    super::commands::metadata(headers, ANONYMOUS, None)
}

/// `POST /oauth/revoke`, form-encoded (RFC 7009).
#[derive(Deserialize, utoipa::ToSchema)]
pub struct RevokeRequest {
    /// A refresh token; its whole session ends.
    #[schema(value_type = String, min_length = 1, max_length = 4096)]
    pub token: Option<String>,
    /// `refresh_token` or `access_token`; other values are ignored (RFC 7009, 2.1).
    pub token_type_hint: Option<String>,
}

/// The longest `token` that `/oauth/revoke` reads.
const MAX_REVOKED_TOKEN: usize = 4096;

/// Revokes a refresh token and its session.
#[utoipa::path(post, path = "/oauth/revoke", tag = "oauth",
    request_body(content = RevokeRequest, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "Revoked, or the token was not valid anyway (RFC 7009: the same answer)"),
        (status = 400, description = "`invalid_request` (no token) or `unsupported_token_type` (an access token: it expires on its own)", body = OAuthErrorBody),
        (status = 413, description = "Body over 16 KiB", body = platform::http::ErrorBody),
        (status = 500, description = "`server_error`", body = OAuthErrorBody),
        (status = 503, description = "`temporarily_unavailable`: PostgreSQL is unavailable", body = OAuthErrorBody),
    ))]
#[tracing::instrument(name = "oauth_revoke", skip_all)]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    body: Result<Form<RevokeRequest>, FormRejection>,
) -> Result<Response, OAuthError> {
    let request = form(body)?;
    let token = required(request.token, "token")?;
    if token.chars().count() > MAX_REVOKED_TOKEN {
        return Err(OAuthError::InvalidRequest(format!(
            "token is at most {MAX_REVOKED_TOKEN} characters"
        )));
    }
    let looks_like_jwt = token.split('.').count() == 3;
    if request.token_type_hint.as_deref() == Some("access_token") || looks_like_jwt {
        return Err(OAuthError::UnsupportedTokenType);
    }
    if token.len() <= 128 {
        state
            .sessions
            .revoke_by_token(&token)
            .await
            .map_err(ApiError::from)?;
    }
    Ok(StatusCode::OK.into_response())
}

/// The public keys access tokens are signed with (RFC 7517), the current one
/// first; earlier keys stay listed until their tokens have expired.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "oauth",
    responses((status = 200, description = "A JWK Set of Ed25519 keys (`kty` OKP, `crv` Ed25519, `alg` EdDSA, `use` sig, `kid` the RFC 7638 thumbprint)", content_type = "application/json", headers(
        ("Cache-Control" = String, description = "public, max-age=300")))))]
#[tracing::instrument(name = "jwks", skip_all)]
pub(crate) async fn jwks(State(state): State<AppState>) -> Response {
    let mut response = Json(state.keys.jwks()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}
