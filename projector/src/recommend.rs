//! The recommender's read model in Redis: each user's affinity to tags and categories from
//! what they read, with exponential time decay, the set of articles they read, and the
//! published articles with their tags. The query API ranks a user's unread published
//! articles by affinity when asked (ADR 10).
//!
//! Keys under the version's prefix (see [`crate::redis_store`]): `aff:<user>` (hash
//! `tag:<tag>` / `cat:<category>` → Σ of [`weight`]s: 2^((read time − epoch) / half-life): a read
//! counts twice as much as one a half-life older; scaling by 2^(−(now − epoch) / half-life)
//! gives today's decayed weight), `read:<user>` (set of news ids; both deleted when the
//! user is erased, whose id then stays in `erased`), `art:<news>` (hash
//! `category`, `tags` as JSON, `version`, `_listed` while published), and the published
//! articles by publication time (microseconds) in `published` and per category and tag in
//! `by:cat:<category>` and `by:tag:<tag>` — so a ranking reads only the articles that
//! match the user's affinities.

use std::time::Duration;

use newsroom_events::Event;
use newsroom_events::affinity::weight;
use newsroom_events::news::NewsEvent;
use newsroom_events::reads::ReadEvent;
use newsroom_events::users::{UserErased, UserEvent};
use newsroom_infra::codec::Decoded;
use newsroom_infra::read_models::{self as rm, field};

use crate::redis_store::{Model, Writes};

/// The consumer's name.
pub const NAME: &str = "recommend";

/// The recommender model.
pub struct Recommender {
    /// How long until a read counts half as much.
    pub half_life: Duration,
    /// The news, reads and users topics.
    pub topics: Vec<String>,
}

impl Model for Recommender {
    fn name(&self) -> &'static str {
        NAME
    }

    fn topics(&self) -> Vec<String> {
        self.topics.clone()
    }

    async fn writes(&self, event: Decoded, out: &mut Writes) -> anyhow::Result<()> {
        if event.name.starts_with("newsroom.news.") {
            let event = NewsEvent::from_avro(&event.name, event.value)?;
            let meta = event.metadata().clone();
            let (id, version) = (meta.aggregate_id.to_string(), meta.aggregate_version);
            let key = rm::key(rm::recommend::ARTICLE, &id);
            match event {
                NewsEvent::Drafted(e) => out.hash(
                    &key,
                    version,
                    true,
                    &[
                        (field::CATEGORY, e.category.as_str().to_owned()),
                        (field::TAGS, serde_json::to_string(&e.tags)?),
                    ],
                ),
                NewsEvent::Edited(e) => {
                    let mut fields = Vec::new();
                    if let Some(c) = e.category {
                        fields.push((field::CATEGORY, c.as_str().to_owned()));
                    }
                    if let Some(t) = e.tags {
                        fields.push((field::TAGS, serde_json::to_string(&t)?));
                    }
                    out.edit_listed(&key, &id, version, &fields);
                }
                NewsEvent::Published(e) => out.list(&key, &id, e.published_at),
                NewsEvent::Unpublished(_) | NewsEvent::Archived(_) | NewsEvent::Deleted(_) => {
                    out.withdraw(&key, &id);
                }
            }
        } else if event.name.starts_with("newsroom.users.") {
            // An erased user's reading history goes with them. Only erasures are decoded: a
            // user event this build does not know parks nothing (it would hold the user's
            // erasure behind it).
            if event.name != <UserErased as Event>::FULL_NAME {
                return Ok(());
            }
            if let UserEvent::Erased(erased) = UserEvent::from_avro(&event.name, event.value)? {
                let user = erased.metadata.aggregate_id;
                out.add_and_delete(
                    rm::recommend::ERASED,
                    &user.to_string(),
                    &[
                        rm::key(rm::recommend::AFFINITIES, user),
                        rm::key(rm::recommend::USER_READS, user),
                    ],
                );
            }
        } else if event.name.starts_with("newsroom.reads.") {
            let ReadEvent::Read(read) = ReadEvent::from_avro(&event.name, event.value)?;
            let user = read.metadata.aggregate_id;
            // Nothing of a user erased before this read was applied (a replay).
            let affinities = match (&read.category, &read.tags) {
                (Some(_), Some(tags)) => 1 + tags.len(),
                _ => 0,
            };
            out.unless_member(rm::recommend::ERASED, &user.to_string(), 1 + affinities);
            out.set_add(
                &rm::key(rm::recommend::USER_READS, user),
                &read.news_id.to_string(),
            );
            // Reads recorded before schema version 2 do not say what was read.
            if let (Some(category), Some(tags)) = (read.category, read.tags) {
                let w = weight(read.metadata.occurred_at, self.half_life);
                let key = rm::key(rm::recommend::AFFINITIES, user);
                out.add_float(
                    &key,
                    &format!("{}{}", rm::recommend::CATEGORY, category.as_str()),
                    w,
                );
                for tag in tags {
                    out.add_float(&key, &format!("{}{tag}", rm::recommend::TAG), w);
                }
            }
        }
        Ok(())
    }
}
