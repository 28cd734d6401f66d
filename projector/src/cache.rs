//! The Redis read models: the article cache, authors' names, read counters and hourly
//! trending buckets, fed from the users, news and reads streams.
//!
//! Keys live under `<root>:v<version>:` (root from [`newsroom_infra::redis::root`]):
//! `news:<id>` (hash of the article's fields and `version`), `name:<user>` (hash `name`,
//! `version`), `reads:<news>` (counter), `trending:<hour>` (sorted set of news ids by
//! reads in the hour starting at that Unix time, expiring 25 hours after it) and
//! `offsets` (hash `<topic>:<partition>` → next offset). `<root>:active` names the version
//! the query side serves, `<root>:building` the one a replay builds, and `<root>:switching`
//! (short-lived) holds the live consumer while a replay switches.
//!
//! Each batch is one Lua script: it checks the version and that the stored offsets are
//! the ones this consumer started from, applies every write and moves the offsets, all at
//! once. So redelivery and replay change nothing, and a Redis that lost its data (restart
//! without persistence) is noticed and rebuilt from the log.

use std::sync::LazyLock;

use anyhow::Context as _;
use newsroom_events::news::NewsEvent;
use newsroom_events::reads::ReadEvent;
use newsroom_events::users::UserEvent;
use newsroom_infra::codec::Decoded;
use newsroom_infra::views::DELETED_AUTHOR;
use redis::Script;
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::consumer::{Batch, Committed, Failure, Mode, Offsets, Store};

/// The consumer's name.
pub const NAME: &str = "cache";

static BATCH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("cache_batch.lua")));

/// The Redis read models of one deployment.
pub struct Cache {
    redis: ConnectionManager,
    pool: PgPool,
    root: String,
    topics: Vec<String>,
}

impl Cache {
    /// The cache under `root`, fed from `topics` (users, news, reads); `pool` holds the
    /// users' keys (authors' names are encrypted in the log).
    pub fn new(redis: ConnectionManager, pool: PgPool, root: String, topics: Vec<String>) -> Self {
        Cache {
            redis,
            pool,
            root,
            topics,
        }
    }
}

/// The field under which the offset of a topic's partition is kept.
pub fn offset_field(topic: &str, partition: i32) -> String {
    format!("{topic}:{partition}")
}

/// A hash write guarded by version: `H kind id version create nfields (field value)*`.
fn hash_write(
    out: &mut Vec<String>,
    kind: &str,
    id: uuid::Uuid,
    version: i64,
    create: bool,
    fields: &[(&str, String)],
) {
    out.extend([
        "H".to_owned(),
        kind.to_owned(),
        id.to_string(),
        version.to_string(),
        if create { "1" } else { "0" }.to_owned(),
        fields.len().to_string(),
    ]);
    for (field, value) in fields {
        out.push((*field).to_owned());
        out.push(value.clone());
    }
}

impl Cache {
    /// A connection to Redis.
    pub fn redis(&self) -> ConnectionManager {
        self.redis.clone()
    }

    /// The root of the keys.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The script arguments for one event.
    async fn writes(&self, event: Decoded, out: &mut Vec<String>) -> Result<(), anyhow::Error> {
        if event.name.starts_with("newsroom.news.") {
            let event = NewsEvent::from_avro(&event.name, event.value)?;
            let meta = event.metadata().clone();
            let (id, version) = (meta.aggregate_id, meta.aggregate_version);
            let at = meta.occurred_at.to_string();
            match event {
                NewsEvent::Drafted(e) => hash_write(
                    out,
                    "news",
                    id,
                    version,
                    true,
                    &[
                        ("id", id.to_string()),
                        ("category", e.category.as_str().to_owned()),
                        ("title", e.title),
                        ("content", e.content),
                        ("tags", serde_json::to_string(&e.tags)?),
                        ("author", e.author_id.to_string()),
                        ("status", "draft".to_owned()),
                        ("created", at.clone()),
                        ("updated", at),
                        ("published", String::new()),
                    ],
                ),
                NewsEvent::Edited(e) => {
                    let mut fields = vec![("updated", at)];
                    if let Some(c) = e.category {
                        fields.push(("category", c.as_str().to_owned()));
                    }
                    if let Some(t) = e.title {
                        fields.push(("title", t));
                    }
                    if let Some(c) = e.content {
                        fields.push(("content", c));
                    }
                    if let Some(t) = e.tags {
                        fields.push(("tags", serde_json::to_string(&t)?));
                    }
                    hash_write(out, "news", id, version, false, &fields);
                }
                NewsEvent::Published(e) => hash_write(
                    out,
                    "news",
                    id,
                    version,
                    false,
                    &[
                        ("status", "published".to_owned()),
                        ("published", e.published_at.to_string()),
                        ("updated", at),
                    ],
                ),
                NewsEvent::Unpublished(_) => hash_write(
                    out,
                    "news",
                    id,
                    version,
                    false,
                    &[
                        ("status", "draft".to_owned()),
                        ("published", String::new()),
                        ("updated", at),
                    ],
                ),
                NewsEvent::Archived(_) => hash_write(
                    out,
                    "news",
                    id,
                    version,
                    false,
                    &[("status", "archived".to_owned()), ("updated", at)],
                ),
                NewsEvent::Deleted(_) => hash_write(
                    out,
                    "news",
                    id,
                    version,
                    false,
                    &[("status", "deleted".to_owned()), ("updated", at)],
                ),
            }
        } else if event.name.starts_with("newsroom.users.") {
            let event = UserEvent::from_avro(&event.name, event.value)?;
            let meta = event.metadata().clone();
            let (id, version) = (meta.aggregate_id, meta.aggregate_version);
            let (name, create) = match &event {
                UserEvent::Registered(e) => (
                    crate::users::open(&self.pool, id, &e.personal).await?.name,
                    true,
                ),
                UserEvent::Updated(e) => match &e.personal {
                    Some(blob) => (crate::users::open(&self.pool, id, blob).await?.name, false),
                    None => (None, false),
                },
                UserEvent::Erased(_) => (Some(DELETED_AUTHOR.to_owned()), false),
                _ => (None, false),
            };
            if create || name.is_some() {
                hash_write(
                    out,
                    "name",
                    id,
                    version,
                    create,
                    &[("name", name.unwrap_or_default())],
                );
            }
        } else {
            let ReadEvent::Read(read) = ReadEvent::from_avro(&event.name, event.value)?;
            let hour = read.metadata.occurred_at.div_euclid(3_600_000_000) * 3600;
            out.extend(["R".to_owned(), read.news_id.to_string(), hour.to_string()]);
        }
        Ok(())
    }
}

impl Store for Cache {
    fn name(&self) -> &'static str {
        NAME
    }

    fn topics(&self) -> Vec<String> {
        self.topics.clone()
    }

    async fn open(&self, mode: Mode) -> anyhow::Result<(i32, Offsets)> {
        let mut redis = self.redis.clone();
        let version: i32 = match mode {
            // Until a first consumer has caught up, no version is active (the query side
            // answers from PostgreSQL meanwhile); version 1 is the one it builds.
            Mode::Live => redis::cmd("GET")
                .arg(format!("{}:active", self.root))
                .query_async::<Option<i32>>(&mut redis)
                .await
                .context("reading the active cache version")?
                .unwrap_or(1),
            Mode::Replay(v) => {
                let building: Option<i32> = redis::cmd("GET")
                    .arg(format!("{}:building", self.root))
                    .query_async(&mut redis)
                    .await
                    .context("reading the cache version being built")?;
                anyhow::ensure!(
                    building == Some(v),
                    "cache version {v} is no longer being built"
                );
                v
            }
        };
        let stored: Vec<(String, i64)> = redis::cmd("HGETALL")
            .arg(format!("{}:v{version}:offsets", self.root))
            .query_async(&mut redis)
            .await
            .context("reading the cache offsets")?;
        let mut offsets = Offsets::new();
        for (field, next) in stored {
            if let Some((topic, partition)) = field.rsplit_once(':')
                && let Ok(partition) = partition.parse()
            {
                offsets.insert((topic.to_owned(), partition), next);
            }
        }
        Ok((version, offsets))
    }

    async fn commit(
        &self,
        mode: Mode,
        version: i32,
        batch: Batch<'_>,
    ) -> Result<Committed, Failure> {
        let Batch {
            events,
            from,
            to,
            caught_up,
        } = batch;
        let mut writes = Vec::new();
        for (index, event) in events.into_iter().enumerate() {
            if let Err(error) = self.writes(event, &mut writes).await {
                return Err(match error.downcast_ref::<sqlx::Error>() {
                    Some(sqlx::Error::Database(_)) | None => Failure::Event { index, error },
                    Some(_) => Failure::Outage(error),
                });
            }
        }
        let mut invocation = BATCH.prepare_invoke();
        invocation
            .arg(&self.root)
            .arg(version)
            .arg(match mode {
                Mode::Live => "live",
                Mode::Replay(_) => "replay",
            })
            .arg(if caught_up { "1" } else { "0" })
            .arg(to.len());
        for ((topic, partition), next) in to {
            let previous = from.get(&(topic.clone(), *partition));
            invocation
                .arg(offset_field(topic, *partition))
                .arg(previous.map(ToString::to_string).unwrap_or_default())
                .arg(next);
        }
        invocation.arg(writes);
        let mut redis = self.redis.clone();
        let outcome: String = invocation.invoke_async(&mut redis).await.map_err(|e| {
            Failure::Outage(anyhow::Error::new(e).context("running the cache batch"))
        })?;
        match outcome.as_str() {
            "done" => Ok(Committed::Done),
            "paused" => Ok(Committed::Paused),
            "reopen" => Ok(Committed::Reopen),
            other => Err(Failure::Outage(anyhow::anyhow!(
                "the cache batch answered {other}"
            ))),
        }
    }
}
