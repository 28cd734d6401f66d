//! Given/when/then tests of the News aggregate: every command and every rejection.

use chrono::Utc;
use newsroom_events::Category;
use newsroom_events::users::Role;
use uuid::Uuid;

use super::*;
use crate::domain::{Actor, DomainError, Stamp};

struct Given {
    id: Uuid,
    author: Actor,
    state: Option<News>,
}

fn author() -> Actor {
    Actor {
        id: Uuid::now_v7(),
        role: Role::Editor,
    }
}

fn given(author: Actor, changes: &[NewsChange]) -> Given {
    let id = Uuid::now_v7();
    let state = changes.iter().enumerate().fold(None, |state, (i, change)| {
        apply(
            state,
            change,
            Stamp {
                id,
                version: i as i64 + 1,
                at: Utc::now(),
            },
        )
    });
    Given { id, author, state }
}

fn drafted(author: &Actor) -> NewsChange {
    NewsChange::Drafted {
        author_id: author.id,
        category: Category::Sports,
        title: "Derby".into(),
        content: "A match.".into(),
        tags: vec!["football".into()],
    }
}

impl Given {
    fn when(&self, command: NewsCommand) -> Result<NewsChange, DomainError> {
        handle(self.state.as_ref(), command)
    }
    fn news(&self) -> &News {
        self.state.as_ref().expect("exists")
    }
}

fn published() -> NewsChange {
    NewsChange::Published { at: Utc::now() }
}

#[test]
fn editors_and_admins_draft_readers_may_not() {
    let g = given(author(), &[]);
    let draft = |actor| NewsCommand::Draft {
        actor,
        category: Category::Sports,
        title: "Derby".into(),
        content: "A match.".into(),
        tags: vec!["football".into()],
    };
    assert_eq!(g.when(draft(g.author)), Ok(drafted(&g.author)));
    assert!(
        g.when(draft(Actor {
            id: Uuid::now_v7(),
            role: Role::Admin
        }))
        .is_ok()
    );
    assert_eq!(
        g.when(draft(Actor {
            id: Uuid::now_v7(),
            role: Role::Reader
        })),
        Err(DomainError::Forbidden)
    );
}

#[test]
fn a_draft_starts_at_version_1_unpublished() {
    let a = author();
    let g = given(a, &[drafted(&a)]);
    assert_eq!(
        (g.news().status, g.news().version, g.news().published_at),
        (Status::Draft, 1, None)
    );
    assert_eq!(g.news().id, g.id);
}

#[test]
fn the_author_publishes_a_draft_and_it_gets_a_publication_time() {
    let a = author();
    let g = given(a, &[drafted(&a), published()]);
    assert_eq!(g.news().status, Status::Published);
    assert!(g.news().published_at.is_some());
    assert_eq!(g.news().version, 2);
}

#[test]
fn lifecycle_transitions_follow_the_status_graph() {
    let a = author();
    let actor = a;
    let publish = || NewsCommand::Publish {
        actor,
        expected_version: None,
        at: Utc::now(),
    };
    let unpublish = || NewsCommand::Unpublish {
        actor,
        expected_version: None,
    };
    let archive = || NewsCommand::Archive {
        actor,
        expected_version: None,
    };

    let draft = given(a, &[drafted(&a)]);
    assert!(draft.when(publish()).is_ok());
    assert_eq!(
        draft.when(unpublish()),
        Err(DomainError::InvalidTransition {
            action: "unpublish".into(),
            status: "draft".into()
        })
    );
    assert_eq!(
        draft.when(archive()),
        Err(DomainError::InvalidTransition {
            action: "archive".into(),
            status: "draft".into()
        })
    );

    let live = given(a, &[drafted(&a), published()]);
    assert_eq!(
        live.when(publish()),
        Err(DomainError::InvalidTransition {
            action: "publish".into(),
            status: "published".into()
        })
    );
    assert_eq!(live.when(unpublish()), Ok(NewsChange::Unpublished));
    assert_eq!(live.when(archive()), Ok(NewsChange::Archived));

    let archived = given(a, &[drafted(&a), published(), NewsChange::Archived]);
    assert_eq!(
        archived.when(publish()),
        Err(DomainError::InvalidTransition {
            action: "publish".into(),
            status: "archived".into()
        })
    );
    assert_eq!(
        archived.when(unpublish()),
        Err(DomainError::InvalidTransition {
            action: "unpublish".into(),
            status: "archived".into()
        })
    );
    let edit = NewsCommand::Edit {
        actor,
        expected_version: None,
        edit: Edit::default(),
    };
    assert_eq!(
        archived.when(edit),
        Err(DomainError::InvalidTransition {
            action: "edit".into(),
            status: "archived".into()
        })
    );
}

#[test]
fn unpublishing_returns_to_draft_and_clears_the_publication_time() {
    let a = author();
    let g = given(a, &[drafted(&a), published(), NewsChange::Unpublished]);
    assert_eq!(
        (g.news().status, g.news().published_at),
        (Status::Draft, None)
    );
}

#[test]
fn edits_change_only_the_given_fields() {
    let a = author();
    let g = given(a, &[drafted(&a)]);
    let edit = Edit {
        title: Some("Derby day".into()),
        ..Edit::default()
    };
    let change = g.when(NewsCommand::Edit {
        actor: a,
        expected_version: Some(1),
        edit: edit.clone(),
    });
    assert_eq!(change, Ok(NewsChange::Edited(edit)));
    let news = apply(
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
        (news.title.as_str(), news.content.as_str(), news.category),
        ("Derby day", "A match.", Category::Sports)
    );
}

#[test]
fn a_stale_if_match_is_a_version_mismatch_for_every_command() {
    let a = author();
    let g = given(a, &[drafted(&a), published()]);
    let mismatch = Err(DomainError::VersionMismatch {
        expected: 1,
        actual: 2,
    });
    assert_eq!(
        g.when(NewsCommand::Edit {
            actor: a,
            expected_version: Some(1),
            edit: Edit::default()
        }),
        mismatch
    );
    assert_eq!(
        g.when(NewsCommand::Unpublish {
            actor: a,
            expected_version: Some(1)
        }),
        mismatch
    );
    assert_eq!(
        g.when(NewsCommand::Archive {
            actor: a,
            expected_version: Some(1)
        }),
        mismatch
    );
    assert_eq!(
        g.when(NewsCommand::Delete {
            actor: a,
            expected_version: Some(1)
        }),
        mismatch
    );
    assert!(
        g.when(NewsCommand::Delete {
            actor: a,
            expected_version: Some(2)
        })
        .is_ok()
    );
}

#[test]
fn another_editor_sees_no_draft_and_may_not_touch_a_published_article() {
    let a = author();
    let stranger = author();
    let delete = NewsCommand::Delete {
        actor: stranger,
        expected_version: None,
    };
    assert_eq!(
        given(a, &[drafted(&a)]).when(delete.clone()),
        Err(DomainError::NotFound)
    );
    assert_eq!(
        given(a, &[drafted(&a), published()]).when(delete.clone()),
        Err(DomainError::Forbidden)
    );
    assert_eq!(
        given(a, &[drafted(&a), published(), NewsChange::Archived]).when(delete),
        Err(DomainError::NotFound)
    );
}

#[test]
fn an_admin_manages_anyones_article() {
    let a = author();
    let admin = Actor {
        id: Uuid::now_v7(),
        role: Role::Admin,
    };
    let g = given(a, &[drafted(&a)]);
    assert!(
        g.when(NewsCommand::Publish {
            actor: admin,
            expected_version: None,
            at: Utc::now()
        })
        .is_ok()
    );
    assert_eq!(
        g.when(NewsCommand::Delete {
            actor: admin,
            expected_version: None
        }),
        Ok(NewsChange::Deleted)
    );
}

#[test]
fn a_deleted_or_unknown_article_is_not_found() {
    let a = author();
    let deleted = given(a, &[drafted(&a), NewsChange::Deleted]);
    assert!(deleted.news().deleted);
    assert_eq!(
        deleted.when(NewsCommand::Delete {
            actor: a,
            expected_version: None
        }),
        Err(DomainError::NotFound)
    );
    let unknown = given(a, &[]);
    assert_eq!(
        unknown.when(NewsCommand::Publish {
            actor: a,
            expected_version: None,
            at: Utc::now()
        }),
        Err(DomainError::NotFound)
    );
}
