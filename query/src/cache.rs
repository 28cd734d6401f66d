//! Reads from the Redis read models (single articles and trending lists). Every lookup
//! says when it cannot answer — Redis down or never built, the article not cached, a
//! consistency token not reached in time — and the caller then answers from PostgreSQL.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use chrono::DateTime;
use newsroom_infra::redis::{Health, connect};
use newsroom_infra::settings::RedisSettings;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use uuid::Uuid;

use crate::consistency::Wanted;
use crate::routes::news::NewsRow;

static TRENDING: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("cache_trending.lua")));
static ARTICLES: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("cache_articles.lua")));
static RECOMMEND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("recommend.lua")));
/// The streams each Redis model reads (the projection names consistency tokens map to).
const CACHE_STREAMS: [&str; 3] = ["users", "news", "reads"];
const RECOMMEND_STREAMS: [&str; 2] = ["news", "reads"];
const POLL: Duration = Duration::from_millis(5);

thread_local! {
    /// Each thread's own connections (by URL). An HTTP worker runs on a single-threaded
    /// runtime: with a connection of its own, the connection's task runs there too and a
    /// read never crosses threads (through one shared connection each request and answer
    /// woke the shared runtime's thread and then the worker again).
    static CONNECTIONS: RefCell<HashMap<String, ConnectionManager>> = RefCell::default();
}

/// The Redis read models of the deployment.
#[derive(Clone)]
pub struct Cache {
    settings: RedisSettings,
    health: Health,
    root: String,
    recommend_root: String,
    /// The `cache` model's version this process last saw active (checked by every read).
    active: Arc<Mutex<Option<String>>>,
}

/// A recommendation as the recommender's model ranks it.
pub struct Ranked {
    /// The article.
    pub id: Uuid,
    /// Σ of the affinities it matches, relative to the model's epoch.
    pub raw_score: f64,
    /// The tags and category that matched, strongest first.
    pub reasons: Vec<String>,
}

impl Cache {
    /// Reads the `cache` model under `root` and the `recommend` model under
    /// `recommend_root` from the Redis of `settings`.
    pub fn new(
        settings: &RedisSettings,
        root: String,
        recommend_root: String,
    ) -> anyhow::Result<Self> {
        Ok(Cache {
            health: Health::watch(connect(settings)?, Duration::from_millis(500)),
            settings: settings.clone(),
            root,
            recommend_root,
            active: Arc::default(),
        })
    }

    /// This thread's connection (made on first use, without waiting for Redis).
    fn redis(&self) -> Option<ConnectionManager> {
        CONNECTIONS.with(|connections| {
            let mut connections = connections.borrow_mut();
            if let Some(connection) = connections.get(&self.settings.url) {
                return Some(connection.clone());
            }
            let connection = connect(&self.settings).ok()?;
            connections.insert(self.settings.url.clone(), connection.clone());
            Some(connection)
        })
    }

    /// Whether Redis is believed up (readiness).
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// Runs `script` until it answers something else than "behind" or the token's deadline
    /// passes; `None` when Redis cannot answer.
    async fn ask(
        &self,
        script: &Script,
        args: Vec<String>,
        wanted: Option<(&Wanted, &[&str])>,
    ) -> Option<Vec<Value>> {
        if !self.health.is_up() {
            return None;
        }
        let mut args = args;
        if let Some((w, streams)) = wanted {
            args.extend(w.redis_args(streams));
        }
        let wanted = wanted.map(|(w, _)| w);
        let mut redis = self.redis()?;
        loop {
            let answer: Vec<Value> = match script.arg(&args).invoke_async(&mut redis).await {
                Ok(a) => a,
                Err(e) => {
                    self.health.failed(&e);
                    return None;
                }
            };
            match answer.first().map(text).as_deref() {
                Some("ok") => return Some(answer),
                Some("behind")
                    if wanted.is_some_and(|w| tokio::time::Instant::now() < w.deadline) =>
                {
                    tokio::time::sleep(POLL).await;
                }
                _ => return None,
            }
        }
    }

    /// The article `id` with its author's name and read count.
    ///
    /// One MULTI/EXEC of plain reads against the version this process last saw active
    /// (checked in the same transaction), not a script: passing the article through Lua
    /// cost Redis three times the HGETALL itself (profile in ADR 13).
    pub async fn article(&self, id: Uuid, wanted: Option<&Wanted>) -> Option<NewsRow> {
        if !self.health.is_up() {
            return None;
        }
        let token = wanted
            .map(|w| w.redis_args(&CACHE_STREAMS))
            .unwrap_or_default();
        let (fields, least): (Vec<&String>, Vec<i64>) = token
            .chunks(2)
            .map(|pair| (&pair[0], pair[1].parse().unwrap_or(i64::MAX)))
            .unzip();
        let mut redis = self.redis()?;
        let active_key = format!("{}:active", self.root);
        let mut version = self.active.lock().ok()?.clone();
        loop {
            let Some(v) = version else {
                let active: Option<String> = self.query(redis::cmd("GET").arg(&active_key)).await?;
                // Never built (or Redis lost it): PostgreSQL answers.
                version = Some(active?);
                *self.active.lock().ok()? = version.clone();
                continue;
            };
            let prefix = format!("{}:v{v}:", self.root);
            let mut pipe = redis::pipe();
            pipe.atomic()
                .get(&active_key)
                .hgetall(format!("{prefix}news:{id}"))
                .get(format!("{prefix}reads:{id}"));
            if !fields.is_empty() {
                pipe.cmd("HMGET")
                    .arg(format!("{prefix}offsets"))
                    .arg(&fields);
            }
            let answer: Vec<Value> = match pipe.query_async(&mut redis).await {
                Ok(answer) => answer,
                Err(e) => {
                    self.health.failed(&e);
                    return None;
                }
            };
            let [active, article, reads, rest @ ..] = &answer[..] else {
                return None;
            };
            let active = (*active != Value::Nil).then(|| text(active));
            if active.as_deref() != Some(v.as_str()) {
                // A replay switched versions (or Redis lost the model): read the new one.
                *self.active.lock().ok()? = active.clone();
                version = Some(active?);
                continue;
            }
            if let Some(Value::Array(offsets)) = rest.first() {
                let behind = offsets
                    .iter()
                    .zip(&least)
                    .any(|(offset, least)| text(offset).parse().unwrap_or(0) < *least);
                if behind {
                    if wanted.is_some_and(|w| tokio::time::Instant::now() < w.deadline) {
                        tokio::time::sleep(POLL).await;
                        version = Some(v);
                        continue;
                    }
                    return None;
                }
            }
            let Value::Array(pairs) = article else {
                return None;
            };
            if pairs.is_empty() {
                return None;
            }
            let field = |name: &str| {
                pairs
                    .chunks(2)
                    .find(|kv| text(&kv[0]) == name)
                    .and_then(|kv| kv.get(1))
                    .cloned()
            };
            // A model built before articles carried their author's name: look it up.
            let name = match field("author_name") {
                Some(name) => name,
                None => {
                    let author = field("author").map(|a| text(&a)).unwrap_or_default();
                    let key = format!("{prefix}name:{author}");
                    self.query(redis::cmd("HGET").arg(key).arg("name"))
                        .await
                        .unwrap_or(Value::Nil)
                }
            };
            return parse_row(&[article.clone(), name, reads.clone()])
                .inspect_err(|e| {
                    tracing::warn!(error = format!("{e:#}"), "an unreadable cached article")
                })
                .ok();
        }
    }

    /// Runs one command; `None` (and Redis marked down) when it fails.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let mut redis = self.redis()?;
        match cmd.query_async(&mut redis).await {
            Ok(value) => Some(value),
            Err(e) => {
                self.health.failed(&e);
                None
            }
        }
    }

    /// The trending list: articles and their reads in the last 24 hours.
    pub async fn trending(
        &self,
        category: Option<&str>,
        limit: i64,
        wanted: Option<&Wanted>,
    ) -> Option<Vec<(NewsRow, i64)>> {
        let args = vec![
            self.root.clone(),
            category.unwrap_or_default().to_owned(),
            limit.to_string(),
        ];
        let wanted = wanted.map(|w| (w, &CACHE_STREAMS[..]));
        let answer = self.ask(&TRENDING, args, wanted).await?;
        let Some(Value::Array(items)) = answer.get(1) else {
            return None;
        };
        let mut list = Vec::with_capacity(items.len());
        for item in items {
            let Value::Array(parts) = item else {
                return None;
            };
            let row = parse_row(parts).ok()?;
            let recent = parts.get(3).map(text).and_then(|t| t.parse().ok())?;
            list.push((row, recent));
        }
        Some(list)
    }
}

impl Cache {
    /// `user`'s ranked recommendations, with the articles from the cache model.
    pub async fn recommendations(
        &self,
        user: Uuid,
        limit: i64,
        candidates: u32,
        wanted: Option<&Wanted>,
    ) -> Option<Vec<(Ranked, NewsRow)>> {
        let args = vec![
            self.recommend_root.clone(),
            user.to_string(),
            limit.to_string(),
            candidates.to_string(),
        ];
        let wanted = wanted.map(|w| (w, &RECOMMEND_STREAMS[..]));
        let answer = self.ask(&RECOMMEND, args, wanted).await?;
        let Some(Value::Array(items)) = answer.get(1) else {
            return None;
        };
        let mut ranked = Vec::with_capacity(items.len());
        for item in items {
            let Value::Array(parts) = item else {
                return None;
            };
            let id = Uuid::parse_str(&text(parts.first()?)).ok()?;
            let raw_score = text(parts.get(1)?).parse().ok()?;
            let reasons = match parts.get(2) {
                Some(Value::Array(names)) => names.iter().map(text).collect(),
                _ => Vec::new(),
            };
            ranked.push(Ranked {
                id,
                raw_score,
                reasons,
            });
        }
        if ranked.is_empty() {
            return Some(Vec::new());
        }
        let mut args = vec![self.root.clone()];
        args.extend(ranked.iter().map(|r| r.id.to_string()));
        let answer = self.ask(&ARTICLES, args, None).await?;
        let Some(Value::Array(rows)) = answer.get(1) else {
            return None;
        };
        // Every article must be in the cache; otherwise PostgreSQL answers.
        let mut out = Vec::with_capacity(ranked.len());
        for (r, row) in ranked.into_iter().zip(rows) {
            let Value::Array(parts) = row else {
                return None;
            };
            out.push((r, parse_row(parts).ok()?));
        }
        Some(out)
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

/// `[article hash, author name or nil, reads]` → a row.
fn parse_row(parts: &[Value]) -> anyhow::Result<NewsRow> {
    let Some(Value::Array(pairs)) = parts.first() else {
        return Err(anyhow!("no article hash"));
    };
    let fields: HashMap<String, String> = pairs
        .chunks(2)
        .filter_map(|kv| match kv {
            [k, v] => Some((text(k), text(v))),
            _ => None,
        })
        .collect();
    let field = |name: &str| {
        fields
            .get(name)
            .cloned()
            .with_context(|| format!("no {name}"))
    };
    let micros = |name: &str| -> anyhow::Result<Option<DateTime<chrono::Utc>>> {
        let raw = field(name)?;
        if raw.is_empty() {
            return Ok(None);
        }
        let micros: i64 = raw
            .parse()
            .with_context(|| format!("{name} is not a number"))?;
        DateTime::from_timestamp_micros(micros)
            .map(Some)
            .with_context(|| format!("{name} is out of range"))
    };
    Ok(NewsRow {
        id: Uuid::parse_str(&field("id")?)?,
        category: field("category")?,
        title: field("title")?,
        content: field("content")?,
        tags: serde_json::from_str(&field("tags")?).context("tags")?,
        author_id: Uuid::parse_str(&field("author")?)?,
        author_name: parts.get(1).map(text).unwrap_or_default(),
        status: field("status")?,
        version: field("version")?.parse()?,
        created_at: micros("created")?.context("no creation time")?,
        updated_at: micros("updated")?.context("no update time")?,
        published_at: micros("published")?,
        read_count: parts
            .get(2)
            .map(text)
            .unwrap_or_default()
            .parse()
            .unwrap_or(0),
    })
}
