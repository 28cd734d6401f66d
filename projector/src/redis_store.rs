//! Read models in Redis. A model turns events into writes; the store applies each batch as
//! one Lua script that checks the version and that the stored offsets are the ones the
//! consumer started from, applies every write and moves the offsets, all at once. So
//! redelivery and replay change nothing, and a Redis that lost its data (restart without
//! persistence) is noticed and rebuilt from the log.
//!
//! Keys live under `<root>:v<version>:` (root: `<prefix>:<model>`, see
//! [`newsroom_infra::redis::root`]), with `offsets` (hash `<topic>:<partition>` → next
//! offset) beside the model's own keys. `<root>:active` names the version the query side
//! serves, `<root>:building` the one a replay builds, and `<root>:switching` (short-lived)
//! holds the live consumer while a replay switches (ADR 8).

use std::future::Future;
use std::sync::LazyLock;

use anyhow::Context as _;
use newsroom_infra::codec::Decoded;
use redis::Script;
use redis::aio::ConnectionManager;

use crate::consumer::{Batch, Committed, Failure, Mode, Offsets, Store};
use crate::replay::{Differences, HOLD, Versioned};

static BATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&newsroom_infra::read_models::lua(include_str!(
        "redis_batch.lua"
    )))
});

/// The writes of a batch, as the batch script reads them. Keys are relative to the
/// version's prefix.
#[derive(Default)]
pub struct Writes(Vec<String>);

impl Writes {
    fn push(&mut self, parts: &[&str]) {
        self.0.extend(parts.iter().map(|p| (*p).to_owned()));
    }

    /// Sets `fields` of hash `key` if `version` is newer than its stored `version` field
    /// (or, with `create`, if the hash does not exist yet).
    pub fn hash(&mut self, key: &str, version: i64, create: bool, fields: &[(&str, String)]) {
        let (version, count) = (version.to_string(), fields.len().to_string());
        self.push(&["H", key, &version, if create { "1" } else { "0" }, &count]);
        for (field, value) in fields {
            self.push(&[field, value]);
        }
    }

    /// Creates document `doc` as [`Writes::hash`] with `create` does, and joins it: `doc`
    /// joins set `join.members`, and its `join.field` copies `join.from_field` of hash
    /// `join.from` (a value denormalised for readers; [`Writes::propagate`] keeps it in
    /// step). The batch script reads each `from` once while nothing else is written.
    pub fn create_joined(
        &mut self,
        doc: &str,
        version: i64,
        fields: &[(&str, String)],
        join: &Join<'_>,
    ) {
        // The batch script sets the joined field first (Lua expands the fields last).
        debug_assert!(fields.iter().all(|(f, _)| *f != join.field));
        let (version, count) = (version.to_string(), fields.len().to_string());
        self.push(&["C", doc, &version, &count]);
        for (field, value) in fields {
            self.push(&[field, value]);
        }
        self.push(&[join.field, join.from, join.from_field, join.members]);
    }

    /// Every document of set `members` copies `from_field` of hash `from` into its `field`.
    pub fn propagate(&mut self, from: &str, from_field: &str, field: &str, members: &str) {
        self.push(&["P", from, from_field, field, members]);
    }

    /// Adds one to counter `key`.
    pub fn incr(&mut self, key: &str) {
        self.push(&["I", key]);
    }

    /// Adds one to `member` of sorted set `key`, which expires at `expire_at` (Unix
    /// seconds); nothing once that time has passed.
    pub fn count_until(&mut self, key: &str, member: &str, expire_at: i64) {
        self.push(&["T", key, member, &expire_at.to_string()]);
    }

    /// Adds `amount` to `field` of hash `key`.
    pub fn add_float(&mut self, key: &str, field: &str, amount: f64) {
        self.push(&["F", key, field, &format!("{amount:e}")]);
    }

    /// Adds `member` to set `key`.
    pub fn set_add(&mut self, key: &str, member: &str) {
        self.push(&["S", key, member]);
    }

    /// The next `writes` writes, each a [`Writes::set_add`] or [`Writes::add_float`], are
    /// skipped if `member` is in set `key`.
    pub fn unless_member(&mut self, key: &str, member: &str, writes: usize) {
        self.push(&["G", key, member, &writes.to_string()]);
    }

    /// Adds `member` to set `key` and deletes `keys`.
    pub fn add_and_delete(&mut self, key: &str, member: &str, keys: &[String]) {
        self.push(&["D", key, member, &keys.len().to_string()]);
        self.0.extend(keys.iter().cloned());
    }

    /// Lists document `doc` (a hash with `category`, `tags` and perhaps `author`) as
    /// `member` with `score` in the indexes of `read_models::index`: `published`,
    /// `by:cat:<category>`, `by:tag:<tag>` and `by:author:<author>`.
    pub fn list(&mut self, doc: &str, member: &str, score: i64) {
        self.push(&["L", doc, member, &score.to_string()]);
    }

    /// Takes a listed document out of its indexes.
    pub fn withdraw(&mut self, doc: &str, member: &str) {
        self.push(&["W", doc, member]);
    }

    /// Like [`Writes::hash`] for a document that may be listed: it moves between indexes.
    pub fn edit_listed(
        &mut self,
        doc: &str,
        member: &str,
        version: i64,
        fields: &[(&str, String)],
    ) {
        let (version, count) = (version.to_string(), fields.len().to_string());
        self.push(&["E", doc, member, &version, &count]);
        for (field, value) in fields {
            self.push(&[field, value]);
        }
    }
}

/// How a document copies a field of another hash, and the set of the documents that do
/// (see [`Writes::create_joined`]).
pub struct Join<'a> {
    /// The document's field.
    pub field: &'a str,
    /// The hash copied from.
    pub from: &'a str,
    /// Its field.
    pub from_field: &'a str,
    /// The set the document joins.
    pub members: &'a str,
}

/// A read model kept in Redis.
pub trait Model: Send + Sync + 'static {
    /// Its name (consumer, dead letters, key root).
    fn name(&self) -> &'static str;
    /// The topics it consumes.
    fn topics(&self) -> Vec<String>;
    /// The number of its key layout, recorded by each version it builds from scratch
    /// (`read_models::LAYOUT`).
    fn layout(&self) -> u32 {
        1
    }
    /// Whether its live batches announce the keys they wrote (`read_models::CHANGED`): a
    /// model whose documents query processes keep.
    fn announces(&self) -> bool {
        false
    }
    /// The writes one event makes. A database error (users' keys) is an outage unless the
    /// database refused the statement.
    fn writes(
        &self,
        event: Decoded,
        out: &mut Writes,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A Redis read model with its connection.
pub struct RedisStore<M> {
    model: M,
    redis: ConnectionManager,
    root: String,
}

impl<M: Model> RedisStore<M> {
    /// `model` under `root` (see [`newsroom_infra::redis::root`]).
    pub fn new(model: M, redis: ConnectionManager, root: String) -> Self {
        RedisStore { model, redis, root }
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.root)
    }

    async fn get_version(&self, name: &str) -> anyhow::Result<Option<i32>> {
        redis::cmd("GET")
            .arg(self.key(name))
            .query_async(&mut self.redis.clone())
            .await
            .with_context(|| format!("reading {}", self.key(name)))
    }
}

impl<M: Model> Store for RedisStore<M> {
    fn name(&self) -> &'static str {
        self.model.name()
    }

    fn topics(&self) -> Vec<String> {
        self.model.topics()
    }

    async fn open(&self, mode: Mode) -> anyhow::Result<(i32, Offsets)> {
        let version = match mode {
            // Until a first consumer has caught up, no version is active (the query side
            // answers from PostgreSQL meanwhile); version 1 is the one it builds.
            Mode::Live => self.get_version("active").await?.unwrap_or(1),
            Mode::Replay(v) => {
                let building = self.get_version("building").await?;
                anyhow::ensure!(
                    building == Some(v),
                    "{} version {v} is no longer being built",
                    self.name()
                );
                v
            }
        };
        let stored: Vec<(String, i64)> = redis::cmd("HGETALL")
            .arg(self.key(&format!(
                "v{version}:{}",
                newsroom_infra::read_models::OFFSETS
            )))
            .query_async(&mut self.redis.clone())
            .await
            .context("reading the stored offsets")?;
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
        let mut writes = Writes::default();
        for (index, event) in events.into_iter().enumerate() {
            if let Err(error) = self.model.writes(event, &mut writes).await {
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
            .arg(self.model.layout())
            .arg(if self.model.announces() { "1" } else { "0" })
            .arg(to.len());
        for ((topic, partition), next) in to {
            let previous = from.get(&(topic.clone(), *partition));
            invocation
                .arg(format!("{topic}:{partition}"))
                .arg(previous.map(ToString::to_string).unwrap_or_default())
                .arg(next);
        }
        invocation.arg(writes.0);
        let outcome: String = invocation
            .invoke_async(&mut self.redis.clone())
            .await
            .map_err(|e| {
                Failure::Outage(anyhow::Error::new(e).context("running the batch script"))
            })?;
        match outcome.as_str() {
            "done" => Ok(Committed::Done),
            "paused" => Ok(Committed::Paused),
            "reopen" => Ok(Committed::Reopen),
            other => Err(Failure::Outage(anyhow::anyhow!(
                "the batch script answered {other}"
            ))),
        }
    }
}

impl<M: Model> Versioned for RedisStore<M> {
    async fn building(&self) -> anyhow::Result<Option<i32>> {
        self.get_version("building").await
    }

    async fn prepare(&self) -> anyhow::Result<(i32, i32)> {
        let (active, _) = self.open(Mode::Live).await?;
        if let Some(left) = self.get_version("building").await? {
            tracing::warn!(
                model = self.name(),
                version = left,
                "dropping what an interrupted replay left"
            );
            self.drop_version(left).await?;
        }
        let new = active + 1;
        self.drop_version(new).await?;
        let (): () = redis::cmd("SET")
            .arg(self.key("building"))
            .arg(new)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok((active, new))
    }

    async fn hold_live(&self, new: i32) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.get_version("building").await? == Some(new),
            "{} version {new} is no longer being built",
            self.name()
        );
        let (): () = redis::cmd("SET")
            .arg(self.key("switching"))
            .arg(new)
            .arg("PX")
            .arg(HOLD.as_millis() as u64)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    async fn release_live(&self) -> anyhow::Result<()> {
        let (): () = redis::cmd("DEL")
            .arg(self.key("switching"))
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    async fn switch(&self, old: i32, new: i32) -> anyhow::Result<()> {
        let script = Script::new(
            "local root = ARGV[1] \
             if (redis.call('GET', root .. ':active') or '1') ~= ARGV[2] or redis.call('GET', root .. ':building') ~= ARGV[3] \
                or redis.call('EXISTS', root .. ':switching') == 0 then return 0 end \
             redis.call('SET', root .. ':active', ARGV[3]) \
             redis.call('DEL', root .. ':building', root .. ':switching') \
             redis.call('PUBLISH', root .. ':' .. ARGV[4], ARGV[3]) \
             return 1",
        );
        let switched: i64 = script
            .arg(&self.root)
            .arg(old)
            .arg(new)
            .arg(newsroom_infra::read_models::CHANGED)
            .invoke_async(&mut self.redis.clone())
            .await?;
        anyhow::ensure!(
            switched == 1,
            "the switch of {} lost its hold on the live consumer",
            self.name()
        );
        Ok(())
    }

    async fn differences(&self, a: i32, b: i32) -> anyhow::Result<Differences> {
        let mut redis = self.redis.clone();
        let first = newsroom_infra::redis::dump(&mut redis, &self.key(&format!("v{a}:"))).await?;
        let second = newsroom_infra::redis::dump(&mut redis, &self.key(&format!("v{b}:"))).await?;
        let mut found = Differences {
            compared: first.len() as u64,
            ..Differences::default()
        };
        for (key, value) in &first {
            match second.get(key) {
                None => found.note(1, [format!("{key}: only in version {a}: {value:?}")]),
                Some(other) if other != value => found.note(
                    1,
                    [format!(
                        "{key}: version {a} has {value:?}, version {b} has {other:?}"
                    )],
                ),
                Some(_) => {}
            }
        }
        for (key, value) in second.iter().filter(|(k, _)| !first.contains_key(*k)) {
            found.note(1, [format!("{key}: only in version {b}: {value:?}")]);
        }
        Ok(found)
    }

    async fn drop_version(&self, version: i32) -> anyhow::Result<()> {
        let mut redis = self.redis.clone();
        let (active, _) = self.open(Mode::Live).await?;
        anyhow::ensure!(
            version != active,
            "refusing to drop the active version of {}",
            self.name()
        );
        let pattern = self.key(&format!("v{version}:*"));
        newsroom_infra::redis::unlink_matching(&mut redis, &pattern).await?;
        let _: i64 = Script::new(
            "if redis.call('GET', ARGV[1]) == ARGV[2] then return redis.call('DEL', ARGV[1]) end return 0",
        )
        .arg(self.key("building"))
        .arg(version)
        .invoke_async(&mut redis)
        .await?;
        Ok(())
    }
}
