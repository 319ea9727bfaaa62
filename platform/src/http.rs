//! HTTP pieces every service uses: the error body, the middleware stack, the
//! operational endpoints and serving with graceful shutdown.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::FutureExt;
use metrics::{Counter, Histogram, SharedString};
use serde::Serialize;
use tracing::Instrument;

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

/// The token of an `Authorization: Bearer <token>` header (scheme matched
/// without regard to case), if the request carries a non-empty one.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|token| !token.is_empty())
}

/// A UUID in its hyphenated form only (what `format: uuid` describes);
/// `Uuid::parse_str` also takes the simple, braced and URN forms.
pub fn parse_uuid(text: &str) -> Option<uuid::Uuid> {
    if text.len() != 36 {
        return None;
    }
    uuid::Uuid::try_parse(text).ok()
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

/// Wraps a service's routes with the fallback 404 in the shared error shape
/// and the [`Envelope`]: request ids, a span, a timeout, panic recovery and
/// HTTP metrics, in one layer (each layer costs every request an allocation
/// and a few moves of its future; five of them cost a cached read a quarter
/// of its throughput, see BENCHMARKS.md).
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
        .layer(EnvelopeLayer {
            limit: request_timeout,
            metrics: Arc::new(HttpMetrics::default()),
        })
}

/// The handles of `http_requests_total` and `http_request_duration_seconds`
/// by route, then method and status: each series is registered once, and a
/// request pays one map look-up instead of building and hashing a labelled
/// key twice (which cost a cheap request 12% of its throughput, see
/// BENCHMARKS.md). Bounded: routes are the router's templates (or
/// `unmatched`), methods a fixed list, statuses the codes HTTP has.
#[derive(Default)]
struct HttpMetrics(RwLock<HashMap<Box<str>, RouteSeries>>);

/// A route's series by method and status: the request counter and the
/// duration histogram of each.
type RouteSeries = HashMap<(&'static str, u16), (Counter, Histogram)>;

impl HttpMetrics {
    fn record(&self, method: &'static str, route: &str, status: StatusCode, elapsed: Duration) {
        let key = (method, status.as_u16());
        let seconds = elapsed.as_secs_f64();
        {
            let known = self.0.read().expect("http metrics lock");
            if let Some((requests, duration)) = known.get(route).and_then(|by| by.get(&key)) {
                requests.increment(1);
                duration.record(seconds);
                return;
            }
        }
        let labels = [
            ("method", SharedString::const_str(method)),
            ("route", SharedString::from(route.to_owned())),
            ("status", status_label(status)),
        ];
        let requests = metrics::counter!("http_requests_total", &labels);
        let duration = metrics::histogram!("http_request_duration_seconds", &labels);
        requests.increment(1);
        duration.record(seconds);
        self.0
            .write()
            .expect("http metrics lock")
            .entry(route.into())
            .or_default()
            .insert(key, (requests, duration));
    }
}

/// Puts an [`Envelope`] around each route.
#[derive(Clone)]
struct EnvelopeLayer {
    limit: Duration,
    metrics: Arc<HttpMetrics>,
}

impl<S> tower::Layer<S> for EnvelopeLayer {
    type Service = Envelope<S>;

    fn layer(&self, inner: S) -> Envelope<S> {
        Envelope {
            inner,
            limit: self.limit,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// What every request goes through:
/// * an `X-Request-Id` before anything reads it, returned on the response: a
///   client's id is kept when [`valid_request_id`]; one that is too long or
///   has other characters is replaced by a generated UUID, with a warning
///   that shows only a short, escaped prefix of the refused value;
/// * the `http` span (method, path, request id) around everything below;
/// * 503 `timeout` in the shared error shape after `limit`;
/// * a panicking handler answers 500 `internal` in the shared shape (the
///   panic hook prints the message) instead of dropping the connection;
/// * `http_requests_total` and `http_request_duration_seconds` by method,
///   route and status, timeouts and panics included.
///
/// A service of its own rather than `middleware::from_fn`, which clones and
/// boxes the route again for every request.
#[derive(Clone)]
struct Envelope<S> {
    inner: S,
    limit: Duration,
    metrics: Arc<HttpMetrics>,
}

impl<S> tower::Service<Request> for Envelope<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let started = Instant::now();
        let id = request_id(&mut req);
        let route = req.extensions().get::<MatchedPath>().cloned();
        let method = method_label(req.method());
        let span = tracing::info_span!(
            "http",
            method,
            path = %req.uri().path(),
            request_id = id.to_str().unwrap_or_default(),
        );
        let called =
            span.in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))));
        let limit = self.limit;
        let metrics = Arc::clone(&self.metrics);
        Box::pin(async move {
            let handled = match called {
                Ok(future) => {
                    AssertUnwindSafe(tokio::time::timeout(limit, future))
                        .catch_unwind()
                        .instrument(span.clone())
                        .await
                }
                Err(panic) => Err(panic),
            };
            let mut response = match handled {
                Ok(Ok(Ok(response))) => response,
                Ok(Ok(Err(never))) => match never {},
                Ok(Err(_)) => {
                    span.in_scope(|| {
                        tracing::warn!(limit_ms = limit.as_millis() as u64, "request timed out");
                    });
                    error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "timeout",
                        format!("the request took longer than {limit:?}"),
                        BTreeMap::new(),
                    )
                }
                Err(_) => {
                    span.in_scope(|| tracing::error!("a request handler panicked"));
                    error_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "internal error",
                        BTreeMap::new(),
                    )
                }
            };
            let elapsed = started.elapsed();
            span.in_scope(|| {
                tracing::debug!(
                    status = response.status().as_u16(),
                    latency_ms = elapsed.as_secs_f64() * 1e3,
                    "answered"
                );
            });
            let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
            metrics.record(method, route, response.status(), elapsed);
            response.headers_mut().insert(REQUEST_ID, id);
            Ok(response)
        })
    }
}

/// The request's `X-Request-Id` after checking (see [`envelope`]).
fn request_id(req: &mut Request) -> HeaderValue {
    if let Some(sent) = req.headers().get(REQUEST_ID) {
        if valid_request_id(sent.as_bytes()) {
            return sent.clone();
        }
    }
    let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
    let replacement =
        HeaderValue::from_str(uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text))
            .expect("a UUID is a valid header value");
    if let Some(sent) = req.headers().get(REQUEST_ID) {
        let bytes = sent.as_bytes();
        let prefix = String::from_utf8_lossy(&bytes[..bytes.len().min(32)]).into_owned();
        tracing::warn!(
            sent_len = bytes.len(),
            sent_prefix = ?prefix,
            replacement = ?replacement,
            "invalid X-Request-Id replaced"
        );
    }
    req.headers_mut().insert(REQUEST_ID, replacement.clone());
    replacement
}

/// Longest `X-Request-Id` kept; longer ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a client's `X-Request-Id` may be kept: 1–128 characters of
/// `[A-Za-z0-9._:-]`, enough for UUIDs, ULIDs and tracing ids. It ends up in
/// the immutable log and in log lines, so nothing else is accepted.
pub fn valid_request_id(value: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The method as a label without allocating for the usual ones.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_label(status: StatusCode) -> SharedString {
    match status.as_u16() {
        200 => SharedString::const_str("200"),
        201 => SharedString::const_str("201"),
        202 => SharedString::const_str("202"),
        304 => SharedString::const_str("304"),
        404 => SharedString::const_str("404"),
        code => SharedString::from(code.to_string()),
    }
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
/// Handlers may read the peer's address (`ConnectInfo<SocketAddr>`), as the
/// command API's rate limit does; services that do not simply never ask.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    /// A fine, a panicking and a slow route under `prefix`, in the layers,
    /// with a 100 ms deadline.
    fn app(prefix: &str) -> Router {
        let routes = Router::new()
            .route(&format!("{prefix}/fine"), get(|| async { "fine" }))
            .route(
                &format!("{prefix}/boom"),
                get(|| async {
                    if true {
                        panic!("deliberate test panic");
                    }
                    "unreachable"
                }),
            )
            .route(
                &format!("{prefix}/slow"),
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            );
        layers(routes, Duration::from_millis(100))
    }

    async fn call(path: &str) -> (StatusCode, serde_json::Value) {
        let app = app("");
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
    async fn every_answer_is_counted_and_timed_by_route_method_and_status() {
        let handle = crate::telemetry::metrics_handle();
        let app = app("/counted");
        for path in [
            "/counted/fine",
            "/counted/fine",
            "/counted/boom",
            "/counted/slow",
        ] {
            app.clone()
                .oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
        }
        let text = handle.render();
        let value = |name: &str, route: &str, status: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(&format!("{name}{{"))
                        && l.contains(&format!("route=\"{route}\""))
                        && l.contains(&format!("status=\"{status}\""))
                        && l.contains("method=\"GET\"")
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(
            value("http_requests_total", "/counted/fine", "200").as_deref(),
            Some("2"),
            "{text}"
        );
        assert_eq!(
            value("http_requests_total", "/counted/boom", "500").as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            value("http_requests_total", "/counted/slow", "503").as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            value(
                "http_request_duration_seconds_count",
                "/counted/slow",
                "503"
            )
            .as_deref(),
            Some("1"),
            "{text}"
        );
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

    #[test]
    fn request_ids_are_bounded_in_length_and_characters() {
        for good in ["req-123", "a", "0b6f.x_y:z-1", &"r".repeat(128)] {
            assert!(valid_request_id(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            &"r".repeat(129),
            "has space",
            "semi;colon",
            "new\nline",
            "é",
            "<script>",
        ] {
            assert!(!valid_request_id(bad.as_bytes()), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_invalid_request_id_is_replaced_before_handlers_see_it() {
        let routes = Router::new().route(
            "/echo",
            get(|headers: axum::http::HeaderMap| async move {
                headers[REQUEST_ID].to_str().unwrap().to_owned()
            }),
        );
        let app = layers(routes, Duration::from_secs(5));
        for (sent, kept) in [("good-id", true), ("bad id with spaces", false)] {
            let response = app
                .clone()
                .oneshot(
                    Request::builder()
                        .uri("/echo")
                        .header(REQUEST_ID, sent)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let echoed = response.headers()[REQUEST_ID].to_str().unwrap().to_owned();
            let body = axum::body::to_bytes(response.into_body(), 4096)
                .await
                .unwrap();
            assert_eq!(echoed.as_bytes(), &body[..], "handler and echo agree");
            assert_eq!(echoed == sent, kept, "{sent} -> {echoed}");
            assert!(valid_request_id(echoed.as_bytes()));
        }
    }

    #[test]
    fn ids_are_taken_in_the_hyphenated_form_only() {
        let id = uuid::Uuid::new_v4();
        assert_eq!(parse_uuid(&id.to_string()), Some(id));
        assert_eq!(parse_uuid(&id.to_string().to_uppercase()), Some(id));
        for other in [
            id.simple().to_string(),
            id.braced().to_string(),
            id.urn().to_string(),
            String::new(),
        ] {
            assert_eq!(parse_uuid(&other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn an_unknown_route_answers_404_in_the_shared_shape() {
        let (status, body) = call("/nowhere").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "not_found");
    }
}
