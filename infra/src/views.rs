//! The JSON shapes of API.md's resources, shared by the command API (which answers with
//! the state it just wrote) and the query API (which answers from the read models).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user as the APIs show it (never a password or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = User)]
pub struct UserView {
    /// Id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// `reader`, `editor` or `admin`.
    #[schema(schema_with = role_schema)]
    pub role: String,
    /// Categories whose publications notify the user.
    #[schema(schema_with = categories_schema)]
    pub followed_categories: Vec<String>,
    /// Whether notifications also go out by e-mail.
    pub email_notifications: bool,
    /// Number of events of the user so far.
    pub version: i64,
    /// Registration time.
    #[serde(with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
}

/// The author of an article as the APIs show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Author)]
pub struct AuthorView {
    /// User id of the editor.
    pub id: Uuid,
    /// Their name, `"[deleted]"` once they were erased.
    pub name: String,
}

/// The name shown for an erased author.
pub const DELETED_AUTHOR: &str = "[deleted]";

/// An article as the APIs show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = News)]
pub struct NewsView {
    /// Id.
    pub id: Uuid,
    /// `famous`, `politics` or `sports`.
    #[schema(schema_with = category_schema)]
    pub category: String,
    /// Title.
    pub title: String,
    /// Body (left out of lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Who drafted it.
    pub author: AuthorView,
    /// `draft`, `published` or `archived`.
    #[schema(schema_with = status_schema)]
    pub status: String,
    /// Number of events of the article.
    pub version: i64,
    /// Drafting time.
    #[serde(with = "rfc3339_micros")]
    pub created_at: DateTime<Utc>,
    /// Last change.
    #[serde(with = "rfc3339_micros")]
    pub updated_at: DateTime<Utc>,
    /// Publication time, null until published.
    #[serde(with = "rfc3339_micros_opt")]
    pub published_at: Option<DateTime<Utc>>,
    /// Reads counted so far.
    pub read_count: i64,
}

/// The statuses of an article, as the APIs spell them.
pub const NEWS_STATUSES: [&str; 3] = ["draft", "published", "archived"];

fn choice(
    values: impl IntoIterator<Item = &'static str>,
) -> utoipa::openapi::schema::ObjectBuilder {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(values))
}

/// A category's schema (its name).
pub fn category_schema() -> utoipa::openapi::schema::ObjectBuilder {
    choice(newsroom_events::Category::ALL.map(|c| c.as_str()))
}

fn categories_schema() -> utoipa::openapi::schema::ArrayBuilder {
    utoipa::openapi::schema::ArrayBuilder::new().items(category_schema())
}

fn role_schema() -> utoipa::openapi::schema::ObjectBuilder {
    choice(newsroom_events::users::Role::ALL.map(|r| r.as_str()))
}

fn status_schema() -> utoipa::openapi::schema::ObjectBuilder {
    choice(NEWS_STATUSES)
}

/// Optional RFC 3339 timestamps (null when absent).
pub mod rfc3339_micros_opt {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes `Some(at)` as RFC 3339, `None` as null.
    pub fn serialize<S: Serializer>(at: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => s.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Micros, true)),
            None => s.serialize_none(),
        }
    }

    /// Parses an RFC 3339 timestamp or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            DateTime::parse_from_rfc3339(&t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

/// RFC 3339 in UTC with microseconds, as every timestamp of the APIs.
pub mod rfc3339_micros {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes `at` as `2026-01-01T00:00:00.000000Z`.
    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    /// Parses any RFC 3339 timestamp.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}
