//! `GET /openapi.json`: the command API as served, generated from the handlers'
//! own annotations and types so it cannot drift from the code.

use axum::response::IntoResponse;
use axum::Json;
use platform::http::{ErrorBody, ErrorDetail};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::users::{Accepted, RegisterRequest, StatusRequest};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "userstream command API",
        description = "Write side of userstream: register, deactivate and reactivate users. \
Every error answers `{\"error\":{\"code\",\"message\",\"fields\"}}`.",
    ),
    paths(
        super::users::register,
        super::users::deactivate,
        super::users::reactivate,
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        serve,
    ),
    components(schemas(RegisterRequest, StatusRequest, Accepted, ErrorBody, ErrorDetail)),
    modifiers(&AdminToken),
    tags((name = "users", description = "User commands"), (name = "operations", description = "Health, readiness, metrics")),
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
                        .description(Some("The ADMIN_TOKEN the service was started with"))
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
    Json(ApiDoc::openapi())
}
