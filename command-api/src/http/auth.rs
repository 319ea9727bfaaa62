//! Who may do what, decided here and nowhere else.
//!
//! * [`Principal`]: any valid access token (RFC 9068 JWT signed by this
//!   service's keys, unexpired, for this audience).
//! * [`Admin`]: a principal with the `admin` scope whose user is, right now,
//!   still an active administrator: a token does not outlive its user's
//!   deactivation or the revocation of the role, however long it has left.
//! * [`RoleGranter`]: an [`Admin`], or the bootstrap `ADMIN_TOKEN`, whose one
//!   power is granting roles, so that the first administrator can be made.
//!
//! Tokens are never logged; the `ADMIN_TOKEN` is compared in constant time.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::error::ApiError;
use super::AppState;
use crate::domain::roles::ADMIN_SCOPE;
use crate::domain::{Status, User};
use crate::tokens::Verified;

/// The caller of a request with a valid access token.
#[derive(Debug, Clone)]
pub struct Principal(pub Verified);

impl Principal {
    pub fn user_id(&self) -> Uuid {
        self.0.user_id
    }

    /// The session (refresh-token family) the token was issued in.
    pub fn session(&self) -> Uuid {
        self.0.session
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.0.scopes.iter().any(|s| s == scope)
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token =
            platform::http::bearer_token(&parts.headers).ok_or(ApiError::Unauthenticated)?;
        match state.keys.verify(token) {
            Ok(verified) => Ok(Self(verified)),
            Err(error) => {
                tracing::debug!(error = %error, "access token refused");
                Err(ApiError::InvalidToken)
            }
        }
    }
}

/// Who acts on the user `target`'s own data (profile, email): the user
/// themself, or an active administrator. Returns the actor to record.
pub async fn self_or_admin(
    principal: Principal,
    target: Uuid,
    state: &AppState,
) -> Result<String, ApiError> {
    if principal.user_id() == target {
        return Ok(target.to_string());
    }
    Ok(Admin::check(principal, state).await?.actor())
}

/// An active administrator acting with their access token.
#[derive(Debug, Clone)]
pub struct Admin(Principal);

impl Admin {
    /// The actor recorded with the events: the administrator's user id.
    pub fn actor(&self) -> String {
        self.0.user_id().to_string()
    }

    pub fn user_id(&self) -> Uuid {
        self.0.user_id()
    }

    /// Administrators cannot deactivate themselves or give up their own
    /// `admin` role: another administrator must, so that the last one is
    /// never locked out by a slip.
    pub fn refuse_own(&self, target: Uuid) -> Result<(), ApiError> {
        if target == self.user_id() {
            Err(ApiError::OwnAccount)
        } else {
            Ok(())
        }
    }

    async fn check(principal: Principal, state: &AppState) -> Result<Self, ApiError> {
        if !principal.has_scope(ADMIN_SCOPE) {
            return Err(ApiError::Forbidden);
        }
        let acting = User::from_events(&state.store.load(principal.user_id()).await?);
        if acting.status != Status::Active || !acting.roles.contains(ADMIN_SCOPE) {
            tracing::warn!(actor = %principal.user_id(), "admin token of a user who is no longer an active administrator");
            return Err(ApiError::Forbidden);
        }
        Ok(Self(principal))
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        Self::check(principal, state).await
    }
}

/// Who may grant a role.
#[derive(Debug, Clone)]
pub enum RoleGranter {
    /// The `ADMIN_TOKEN`: only to make the first administrators.
    Bootstrap,
    Admin(Admin),
}

impl RoleGranter {
    /// The actor recorded for the bootstrap token.
    pub const BOOTSTRAP: &'static str = "bootstrap";

    pub fn actor(&self) -> String {
        match self {
            Self::Bootstrap => Self::BOOTSTRAP.to_owned(),
            Self::Admin(admin) => admin.actor(),
        }
    }
}

impl FromRequestParts<AppState> for RoleGranter {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented =
            platform::http::bearer_token(&parts.headers).ok_or(ApiError::Unauthenticated)?;
        let expected = state.admin_token.expose_secret().as_bytes();
        if bool::from(presented.as_bytes().ct_eq(expected)) {
            return Ok(Self::Bootstrap);
        }
        Admin::from_request_parts(parts, state)
            .await
            .map(Self::Admin)
    }
}
