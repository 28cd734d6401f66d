//! Events of the User aggregate (topic `<prefix>.users`, keyed by user id).
//!
//! Personal data (name, e-mail, password hash) travels only inside `personal`, encrypted
//! with the user's own key ([`crate::personal`]); destroying the key erases it everywhere.

use apache_avro::AvroSchema;
use serde::{Deserialize, Serialize};

use crate::macros::event_family;
use crate::{Category, EventMetadata};

/// A user's role, which decides what they may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, AvroSchema)]
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
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Reader, Role::Editor, Role::Admin];

    /// The role's name as the API and the read models spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }

    /// Parses the API spelling.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "reader" => Some(Role::Reader),
            "editor" => Some(Role::Editor),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A user registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.users")]
pub struct UserRegistered {
    /// Event metadata; `aggregate_id` is the user id.
    pub metadata: EventMetadata,
    /// Encrypted [`crate::personal::Personal`] with name, e-mail and password hash.
    #[serde(with = "apache_avro::serde::bytes")]
    #[avro(with)]
    pub personal: Vec<u8>,
    /// Keyed hash of the normalised e-mail (the uniqueness claim).
    pub email_claim: String,
    /// The role the user starts with.
    pub role: Role,
}

/// A user changed profile fields; `None` means unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.users")]
pub struct UserUpdated {
    /// Event metadata.
    pub metadata: EventMetadata,
    /// Encrypted new name and/or e-mail.
    #[serde(with = "apache_avro::serde::bytes_opt")]
    #[avro(with)]
    #[avro(default = "null")]
    pub personal: Option<Vec<u8>>,
    /// Claim of the new e-mail.
    #[avro(default = "null")]
    pub email_claim: Option<String>,
    /// New followed categories.
    #[avro(default = "null")]
    pub followed_categories: Option<Vec<Category>>,
    /// New e-mail notification preference.
    #[avro(default = "null")]
    pub email_notifications: Option<bool>,
}

/// A user set a new password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.users")]
pub struct UserPasswordChanged {
    /// Event metadata.
    pub metadata: EventMetadata,
    /// Encrypted new password hash.
    #[serde(with = "apache_avro::serde::bytes")]
    #[avro(with)]
    pub personal: Vec<u8>,
}

/// An admin changed a user's role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.users")]
pub struct UserRoleChanged {
    /// Event metadata.
    pub metadata: EventMetadata,
    /// The new role.
    pub role: Role,
}

/// A user was erased.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.users")]
pub struct UserErased {
    /// Event metadata.
    pub metadata: EventMetadata,
}

/// A user marked every notification so far as read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, AvroSchema)]
#[avro(namespace = "newsroom.users")]
pub struct UserNotificationsRead {
    /// Event metadata.
    pub metadata: EventMetadata,
    /// Notifications created up to this time (microseconds since the epoch) are read.
    #[avro(with = || apache_avro::Schema::TimestampMicros)]
    pub read_at: i64,
}

event_family!(
    /// Every event of the User aggregate.
    UserEvent, "users", "newsroom.users" {
        Registered(UserRegistered, 1),
        Updated(UserUpdated, 1),
        PasswordChanged(UserPasswordChanged, 1),
        RoleChanged(UserRoleChanged, 1),
        Erased(UserErased, 1),
        NotificationsRead(UserNotificationsRead, 1),
    }
);
