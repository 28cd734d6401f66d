//! The User aggregate.

use chrono::{DateTime, Utc};
use newsroom_events::users::{Role, UserEvent, UserRegistered};
use newsroom_events::{Event, EventMetadata};
use uuid::Uuid;

/// The state of one user, folded from their events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Role.
    pub role: Role,
    /// Number of events so far.
    pub version: i64,
    /// When the user registered.
    pub created_at: DateTime<Utc>,
}

/// What the command side knows about the request beyond its body.
#[derive(Debug, Clone)]
pub struct Context {
    /// Id of the new event(s) base; each event gets its own id from this generator's output.
    pub now: DateTime<Utc>,
    /// The request id.
    pub correlation_id: String,
    /// The id of this command.
    pub command_id: String,
    /// The authenticated caller.
    pub actor_id: Option<Uuid>,
}

/// Register a new user (validated input, password already hashed).
#[derive(Debug, Clone)]
pub struct RegisterUser {
    /// The id chosen for the new user.
    pub user_id: Uuid,
    /// Trimmed name.
    pub name: String,
    /// Trimmed e-mail.
    pub email: String,
    /// Argon2id PHC string.
    pub password_hash: String,
}

/// A command the aggregate refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// The user already exists.
    #[error("user {0} already exists")]
    AlreadyExists(Uuid),
}

/// Decides the events of a registration.
pub fn register(
    state: Option<&User>,
    command: RegisterUser,
    ctx: &Context,
) -> Result<Vec<UserEvent>, UserError> {
    if let Some(user) = state {
        return Err(UserError::AlreadyExists(user.id));
    }
    Ok(vec![UserEvent::Registered(UserRegistered {
        metadata: metadata(command.user_id, 1, ctx, UserRegistered::SCHEMA_VERSION),
        name: command.name,
        email: command.email,
        password_hash: command.password_hash,
        role: Role::Reader,
    })])
}

/// Folds one event into the state.
pub fn apply(state: Option<User>, event: &UserEvent) -> Option<User> {
    match event {
        UserEvent::Registered(e) => Some(User {
            id: e.metadata.aggregate_id,
            name: e.name.clone(),
            email: e.email.clone(),
            role: e.role,
            version: e.metadata.aggregate_version,
            created_at: e.metadata.occurred_at(),
        }),
    }
    .or(state)
}

fn metadata(aggregate_id: Uuid, version: i64, ctx: &Context, schema_version: i32) -> EventMetadata {
    EventMetadata {
        event_id: Uuid::now_v7(),
        aggregate_id,
        aggregate_version: version,
        occurred_at: newsroom_events::metadata::micros(ctx.now),
        correlation_id: ctx.correlation_id.clone(),
        causation_id: ctx.command_id.clone(),
        actor_id: ctx.actor_id,
        schema_version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            now: Utc::now(),
            correlation_id: "req-1".into(),
            command_id: "cmd-1".into(),
            actor_id: None,
        }
    }

    fn command(id: Uuid) -> RegisterUser {
        RegisterUser {
            user_id: id,
            name: "Ada".into(),
            email: "ada@example.com".into(),
            password_hash: "$argon2id$...".into(),
        }
    }

    #[test]
    fn given_no_user_when_registering_then_a_reader_is_registered_at_version_1() {
        let id = Uuid::now_v7();
        let events = register(None, command(id), &ctx()).expect("accepted");
        let [UserEvent::Registered(e)] = events.as_slice() else {
            panic!("expected exactly one UserRegistered, got {events:?}");
        };
        assert_eq!(e.metadata.aggregate_id, id);
        assert_eq!(e.metadata.aggregate_version, 1);
        assert_eq!(e.metadata.correlation_id, "req-1");
        assert_eq!(e.metadata.causation_id, "cmd-1");
        assert_eq!(e.role, Role::Reader);
        assert_eq!(
            (e.name.as_str(), e.email.as_str()),
            ("Ada", "ada@example.com")
        );
    }

    #[test]
    fn given_a_registered_user_when_registering_again_then_it_is_refused() {
        let id = Uuid::now_v7();
        let events = register(None, command(id), &ctx()).expect("accepted");
        let state = events.iter().fold(None, apply);
        assert_eq!(state.as_ref().map(|u| u.version), Some(1));
        assert_eq!(
            register(state.as_ref(), command(id), &ctx())
                .expect_err("a second registration is refused"),
            UserError::AlreadyExists(id)
        );
    }
}
