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
