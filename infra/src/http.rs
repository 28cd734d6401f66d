//! HTTP pieces both APIs share: problem+json errors (RFC 9457), request ids, the JSON body
//! rules (1 MiB, `application/json`), and the ops endpoints.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::JsonPayloadError;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, ResponseError, web};
use serde::Serialize;
use tracing::Instrument as _;

use crate::metrics;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The request id header, echoed on every response and carried into events.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// The field's name as in the request body.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// An error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Every error an API answers with; each maps to one problem+json body of API.md.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `malformed_request`.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// 401 `unauthenticated`.
    #[error("unauthenticated")]
    Unauthenticated,
    /// 403 `forbidden`.
    #[error("forbidden")]
    Forbidden,
    /// 404 `not_found`.
    #[error("not found")]
    NotFound,
    /// 409 with a specific code (`email_taken`, `invalid_transition`).
    #[error("conflict: {detail}")]
    Conflict {
        /// Machine-readable code.
        code: &'static str,
        /// Human-readable detail.
        detail: String,
    },
    /// 412 `version_mismatch`.
    #[error("version mismatch: expected {expected}, actual {actual}")]
    VersionMismatch {
        /// The version the client sent in `If-Match`.
        expected: i64,
        /// The aggregate's current version.
        actual: i64,
    },
    /// 413 `payload_too_large`.
    #[error("payload too large")]
    PayloadTooLarge,
    /// 415 `unsupported_media_type`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 422 `validation_failed` with every invalid field.
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// 422 `idempotency_key_reused`: the key came with another request before.
    #[error("idempotency key reused")]
    IdempotencyKeyReused,
    /// 429 `rate_limited`: too many requests of this kind from this caller or address;
    /// retry after this many seconds.
    #[error("rate limited")]
    RateLimited(u64),
    /// 503 `projection_lagging`: the read models do not include the token's writes yet.
    #[error("projection lagging")]
    ProjectionLagging,
    /// 503 `unavailable`: a dependency is down and nothing was written.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// 500: the cause goes to the log, never to the client.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// An error as the APIs answer it (`application/problem+json`, RFC 9457).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem<'a> {
    /// A URI naming the kind of error.
    #[serde(rename = "type")]
    kind: String,
    /// A short summary of the kind.
    title: &'a str,
    /// The HTTP status.
    status: u16,
    /// What went wrong with this request.
    detail: String,
    /// A stable machine-readable code (API.md).
    code: &'a str,
    /// Every invalid field (422 `validation_failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a [FieldError]>,
    /// The version `If-Match` named (412 `version_mismatch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    expected: Option<i64>,
    /// The current version (412 `version_mismatch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    actual: Option<i64>,
}

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            ApiError::Malformed(_) => "malformed_request",
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::Conflict { code, .. } => code,
            ApiError::VersionMismatch { .. } => "version_mismatch",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Validation(_) => "validation_failed",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::ProjectionLagging => "projection_lagging",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Malformed(_) => "Malformed request",
            ApiError::Unauthenticated => "Authentication required",
            ApiError::Forbidden => "Forbidden",
            ApiError::NotFound => "Not found",
            ApiError::Conflict { .. } => "Conflict",
            ApiError::VersionMismatch { .. } => "Version mismatch",
            ApiError::PayloadTooLarge => "Payload too large",
            ApiError::UnsupportedMediaType => "Unsupported media type",
            ApiError::Validation(_) => "Validation failed",
            ApiError::IdempotencyKeyReused => "Idempotency key reused",
            ApiError::RateLimited(_) => "Too many requests",
            ApiError::ProjectionLagging => "Read models lagging",
            ApiError::Unavailable(_) => "Service unavailable",
            ApiError::Internal(_) => "Internal error",
        }
    }

    fn detail(&self) -> String {
        match self {
            ApiError::Malformed(d) | ApiError::Unavailable(d) => d.clone(),
            ApiError::Conflict { detail, .. } => detail.clone(),
            ApiError::Unauthenticated => "a valid bearer token is required".into(),
            ApiError::Forbidden => "the caller may not do this".into(),
            ApiError::NotFound => "no such resource".into(),
            ApiError::VersionMismatch { expected, actual } => {
                format!("If-Match names version {expected}, the current version is {actual}")
            }
            ApiError::PayloadTooLarge => format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            ApiError::UnsupportedMediaType => "the body must be application/json".into(),
            ApiError::Validation(errors) => format!("{} invalid field(s)", errors.len()),
            ApiError::IdempotencyKeyReused => {
                "this Idempotency-Key was used with a different request".into()
            }
            ApiError::Internal(_) => "an unexpected error occurred; it has been logged".into(),
            ApiError::RateLimited(seconds) => {
                format!("too many requests of this kind; retry in {seconds} s")
            }
            ApiError::ProjectionLagging => {
                "the read models do not include the writes of X-Consistency-Token yet; retry shortly".into()
            }
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::VersionMismatch { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation(_) | ApiError::IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Unavailable(_) | ApiError::ProjectionLagging => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        match self {
            ApiError::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "request failed")
            }
            ApiError::Unavailable(detail) => tracing::warn!(detail, "dependency unavailable"),
            _ => {}
        }
        let code = self.code();
        let (expected, actual) = match self {
            ApiError::VersionMismatch { expected, actual } => (Some(*expected), Some(*actual)),
            _ => (None, None),
        };
        let problem = Problem {
            kind: format!("https://newsroom.dev/problems/{}", code.replace('_', "-")),
            title: self.title(),
            status: status.as_u16(),
            detail: self.detail(),
            code,
            errors: match self {
                ApiError::Validation(errors) => Some(errors),
                _ => None,
            },
            expected,
            actual,
        };
        let mut response = HttpResponse::build(status);
        response.content_type("application/problem+json");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()));
        }
        if let ApiError::RateLimited(seconds) = self {
            response.insert_header((header::RETRY_AFTER, seconds.max(&1).to_string()));
        }
        response.json(problem)
    }
}

impl From<JsonPayloadError> for ApiError {
    fn from(err: JsonPayloadError) -> Self {
        match err {
            JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
                ApiError::PayloadTooLarge
            }
            JsonPayloadError::ContentType => ApiError::UnsupportedMediaType,
            JsonPayloadError::Deserialize(e) => {
                ApiError::Malformed(format!("the body is not valid JSON: {e}"))
            }
            other => ApiError::Malformed(format!("the body could not be read: {other}")),
        }
    }
}

/// How long a request body may take to arrive, once its head has (actix bounds the head).
pub const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads a whole request body: at most 1 MiB (413), all of it within [`BODY_DEADLINE`]
/// (400; a body trickled in would hold its connection for good). Every reader of a body
/// goes through here.
pub async fn read_body<S, E>(payload: &mut S) -> Result<web::Bytes, ApiError>
where
    S: futures::Stream<Item = Result<web::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    use futures::StreamExt as _;
    let read = async {
        let mut raw = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::Malformed(format!("the body could not be read: {e}")))?;
            if raw.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(ApiError::PayloadTooLarge);
            }
            raw.extend_from_slice(&chunk);
        }
        Ok(raw.freeze())
    };
    tokio::time::timeout(BODY_DEADLINE, read)
        .await
        .map_err(|_| {
            ApiError::Malformed(format!(
                "the body did not arrive within {} s",
                BODY_DEADLINE.as_secs()
            ))
        })?
}

/// A JSON request body, kept both raw (to forward it unchanged) and parsed. Extracting it
/// applies API.md's rules: `application/json` (415), at most 1 MiB (413), valid JSON (400).
#[derive(Debug, Clone)]
pub struct JsonBody {
    /// The bytes as received.
    pub raw: web::Bytes,
    /// The parsed document.
    pub value: serde_json::Value,
}

impl actix_web::FromRequest for JsonBody {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<JsonBody, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let is_json = req
            .mime_type()
            .ok()
            .flatten()
            .is_some_and(|m| m.essence_str() == "application/json");
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            if !is_json {
                return Err(ApiError::UnsupportedMediaType);
            }
            if declared.is_some_and(|len| len > MAX_BODY_BYTES) {
                return Err(ApiError::PayloadTooLarge);
            }
            let raw = read_body(&mut payload).await?;
            let value = serde_json::from_slice(&raw)
                .map_err(|e| ApiError::Malformed(format!("the body is not valid JSON: {e}")))?;
            Ok(JsonBody { raw, value })
        })
    }
}

/// The JSON body rules of API.md: at most 1 MiB, `application/json` only, problem+json errors.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_BODY_BYTES)
        .content_type_required(true)
        .error_handler(|err, _req| ApiError::from(err).into())
}

/// Path parameters that do not parse (a non-UUID id) name no resource: 404.
pub fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|_, _| ApiError::NotFound.into())
}

/// The request id of the current request, as stored by [`request_id`].
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl RequestId {
    /// The id of `req` (a fresh one if the middleware did not run).
    pub fn of(req: &HttpRequest) -> String {
        req.extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
    }
}

fn acceptable_request_id(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let ok = (1..=200).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| text.to_owned())
}

/// Middleware: takes the caller's `X-Request-Id` (or makes one), runs the request inside a
/// span carrying it, echoes it on the response, logs one line and records metrics.
pub async fn request_id(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody + 'static>, actix_web::Error> {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(acceptable_request_id)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().to_string();
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route);
    // A caller's W3C trace context: this request (and the events it causes) joins its trace.
    if crate::trace::enabled()
        && let Some(parent) = req
            .headers()
            .get(crate::trace::HEADER)
            .and_then(|v| v.to_str().ok())
    {
        crate::trace::continue_from(&span, parent);
    }
    let started = Instant::now();
    let result = next.call(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let mut response = result?;
    let status = response.status().as_u16();
    metrics::record_http(&route, &method, status, elapsed);
    span.in_scope(|| {
        tracing::info!(
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "request served"
        );
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    Ok(response)
}

/// The answer for a route that does not exist.
pub async fn not_found() -> HttpResponse {
    ApiError::NotFound.error_response()
}

/// An asynchronous readiness probe: the name of each dependency and whether it answers.
pub type ReadinessCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Vec<(&'static str, bool)>> + Send>> + Send + Sync>;

/// What the ops endpoints of one service need.
#[derive(Clone)]
pub struct Ops {
    /// The service name (`command-api`, `query-api`).
    pub service: &'static str,
    /// Its OpenAPI document (generated from the code at start).
    pub openapi: web::Bytes,
    /// Its readiness probe.
    pub readiness: ReadinessCheck,
    /// Checks whose failure degrades the service without making it unready (it has a
    /// fallback for them).
    pub optional: &'static [&'static str],
}

/// Mounts `/healthz`, `/readyz`, `/metrics` and `/openapi.json`.
///
/// Their descriptions (and the problem answer both APIs share) are in
/// [`crate::openapi`].
pub fn ops_routes(cfg: &mut web::ServiceConfig, ops: Ops) {
    cfg.app_data(web::Data::new(ops))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics_text))
        .route("/openapi.json", web::get().to(openapi));
}

/// `GET /healthz`.
#[utoipa::path(get, path = "/healthz", summary = "Liveness", responses(
    (status = 200, description = "The process answers"),
    (status = 429, response = crate::openapi::ProblemAnswer),
))]
pub async fn healthz(ops: web::Data<Ops>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok", "service": ops.service}))
}

/// `GET /readyz`.
#[utoipa::path(get, path = "/readyz", summary = "Readiness: 503 with the failing dependencies", responses(
    (status = 200, description = "Ready, or degraded (a dependency with a fallback is down)"),
    (status = 429, response = crate::openapi::ProblemAnswer),
    (status = 503, description = "A dependency is down"),
))]
pub async fn readyz(ops: web::Data<Ops>) -> HttpResponse {
    let checks = (ops.readiness)().await;
    let down: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| *n)
        .collect();
    let (degraded, failing): (Vec<&str>, Vec<&str>) =
        down.into_iter().partition(|n| ops.optional.contains(n));
    let status = match (failing.is_empty(), degraded.is_empty()) {
        (false, _) => "not_ready",
        (true, false) => "degraded",
        (true, true) => "ready",
    };
    let body = serde_json::json!({
        "status": status,
        "checks": checks.iter().map(|(n, ok)| (n.to_string(), if *ok { "up" } else { "down" })).collect::<std::collections::BTreeMap<_, _>>(),
        "failing": failing,
        "degraded": degraded,
    });
    if failing.is_empty() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()))
            .json(body)
    }
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", summary = "Prometheus metrics", responses(
    (status = 200, description = "The metrics in Prometheus' text format", content_type = "text/plain"),
    (status = 429, response = crate::openapi::ProblemAnswer),
))]
pub async fn metrics_text() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics::render())
}

async fn openapi(ops: web::Data<Ops>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(ops.openapi.clone())
}
