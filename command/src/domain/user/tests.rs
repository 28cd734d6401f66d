//! Given/when/then tests of the User aggregate: every command and every rejection.

use chrono::Utc;
use newsroom_events::Category;
use newsroom_events::users::Role;
use uuid::Uuid;

use super::*;
use crate::domain::{Actor, DomainError, Stamp};

struct Given {
    id: Uuid,
    state: Option<User>,
}

fn given(changes: &[UserChange]) -> Given {
    let id = Uuid::now_v7();
    let state = changes.iter().enumerate().fold(None, |state, (i, change)| {
        let stamp = Stamp {
            id,
            version: i as i64 + 1,
            at: Utc::now(),
        };
        apply(state, change, stamp)
    });
    Given { id, state }
}

impl Given {
    fn when(&self, command: UserCommand) -> Result<UserChange, DomainError> {
        handle(self.id, self.state.as_ref(), command)
    }
    fn me(&self) -> Actor {
        Actor {
            id: self.id,
            role: Role::Reader,
        }
    }
}

fn registered() -> UserChange {
    UserChange::Registered {
        name: "Ada".into(),
        email: "ada@example.com".into(),
        email_claim: "claim-ada".into(),
        password_hash: "hash-1".into(),
        role: Role::Reader,
    }
}

fn other(role: Role) -> Actor {
    Actor {
        id: Uuid::now_v7(),
        role,
    }
}

fn register_command() -> UserCommand {
    let UserChange::Registered {
        name,
        email,
        email_claim,
        password_hash,
        role,
    } = registered()
    else {
        unreachable!()
    };
    UserCommand::Register {
        name,
        email,
        email_claim,
        password_hash,
        role,
    }
}

#[test]
fn given_nothing_when_registering_then_the_user_is_registered() {
    let g = given(&[]);
    assert_eq!(g.when(register_command()), Ok(registered()));
}

#[test]
fn given_a_user_when_registering_the_same_id_then_it_already_exists() {
    let g = given(&[registered()]);
    assert_eq!(g.when(register_command()), Err(DomainError::AlreadyExists));
}

#[test]
fn registration_starts_at_version_1_as_a_reader_without_followed_categories() {
    let g = given(&[registered()]);
    let user = g.state.expect("registered");
    assert_eq!(
        (user.version, user.role, user.email_notifications),
        (1, Role::Reader, false)
    );
    assert!(user.followed_categories.is_empty());
}

#[test]
fn given_a_user_when_they_update_their_profile_then_it_changes_and_the_version_grows() {
    let g = given(&[registered()]);
    let profile = Profile {
        name: Some("Ada L.".into()),
        email: Some(("ada@new.example".into(), "claim-new".into())),
        followed_categories: Some(vec![Category::Politics]),
        email_notifications: Some(true),
    };
    let change = g.when(UserCommand::Update {
        actor: g.me(),
        expected_version: Some(1),
        profile: profile.clone(),
    });
    assert_eq!(change, Ok(UserChange::Updated(profile)));
    let user = apply(
        g.state.clone(),
        &change.expect("accepted"),
        Stamp {
            id: g.id,
            version: 2,
            at: Utc::now(),
        },
    )
    .expect("exists");
    assert_eq!(
        (user.name.as_str(), user.email.as_str(), user.version),
        ("Ada L.", "ada@new.example", 2)
    );
    assert_eq!(user.followed_categories, vec![Category::Politics]);
    assert!(user.email_notifications);
}

#[test]
fn an_admin_may_update_any_user_another_reader_may_not() {
    let g = given(&[registered()]);
    let update = |actor| UserCommand::Update {
        actor,
        expected_version: None,
        profile: Profile::default(),
    };
    assert!(g.when(update(other(Role::Admin))).is_ok());
    assert_eq!(
        g.when(update(other(Role::Reader))),
        Err(DomainError::Forbidden)
    );
    assert_eq!(
        g.when(update(other(Role::Editor))),
        Err(DomainError::Forbidden)
    );
}

#[test]
fn a_stale_if_match_is_a_version_mismatch() {
    let g = given(&[registered(), UserChange::RoleChanged { role: Role::Editor }]);
    let result = g.when(UserCommand::Update {
        actor: g.me(),
        expected_version: Some(1),
        profile: Profile::default(),
    });
    assert_eq!(
        result,
        Err(DomainError::VersionMismatch {
            expected: 1,
            actual: 2
        })
    );
}

#[test]
fn password_changes_only_for_oneself_and_only_from_the_current_hash() {
    let g = given(&[registered()]);
    let change = |actor, verified: &str| UserCommand::ChangePassword {
        actor,
        expected_version: None,
        verified_hash: verified.into(),
        new_hash: "hash-2".into(),
    };
    assert_eq!(
        g.when(change(g.me(), "hash-1")),
        Ok(UserChange::PasswordChanged {
            password_hash: "hash-2".into()
        })
    );
    assert_eq!(
        g.when(change(g.me(), "hash-0")),
        Err(DomainError::StalePassword)
    );
    assert_eq!(
        g.when(change(other(Role::Admin), "hash-1")),
        Err(DomainError::Forbidden)
    );
}

#[test]
fn only_admins_change_roles() {
    let g = given(&[registered()]);
    let change = |actor| UserCommand::ChangeRole {
        actor,
        expected_version: None,
        role: Role::Editor,
    };
    assert_eq!(
        g.when(change(other(Role::Admin))),
        Ok(UserChange::RoleChanged { role: Role::Editor })
    );
    assert_eq!(g.when(change(g.me())), Err(DomainError::Forbidden));
}

#[test]
fn erasure_clears_personal_data_and_hides_the_user() {
    let g = given(&[registered(), UserChange::Erased]);
    let user = g.state.clone().expect("kept as a tombstone");
    assert!(
        user.erased
            && user.name.is_empty()
            && user.email.is_empty()
            && user.password_hash.is_empty()
    );
    let again = g.when(UserCommand::Erase {
        actor: g.me(),
        expected_version: None,
    });
    assert_eq!(again, Err(DomainError::NotFound));
    let update = g.when(UserCommand::Update {
        actor: other(Role::Admin),
        expected_version: None,
        profile: Profile::default(),
    });
    assert_eq!(update, Err(DomainError::NotFound));
}

#[test]
fn self_or_admin_may_erase_others_may_not() {
    let g = given(&[registered()]);
    assert_eq!(
        g.when(UserCommand::Erase {
            actor: g.me(),
            expected_version: Some(1)
        }),
        Ok(UserChange::Erased)
    );
    assert_eq!(
        g.when(UserCommand::Erase {
            actor: other(Role::Admin),
            expected_version: None
        }),
        Ok(UserChange::Erased)
    );
    assert_eq!(
        g.when(UserCommand::Erase {
            actor: other(Role::Editor),
            expected_version: None
        }),
        Err(DomainError::Forbidden)
    );
}

#[test]
fn notifications_are_marked_read_by_their_owner_only() {
    let g = given(&[registered()]);
    let at = Utc::now();
    assert_eq!(
        g.when(UserCommand::MarkNotificationsRead { actor: g.me(), at }),
        Ok(UserChange::NotificationsRead { at })
    );
    assert_eq!(
        g.when(UserCommand::MarkNotificationsRead {
            actor: other(Role::Admin),
            at
        }),
        Err(DomainError::Forbidden)
    );
}

#[test]
fn commands_on_an_unknown_user_are_not_found_for_those_allowed_to_ask() {
    let g = given(&[]);
    assert_eq!(
        g.when(UserCommand::Erase {
            actor: g.me(),
            expected_version: None
        }),
        Err(DomainError::NotFound)
    );
    assert_eq!(
        g.when(UserCommand::Erase {
            actor: other(Role::Reader),
            expected_version: None
        }),
        Err(DomainError::Forbidden)
    );
}
