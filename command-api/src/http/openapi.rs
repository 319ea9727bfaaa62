//! `GET /openapi.json`: the command API as served, generated from the handlers'
//! own annotations and types so it cannot drift from the code.

use axum::response::IntoResponse;
use axum::Json;
use platform::http::{ErrorBody, ErrorDetail};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::commands::Accepted;
use super::users::{RegisterRequest, StatusRequest};
use crate::domain::profile;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "userstream command API",
        description = "Write side of userstream: register users, sign them in (OAuth 2.0), \
change passwords (or reset them by a mailed code), profiles and email addresses (verified by a \
mailed code), status, locks and roles, and read a user's history. Errors answer \
`{\"error\":{\"code\",\"message\",\"fields\"}}`, except on the OAuth endpoints, which answer \
RFC 6749's `{\"error\",\"error_description\"}`.",
    ),
    paths(
        super::users::register,
        super::users::deactivate,
        super::users::reactivate,
        super::users::unlock,
        super::password::change,
        super::profile::change,
        super::email::request,
        super::email::verify,
        super::password_reset::request,
        super::password_reset::complete,
        super::roles::grant,
        super::roles::revoke,
        super::history::history,
        super::oauth::token,
        super::oauth::revoke,
        super::oauth::jwks,
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        serve,
    ),
    components(schemas(
        RegisterRequest,
        StatusRequest,
        Accepted,
        ErrorBody,
        ErrorDetail,
        super::password::ChangePasswordRequest,
        super::profile::ProfilePatch,
        super::email::EmailRequest,
        super::email::VerifyRequest,
        super::password_reset::ResetRequest,
        super::password_reset::ResetRequested,
        super::password_reset::CompleteReset,
        super::roles::GrantRequest,
        super::history::HistoryPage,
        super::history::HistoryEvent,
        super::oauth::TokenGrant,
        super::oauth::PasswordGrant,
        super::oauth::RefreshTokenGrant,
        super::oauth::PasswordGrantType,
        super::oauth::RefreshTokenGrantType,
        super::oauth::TokenResponse,
        super::oauth::OAuthErrorBody,
        super::oauth::RevokeRequest,
    )),
    modifiers(&AdminToken),
    tags((name = "users", description = "User commands"),
        (name = "roles", description = "Roles, which become scopes"),
        (name = "oauth", description = "OAuth 2.0 tokens and their keys"), (name = "operations", description = "Health, readiness, metrics")),
)]
pub struct ApiDoc;

struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "admin_token",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "The ADMIN_TOKEN the service was started with: only grants roles",
                        ))
                        .build(),
                ),
            );
            components.add_security_scheme(
                "access_token",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .description(Some(
                            "An access token from POST /oauth/token (RFC 9068 JWT, EdDSA); \
                             its `scope` claim lists `user` and one scope per role",
                        ))
                        .build(),
                ),
            );
        }
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 description of this API", content_type = "application/json")))]
pub async fn serve() -> impl IntoResponse {
    Json(document())
}

/// The document as served: [`ApiDoc`] plus OpenAPI links from a
/// registration's answer to the status commands (its `id` is their `{id}`),
/// so clients and schema-driven tests can follow them. Added as JSON because
/// utoipa 5 spells a link's `operationId` as `operation_id`.
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serialises");
    let links: serde_json::Map<String, serde_json::Value> = ["deactivate", "reactivate"]
        .into_iter()
        .map(|operation| {
            let link = serde_json::json!({
                "operationId": operation,
                "parameters": { "id": "$response.body#/id" },
                "description": format!("{operation} the user just registered"),
            });
            (format!("{operation}_registered_user"), link)
        })
        .collect();
    doc["paths"]["/users"]["post"]["responses"]["201"]["links"] = links.into();
    // The time zones this build knows, exactly (utoipa has no runtime enum).
    let zones: Vec<serde_json::Value> = chrono_tz::TZ_VARIANTS
        .iter()
        .map(|zone| zone.name().into())
        .chain([serde_json::Value::Null])
        .collect();
    // Every email field accepts exactly what registration does.
    let email = doc["components"]["schemas"]["RegisterRequest"]["properties"]["email"].clone();
    for schema in ["EmailRequest", "ResetRequest", "CompleteReset"] {
        let field = &mut doc["components"]["schemas"][schema]["properties"]["email"];
        field["pattern"] = email["pattern"].clone();
    }
    let patch = &mut doc["components"]["schemas"]["ProfilePatch"];
    patch["properties"]["time_zone"]["enum"] = zones.into();
    patch["additionalProperties"] = false.into();
    patch["properties"]["preferences"] = serde_json::json!({
        "type": ["object", "null"],
        "description": patch["properties"]["preferences"]["description"],
        "maxProperties": profile::PREFERENCES_MAX,
        "propertyNames": { "pattern": profile::PREFERENCE_KEY_PATTERN },
        "additionalProperties": { "anyOf": [
            { "type": "string", "maxLength": profile::PREFERENCE_STRING_MAX },
            { "type": "number" },
            { "type": "boolean" },
            { "type": "null" },
        ]},
    });
    doc
}
