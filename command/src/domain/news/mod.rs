//! The News aggregate: `draft` → `published` → `archived`, `published` → `draft` by
//! unpublish; deletion from any status.

#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};
use newsroom_events::Category;
use newsroom_events::users::Role;
use uuid::Uuid;

use super::{Actor, DomainError, Stamp, check_version};

/// The lifecycle of an article.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Status {
    /// Being written; only its author and admins see it.
    Draft,
    /// Public.
    Published,
    /// Withdrawn; only its author and admins see it.
    Archived,
}

impl Status {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Published => "published",
            Status::Archived => "archived",
        }
    }
}

/// The state of one article.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct News {
    /// Id.
    pub id: Uuid,
    /// The editor who drafted it.
    pub author_id: Uuid,
    /// Category.
    pub category: Category,
    /// Title.
    pub title: String,
    /// Content.
    pub content: String,
    /// Tags, normalised.
    pub tags: Vec<String>,
    /// Status.
    pub status: Status,
    /// Deleted articles answer 404 and accept no command.
    pub deleted: bool,
    /// Number of changes.
    pub version: i64,
    /// Drafting time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Last publication (cleared by unpublish).
    pub published_at: Option<DateTime<Utc>>,
}

/// The editable fields; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edit {
    /// New category.
    pub category: Option<Category>,
    /// New title.
    pub title: Option<String>,
    /// New content.
    pub content: Option<String>,
    /// New tags.
    pub tags: Option<Vec<String>>,
}

/// Commands of the News aggregate (inputs validated).
#[derive(Debug, Clone)]
pub enum NewsCommand {
    /// Draft a new article (editors and admins).
    Draft {
        /// Caller.
        actor: Actor,
        /// Category.
        category: Category,
        /// Title.
        title: String,
        /// Content.
        content: String,
        /// Tags, normalised.
        tags: Vec<String>,
    },
    /// Edit fields.
    Edit {
        /// Caller.
        actor: Actor,
        /// `If-Match`.
        expected_version: Option<i64>,
        /// Changes.
        edit: Edit,
    },
    /// Publish a draft.
    Publish {
        /// Caller.
        actor: Actor,
        /// `If-Match`.
        expected_version: Option<i64>,
        /// Publication time.
        at: DateTime<Utc>,
    },
    /// Take a published article back to draft.
    Unpublish {
        /// Caller.
        actor: Actor,
        /// `If-Match`.
        expected_version: Option<i64>,
    },
    /// Archive a published article.
    Archive {
        /// Caller.
        actor: Actor,
        /// `If-Match`.
        expected_version: Option<i64>,
    },
    /// Delete the article.
    Delete {
        /// Caller.
        actor: Actor,
        /// `If-Match`.
        expected_version: Option<i64>,
    },
}

/// The one change an accepted command makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewsChange {
    /// Drafted.
    Drafted {
        /// Author.
        author_id: Uuid,
        /// Category.
        category: Category,
        /// Title.
        title: String,
        /// Content.
        content: String,
        /// Tags.
        tags: Vec<String>,
    },
    /// Edited.
    Edited(Edit),
    /// Published at the given time.
    Published {
        /// When.
        at: DateTime<Utc>,
    },
    /// Back to draft.
    Unpublished,
    /// Archived.
    Archived,
    /// Deleted.
    Deleted,
}

/// The article as the caller may act on it: invisible ones (unknown, deleted, or a draft
/// or archived article of someone else) are 404; others' published articles are 403.
fn accessible<'a>(state: Option<&'a News>, actor: &Actor) -> Result<&'a News, DomainError> {
    let news = state.filter(|n| !n.deleted).ok_or(DomainError::NotFound)?;
    if actor.is_admin() || news.author_id == actor.id {
        return Ok(news);
    }
    match news.status {
        Status::Published => Err(DomainError::Forbidden),
        Status::Draft | Status::Archived => Err(DomainError::NotFound),
    }
}

fn transition(news: &News, action: &'static str, allowed: &[Status]) -> Result<(), DomainError> {
    if allowed.contains(&news.status) {
        Ok(())
    } else {
        Err(DomainError::InvalidTransition {
            action: action.into(),
            status: news.status.as_str().into(),
        })
    }
}

/// Decides the change a command makes.
pub fn handle(state: Option<&News>, command: NewsCommand) -> Result<NewsChange, DomainError> {
    match command {
        NewsCommand::Draft {
            actor,
            category,
            title,
            content,
            tags,
        } => {
            if !matches!(actor.role, Role::Editor | Role::Admin) {
                return Err(DomainError::Forbidden);
            }
            if state.is_some() {
                return Err(DomainError::AlreadyExists);
            }
            Ok(NewsChange::Drafted {
                author_id: actor.id,
                category,
                title,
                content,
                tags,
            })
        }
        NewsCommand::Edit {
            actor,
            expected_version,
            edit,
        } => {
            let news = accessible(state, &actor)?;
            check_version(expected_version, news.version)?;
            transition(news, "edit", &[Status::Draft, Status::Published])?;
            Ok(NewsChange::Edited(edit))
        }
        NewsCommand::Publish {
            actor,
            expected_version,
            at,
        } => {
            let news = accessible(state, &actor)?;
            check_version(expected_version, news.version)?;
            transition(news, "publish", &[Status::Draft])?;
            Ok(NewsChange::Published { at })
        }
        NewsCommand::Unpublish {
            actor,
            expected_version,
        } => {
            let news = accessible(state, &actor)?;
            check_version(expected_version, news.version)?;
            transition(news, "unpublish", &[Status::Published])?;
            Ok(NewsChange::Unpublished)
        }
        NewsCommand::Archive {
            actor,
            expected_version,
        } => {
            let news = accessible(state, &actor)?;
            check_version(expected_version, news.version)?;
            transition(news, "archive", &[Status::Published])?;
            Ok(NewsChange::Archived)
        }
        NewsCommand::Delete {
            actor,
            expected_version,
        } => {
            let news = accessible(state, &actor)?;
            check_version(expected_version, news.version)?;
            Ok(NewsChange::Deleted)
        }
    }
}

/// Folds one change into the state.
pub fn apply(state: Option<News>, change: &NewsChange, stamp: Stamp) -> Option<News> {
    if let NewsChange::Drafted {
        author_id,
        category,
        title,
        content,
        tags,
    } = change
    {
        return Some(News {
            id: stamp.id,
            author_id: *author_id,
            category: *category,
            title: title.clone(),
            content: content.clone(),
            tags: tags.clone(),
            status: Status::Draft,
            deleted: false,
            version: stamp.version,
            created_at: stamp.at,
            updated_at: stamp.at,
            published_at: None,
        });
    }
    let mut news = state?;
    match change {
        NewsChange::Drafted { .. } => {}
        NewsChange::Edited(edit) => {
            if let Some(category) = edit.category {
                news.category = category;
            }
            if let Some(title) = &edit.title {
                news.title = title.clone();
            }
            if let Some(content) = &edit.content {
                news.content = content.clone();
            }
            if let Some(tags) = &edit.tags {
                news.tags = tags.clone();
            }
        }
        NewsChange::Published { at } => {
            news.status = Status::Published;
            news.published_at = Some(*at);
        }
        NewsChange::Unpublished => {
            news.status = Status::Draft;
            news.published_at = None;
        }
        NewsChange::Archived => news.status = Status::Archived,
        NewsChange::Deleted => news.deleted = true,
    }
    news.version = stamp.version;
    news.updated_at = stamp.at;
    Some(news)
}
