//! Events of the User aggregate (topic `<prefix>.users`, keyed by user id).

use apache_avro::AvroSchema;
use serde::{Deserialize, Serialize};

use crate::EventMetadata;
use crate::schemas::{Event, EventDecodeError, decode_as};

/// A user's role, which decides what they may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.users")]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)] // the AvroSchema derive refuses doc comments on unit variants
pub enum Role {
    // Reads news; the role of every new user.
    Reader,
    // Drafts and manages their own news.
    Editor,
    // May do everything.
    Admin,
}

impl Role {
    /// The role's name as the API and the read models spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }
}

/// A user registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.users")]
pub struct UserRegistered {
    /// Event metadata; `aggregate_id` is the user id.
    pub metadata: EventMetadata,
    /// Display name, trimmed, 1..=100 characters.
    pub name: String,
    /// E-mail address as given (trimmed).
    pub email: String,
    /// Argon2id hash in PHC string format.
    pub password_hash: String,
    /// The role the user starts with.
    pub role: Role,
}

impl Event for UserRegistered {
    const FULL_NAME: &'static str = "newsroom.users.UserRegistered";
    const SCHEMA: &'static str = include_str!("../../avro/users/UserRegistered.avsc");
    const SCHEMA_VERSION: i32 = 1;

    fn metadata(&self) -> &EventMetadata {
        &self.metadata
    }
}

/// Every event of the User aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserEvent {
    /// See [`UserRegistered`].
    Registered(UserRegistered),
}

impl UserEvent {
    /// The event's metadata, whatever its type.
    pub fn metadata(&self) -> &EventMetadata {
        match self {
            UserEvent::Registered(e) => &e.metadata,
        }
    }

    /// Builds the event from a decoded Avro value whose record full name is `name`.
    pub fn from_avro(
        name: &str,
        value: apache_avro::types::Value,
    ) -> Result<Self, EventDecodeError> {
        match name {
            UserRegistered::FULL_NAME => decode_as(value).map(UserEvent::Registered),
            other => Err(EventDecodeError::UnknownType(other.to_owned())),
        }
    }
}
