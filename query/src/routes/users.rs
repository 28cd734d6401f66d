//! `/v1/users` reads.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use newsroom_infra::auth::Caller;
use newsroom_infra::http::ApiError;
use newsroom_infra::openapi::{Id, ProblemAnswer};
use newsroom_infra::views::UserView;
use uuid::Uuid;

use crate::State;

/// `GET /v1/users/{id}`: the user themselves or an admin.
#[utoipa::path(get, path = "/v1/users/{id}",
    summary = "A user (never the password or its hash)",
    params(Id, crate::openapi::Consistency),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The user", body = newsroom_infra::views::UserView, headers(("ETag" = String))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
#[tracing::instrument(skip(req, state, caller))]
pub async fn get(
    req: actix_web::HttpRequest,
    id: web::Path<Uuid>,
    caller: Caller,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let actor = caller.required()?;
    crate::consistency::wait(&req, &state).await?;
    if actor.id != *id && !actor.is_admin() {
        return Err(ApiError::Forbidden);
    }
    // Read through the active version's view: a view's columns are nullable to PostgreSQL,
    // so each says it is not (the tables' columns are NOT NULL).
    let row = sqlx::query!(
        r#"SELECT id AS "id!", name AS "name!", email AS "email!", role AS "role!",
                  followed_categories AS "followed_categories!", email_notifications AS "email_notifications!",
                  version AS "version!", created_at AS "created_at!"
           FROM users WHERE id = $1 AND NOT erased"#,
        *id,
    )
    .fetch_optional(&state.pool)
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "reading a user from the read model");
        ApiError::Unavailable("the read model is unavailable".into())
    })?;
    let row = row.ok_or(ApiError::NotFound)?;
    let user = UserView {
        id: row.id,
        name: row.name,
        email: row.email,
        role: row.role,
        followed_categories: row.followed_categories,
        email_notifications: row.email_notifications,
        version: row.version,
        created_at: row.created_at,
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::ETAG, format!("\"{}\"", user.version)))
        .json(user))
}

/// One read of a user's history.
#[derive(serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
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
#[utoipa::path(get, path = "/v1/users/{id}/history",
    summary = "The user's reads, newest first (self, admin)",
    params(Id, crate::openapi::Paging, crate::openapi::Consistency),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page", body = crate::routes::news::Page<HistoryItem>),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
#[tracing::instrument(skip_all, fields(user = %id))]
pub async fn history(
    req: actix_web::HttpRequest,
    id: web::Path<Uuid>,
    caller: Caller,
    params: web::Query<std::collections::HashMap<String, String>>,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    use crate::routes::news::{Page, decode_cursor, encode_cursor, limit, unavailable};
    self_or_admin(&caller, *id)?;
    crate::consistency::wait(&req, &state).await?;
    let limit = limit(&params)?;
    let after = params
        .get("cursor")
        .map(|c| decode_cursor("h1", c))
        .transpose()?;
    existing(&state, *id).await?;
    let rows: Vec<HistoryItem> = sqlx::query_as!(
        HistoryItem,
        r#"SELECT h.news_id AS "news_id!", n.title AS "title!", h.read_at AS "read_at!", h.event_id AS "event_id!"
           FROM reading_history h JOIN news n ON n.id = h.news_id
           WHERE h.user_id = $1 AND ($2::timestamptz IS NULL OR (h.read_at, h.event_id) < ($2, $3))
           ORDER BY h.read_at DESC, h.event_id DESC LIMIT $4"#,
        *id,
        after.map(|(at, _)| at),
        after.map(|(_, event)| event),
        limit + 1,
    )
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

/// User resources are for the user themselves and admins.
fn self_or_admin(caller: &Caller, id: Uuid) -> Result<(), ApiError> {
    let actor = caller.required()?;
    if actor.id != id && !actor.is_admin() {
        return Err(ApiError::Forbidden);
    }
    Ok(())
}

/// 404 unless `id` is a user who was not erased.
async fn existing(state: &State, id: Uuid) -> Result<(), ApiError> {
    let erased = sqlx::query_scalar!(r#"SELECT erased AS "erased!" FROM users WHERE id = $1"#, id)
        .fetch_optional(&state.pool)
        .await
        .map_err(crate::routes::news::unavailable)?;
    match erased {
        Some(false) => Ok(()),
        _ => Err(ApiError::NotFound),
    }
}

/// One recommendation.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Recommendation {
    /// The article (without content).
    pub news: newsroom_infra::views::NewsView,
    /// The user's affinity to it: reads of its category and tags, each read counting
    /// 2^(−age / half-life).
    pub score: f64,
    /// The category and tags it matched, strongest first.
    pub reasons: Vec<String>,
}

struct RankedRow {
    id: Uuid,
    score: f64,
    reasons: Vec<String>,
}

/// `GET /v1/users/{id}/recommendations?limit=`: published articles the user has not read,
/// ranked by affinity (self, admin). Redis first; PostgreSQL when Redis cannot answer.
#[utoipa::path(get, path = "/v1/users/{id}/recommendations",
    summary = "Published articles the user has not read, ranked by their affinity to the articles' category and tags (self, admin)",
    params(Id, crate::openapi::Limit, crate::openapi::Consistency),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The ranked recommendations", body = crate::routes::news::Items<Recommendation>),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
#[tracing::instrument(skip_all, fields(user = %id))]
pub async fn recommendations(
    req: actix_web::HttpRequest,
    id: web::Path<Uuid>,
    caller: Caller,
    params: web::Query<std::collections::HashMap<String, String>>,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    use crate::routes::news::{NewsRow, limit, unavailable};
    self_or_admin(&caller, *id)?;
    let limit = limit(&params)?;
    let wanted = crate::consistency::wanted(&req, &state).await?;
    // A user's own token, checked against their floor, says they exist and were not
    // erased (erasure revokes it, ADR 18): only an admin asking about someone, or a token
    // whose floor could not be read, costs a database lookup.
    if caller.required()?.id != *id || !newsroom_infra::auth::verified(&req) {
        existing(&state, *id).await?;
    }
    let half_life = state.recommend.half_life();
    let now = newsroom_events::affinity::weight(Utc::now().timestamp_micros(), half_life);
    if let Some(ranked) = state
        .cache
        .recommendations(*id, limit, state.recommend.candidates, wanted.as_ref())
        .await
    {
        crate::routes::news::answered("recommendations", "redis");
        let items: Vec<Recommendation> = ranked
            .into_iter()
            .map(|(r, row)| Recommendation {
                news: row.view(false),
                score: r.raw_score / now,
                reasons: r.reasons,
            })
            .collect();
        return Ok(HttpResponse::Ok().json(crate::routes::news::Items { items }));
    }
    crate::routes::news::answered("recommendations", "postgres");
    crate::consistency::wait_postgres(&state.pool, wanted.as_ref()).await?;
    let ranked: Vec<RankedRow> = sqlx::query_as!(
        RankedRow,
        r#"WITH mine AS (SELECT news_id, read_at FROM reading_history WHERE user_id = $1),
         affinity AS (SELECT k.key, sum(power(2::float8, extract(epoch FROM (m.read_at - now()))::float8 / $3)) AS w
           FROM mine m JOIN news n ON n.id = m.news_id
           CROSS JOIN LATERAL (SELECT 'cat:' || n.category UNION SELECT 'tag:' || t FROM unnest(n.tags) t) k(key)
           GROUP BY k.key),
         candidates AS (SELECT id, category, tags, published_at FROM news
           WHERE status = 'published' AND id NOT IN (SELECT news_id FROM mine)
           ORDER BY published_at DESC, id DESC LIMIT $4)
         SELECT c.id AS "id!", coalesce(sum(a.w), 0)::float8 AS "score!",
           coalesce(array_agg(k.name ORDER BY a.w DESC, k.name) FILTER (WHERE a.w IS NOT NULL), '{}') AS "reasons!"
         FROM candidates c
         CROSS JOIN LATERAL (SELECT DISTINCT ON (name) key, name FROM
           (SELECT 'cat:' || c.category AS key, c.category AS name UNION ALL SELECT 'tag:' || t, t FROM unnest(c.tags) t) keys
           ORDER BY name, key) k
         LEFT JOIN affinity a ON a.key = k.key
         GROUP BY c.id, c.published_at ORDER BY "score!" DESC, c.published_at DESC, c.id DESC LIMIT $2"#,
        *id,
        limit,
        half_life.as_secs_f64(),
        i64::from(state.recommend.candidates),
    )
    .fetch_all(&state.pool)
    .await
    .map_err(unavailable)?;
    let ids: Vec<Uuid> = ranked.iter().map(|r| r.id).collect();
    let rows: Vec<NewsRow> = sqlx::query_as(concat!(
        crate::routes::news::select_news!(),
        "WHERE n.id = ANY($1)"
    ))
    .bind(&ids)
    .fetch_all(&state.pool)
    .await
    .map_err(unavailable)?;
    let mut by_id: std::collections::HashMap<Uuid, NewsRow> =
        rows.into_iter().map(|r| (r.id, r)).collect();
    let items: Vec<Recommendation> = ranked
        .into_iter()
        .filter_map(|r| {
            by_id.remove(&r.id).map(|row| Recommendation {
                news: row.view(false),
                score: r.score,
                reasons: r.reasons,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(crate::routes::news::Items { items }))
}

/// One notification.
#[derive(serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Notification {
    /// Its id (the same for a user and an article, in every replay).
    pub id: Uuid,
    /// The article.
    pub news_id: Uuid,
    /// Its title when it was published.
    pub title: String,
    /// Its category.
    #[schema(schema_with = newsroom_infra::views::category_schema)]
    pub category: String,
    /// When it was published.
    #[serde(with = "newsroom_infra::views::rfc3339_micros")]
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/users/{id}/notifications?limit=&cursor=`: the user's inbox, newest first, with
/// the number of entries since they last marked them read (self, admin).
#[utoipa::path(get, path = "/v1/users/{id}/notifications",
    summary = "The user's inbox, newest first, and how many entries came since they were last marked read (self, admin)",
    params(Id, crate::openapi::Paging, crate::openapi::Consistency),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of the inbox", body = Inbox),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
#[tracing::instrument(skip_all, fields(user = %id))]
pub async fn notifications(
    req: actix_web::HttpRequest,
    id: web::Path<Uuid>,
    caller: Caller,
    params: web::Query<std::collections::HashMap<String, String>>,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    use crate::routes::news::{decode_cursor, encode_cursor, limit, unavailable};
    self_or_admin(&caller, *id)?;
    let limit = limit(&params)?;
    let after = params
        .get("cursor")
        .map(|c| decode_cursor("i1", c))
        .transpose()?;
    // The inbox is the notifier's; when notifications were last read is the users model's.
    let wanted = crate::consistency::wanted(&req, &state).await?;
    crate::consistency::wait_postgres(&state.pool, wanted.as_ref()).await?;
    let by_notifier = wanted.map(|w| w.served_by("notify", &["users", "news"]));
    crate::consistency::wait_postgres(&state.pool, by_notifier.as_ref()).await?;
    existing(&state, *id).await?;
    let rows: Vec<Notification> = sqlx::query_as!(
        Notification,
        r#"SELECT md5(user_id::text || news_id::text)::uuid AS "id!", news_id AS "news_id!", title AS "title!",
                  category AS "category!", created_at AS "created_at!"
           FROM notify_inbox WHERE user_id = $1 AND ($2::timestamptz IS NULL OR (created_at, news_id) < ($2, $3))
           ORDER BY created_at DESC, news_id DESC LIMIT $4"#,
        *id,
        after.map(|(at, _)| at),
        after.map(|(_, news)| news),
        limit + 1,
    )
    .fetch_all(&state.pool)
    .await
    .map_err(unavailable)?;
    let unread = sqlx::query_scalar!(
        r#"SELECT count(*) AS "unread!" FROM notify_inbox WHERE user_id = $1 AND created_at >
           coalesce((SELECT notifications_read_at FROM users WHERE id = $1), '-infinity')"#,
        *id,
    )
    .fetch_one(&state.pool)
    .await
    .map_err(unavailable)?;
    let more = rows.len() as i64 > limit;
    let items: Vec<Notification> = rows.into_iter().take(limit as usize).collect();
    let next_cursor = more
        .then(|| {
            items
                .last()
                .map(|n| encode_cursor("i1", n.created_at, n.news_id))
        })
        .flatten();
    Ok(HttpResponse::Ok().json(Inbox {
        items,
        next_cursor,
        unread_count: unread,
    }))
}

/// A page of a user's inbox.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Inbox {
    /// The notifications, newest first.
    pub items: Vec<Notification>,
    /// Where the next page starts; null on the last page.
    pub next_cursor: Option<String>,
    /// How many came since the user last marked them read.
    pub unread_count: i64,
}
