//! How each aggregate meets the log: the generic [`Aggregate`] the partition writers run,
//! and the mapping between domain changes and wire events (personal data sealed with the
//! user's key on the way out, opened on the way in).

use anyhow::{Context as _, anyhow};
use apache_avro::types::Value;
use newsroom_events::news::{
    NewsArchived, NewsDeleted, NewsDrafted, NewsEdited, NewsEvent, NewsPublished, NewsUnpublished,
};
use newsroom_events::personal::{self, Personal};
use newsroom_events::users::{
    UserErased, UserEvent, UserNotificationsRead, UserPasswordChanged, UserRegistered,
    UserRoleChanged, UserUpdated,
};
use newsroom_events::{EventMetadata, metadata::micros};
use newsroom_infra::kafka::Stream;
use uuid::Uuid;

use crate::domain::news::{self, News, NewsChange, NewsCommand};
use crate::domain::user::{self, Profile, User, UserChange, UserCommand};
use crate::domain::{DomainError, Stamp};
use crate::keys::Keys;

/// An aggregate type as the partition writers see it.
pub trait Aggregate: Send + Sync + 'static {
    /// Its state (serializable for snapshots).
    type State: Clone + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static;
    /// Its commands.
    type Command: Send + 'static;
    /// The change an accepted command makes.
    type Change: Clone + Send + Sync + 'static;
    /// The stream its events go to.
    const STREAM: Stream;

    /// Decides (pure).
    fn handle(
        id: Uuid,
        state: Option<&Self::State>,
        command: Self::Command,
    ) -> Result<Self::Change, DomainError>;
    /// Folds (pure).
    fn apply(
        state: Option<Self::State>,
        change: &Self::Change,
        stamp: Stamp,
    ) -> Option<Self::State>;
    /// The version of a state.
    fn version(state: &Self::State) -> i64;
    /// The id of a state's aggregate.
    fn id(state: &Self::State) -> Uuid;
    /// Whether a state holds personal data (sealed with the user's key wherever it is
    /// kept outside the writer).
    fn personal(_state: &Self::State) -> bool {
        false
    }
    /// Whether a change must be followed by a fresh snapshot at once (erasure: no
    /// snapshot may keep personal data of an erased user).
    fn forces_snapshot(_change: &Self::Change) -> bool {
        false
    }
    /// The wire event of a change, framed with `id_of`'s schema ids.
    fn encode(
        change: &Self::Change,
        metadata: EventMetadata,
        keys: &Keys,
        id_of: &dyn Fn(&str) -> Option<u32>,
    ) -> anyhow::Result<Vec<u8>>;
    /// The change a wire event records, with its metadata.
    fn decode(
        name: &str,
        value: Value,
        keys: &Keys,
    ) -> anyhow::Result<(EventMetadata, Self::Change)>;
}

/// The User aggregate.
pub struct UserAggregate;

/// The News aggregate.
pub struct NewsAggregate;

fn seal(keys: &Keys, user: Uuid, personal: &Personal) -> anyhow::Result<Vec<u8>> {
    let key = keys
        .get(user)
        .with_context(|| format!("no data key for user {user}"))?;
    Ok(personal::seal(&key, user, personal))
}

/// Opens a blob; a destroyed key (erased user) yields empty personal data.
fn open(keys: &Keys, user: Uuid, blob: &[u8]) -> Personal {
    keys.get(user)
        .and_then(|key| personal::open(&key, user, blob).ok())
        .unwrap_or_default()
}

impl Aggregate for UserAggregate {
    type State = User;
    type Command = UserCommand;
    type Change = UserChange;
    const STREAM: Stream = Stream::Users;

    fn personal(state: &User) -> bool {
        !state.erased
    }

    fn handle(
        id: Uuid,
        state: Option<&User>,
        command: UserCommand,
    ) -> Result<UserChange, DomainError> {
        user::handle(id, state, command)
    }

    fn apply(state: Option<User>, change: &UserChange, stamp: Stamp) -> Option<User> {
        user::apply(state, change, stamp)
    }

    fn version(state: &User) -> i64 {
        state.version
    }

    fn id(state: &User) -> Uuid {
        state.id
    }

    fn forces_snapshot(change: &UserChange) -> bool {
        matches!(change, UserChange::Erased)
    }

    fn encode(
        change: &UserChange,
        metadata: EventMetadata,
        keys: &Keys,
        id_of: &dyn Fn(&str) -> Option<u32>,
    ) -> anyhow::Result<Vec<u8>> {
        let id = metadata.aggregate_id;
        let event = match change {
            UserChange::Registered {
                name,
                email,
                email_claim,
                password_hash,
                role,
            } => UserEvent::Registered(UserRegistered {
                personal: seal(
                    keys,
                    id,
                    &Personal {
                        name: Some(name.clone()),
                        email: Some(email.clone()),
                        password_hash: Some(password_hash.clone()),
                    },
                )?,
                metadata,
                email_claim: email_claim.clone(),
                role: *role,
            }),
            UserChange::Updated(profile) => {
                let personal = if profile.name.is_some() || profile.email.is_some() {
                    Some(seal(
                        keys,
                        id,
                        &Personal {
                            name: profile.name.clone(),
                            email: profile.email.as_ref().map(|(e, _)| e.clone()),
                            password_hash: None,
                        },
                    )?)
                } else {
                    None
                };
                UserEvent::Updated(UserUpdated {
                    metadata,
                    personal,
                    email_claim: profile.email.as_ref().map(|(_, c)| c.clone()),
                    followed_categories: profile.followed_categories.clone(),
                    email_notifications: profile.email_notifications,
                })
            }
            UserChange::PasswordChanged { password_hash } => {
                UserEvent::PasswordChanged(UserPasswordChanged {
                    personal: seal(
                        keys,
                        id,
                        &Personal {
                            password_hash: Some(password_hash.clone()),
                            ..Personal::default()
                        },
                    )?,
                    metadata,
                })
            }
            UserChange::RoleChanged { role } => UserEvent::RoleChanged(UserRoleChanged {
                metadata,
                role: *role,
            }),
            UserChange::Erased => UserEvent::Erased(UserErased { metadata }),
            UserChange::NotificationsRead { at } => {
                UserEvent::NotificationsRead(UserNotificationsRead {
                    metadata,
                    read_at: micros(*at),
                })
            }
        };
        Ok(event.with_schema_version().encode(id_of)?)
    }

    fn decode(
        name: &str,
        value: Value,
        keys: &Keys,
    ) -> anyhow::Result<(EventMetadata, UserChange)> {
        let event = UserEvent::from_avro(name, value)?;
        let metadata = event.metadata().clone();
        let id = metadata.aggregate_id;
        let change = match event {
            UserEvent::Registered(e) => {
                let p = open(keys, id, &e.personal);
                UserChange::Registered {
                    name: p.name.unwrap_or_default(),
                    email: p.email.unwrap_or_default(),
                    email_claim: e.email_claim,
                    password_hash: p.password_hash.unwrap_or_default(),
                    role: e.role,
                }
            }
            UserEvent::Updated(e) => {
                let p = e
                    .personal
                    .as_deref()
                    .map(|b| open(keys, id, b))
                    .unwrap_or_default();
                UserChange::Updated(Profile {
                    name: p.name,
                    email: match (p.email, e.email_claim) {
                        (Some(email), Some(claim)) => Some((email, claim)),
                        (None, Some(claim)) => Some((String::new(), claim)),
                        _ => None,
                    },
                    followed_categories: e.followed_categories,
                    email_notifications: e.email_notifications,
                })
            }
            UserEvent::PasswordChanged(e) => UserChange::PasswordChanged {
                password_hash: open(keys, id, &e.personal)
                    .password_hash
                    .unwrap_or_default(),
            },
            UserEvent::RoleChanged(e) => UserChange::RoleChanged { role: e.role },
            UserEvent::Erased(_) => UserChange::Erased,
            UserEvent::NotificationsRead(e) => UserChange::NotificationsRead {
                at: chrono::DateTime::from_timestamp_micros(e.read_at)
                    .ok_or_else(|| anyhow!("bad read_at"))?,
            },
        };
        Ok((metadata, change))
    }
}

impl Aggregate for NewsAggregate {
    type State = News;
    type Command = NewsCommand;
    type Change = NewsChange;
    const STREAM: Stream = Stream::News;

    fn handle(
        _id: Uuid,
        state: Option<&News>,
        command: NewsCommand,
    ) -> Result<NewsChange, DomainError> {
        news::handle(state, command)
    }

    fn apply(state: Option<News>, change: &NewsChange, stamp: Stamp) -> Option<News> {
        news::apply(state, change, stamp)
    }

    fn version(state: &News) -> i64 {
        state.version
    }

    fn id(state: &News) -> Uuid {
        state.id
    }

    fn encode(
        change: &NewsChange,
        metadata: EventMetadata,
        _keys: &Keys,
        id_of: &dyn Fn(&str) -> Option<u32>,
    ) -> anyhow::Result<Vec<u8>> {
        let event = match change {
            NewsChange::Drafted {
                author_id,
                category,
                title,
                content,
                tags,
            } => NewsEvent::Drafted(NewsDrafted {
                metadata,
                author_id: *author_id,
                category: *category,
                title: title.clone(),
                content: content.clone(),
                tags: tags.clone(),
            }),
            NewsChange::Edited(edit) => NewsEvent::Edited(NewsEdited {
                metadata,
                category: edit.category,
                title: edit.title.clone(),
                content: edit.content.clone(),
                tags: edit.tags.clone(),
            }),
            NewsChange::Published { at } => NewsEvent::Published(NewsPublished {
                metadata,
                published_at: micros(*at),
            }),
            NewsChange::Unpublished => NewsEvent::Unpublished(NewsUnpublished { metadata }),
            NewsChange::Archived => NewsEvent::Archived(NewsArchived { metadata }),
            NewsChange::Deleted => NewsEvent::Deleted(NewsDeleted { metadata }),
        };
        Ok(event.with_schema_version().encode(id_of)?)
    }

    fn decode(
        name: &str,
        value: Value,
        _keys: &Keys,
    ) -> anyhow::Result<(EventMetadata, NewsChange)> {
        let event = NewsEvent::from_avro(name, value)?;
        let metadata = event.metadata().clone();
        let change = match event {
            NewsEvent::Drafted(e) => NewsChange::Drafted {
                author_id: e.author_id,
                category: e.category,
                title: e.title,
                content: e.content,
                tags: e.tags,
            },
            NewsEvent::Edited(e) => NewsChange::Edited(news::Edit {
                category: e.category,
                title: e.title,
                content: e.content,
                tags: e.tags,
            }),
            NewsEvent::Published(e) => NewsChange::Published {
                at: chrono::DateTime::from_timestamp_micros(e.published_at)
                    .ok_or_else(|| anyhow!("bad published_at"))?,
            },
            NewsEvent::Unpublished(_) => NewsChange::Unpublished,
            NewsEvent::Archived(_) => NewsChange::Archived,
            NewsEvent::Deleted(_) => NewsChange::Deleted,
        };
        Ok((metadata, change))
    }
}
