//! `/v1/users` reads.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use newsroom_infra::http::ApiError;
use newsroom_infra::views::UserView;
use uuid::Uuid;

use crate::State;

type UserRow = (
    Uuid,
    String,
    String,
    String,
    Vec<String>,
    bool,
    i64,
    DateTime<Utc>,
);

/// `GET /v1/users/{id}`.
#[tracing::instrument(skip(state))]
pub async fn get(id: web::Path<Uuid>, state: web::Data<State>) -> Result<HttpResponse, ApiError> {
    let row: Option<UserRow> = sqlx::query_as(
        "SELECT id, name, email, role, followed_categories, email_notifications, version, created_at \
         FROM users WHERE id = $1",
    )
    .bind(*id)
    .fetch_optional(&state.pool)
    .await
    .context("reading a user")
    .map_err(|e| ApiError::Unavailable(format!("the read model is unavailable: {e:#}")))?;
    let (id, name, email, role, followed_categories, email_notifications, version, created_at) =
        row.ok_or(ApiError::NotFound)?;
    let user = UserView {
        id,
        name,
        email,
        role,
        followed_categories,
        email_notifications,
        version,
        created_at,
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::ETAG, format!("\"{}\"", user.version)))
        .json(user))
}
