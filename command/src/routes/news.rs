//! `/v1/news` commands.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use newsroom_events::Category;
use newsroom_events::users::Role;
use newsroom_infra::auth::Caller;
use newsroom_infra::http::{ApiError, JsonBody};
use newsroom_infra::kafka::Stream;
use newsroom_infra::openapi::{Id, ProblemAnswer};
use newsroom_infra::views::{AuthorView, DELETED_AUTHOR, NewsView};
use uuid::Uuid;

use super::{Placement, Target, X_CONSISTENCY_TOKEN, place, token_for};
use crate::State;
use crate::aggregate::NewsAggregate;
use crate::domain::Actor;
use crate::domain::news::{Edit, News, NewsCommand};
use crate::owner::{self, Committed, RequestMeta};
use crate::validation::Fields;

const CATEGORIES: &str = "famous, politics, sports";

/// The author's name from the users read model (`[deleted]` once erased).
async fn author(state: &State, id: Uuid) -> AuthorView {
    if let Some(name) = state.authors.get(id) {
        return AuthorView { id, name };
    }
    let row = sqlx::query!(
        r#"SELECT name AS "name!", erased AS "erased!" FROM users WHERE id = $1"#,
        id,
    )
    .fetch_optional(&state.pool)
    .await
    .unwrap_or_else(|e| {
        tracing::warn!(error = %e, "reading an author's name");
        None
    })
    .map(|row| (row.name, row.erased));
    let name = match row {
        Some((_, true)) => DELETED_AUTHOR.to_owned(),
        Some((name, false)) => {
            state.authors.put(id, &name);
            name
        }
        // Not projected yet (a brand-new editor), or the read model unreadable: no name
        // rather than a wrong one; remembered like a name, so that a burst of commands
        // asks once.
        None => {
            state.authors.put(id, "");
            String::new()
        }
    };
    AuthorView { id, name }
}

/// Author names for command answers, kept a few seconds (names change rarely; the query
/// API serves the authoritative ones).
#[derive(Default)]
pub struct AuthorNames {
    names: std::sync::RwLock<std::collections::HashMap<Uuid, (String, std::time::Instant)>>,
}

impl AuthorNames {
    const FRESH: std::time::Duration = std::time::Duration::from_secs(5);
    const MAX: usize = 10_000;

    /// How long an author not projected yet is remembered as such.
    const UNKNOWN_FRESH: std::time::Duration = std::time::Duration::from_millis(500);

    fn get(&self, id: Uuid) -> Option<String> {
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        names
            .get(&id)
            .filter(|(name, at)| {
                let fresh = if name.is_empty() {
                    Self::UNKNOWN_FRESH
                } else {
                    Self::FRESH
                };
                at.elapsed() < fresh
            })
            .map(|(name, _)| name.clone())
    }

    fn put(&self, id: Uuid, name: &str) {
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        if names.len() >= Self::MAX {
            names.retain(|_, (_, at)| at.elapsed() < Self::FRESH);
        }
        names.insert(id, (name.to_owned(), std::time::Instant::now()));
    }
}

/// The article as the API shows it. Read counts are the query API's: a command answers 0.
pub async fn news_view(state: &State, news: &News) -> NewsView {
    NewsView {
        id: news.id,
        category: news.category.as_str().to_owned(),
        title: news.title.clone(),
        content: Some(news.content.clone()),
        tags: news.tags.clone(),
        author: author(state, news.author_id).await,
        status: news.status.as_str().to_owned(),
        version: news.version,
        created_at: news.created_at,
        updated_at: news.updated_at,
        published_at: news.published_at,
        read_count: 0,
    }
}

async fn answer(state: &State, status: StatusCode, committed: &Committed<News>) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    response
        .insert_header((header::ETAG, format!("\"{}\"", committed.state.version)))
        .insert_header((
            X_CONSISTENCY_TOKEN,
            token_for(Stream::News, committed.position),
        ));
    if status == StatusCode::NO_CONTENT {
        return response.finish();
    }
    if status == StatusCode::CREATED {
        response.insert_header((header::LOCATION, format!("/v1/news/{}", committed.state.id)));
    }
    response.json(news_view(state, &committed.state).await)
}

fn editor(actor: Actor) -> Result<Actor, ApiError> {
    match actor.role {
        Role::Editor | Role::Admin => Ok(actor),
        Role::Reader => Err(ApiError::Forbidden),
    }
}

/// `POST /v1/news`: draft an article (editors, admins).
#[tracing::instrument(skip_all)]
#[utoipa::path(post, path = "/v1/news",
    summary = "Draft an article (editor, admin)",
    params(crate::openapi::Keyed),
    request_body = crate::openapi::CreateNews,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Drafted", body = NewsView, headers(("Location" = String), ("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 409, response = ProblemAnswer),
        (status = 413, response = ProblemAnswer),
        (status = 415, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn create(
    req: HttpRequest,
    caller: Caller,
    body: JsonBody,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let actor = editor(caller.required()?)?;
    let mut fields = Fields::of(&body.value)?;
    let (category, title, content, tags) = read_draft(&mut fields);
    fields.finish()?;
    let (Some(category), Some(title), Some(content)) = (category, title, content) else {
        return Err(ApiError::Internal(anyhow::anyhow!(
            "validated fields missing"
        )));
    };
    let meta = RequestMeta::of(&req, Some(actor.id));
    let id = match &meta.keyed {
        // Every retry of the key makes the same id, on the partition holding its outcome.
        Some(keyed) => {
            let id = keyed.new_id();
            let partition = state.owners.partition_of(id);
            if let Placement::Forwarded(response) =
                place(&state, &req, &body.raw, partition).await?
            {
                return Ok(response);
            }
            id
        }
        None if state.owners.ready().is_empty() => {
            return Err(ApiError::Unavailable(
                "this process writes no partition yet; retry shortly".into(),
            ));
        }
        None => state.owners.new_id(),
    };
    let command = NewsCommand::Draft {
        actor,
        category,
        title,
        content,
        tags,
    };
    let committed = owner::submit::<NewsAggregate>(&state.owners, id, command, meta).await?;
    Ok(answer(&state, StatusCode::CREATED, &committed).await)
}

/// The body of `POST /v1/news`: category, title, content and tags.
pub fn read_draft(
    fields: &mut Fields<'_>,
) -> (
    Option<Category>,
    Option<String>,
    Option<String>,
    Vec<String>,
) {
    let category = fields.one_of("category", CATEGORIES, Category::parse);
    let title = fields.trimmed_string("title", 1, 200);
    let content = fields.exact_string("content", 1, 100_000);
    let tags = fields.optional_tags("tags", 20, 50).unwrap_or_default();
    (category, title, content, tags)
}

/// The body of `PATCH /v1/news/{id}`: at least one of the draft's fields.
pub fn read_edit(fields: &mut Fields<'_>) -> Edit {
    let edit = Edit {
        category: fields.optional_one_of("category", CATEGORIES, Category::parse),
        title: fields.optional_trimmed_string("title", 1, 200),
        content: fields.optional_exact_string("content", 1, 100_000),
        tags: fields.optional_tags("tags", 20, 50),
    };
    fields.require_any(&["category", "title", "content", "tags"]);
    edit
}

/// Runs a command on an existing article here, or forwards it to the article's owner.
async fn run(
    state: &State,
    req: &HttpRequest,
    body: &[u8],
    id: Uuid,
    actor: Actor,
    command: NewsCommand,
    status: StatusCode,
) -> Result<HttpResponse, ApiError> {
    let partition = state.owners.partition_of(id);
    if let Placement::Forwarded(response) = place(state, req, body, partition).await? {
        return Ok(response);
    }
    let meta = RequestMeta::of(req, Some(actor.id));
    let committed = owner::submit::<NewsAggregate>(&state.owners, id, command, meta).await?;
    Ok(answer(state, status, &committed).await)
}

/// `PATCH /v1/news/{id}`.
#[tracing::instrument(skip_all, fields(news = %target.id))]
#[utoipa::path(patch, path = "/v1/news/{id}",
    summary = "Edit an article (its author, admin)",
    params(Id, crate::openapi::Writes),
    request_body = crate::openapi::EditNews,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Edited", body = NewsView, headers(("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 409, response = ProblemAnswer),
        (status = 412, response = ProblemAnswer),
        (status = 413, response = ProblemAnswer),
        (status = 415, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn update(
    req: HttpRequest,
    target: Target,
    body: JsonBody,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let Target {
        actor,
        id,
        expected_version,
    } = target;
    let actor = editor(actor)?;
    let mut fields = Fields::of(&body.value)?;
    let edit = read_edit(&mut fields);
    fields.finish()?;
    let command = NewsCommand::Edit {
        actor,
        expected_version,
        edit,
    };
    run(&state, &req, &body.raw, id, actor, command, StatusCode::OK).await
}

/// A lifecycle command without a body: publish, unpublish, archive, delete.
pub trait Transition {
    /// The status of a success.
    const STATUS: StatusCode;
    /// The command for `actor` with the `If-Match` version.
    fn command(actor: Actor, expected_version: Option<i64>) -> NewsCommand;
}

/// `POST /v1/news/{id}/publish`.
pub struct Publish;
/// `POST /v1/news/{id}/unpublish`.
pub struct Unpublish;
/// `POST /v1/news/{id}/archive`.
pub struct Archive;
/// `DELETE /v1/news/{id}`.
pub struct Delete;

impl Transition for Publish {
    const STATUS: StatusCode = StatusCode::OK;
    fn command(actor: Actor, expected_version: Option<i64>) -> NewsCommand {
        let at = chrono::Utc::now();
        NewsCommand::Publish {
            actor,
            expected_version,
            at,
        }
    }
}

impl Transition for Unpublish {
    const STATUS: StatusCode = StatusCode::OK;
    fn command(actor: Actor, expected_version: Option<i64>) -> NewsCommand {
        NewsCommand::Unpublish {
            actor,
            expected_version,
        }
    }
}

impl Transition for Archive {
    const STATUS: StatusCode = StatusCode::OK;
    fn command(actor: Actor, expected_version: Option<i64>) -> NewsCommand {
        NewsCommand::Archive {
            actor,
            expected_version,
        }
    }
}

impl Transition for Delete {
    const STATUS: StatusCode = StatusCode::NO_CONTENT;
    fn command(actor: Actor, expected_version: Option<i64>) -> NewsCommand {
        NewsCommand::Delete {
            actor,
            expected_version,
        }
    }
}

/// The handler of every [`Transition`].
#[tracing::instrument(skip_all, fields(news = %target.id))]
pub async fn transition<T: Transition>(
    req: HttpRequest,
    target: Target,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let Target {
        actor,
        id,
        expected_version,
    } = target;
    let command = T::command(editor(actor)?, expected_version);
    run(&state, &req, &[], id, actor, command, T::STATUS).await
}

/// `POST /v1/news/{id}/publish`.
#[utoipa::path(post, path = "/v1/news/{id}/publish",
    summary = "Publish a draft (its author, admin)",
    params(Id, crate::openapi::Writes),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Published", body = NewsView, headers(("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 409, response = ProblemAnswer),
        (status = 412, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn publish(
    req: HttpRequest,
    target: Target,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    transition::<Publish>(req, target, state).await
}

/// `POST /v1/news/{id}/unpublish`.
#[utoipa::path(post, path = "/v1/news/{id}/unpublish",
    summary = "Take a published article back to draft (its author, admin)",
    params(Id, crate::openapi::Writes),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Back to draft", body = NewsView, headers(("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 409, response = ProblemAnswer),
        (status = 412, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn unpublish(
    req: HttpRequest,
    target: Target,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    transition::<Unpublish>(req, target, state).await
}

/// `POST /v1/news/{id}/archive`.
#[utoipa::path(post, path = "/v1/news/{id}/archive",
    summary = "Archive a published article (its author, admin)",
    params(Id, crate::openapi::Writes),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Archived", body = NewsView, headers(("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 409, response = ProblemAnswer),
        (status = 412, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn archive(
    req: HttpRequest,
    target: Target,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    transition::<Archive>(req, target, state).await
}

/// `DELETE /v1/news/{id}`.
#[utoipa::path(delete, path = "/v1/news/{id}",
    summary = "Delete an article (its author, admin)",
    params(Id, crate::openapi::Writes),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted", headers(("ETag" = String, description = "The new version, in quotes"), ("X-Consistency-Token" = String, description = "Send it to the query API to read this write"))),
        (status = 400, response = ProblemAnswer),
        (status = 401, response = ProblemAnswer),
        (status = 403, response = ProblemAnswer),
        (status = 404, response = ProblemAnswer),
        (status = 412, response = ProblemAnswer),
        (status = 422, response = ProblemAnswer),
        (status = 429, response = ProblemAnswer),
        (status = 503, response = ProblemAnswer),
    ),
)]
pub async fn delete(
    req: HttpRequest,
    target: Target,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    transition::<Delete>(req, target, state).await
}
