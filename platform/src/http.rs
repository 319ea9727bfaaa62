//! HTTP pieces every service uses: the error body, the middleware stack, the
//! operational endpoints and serving with graceful shutdown.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `{"error":{"code":"…","message":"…","fields":{…}}}`, the one error shape of every API.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable, stable: e.g. `validation_failed`, `username_taken`.
    pub code: &'static str,
    /// For people; may change.
    pub message: String,
    /// Per-field messages, present when specific fields were refused.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

/// Builds an error response in the shared shape.
pub fn error_response(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
    fields: BTreeMap<String, String>,
) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code,
            message: message.into(),
            fields,
        },
    };
    (status, Json(body)).into_response()
}

/// Wraps a service's routes with request ids, tracing, a timeout, HTTP metrics
/// and the fallback 404 in the shared error shape.
pub fn layers(router: Router, request_timeout: Duration) -> Router {
    router
        .fallback(|| async {
            error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route",
                BTreeMap::new(),
            )
        })
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                // The panic message is printed by the panic hook; the client gets
                // the shared shape, not a dropped connection.
                tracing::error!("a request handler panicked");
                error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                    BTreeMap::new(),
                )
            },
        ))
        .layer(middleware::from_fn(record_metrics))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            deadline(request_timeout, req, next)
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let request_id = req
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!(
                        "http",
                        method = %req.method(),
                        path = %req.uri().path(),
                        request_id,
                    )
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::DEBUG)),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// Answers 503 `timeout` in the shared error shape when a request takes longer
/// than `limit` (tower-http's timeout layer answers with an empty body).
async fn deadline(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(limit_ms = limit.as_millis() as u64, "request timed out");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!("the request took longer than {limit:?}"),
                BTreeMap::new(),
            )
        }
    }
}

async fn record_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// `GET /healthz`: the process is alive and serving.
pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::telemetry::metrics_handle().render(),
    )
}

/// The `/readyz` answer: 200 when every check passed, 503 otherwise, with each
/// check's result so an operator sees which dependency is missing.
pub fn readiness(checks: BTreeMap<&'static str, Result<serde_json::Value, String>>) -> Response {
    let ready = checks.values().all(Result::is_ok);
    let body: BTreeMap<_, _> = checks
        .into_iter()
        .map(|(name, result)| match result {
            Ok(detail) => (name, serde_json::json!({ "ok": true, "detail": detail })),
            Err(error) => (name, serde_json::json!({ "ok": false, "error": error })),
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": ready, "checks": body })),
    )
        .into_response()
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn call(path: &str) -> (StatusCode, serde_json::Value) {
        let routes = Router::new()
            .route(
                "/boom",
                get(|| async {
                    if true {
                        panic!("deliberate test panic");
                    }
                    "unreachable"
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            );
        let app = layers(routes, Duration::from_millis(100));
        let response = app
            .oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_the_shared_shape() {
        let (status, body) = call("/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"]["code"], "internal");
    }

    #[tokio::test]
    async fn a_slow_handler_answers_503_timeout_in_the_shared_shape() {
        let (status, body) = call("/slow").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["code"], "timeout");
    }

    #[tokio::test]
    async fn an_unknown_route_answers_404_in_the_shared_shape() {
        let (status, body) = call("/nowhere").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "not_found");
    }
}
