//! `/v1/news` reads.

use newsroom_infra::openapi::{Id, ProblemAnswer};
use std::collections::HashMap;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use newsroom_infra::auth::{Actor, Caller};
use newsroom_infra::http::ApiError;
use newsroom_infra::views::{AuthorView, NewsView};
use serde::Serialize;
use uuid::Uuid;

use crate::State;
use crate::cache::Listing;
use crate::consistency;
use crate::kept::KeptArticle;

/// The news rows with their author's name, in `NewsRow` order (a macro, so that queries
/// stay static strings).
macro_rules! news_columns {
    () => {
        "n.id, n.category, n.title, n.content, n.tags, n.author_id, \
         CASE WHEN u.id IS NULL THEN '' WHEN u.erased THEN '[deleted]' ELSE u.name END AS author_name, \
         n.status, n.version, n.created_at, n.updated_at, n.published_at, coalesce(c.reads, 0) AS read_count "
    };
}

macro_rules! news_from {
    () => {
        "FROM news n LEFT JOIN users u ON u.id = n.author_id \
         LEFT JOIN news_read_counts c ON c.news_id = n.id "
    };
}

macro_rules! select_news {
    () => {
        concat!(
            "SELECT ",
            $crate::routes::news::news_columns!(),
            $crate::routes::news::news_from!()
        )
    };
}
pub(crate) use {news_columns, news_from, select_news};

/// An article row as both stores give it.
#[derive(sqlx::FromRow, Clone)]
#[allow(missing_docs)]
pub struct NewsRow {
    pub id: Uuid,
    pub category: String,
    pub title: String,
    pub content: String,
    pub tags: Vec<String>,
    pub author_id: Uuid,
    pub author_name: String,
    pub status: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub read_count: i64,
}

impl NewsRow {
    pub(crate) fn view(self, with_content: bool) -> NewsView {
        NewsView {
            id: self.id,
            category: self.category,
            title: self.title,
            content: with_content.then_some(self.content),
            tags: self.tags,
            author: AuthorView {
                id: self.author_id,
                name: self.author_name,
            },
            status: self.status,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            published_at: self.published_at,
            read_count: self.read_count,
        }
    }

    /// Drafts and archived articles exist only for their author and admins.
    fn visible_to(&self, caller: Option<Actor>) -> bool {
        match self.status.as_str() {
            "published" => true,
            "draft" | "archived" => caller.is_some_and(|a| a.is_admin() || a.id == self.author_id),
            _ => false,
        }
    }
}

/// A read-model failure: logged, answered 503 without internals.
pub fn unavailable(e: sqlx::Error) -> ApiError {
    tracing::error!(error = %e, "reading the read model");
    ApiError::Unavailable("the read model is unavailable".into())
}

/// Counts an answer of `endpoint` from `store`.
pub fn answered(endpoint: &str, store: &str) {
    newsroom_infra::metrics::QUERY_ANSWERS
        .with_label_values(&[endpoint, store])
        .inc();
}

/// Whether `If-None-Match` names `version`.
fn not_modified(req: &HttpRequest, version: i64) -> bool {
    let Some(value) = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let etag = format!("\"{version}\"");
    value
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag == etag || tag.strip_prefix("W/") == Some(etag.as_str()))
}

/// `GET /v1/news/{id}`.
#[utoipa::path(get, path = "/v1/news/{id}",
    summary = "An article (drafts and archived: author, admin); an authenticated read is recorded",
    params(Id, ("If-None-Match" = Option<String>, Header), crate::openapi::Consistency),
    responses(
        (status = 200, description = "The article", body = NewsView, headers(("ETag" = String))),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
#[tracing::instrument(skip_all, fields(news = %id))]
pub async fn get(
    req: HttpRequest,
    id: web::Path<Uuid>,
    caller: Caller,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let wanted = consistency::wanted(&req, &state).await?;
    let kept = wanted
        .is_none()
        .then(|| state.cache.kept_article(*id))
        .flatten();
    let article = match kept {
        Some(article) => {
            answered("article", "memo");
            Some(article)
        }
        None => match state.cache.article(*id, wanted.as_ref()).await {
            Some((row, keeping)) => {
                answered("article", "redis");
                let article = Arc::new(KeptArticle::new(row.clone(), render(row)?));
                if let Some(keeping) = keeping {
                    state.cache.keep_article(keeping, article.clone());
                }
                Some(article)
            }
            None => {
                answered("article", "postgres");
                consistency::wait_postgres(&state.pool, wanted.as_ref()).await?;
                let row: Option<NewsRow> =
                    sqlx::query_as(concat!(select_news!(), "WHERE n.id = $1"))
                        .bind(*id)
                        .fetch_optional(&state.pool)
                        .await
                        .map_err(unavailable)?;
                match row {
                    Some(row) => Some(Arc::new(KeptArticle::new(row.clone(), render(row)?))),
                    None => None,
                }
            }
        },
    };
    let article = article
        .filter(|a| a.row.visible_to(caller.0))
        .ok_or(ApiError::NotFound)?;
    let row = &article.row;
    if let Some(reader) = caller.0.filter(|_| row.status == "published") {
        match newsroom_events::Category::parse(&row.category) {
            Some(category) => state.reads.record(crate::reads::Read {
                user: reader.id,
                news: row.id,
                category,
                tags: row.tags.clone(),
                request_id: newsroom_infra::http::RequestId::of(&req),
            }),
            None => tracing::error!(category = %row.category, "an article of an unknown category"),
        }
    }
    let etag = format!("\"{}\"", row.version);
    if not_modified(&req, row.version) {
        return Ok(HttpResponse::NotModified()
            .insert_header((header::ETAG, etag))
            .finish());
    }
    Ok(HttpResponse::Ok()
        .insert_header((header::ETAG, etag))
        .content_type(header::ContentType::json())
        .body(article.body.clone()))
}

/// An article's JSON, as `GET /v1/news/{id}` answers it.
fn render(row: NewsRow) -> Result<web::Bytes, ApiError> {
    serde_json::to_vec(&row.view(true))
        .map(web::Bytes::from)
        .map_err(|e| ApiError::Internal(e.into()))
}

/// A whole list (the answer of lists without pages).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Items<T> {
    /// The items.
    pub items: Vec<T>,
}

/// A page of a list.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Where the next page starts; null on the last page.
    pub next_cursor: Option<String>,
}

/// A position in a list: after the item at time `at` with id `id`; `kind` tells lists
/// apart, so a cursor of one list is refused by another.
pub fn encode_cursor(kind: &str, at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{kind}:{}:{id}", at.timestamp_micros()))
}

/// Reads a cursor of list `kind`.
pub fn decode_cursor(kind: &str, text: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let bad = || ApiError::Malformed("cursor was not issued by this server".into());
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let mut parts = text.splitn(3, ':');
    let (Some(k), Some(micros), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    if k != kind {
        return Err(bad());
    }
    // Within what PostgreSQL stores (a cursor from this server is a real time).
    const LATEST: i64 = 253_402_300_799_999_999; // 9999-12-31T23:59:59.999999Z
    let at = micros
        .parse::<i64>()
        .ok()
        .filter(|m| (0..=LATEST).contains(m))
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| bad())?))
}

/// The items of a page unless `limit` says otherwise.
pub const LIMIT_DEFAULT: i64 = 20;
/// The most items of a page.
pub const LIMIT_MAX: i64 = 100;
/// The longest tag a list filters by.
pub const TAG_MAX: usize = 50;

/// `limit`: 1..=100, default 20.
pub fn limit(params: &HashMap<String, String>) -> Result<i64, ApiError> {
    match params.get("limit") {
        None => Ok(LIMIT_DEFAULT),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=LIMIT_MAX).contains(l))
            .ok_or_else(|| {
                ApiError::Malformed(format!(
                    "limit must be a whole number from 1 to {LIMIT_MAX}"
                ))
            }),
    }
}

/// `GET /v1/news?category=&tag=&author_id=&limit=&cursor=`: published articles, newest
/// publication first. Pages are keyset-based on (published_at, id), so publications made
/// while a client pages through never make it skip or repeat an item.
#[utoipa::path(get, path = "/v1/news",
    summary = "Published news, newest publication first",
    params(crate::openapi::Filters, crate::openapi::Paging, crate::openapi::Consistency),
    responses(
        (status = 200, description = "A page (items without content)", body = Page<NewsView>),
        (status = 400, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
#[tracing::instrument(skip_all)]
pub async fn list(
    req: HttpRequest,
    params: web::Query<HashMap<String, String>>,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let wanted = consistency::wanted(&req, &state).await?;
    let category = category(&params)?;
    let tag = match params.get("tag") {
        None => None,
        Some(t) => {
            let tag = t.trim().to_lowercase();
            if tag.is_empty() || tag.chars().count() > TAG_MAX || tag.chars().any(char::is_control)
            {
                return Err(ApiError::Malformed(format!(
                    "tag must be 1 to {TAG_MAX} characters, none of them a control character"
                )));
            }
            Some(tag)
        }
    };
    let author = match params.get("author_id") {
        None => None,
        Some(a) => Some(
            Uuid::parse_str(a)
                .map_err(|_| ApiError::Malformed("author_id must be a UUID".into()))?,
        ),
    };
    let limit = limit(&params)?;
    let after = params
        .get("cursor")
        .map(|c| decode_cursor("n1", c))
        .transpose()?;
    // A list of one filter or none is an index of the cache model in Redis.
    let listing = match (&category, &tag, author) {
        (None, None, None) => Some(Listing::All),
        (Some(c), None, None) => Some(Listing::Category(c.clone())),
        (None, Some(t), None) => Some(Listing::Tag(t.clone())),
        (None, None, Some(a)) => Some(Listing::Author(a)),
        _ => None,
    };
    if let Some(listing) = listing {
        let after_micros = after.map(|(at, id)| (at.timestamp_micros(), id));
        let render = |rows, limit| {
            serde_json::to_vec(&page(rows, limit))
                .map(Into::into)
                .unwrap_or_default()
        };
        if let Some((body, source)) = state
            .cache
            .list_page(&listing, after_micros, limit, wanted.as_ref(), render)
            .await
        {
            answered("list", source.label());
            return Ok(HttpResponse::Ok()
                .insert_header(header::ContentType::json())
                .body(body));
        }
    }
    answered("list", "postgres");
    consistency::wait_postgres(&state.pool, wanted.as_ref()).await?;
    // Only the filters asked for, so that the planner picks the index that matches them
    // and stops after `limit` rows (a catch-all `$1 IS NULL OR ...` statement got a generic
    // plan that sorted every published article: 77 ms at 22,000 articles). At most 16
    // statement texts, each prepared once per connection.
    let mut query =
        sqlx::QueryBuilder::new(concat!(select_news!(), "WHERE n.status = 'published'"));
    if let Some(category) = category {
        query.push(" AND n.category = ").push_bind(category);
    }
    if let Some(tag) = tag {
        query
            .push(" AND n.tags @> ARRAY[")
            .push_bind(tag)
            .push("::text]");
    }
    if let Some(author) = author {
        query.push(" AND n.author_id = ").push_bind(author);
    }
    if let Some((at, id)) = after {
        query
            .push(" AND (n.published_at, n.id) < (")
            .push_bind(at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    query
        .push(" ORDER BY n.published_at DESC, n.id DESC LIMIT ")
        .push_bind(limit + 1);
    let rows: Vec<NewsRow> = query
        .build_query_as()
        .fetch_all(&state.pool)
        .await
        .map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(page(rows, limit)))
}

/// A page of a list of published articles from up to `limit` + 1 `rows` (one more than
/// the page: there is a next page).
fn page(rows: Vec<NewsRow>, limit: i64) -> Page<NewsView> {
    let more = rows.len() as i64 > limit;
    let items: Vec<NewsView> = rows
        .into_iter()
        .take(limit as usize)
        .map(|r| r.view(false))
        .collect();
    let next_cursor = if more {
        items
            .last()
            .and_then(|n| n.published_at.map(|at| encode_cursor("n1", at, n.id)))
    } else {
        None
    };
    Page { items, next_cursor }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_survives_its_text_form_and_foreign_ones_are_refused() {
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).expect("valid");
        let id = Uuid::now_v7();
        assert_eq!(
            decode_cursor("n1", &encode_cursor("n1", at, id)).ok(),
            Some((at, id))
        );
        assert!(
            decode_cursor("h1", &encode_cursor("n1", at, id)).is_err(),
            "another list's cursor"
        );
        for bad in [
            "",
            "!!",
            "bm90IGEgY3Vyc29y",
            &URL_SAFE_NO_PAD.encode("n1:x:y"),
            // Times PostgreSQL cannot compare with (a 503 before).
            &URL_SAFE_NO_PAD.encode(format!("n1:-8000000000000000:{id}")),
            &URL_SAFE_NO_PAD.encode(format!("n1:{}:{id}", i64::MAX)),
        ] {
            assert!(decode_cursor("n1", bad).is_err(), "{bad}");
        }
    }
}

/// One entry of a trending list.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Trending {
    /// The article (without content).
    pub news: NewsView,
    /// Its reads in the last 24 hours.
    pub reads: i64,
}

#[derive(sqlx::FromRow)]
struct TrendingRow {
    #[sqlx(flatten)]
    news: NewsRow,
    reads: i64,
}

/// `GET /v1/news/trending?category=&limit=`: the most-read published articles of the last
/// 24 hours (by hour buckets), most reads first.
#[utoipa::path(get, path = "/v1/news/trending",
    summary = "Most-read published articles of the last 24 hours (hour buckets)",
    params(crate::openapi::CategoryFilter, crate::openapi::Limit, crate::openapi::Consistency),
    responses(
        (status = 200, description = "The list", body = Items<Trending>),
        (status = 400, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
#[tracing::instrument(skip_all)]
pub async fn trending(
    req: HttpRequest,
    params: web::Query<HashMap<String, String>>,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let wanted = consistency::wanted(&req, &state).await?;
    let category = category(&params)?;
    let limit = limit(&params)?;
    if let Some((list, source)) = state
        .cache
        .trending(category.as_deref(), limit, wanted.as_ref())
        .await
    {
        answered("trending", source.label());
        let items: Vec<Trending> = list
            .iter()
            .map(|(row, reads)| Trending {
                news: row.clone().view(false),
                reads: *reads,
            })
            .collect();
        return Ok(HttpResponse::Ok().json(Items { items }));
    }
    answered("trending", "postgres");
    consistency::wait_postgres(&state.pool, wanted.as_ref()).await?;
    let rows: Vec<TrendingRow> = sqlx::query_as(concat!(
        "WITH recent AS (SELECT news_id, sum(reads)::bigint AS reads FROM news_reads_hourly \
         WHERE hour > now() - interval '24 hours' GROUP BY news_id) SELECT ",
        news_columns!(),
        ", r.reads ",
        news_from!(),
        "JOIN recent r ON r.news_id = n.id \
         WHERE n.status = 'published' AND ($1::text IS NULL OR n.category = $1) \
         ORDER BY r.reads DESC, n.published_at DESC, n.id DESC LIMIT $2"
    ))
    .bind(category)
    .bind(limit)
    .fetch_all(&state.pool)
    .await
    .map_err(unavailable)?;
    let items: Vec<Trending> = rows
        .into_iter()
        .map(|r| Trending {
            news: r.news.view(false),
            reads: r.reads,
        })
        .collect();
    Ok(HttpResponse::Ok().json(Items { items }))
}

/// `category`: one of the three, if given.
fn category(params: &HashMap<String, String>) -> Result<Option<String>, ApiError> {
    match params.get("category") {
        None => Ok(None),
        Some(c) if ["famous", "politics", "sports"].contains(&c.as_str()) => Ok(Some(c.clone())),
        Some(_) => Err(ApiError::Malformed(
            "category must be famous, politics or sports".into(),
        )),
    }
}
