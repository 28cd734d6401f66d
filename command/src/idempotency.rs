//! `Idempotency-Key`: the first request with a key records its outcome durably (in
//! `cmd_idempotency`); a retry with the same key and the same request within 24 hours gets
//! the same status, headers and body and appends nothing; the same key with another
//! request is refused with 422 `idempotency_key_reused`. Keys are scoped by caller.
//!
//! Outcomes that wrote nothing and may succeed later (5xx) are not recorded, so a retry
//! runs again. A request arriving while the first is still running waits for its outcome.
//!
//! This table answers retries of finished requests and makes concurrent ones wait; what
//! makes a retry safe after a crash is the log: the key goes with the command to its
//! partition's writer ([`Keyed`] in the request's extensions), which records the outcome
//! in the command's Kafka transaction and answers a retry from it (ADR 16). So a pending
//! record left by a dead process is simply run again.

use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody, to_bytes};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpMessage as _, HttpResponse, ResponseError, web};
use anyhow::Context as _;
use newsroom_infra::auth::Tokens;
use newsroom_infra::http::ApiError;
use serde_json::{Map, Value};
use sqlx::PgPool;

use crate::owner::outcome::Keyed;

/// The header.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Headers of the answer that are recorded and replayed.
const REPLAYED: [&str; 4] = ["content-type", "location", "etag", "x-consistency-token"];
/// How long a retry waits for the first request with its key to finish.
const WAIT: Duration = Duration::from_secs(15);
/// A pending record older than this was left by a process that died mid-request (or one
/// that is very slow): the retry runs again, and the writer answers it with the first
/// request's outcome if that one reached the log.
const STALE: Duration = Duration::from_secs(10);

/// The key store.
#[derive(Clone)]
pub struct Idempotency {
    pool: PgPool,
    /// Keys the hashes of requests (their bodies hold passwords).
    secret: std::sync::Arc<[u8]>,
}

enum Begun {
    /// This request runs, as the attempt with this id.
    First(uuid::Uuid),
    Replay(HttpResponse),
}

/// The request holding a pending record.
struct Attempt<'a> {
    caller: &'a str,
    key: &'a str,
    id: uuid::Uuid,
}

/// The user a path is about (`/v1/users/{id}...`).
fn subject(path: &str) -> Option<uuid::Uuid> {
    let rest = path.strip_prefix("/v1/users/")?;
    uuid::Uuid::parse_str(rest.split('/').next()?).ok()
}

/// The author an article's answer names (`author.id`).
fn author(body: &[u8]) -> Option<uuid::Uuid> {
    let answer: Value = serde_json::from_slice(body).ok()?;
    uuid::Uuid::parse_str(answer.get("author")?.get("id")?.as_str()?).ok()
}

/// What [`valid_key`] takes, as the OpenAPI description's pattern.
pub const KEY_PATTERN: &str = "^[!-~]{1,255}$";

fn valid_key(key: &str) -> bool {
    (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

impl Idempotency {
    /// A store over `pool`; request hashes keyed with `secret`.
    pub fn new(pool: PgPool, secret: Vec<u8>) -> Self {
        Idempotency {
            pool,
            secret: secret.into(),
        }
    }

    /// Forgets every outcome `user` asked for, or that is about them (at erasure: the
    /// stored answers hold their name and e-mail).
    pub async fn erase(&self, user: uuid::Uuid) -> anyhow::Result<()> {
        sqlx::query!(
            "DELETE FROM cmd_idempotency WHERE caller = $1 OR subject = $2",
            user.to_string(),
            user,
        )
        .execute(&self.pool)
        .await
        .context("forgetting a user's idempotency records")?;
        Ok(())
    }

    /// Records `key` of `caller` as pending for the request hashed `hash` (or answers it).
    /// `legacy` is the request's plain SHA-256, as rows written before the hashes were
    /// keyed hold it (for the 24 hours such rows answer).
    async fn begin(
        &self,
        caller: &str,
        key: &str,
        hash: &str,
        legacy: &str,
    ) -> Result<Begun, ApiError> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let attempt = uuid::Uuid::now_v7();
            let inserted = sqlx::query!(
                "INSERT INTO cmd_idempotency (caller, key, request_hash, state, attempt) VALUES ($1, $2, $3, 'pending', $4) \
                 ON CONFLICT (caller, key) DO NOTHING",
                caller,
                key,
                hash,
                attempt,
            )
            .execute(&self.pool)
            .await
            .context("recording an idempotency key")?;
            if inserted.rows_affected() == 1 {
                return Ok(Begun::First(attempt));
            }
            let row = sqlx::query!(
                r#"SELECT request_hash, state, status, headers, body,
                          EXTRACT(EPOCH FROM now() - created_at)::float8 AS "age!", attempt
                   FROM cmd_idempotency WHERE caller = $1 AND key = $2"#,
                caller,
                key,
            )
            .fetch_optional(&self.pool)
            .await
            .context("reading an idempotency key")?;
            let Some(row) = row else {
                continue;
            };
            let (stored_hash, state, status, headers, body, age, holder) = (
                row.request_hash,
                row.state,
                row.status,
                row.headers,
                row.body,
                row.age,
                row.attempt,
            );
            let expired = age > 24.0 * 3600.0 || (state == "pending" && age > STALE.as_secs_f64());
            if expired {
                // Only the record as it was read: a concurrent retry may have taken over.
                sqlx::query!(
                    "DELETE FROM cmd_idempotency WHERE caller = $1 AND key = $2 \
                     AND attempt IS NOT DISTINCT FROM $3 AND state = $4",
                    caller,
                    key,
                    holder,
                    state,
                )
                .execute(&self.pool)
                .await
                .context("dropping a stale idempotency key")?;
                continue;
            }
            if stored_hash != hash && stored_hash != legacy {
                return Err(ApiError::IdempotencyKeyReused);
            }
            if state == "done" {
                return Ok(Begun::Replay(replay(status, headers, body)));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::Unavailable(
                    "a request with this Idempotency-Key is still running".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn finish(
        &self,
        attempt: &Attempt<'_>,
        status: u16,
        headers: Value,
        body: &[u8],
        subject: Option<uuid::Uuid>,
    ) -> anyhow::Result<()> {
        sqlx::query!(
            "UPDATE cmd_idempotency SET state = 'done', status = $3, headers = $4, body = $5, \
             subject = $7 WHERE caller = $1 AND key = $2 AND attempt = $6",
            attempt.caller,
            attempt.key,
            i32::from(status),
            headers,
            body,
            attempt.id,
            subject,
        )
        .execute(&self.pool)
        .await
        .context("recording an outcome")?;
        Ok(())
    }

    async fn forget(&self, attempt: &Attempt<'_>) -> anyhow::Result<()> {
        sqlx::query!(
            "DELETE FROM cmd_idempotency WHERE caller = $1 AND key = $2 AND attempt = $3",
            attempt.caller,
            attempt.key,
            attempt.id,
        )
        .execute(&self.pool)
        .await
        .context("forgetting an idempotency key")?;
        Ok(())
    }

    /// Drops records older than 24 hours, a bounded chunk per statement: an hour of keys
    /// under load is millions of rows, which one statement would not delete within the
    /// statement timeout (and, cancelled, would leave for the next hour, doubled).
    pub async fn expire(&self) -> anyhow::Result<u64> {
        const CHUNK: u64 = 10_000;
        let mut expired = 0;
        loop {
            let done = sqlx::query!(
                "DELETE FROM cmd_idempotency WHERE ctid IN (SELECT ctid FROM cmd_idempotency \
                 WHERE created_at < now() - interval '24 hours' LIMIT $1)",
                CHUNK as i64,
            )
            .execute(&self.pool)
            .await?;
            expired += done.rows_affected();
            if done.rows_affected() < CHUNK {
                return Ok(expired);
            }
        }
    }
}

fn replay(status: Option<i32>, headers: Option<Value>, body: Option<Vec<u8>>) -> HttpResponse {
    let status = status
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| actix_web::http::StatusCode::from_u16(s).ok())
        .unwrap_or(actix_web::http::StatusCode::OK);
    let mut response = HttpResponse::build(status);
    if let Some(Value::Object(headers)) = headers {
        for (name, value) in headers {
            if let (Ok(name), Some(value)) = (HeaderName::try_from(name.as_str()), value.as_str())
                && let Ok(value) = HeaderValue::from_str(value)
            {
                response.insert_header((name, value));
            }
        }
    }
    response.insert_header((HeaderName::from_static("idempotent-replayed"), "true"));
    response.body(body.unwrap_or_default())
}

/// Middleware over the commands: applies `Idempotency-Key` when the request has one.
pub async fn middleware(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let key = req
        .headers()
        .get(IDEMPOTENCY_KEY)
        .map(|v| v.to_str().map(str::to_owned));
    let is_command = !matches!(
        *req.method(),
        actix_web::http::Method::GET | actix_web::http::Method::HEAD
    );
    let forwarded = req
        .app_data::<web::Data<crate::State>>()
        .is_some_and(|state| state.shared.directory.forwarded(req.head()));
    let key = match key {
        Some(_) if !is_command => None,
        Some(Ok(key)) if valid_key(&key) => Some(key),
        Some(_) => {
            let error = ApiError::Malformed(
                "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
            );
            return Ok(req.into_response(error.error_response()));
        }
        None => None,
    };
    let (Some(key), Some(store)) = (key, req.app_data::<web::Data<Idempotency>>().cloned()) else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    let caller = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| {
            req.app_data::<web::Data<Tokens>>()
                .and_then(|tokens| tokens.verify(t))
        })
        .map_or_else(|| "anonymous".to_owned(), |actor| actor.id.to_string());

    // The request's identity: method, path and body bytes.
    let mut payload = req.take_payload();
    let body = match newsroom_infra::http::read_body(&mut payload).await {
        Ok(body) => body,
        Err(refused) => return Ok(req.into_response(refused.error_response())),
    };
    let keyed = Keyed::new(
        &store.secret,
        &caller,
        &key,
        req.method().as_str(),
        req.path(),
        &body,
    );
    let hash = keyed.request_hex();
    // What rows written before the hashes were keyed hold.
    let legacy = crate::digest::hex(&crate::digest::sha256(&[
        req.method().as_str().as_bytes(),
        b" ",
        req.path().as_bytes(),
        b"\n",
        &body,
    ]));
    req.extensions_mut().insert(keyed);
    req.set_payload(actix_web::dev::Payload::from(body));
    // A forwarded request is recorded by the process that received it; an answer that
    // holds credentials (a login's token) is never stored: its retry logs in again.
    if forwarded || req.path().starts_with("/v1/auth/") {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    let subject = subject(req.path());
    let news = req.path().starts_with("/v1/news");

    let attempt = match store.begin(&caller, &key, &hash, &legacy).await {
        Err(error) => return Ok(req.into_response(error.error_response())),
        Ok(Begun::Replay(response)) => return Ok(req.into_response(response)),
        Ok(Begun::First(id)) => Attempt {
            caller: &caller,
            key: &key,
            id,
        },
    };
    let response = match next.call(req).await {
        Ok(response) => response,
        Err(error) => {
            let _ = store.forget(&attempt).await;
            return Err(error);
        }
    };
    let status = response.status();
    if status.is_server_error() {
        // Nothing was written, or the writer recorded the outcome: a retry runs again.
        if let Err(e) = store.forget(&attempt).await {
            tracing::warn!(error = format!("{e:#}"), "forgetting an idempotency key");
        }
        return Ok(response.map_into_boxed_body());
    }
    let mut headers = Map::new();
    for name in REPLAYED {
        if let Some(value) = response.headers().get(name).and_then(|v| v.to_str().ok()) {
            headers.insert(name.to_owned(), Value::String(value.to_owned()));
        }
    }
    let (request, response) = response.into_parts();
    let (response, body) = response.into_parts();
    let bytes = to_bytes(body).await.unwrap_or_default();
    // Who the stored answer is about, so that their erasure removes it: the user of the
    // path or of the answer's location, or the author an article's answer names.
    let subject = subject
        .or_else(|| {
            response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(self::subject)
        })
        .or_else(|| news.then(|| author(&bytes)).flatten());
    if let Err(e) = store
        .finish(
            &attempt,
            status.as_u16(),
            Value::Object(headers),
            &bytes,
            subject,
        )
        .await
    {
        tracing::error!(error = format!("{e:#}"), "recording an idempotent outcome");
    }
    let response = response.set_body(BoxBody::new(bytes));
    Ok(ServiceResponse::new(request, response))
}
