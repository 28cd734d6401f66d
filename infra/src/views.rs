//! The JSON shapes of API.md's resources, shared by the command API (which answers with
//! the state it just wrote) and the query API (which answers from the read models).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A user as the APIs show it (never a password or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    /// Id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// `reader`, `editor` or `admin`.
    pub role: String,
    /// Categories whose publications notify the user.
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorView {
    /// User id of the editor.
    pub id: Uuid,
    /// Their name, `"[deleted]"` once they were erased.
    pub name: String,
}

/// The name shown for an erased author.
pub const DELETED_AUTHOR: &str = "[deleted]";

/// An article as the APIs show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewsView {
    /// Id.
    pub id: Uuid,
    /// `famous`, `politics` or `sports`.
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
