//! The `cache` read model in Redis: articles, authors' names, read counters and hourly
//! trending buckets, fed from the users, news and reads streams.
//!
//! Keys under the version's prefix (see [`crate::redis_store`]): `news:<id>` (hash of the
//! article's fields, `version`, and `author_name`, a copy of the author's name so that an
//! article is read with one HGETALL), `name:<user>` (hash `name`, `version`),
//! `authored:<user>` (set of the user's `news:<id>` keys, to copy a new name into),
//! `reads:<news>` (counter) and `trending:<hour>` (sorted set of news ids by reads in the
//! hour starting at that Unix time, expiring 25 hours after it); published articles are
//! listed in the indexes of `read_models::index` (`published`, `by:cat:`, `by:tag:`,
//! `by:author:`), which the query API's lists read.

use newsroom_events::news::NewsEvent;
use newsroom_events::reads::ReadEvent;
use newsroom_events::users::UserEvent;
use newsroom_infra::codec::Decoded;
use newsroom_infra::read_models::{self as rm, field};
use newsroom_infra::views::DELETED_AUTHOR;
use sqlx::PgPool;

use crate::redis_store::{Join, Model, Writes};

/// The consumer's name.
pub const NAME: &str = "cache";

/// The model; `pool` holds the users' keys (authors' names are encrypted in the log).
pub struct Cache {
    /// Users' keys.
    pub pool: PgPool,
    /// The users, news and reads topics.
    pub topics: Vec<String>,
}

impl Model for Cache {
    fn name(&self) -> &'static str {
        NAME
    }

    fn topics(&self) -> Vec<String> {
        self.topics.clone()
    }

    fn announces(&self) -> bool {
        true
    }

    fn layout(&self) -> u32 {
        rm::cache::LAYOUT
    }

    async fn writes(&self, event: Decoded, out: &mut Writes) -> anyhow::Result<()> {
        if event.name.starts_with("newsroom.news.") {
            let event = NewsEvent::from_avro(&event.name, event.value)?;
            let meta = event.metadata().clone();
            let (version, id) = (meta.aggregate_version, meta.aggregate_id.to_string());
            let key = rm::key(rm::cache::ARTICLE, &id);
            let at = meta.occurred_at.to_string();
            let is_archived = matches!(event, NewsEvent::Archived(_));
            match event {
                NewsEvent::Drafted(e) => {
                    let author = e.author_id;
                    let (name, authored) = (
                        rm::key(rm::cache::AUTHOR_NAME, author),
                        rm::key(rm::cache::AUTHORED, author),
                    );
                    out.create_joined(
                        &key,
                        version,
                        &[
                            (field::ID, id.clone()),
                            (field::CATEGORY, e.category.as_str().to_owned()),
                            (field::TITLE, e.title),
                            (field::CONTENT, e.content),
                            (field::TAGS, serde_json::to_string(&e.tags)?),
                            (field::AUTHOR, author.to_string()),
                            (field::STATUS, "draft".to_owned()),
                            (field::CREATED, at.clone()),
                            (field::UPDATED, at),
                            (field::PUBLISHED, String::new()),
                        ],
                        &Join {
                            field: field::AUTHOR_NAME,
                            from: &name,
                            from_field: field::NAME,
                            members: &authored,
                        },
                    );
                }
                NewsEvent::Edited(e) => {
                    let mut fields = vec![(field::UPDATED, at)];
                    if let Some(c) = e.category {
                        fields.push((field::CATEGORY, c.as_str().to_owned()));
                    }
                    if let Some(t) = e.title {
                        fields.push((field::TITLE, t));
                    }
                    if let Some(c) = e.content {
                        fields.push((field::CONTENT, c));
                    }
                    if let Some(t) = e.tags {
                        fields.push((field::TAGS, serde_json::to_string(&t)?));
                    }
                    out.edit_listed(&key, &id, version, &fields);
                }
                NewsEvent::Published(e) => {
                    out.hash(
                        &key,
                        version,
                        false,
                        &[
                            (field::STATUS, "published".to_owned()),
                            (field::PUBLISHED, e.published_at.to_string()),
                            (field::UPDATED, at),
                        ],
                    );
                    out.list(&key, &id, e.published_at);
                }
                NewsEvent::Unpublished(_) => {
                    out.hash(
                        &key,
                        version,
                        false,
                        &[
                            (field::STATUS, "draft".to_owned()),
                            (field::PUBLISHED, String::new()),
                            (field::UPDATED, at),
                        ],
                    );
                    out.withdraw(&key, &id);
                }
                NewsEvent::Archived(_) | NewsEvent::Deleted(_) => {
                    let status = if is_archived { "archived" } else { "deleted" };
                    out.hash(
                        &key,
                        version,
                        false,
                        &[(field::STATUS, status.to_owned()), (field::UPDATED, at)],
                    );
                    out.withdraw(&key, &id);
                }
            }
        } else if event.name.starts_with("newsroom.users.") {
            let event = UserEvent::from_avro(&event.name, event.value)?;
            let meta = event.metadata().clone();
            let (id, version) = (meta.aggregate_id, meta.aggregate_version);
            let open = |blob| crate::users::open(&self.pool, id, blob);
            let (name, create) = match &event {
                UserEvent::Registered(e) => (open(&e.personal).await?.name, true),
                UserEvent::Updated(e) => match &e.personal {
                    Some(blob) => (open(blob).await?.name, false),
                    None => (None, false),
                },
                UserEvent::Erased(_) => (Some(DELETED_AUTHOR.to_owned()), false),
                _ => (None, false),
            };
            if create || name.is_some() {
                let name_key = rm::key(rm::cache::AUTHOR_NAME, id);
                out.hash(
                    &name_key,
                    version,
                    create,
                    &[(field::NAME, name.unwrap_or_default())],
                );
                out.propagate(
                    &name_key,
                    field::NAME,
                    field::AUTHOR_NAME,
                    &rm::key(rm::cache::AUTHORED, id),
                );
            }
        } else {
            let ReadEvent::Read(read) = ReadEvent::from_avro(&event.name, event.value)?;
            let hour = read.metadata.occurred_at.div_euclid(3_600_000_000) * 3600;
            let news = read.news_id.to_string();
            out.incr(&rm::key(rm::cache::READS, &news));
            out.count_until(&rm::key(rm::cache::TRENDING, hour), &news, hour + 25 * 3600);
        }
        Ok(())
    }
}
