//! The User aggregate.

#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};
use newsroom_events::Category;
use newsroom_events::users::Role;
use uuid::Uuid;

use super::{Actor, DomainError, Stamp, check_version};

/// The state of one user, folded from their changes (personal data in clear: the command
/// side holds the keys).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    /// Id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Claim (keyed hash) of the normalised e-mail.
    pub email_claim: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// Role.
    pub role: Role,
    /// Followed categories, in canonical order.
    pub followed_categories: Vec<Category>,
    /// E-mail notifications on or off.
    pub email_notifications: bool,
    /// Notifications up to this time are read.
    pub notifications_read_at: Option<DateTime<Utc>>,
    /// Erased: the user answers 404 and accepts no command.
    pub erased: bool,
    /// Number of changes.
    pub version: i64,
    /// Registration time.
    pub created_at: DateTime<Utc>,
    /// Time of the last change.
    pub updated_at: DateTime<Utc>,
    /// Tokens issued before this are revoked: the time of the last password change, role
    /// change or erasure.
    #[serde(default)]
    pub tokens_valid_from: Option<DateTime<Utc>>,
}

/// What a user's command may change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// New name.
    pub name: Option<String>,
    /// New e-mail with its claim.
    pub email: Option<(String, String)>,
    /// New followed categories.
    pub followed_categories: Option<Vec<Category>>,
    /// New preference.
    pub email_notifications: Option<bool>,
}

/// Commands of the User aggregate (inputs validated, secrets already hashed).
#[derive(Debug, Clone)]
pub enum UserCommand {
    /// Register (anyone); `role` is `Reader` except for the bootstrap admin.
    Register {
        /// Name.
        name: String,
        /// E-mail.
        email: String,
        /// Claim of the e-mail.
        email_claim: String,
        /// Argon2id hash.
        password_hash: String,
        /// Starting role.
        role: Role,
    },
    /// Change profile fields (self or admin).
    Update {
        /// Caller.
        actor: Actor,
        /// `If-Match`.
        expected_version: Option<i64>,
        /// Changes.
        profile: Profile,
    },
    /// Set a new password (self only). `verified_hash` is the hash the caller's current
    /// password was checked against; it must still be the current one.
    ChangePassword {
        /// Caller.
        actor: Actor,
        /// `If-Match`.
        expected_version: Option<i64>,
        /// The hash the current password matched.
        verified_hash: String,
        /// The new hash.
        new_hash: String,
    },
    /// Give a user a role (admin only).
    ChangeRole {
        /// Caller.
        actor: Actor,
        /// `If-Match`.
        expected_version: Option<i64>,
        /// The new role.
        role: Role,
    },
    /// Erase the user (self or admin).
    Erase {
        /// Caller.
        actor: Actor,
        /// `If-Match`.
        expected_version: Option<i64>,
    },
    /// Mark notifications read (self only).
    MarkNotificationsRead {
        /// Caller.
        actor: Actor,
        /// Up to when.
        at: DateTime<Utc>,
    },
}

/// The one change an accepted command makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChange {
    /// Registered.
    Registered {
        /// Name.
        name: String,
        /// E-mail.
        email: String,
        /// Claim of the e-mail.
        email_claim: String,
        /// Hash.
        password_hash: String,
        /// Role.
        role: Role,
    },
    /// Profile changed.
    Updated(Profile),
    /// Password changed.
    PasswordChanged {
        /// New hash.
        password_hash: String,
    },
    /// Role changed.
    RoleChanged {
        /// New role.
        role: Role,
    },
    /// Erased.
    Erased,
    /// Notifications read up to `at`.
    NotificationsRead {
        /// Up to when.
        at: DateTime<Utc>,
    },
}

/// Who may act on a user: themselves, or an admin (unless `self_only`).
fn authorize(target: Uuid, actor: &Actor, self_only: bool) -> Result<(), DomainError> {
    if actor.id == target || (!self_only && actor.is_admin()) {
        Ok(())
    } else {
        Err(DomainError::Forbidden)
    }
}

/// The user `id` as the caller may see it: 403 before 404, so that existence does not
/// leak to other users.
fn existing<'a>(
    id: Uuid,
    state: Option<&'a User>,
    actor: &Actor,
    self_only: bool,
) -> Result<&'a User, DomainError> {
    authorize(id, actor, self_only)?;
    state.filter(|u| !u.erased).ok_or(DomainError::NotFound)
}

/// Decides the change a command makes to user `id`.
pub fn handle(
    id: Uuid,
    state: Option<&User>,
    command: UserCommand,
) -> Result<UserChange, DomainError> {
    match command {
        UserCommand::Register {
            name,
            email,
            email_claim,
            password_hash,
            role,
        } => match state {
            Some(_) => Err(DomainError::AlreadyExists),
            None => Ok(UserChange::Registered {
                name,
                email,
                email_claim,
                password_hash,
                role,
            }),
        },
        UserCommand::Update {
            actor,
            expected_version,
            profile,
        } => {
            let user = existing(id, state, &actor, false)?;
            check_version(expected_version, user.version)?;
            Ok(UserChange::Updated(profile))
        }
        UserCommand::ChangePassword {
            actor,
            expected_version,
            verified_hash,
            new_hash,
        } => {
            let user = existing(id, state, &actor, true)?;
            check_version(expected_version, user.version)?;
            if user.password_hash != verified_hash {
                return Err(DomainError::StalePassword);
            }
            Ok(UserChange::PasswordChanged {
                password_hash: new_hash,
            })
        }
        UserCommand::ChangeRole {
            actor,
            expected_version,
            role,
        } => {
            if !actor.is_admin() {
                return Err(DomainError::Forbidden);
            }
            let user = existing(id, state, &actor, false)?;
            check_version(expected_version, user.version)?;
            Ok(UserChange::RoleChanged { role })
        }
        UserCommand::Erase {
            actor,
            expected_version,
        } => {
            let user = existing(id, state, &actor, false)?;
            check_version(expected_version, user.version)?;
            Ok(UserChange::Erased)
        }
        UserCommand::MarkNotificationsRead { actor, at } => {
            existing(id, state, &actor, true)?;
            Ok(UserChange::NotificationsRead { at })
        }
    }
}

/// Folds one change into the state.
pub fn apply(state: Option<User>, change: &UserChange, stamp: Stamp) -> Option<User> {
    if let UserChange::Registered {
        name,
        email,
        email_claim,
        password_hash,
        role,
    } = change
    {
        return Some(User {
            id: stamp.id,
            name: name.clone(),
            email: email.clone(),
            email_claim: email_claim.clone(),
            password_hash: password_hash.clone(),
            role: *role,
            followed_categories: Vec::new(),
            email_notifications: false,
            notifications_read_at: None,
            erased: false,
            version: stamp.version,
            created_at: stamp.at,
            updated_at: stamp.at,
            tokens_valid_from: None,
        });
    }
    let mut user = state?;
    match change {
        UserChange::Registered { .. } => {}
        UserChange::Updated(profile) => {
            if let Some(name) = &profile.name {
                user.name = name.clone();
            }
            if let Some((email, claim)) = &profile.email {
                user.email = email.clone();
                user.email_claim = claim.clone();
            }
            if let Some(categories) = &profile.followed_categories {
                user.followed_categories = categories.clone();
            }
            if let Some(on) = profile.email_notifications {
                user.email_notifications = on;
            }
        }
        UserChange::PasswordChanged { password_hash } => {
            user.password_hash = password_hash.clone();
            user.tokens_valid_from = Some(stamp.at);
        }
        UserChange::RoleChanged { role } => {
            user.role = *role;
            user.tokens_valid_from = Some(stamp.at);
        }
        UserChange::Erased => {
            user.tokens_valid_from = Some(stamp.at);
            user.erased = true;
            user.name.clear();
            user.email.clear();
            user.password_hash.clear();
        }
        UserChange::NotificationsRead { at } => user.notifications_read_at = Some(*at),
    }
    user.version = stamp.version;
    user.updated_at = stamp.at;
    Some(user)
}
