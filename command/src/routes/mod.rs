//! HTTP handlers of the command API, and what they share: routing a request to the
//! partition's writer (here, or forwarded to its owner), `If-Match`, and error mapping.

pub mod news;
pub mod session;
pub mod users;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use newsroom_events::consistency::{ConsistencyToken, Position};
use newsroom_infra::http::{ApiError, FieldError};
use newsroom_infra::kafka::Stream;

use crate::State;
use crate::domain::DomainError;
use crate::owner::{CommandError, Route, Submitted};

/// The `X-Consistency-Token` header.
pub const X_CONSISTENCY_TOKEN: &str = "x-consistency-token";

/// The token naming the position a command wrote.
pub fn token_for(stream: Stream, position: Position) -> String {
    let mut token = ConsistencyToken::default();
    token.add(stream.name(), position);
    token.to_string()
}

/// What [`if_match`] takes, as the OpenAPI description's pattern.
pub const IF_MATCH_PATTERN: &str = r#"^(\*|(W/)?"?[1-9][0-9]{0,17}"?)$"#;

/// `If-Match: "<version>"` (quotes optional; `*` or absent: no precondition).
pub fn if_match(req: &HttpRequest) -> Result<Option<i64>, ApiError> {
    let Some(value) = req.headers().get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::Malformed("If-Match must be ASCII".into()))?
        .trim();
    if text == "*" {
        return Ok(None);
    }
    let bare = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    bare.parse::<i64>()
        .ok()
        .filter(|v| *v >= 1)
        .map(Some)
        .ok_or_else(|| {
            ApiError::Malformed(format!(
                "If-Match must be a version in quotes, like \"3\"; got {text}"
            ))
        })
}

/// What a command on an existing aggregate starts from: the authenticated caller (401),
/// the id in the path (404 if it is not a UUID) and the `If-Match` version (400 if
/// malformed).
pub struct Target {
    /// The caller.
    pub actor: crate::domain::Actor,
    /// The aggregate.
    pub id: uuid::Uuid,
    /// `If-Match`.
    pub expected_version: Option<i64>,
}

impl actix_web::FromRequest for Target {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Target, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let target = (|| {
            let caller = newsroom_infra::auth::Caller::from_request(req, payload).into_inner()?;
            let actor = caller.required()?;
            let id = req
                .match_info()
                .get("id")
                .and_then(|raw| uuid::Uuid::parse_str(raw).ok())
                .ok_or(ApiError::NotFound)?;
            let expected_version = if_match(req)?;
            Ok(Target {
                actor,
                id,
                expected_version,
            })
        })();
        std::future::ready(target)
    }
}

/// Where a request for `partition` of `A` must go.
pub enum Placement {
    /// Served here.
    Here,
    /// Forwarded: this is the owner's answer.
    Forwarded(HttpResponse),
}

/// Serves here if this process writes `partition`, else forwards the request to the owner.
pub async fn place(
    state: &State,
    req: &HttpRequest,
    body: &[u8],
    partition: i32,
) -> Result<Placement, ApiError> {
    match state.owners.route(partition) {
        Route::Local => Ok(Placement::Here),
        Route::Starting => Err(ApiError::Unavailable(format!(
            "partition {partition} is being taken over; retry shortly"
        ))),
        Route::Elsewhere => Ok(Placement::Forwarded(
            state.shared.directory.forward(req, body, partition).await?,
        )),
    }
}

impl From<DomainError> for ApiError {
    fn from(err: DomainError) -> Self {
        match err {
            DomainError::NotFound => ApiError::NotFound,
            DomainError::Forbidden => ApiError::Forbidden,
            DomainError::VersionMismatch { expected, actual } => {
                ApiError::VersionMismatch { expected, actual }
            }
            DomainError::InvalidTransition { action, status } => ApiError::Conflict {
                code: "invalid_transition",
                detail: format!("cannot {action} an article that is {status}"),
            },
            DomainError::AlreadyExists => ApiError::Conflict {
                code: "conflict",
                detail: "the resource exists already".into(),
            },
            DomainError::StalePassword => ApiError::Validation(vec![FieldError::new(
                "current_password",
                "does not match the current password",
            )]),
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(err: CommandError) -> Self {
        match err {
            CommandError::Domain(e) => e.into(),
            CommandError::KeyReused => ApiError::IdempotencyKeyReused,
            CommandError::Recorded(offset) => ApiError::Internal(anyhow::anyhow!(
                "an outcome recorded at offset {offset} was not read"
            )),
            CommandError::Unavailable { reason, definitive } => {
                ApiError::Unavailable(if definitive {
                    format!("{reason}; nothing was written")
                } else {
                    format!("{reason}; the outcome is unknown, retry with the same Idempotency-Key")
                })
            }
        }
    }
}

impl From<Submitted> for ApiError {
    fn from(err: Submitted) -> Self {
        match err {
            Submitted::Failed(e) => e.into(),
            Submitted::NotHere => {
                ApiError::Unavailable("the partition changed owner; retry shortly".into())
            }
        }
    }
}
