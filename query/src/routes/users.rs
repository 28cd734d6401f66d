//! `/v1/users` reads.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use newsroom_infra::auth::Caller;
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

/// `GET /v1/users/{id}`: the user themselves or an admin.
#[tracing::instrument(skip(req, state, caller))]
pub async fn get(
    req: actix_web::HttpRequest,
    id: web::Path<Uuid>,
    caller: Caller,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let actor = caller.required()?;
    crate::consistency::wait(&req, &state.pool, &state.topic_prefix).await?;
    if actor.id != *id && !actor.is_admin() {
        return Err(ApiError::Forbidden);
    }
    let row: Option<UserRow> = sqlx::query_as(
        "SELECT id, name, email, role, followed_categories, email_notifications, version, created_at \
         FROM users WHERE id = $1 AND NOT erased",
    )
    .bind(*id)
    .fetch_optional(&state.pool)
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "reading a user from the read model");
        ApiError::Unavailable("the read model is unavailable".into())
    })?;
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

/// One read of a user's history.
#[derive(serde::Serialize, sqlx::FromRow)]
pub struct HistoryItem {
    /// The article.
    pub news_id: Uuid,
    /// Its title now.
    pub title: String,
    /// When it was read.
    #[serde(with = "newsroom_infra::views::rfc3339_micros")]
    pub read_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip)]
    event_id: Uuid,
}

/// `GET /v1/users/{id}/history?limit=&cursor=`: the user's reads, newest first (self, admin).
#[tracing::instrument(skip_all, fields(user = %id))]
pub async fn history(
    req: actix_web::HttpRequest,
    id: web::Path<Uuid>,
    caller: Caller,
    params: web::Query<std::collections::HashMap<String, String>>,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    use crate::routes::news::{Page, decode_cursor, encode_cursor, limit, unavailable};
    let actor = caller.required()?;
    if actor.id != *id && !actor.is_admin() {
        return Err(ApiError::Forbidden);
    }
    crate::consistency::wait(&req, &state.pool, &state.topic_prefix).await?;
    let limit = limit(&params)?;
    let after = params
        .get("cursor")
        .map(|c| decode_cursor("h1", c))
        .transpose()?;
    let exists: Option<(bool,)> = sqlx::query_as("SELECT erased FROM users WHERE id = $1")
        .bind(*id)
        .fetch_optional(&state.pool)
        .await
        .map_err(unavailable)?;
    if !matches!(exists, Some((false,))) {
        return Err(ApiError::NotFound);
    }
    let rows: Vec<HistoryItem> = sqlx::query_as(
        "SELECT h.news_id, n.title, h.read_at, h.event_id FROM reading_history h JOIN news n ON n.id = h.news_id \
         WHERE h.user_id = $1 AND ($2::timestamptz IS NULL OR (h.read_at, h.event_id) < ($2, $3)) \
         ORDER BY h.read_at DESC, h.event_id DESC LIMIT $4",
    )
    .bind(*id)
    .bind(after.map(|(at, _)| at))
    .bind(after.map(|(_, event)| event))
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await
    .map_err(unavailable)?;
    let more = rows.len() as i64 > limit;
    let items: Vec<HistoryItem> = rows.into_iter().take(limit as usize).collect();
    let next_cursor = more
        .then(|| {
            items
                .last()
                .map(|i| encode_cursor("h1", i.read_at, i.event_id))
        })
        .flatten();
    Ok(HttpResponse::Ok().json(Page { items, next_cursor }))
}
