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
