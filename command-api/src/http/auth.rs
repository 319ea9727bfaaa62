//! Admin authentication: `Authorization: Bearer <ADMIN_TOKEN>`, compared in
//! constant time. The token is never logged.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

/// Proof that the request carried the admin token.
pub struct Admin;

impl Admin {
    /// The principal the admin token stands for: the actor recorded with the
    /// events and the caller that scopes its idempotency keys.
    pub const PRINCIPAL: &'static str = "admin";
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented =
            platform::http::bearer_token(&parts.headers).ok_or(ApiError::Unauthenticated)?;
        let expected = state.admin_token.expose_secret().as_bytes();
        if bool::from(presented.as_bytes().ct_eq(expected)) {
            Ok(Admin)
        } else {
            Err(ApiError::Forbidden)
        }
    }
}
