//! Reads from the Redis read models (single articles and trending lists). Every lookup
//! says when it cannot answer — Redis down or never built, the article not cached, a
//! consistency token not reached in time — and the caller then answers from PostgreSQL.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use chrono::DateTime;
use newsroom_infra::redis::Health;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use uuid::Uuid;

use crate::consistency::Wanted;
use crate::routes::news::NewsRow;

static ARTICLE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("cache_article.lua")));
static TRENDING: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("cache_trending.lua")));
static ARTICLES: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("cache_articles.lua")));
static RECOMMEND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("recommend.lua")));
/// The streams each Redis model reads (the projection names consistency tokens map to).
const CACHE_STREAMS: [&str; 3] = ["users", "news", "reads"];
const RECOMMEND_STREAMS: [&str; 2] = ["news", "reads"];
const POLL: Duration = Duration::from_millis(5);

/// The Redis read models of the deployment.
#[derive(Clone)]
pub struct Cache {
    redis: ConnectionManager,
    health: Health,
    root: String,
    recommend_root: String,
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
    /// `recommend_root` through `redis`.
    pub fn new(redis: ConnectionManager, root: String, recommend_root: String) -> Self {
        Cache {
            health: Health::watch(redis.clone(), Duration::from_millis(500)),
            redis,
            root,
            recommend_root,
        }
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
        let mut redis = self.redis.clone();
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
    pub async fn article(&self, id: Uuid, wanted: Option<&Wanted>) -> Option<NewsRow> {
        let wanted = wanted.map(|w| (w, &CACHE_STREAMS[..]));
        let answer = self
            .ask(&ARTICLE, vec![self.root.clone(), id.to_string()], wanted)
            .await?;
        parse_row(&answer[1..])
            .inspect_err(|e| {
                tracing::warn!(error = format!("{e:#}"), "an unreadable cached article")
            })
            .ok()
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
