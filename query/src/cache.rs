//! Reads from the Redis read models (articles, lists, trending lists, recommendations). Every lookup
//! says when it cannot answer — Redis down or never built, the article not cached, a
//! consistency token not reached in time — and the caller then answers from PostgreSQL.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use actix_web::web::Bytes;
use anyhow::{Context as _, anyhow};
use chrono::DateTime;
use newsroom_infra::read_models::{self as rm, field};
use newsroom_infra::redis::{Health, connect};
use newsroom_infra::settings::RedisSettings;
use redis::aio::ConnectionManager;
use redis::{Script, Value};
use uuid::Uuid;

use crate::consistency::Wanted;
use crate::kept::{Bounded, KeptArticle, KeptArticles, Ticket, Weighed};
use crate::recommend::{self, KEPT, Ranked, Rankings};
use crate::routes::news::NewsRow;

static TRENDING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&newsroom_infra::read_models::lua(include_str!(
        "cache_trending.lua"
    )))
});
/// The streams each Redis model reads (the projection names consistency tokens map to).
const CACHE_STREAMS: [&str; 3] = ["users", "news", "reads"];
const RECOMMEND_STREAMS: [&str; 2] = ["news", "reads"];
const POLL: Duration = Duration::from_millis(5);
/// Longest wait for a turn to rank (ADR 20).
const RANKING_WAIT: Duration = Duration::from_millis(500);

/// How long a trending list is answered again without being computed afresh.
pub const TRENDING_FRESH: Duration = Duration::from_secs(1);
/// How long the other requests wait for one that computes a trending list afresh (answering
/// the last one meanwhile) before another one tries.
pub const TRENDING_STALE: Duration = Duration::from_secs(5);
/// The oldest trending list answered while another request computes it afresh (past it,
/// as after a minute without requests, every request computes it).
pub const TRENDING_OLDEST: Duration = Duration::from_secs(60);

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Read from Redis for this request.
    Redis,
    /// What this process read from Redis for an earlier request (see [`TRENDING_FRESH`]).
    Memo,
}

impl Source {
    /// Its label in the answers' metric.
    pub fn label(self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::Memo => "memo",
        }
    }
}

/// How long a rendered page of a list is answered again while its list is unchanged.
pub const PAGE_FRESH: Duration = Duration::from_secs(1);
/// At most this many rendered pages are kept per process (see [`Bounded::keep`]).
const PAGES_KEPT: usize = 4096;
/// At most this many bytes of rendered pages are kept per process: a client walking every
/// cursor of every list at the largest limit fills this, not the memory.
const PAGES_BYTES: usize = 32 << 20;

/// A page of a list: its index, the cursor it starts after and its limit.
type PageKey = (String, Option<(i64, Uuid)>, i64);

/// What keeps an article read from Redis without a consistency token: the model version it
/// was read at and the ticket taken before.
pub struct Keeping {
    ticket: Ticket,
    version: String,
}

/// A page of a list this process rendered, and what it was read at.
struct PageMemo {
    version: String,
    listing: String,
    at: std::time::Instant,
    body: Bytes,
}

impl Weighed for PageMemo {
    fn at(&self) -> std::time::Instant {
        self.at
    }
    fn size(&self) -> usize {
        self.body.len()
    }
}

/// At most this many users' recommended articles are kept per process (all are dropped past
/// it; a second is all they are kept for anyway): up to ~40 MB at 100 articles each.
const RECOMMENDED_KEPT: usize = 1024;

/// The articles of a user's recommendations, read for one ranking.
struct RecommendedArticles {
    ranking: Arc<Vec<Ranked>>,
    at: std::time::Instant,
    rows: Arc<Vec<NewsRow>>,
}

/// A trending list: the articles and their reads in the last 24 hours.
type TrendingList = Arc<Vec<(NewsRow, i64)>>;

/// A trending list this process computed.
struct TrendingMemo {
    at: std::time::Instant,
    list: TrendingList,
    /// When a request began computing it afresh.
    refresh_started: Option<std::time::Instant>,
}

/// The trending lists this process computed, by category and limit (at most 4 × 100).
type TrendingMemos = HashMap<(Option<String>, i64), TrendingMemo>;

/// What a consistency token asks of a Redis model read with plain commands: the least
/// next offset of each of its offset fields.
struct Least {
    fields: Vec<String>,
    least: Vec<i64>,
}

impl Least {
    /// Nothing asked.
    fn none() -> Least {
        Least::of(None, &[])
    }

    fn of(wanted: Option<&Wanted>, streams: &[&str]) -> Least {
        let token = wanted.map(|w| w.redis_args(streams)).unwrap_or_default();
        let (fields, least) = token
            .chunks(2)
            .map(|pair| (pair[0].clone(), pair[1].parse().unwrap_or(i64::MAX)))
            .unzip();
        Least { fields, least }
    }

    /// Adds the read of the model's offsets under `prefix` to `pipe`, if the token asks.
    fn read(&self, pipe: &mut redis::Pipeline, prefix: &str) {
        if !self.fields.is_empty() {
            pipe.cmd("HMGET")
                .arg(format!("{prefix}{}", rm::OFFSETS))
                .arg(&self.fields);
        }
    }

    /// Splits the answer of [`Least::read`] off `rest`: whether the model is behind the
    /// token, and what follows it.
    fn behind<'a>(&self, rest: &'a [Value]) -> Option<(bool, &'a [Value])> {
        if self.fields.is_empty() {
            return Some((false, rest));
        }
        let (Value::Array(offsets), rest) = rest.split_first()? else {
            return None;
        };
        let behind = offsets
            .iter()
            .zip(&self.least)
            .any(|(offset, least)| text(offset).parse().unwrap_or(0) < *least);
        Some((behind, rest))
    }
}

/// After a model was found behind a consistency token: waits a moment and says whether to
/// look again (`false`: no token, or its deadline passed).
async fn again(wanted: Option<&Wanted>) -> bool {
    if wanted.is_some_and(|w| tokio::time::Instant::now() < w.deadline) {
        tokio::time::sleep(POLL).await;
        return true;
    }
    false
}

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
    /// The same for the `recommend` model.
    recommend_active: Arc<Mutex<Option<String>>>,
    /// Each user's last ranking.
    rankings: Rankings,
    /// Rankings computed at once.
    ranking_permits: Arc<tokio::sync::Semaphore>,
    /// The trending lists computed last.
    trending: Arc<Mutex<TrendingMemos>>,
    /// Held while a trending list is computed without one to answer meanwhile.
    trending_turn: Arc<tokio::sync::Mutex<()>>,
    /// The pages of lists rendered last, by index, cursor and limit.
    pages: Arc<Mutex<Bounded<PageKey, PageMemo>>>,
    /// Articles read last, until the projection announces a change to them.
    kept: KeptArticles,
    /// The articles of each user's recommendations read last, by user and limit.
    recommended: Arc<Mutex<HashMap<(Uuid, i64), RecommendedArticles>>>,
}

impl Cache {
    /// Reads the `cache` model under `root` and the `recommend` model under
    /// `recommend_root` from the Redis of `settings`, keeping the last ranking of up to
    /// `kept_users` users.
    pub fn new(
        settings: &RedisSettings,
        root: String,
        recommend_root: String,
        kept_users: usize,
    ) -> anyhow::Result<Self> {
        let kept = KeptArticles::follow(settings, &root);
        Ok(Cache {
            health: Health::watch(connect(settings)?, Duration::from_millis(500)),
            settings: settings.clone(),
            root,
            recommend_root,
            active: Arc::default(),
            recommend_active: Arc::default(),
            rankings: Rankings::new(kept_users),
            ranking_permits: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            trending: Arc::default(),
            trending_turn: Arc::default(),
            pages: Arc::new(Mutex::new(Bounded::new(
                PAGES_KEPT,
                PAGES_BYTES,
                PAGE_FRESH,
            ))),
            kept,
            recommended: Arc::default(),
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
                Some("behind") if again(wanted).await => {}
                _ => return None,
            }
        }
    }

    /// The article `id` as this process kept it (ADR 33): for requests without a
    /// consistency token.
    pub fn kept_article(&self, id: Uuid) -> Option<Arc<KeptArticle>> {
        self.kept.get(id)
    }

    /// The article `id` with its author's name and read count, and, when asked without a
    /// consistency token, what keeps it in this process ([`Cache::keep_article`]).
    pub async fn article(
        &self,
        id: Uuid,
        wanted: Option<&Wanted>,
    ) -> Option<(NewsRow, Option<Keeping>)> {
        let ticket = wanted.is_none().then(|| self.kept.ticket()).flatten();
        let (version, mut rows) = self.articles_at(&[id], true, wanted).await?;
        let row = rows.pop()?;
        if wanted.is_some() {
            self.kept.saw(&row);
        }
        let keeping = ticket.map(|ticket| Keeping { ticket, version });
        Some((row, keeping))
    }

    /// Keeps `article`, read from Redis with `keeping`, for the next requests without a
    /// consistency token.
    pub fn keep_article(&self, keeping: Keeping, article: Arc<KeptArticle>) {
        self.kept.keep(keeping.ticket, &keeping.version, article);
    }

    /// The articles `ids`, in that order, each with its author's name and read count, with
    /// their content or (for lists) without it; `None` unless every one is cached.
    ///
    /// One MULTI/EXEC of plain reads against the version this process last saw active
    /// (checked in the same transaction), not a script: passing the article through Lua
    /// cost Redis three times the HGETALL itself (profile in ADR 13).
    pub async fn articles(
        &self,
        ids: &[Uuid],
        content: bool,
        wanted: Option<&Wanted>,
    ) -> Option<Vec<NewsRow>> {
        Some(self.articles_at(ids, content, wanted).await?.1)
    }

    /// [`Cache::articles`], with the model version they were read at.
    async fn articles_at(
        &self,
        ids: &[Uuid],
        content: bool,
        wanted: Option<&Wanted>,
    ) -> Option<(String, Vec<NewsRow>)> {
        let least = Least::of(wanted, &CACHE_STREAMS);
        let (v, answer) = self
            .read_active(&self.root, &self.active, &least, wanted, |pipe, prefix| {
                for id in ids {
                    let key = format!("{prefix}{}{id}", rm::cache::ARTICLE);
                    if content {
                        pipe.hgetall(key);
                    } else {
                        pipe.cmd("HMGET").arg(key).arg(&field::LISTED_ARTICLE[..]);
                    }
                    pipe.get(format!("{prefix}{}{id}", rm::cache::READS));
                }
            })
            .await?;
        let prefix = format!("{}:v{v}:", self.root);
        let mut rows = Vec::with_capacity(ids.len());
        for pair in answer.chunks(2) {
            let [article, reads] = pair else {
                return None;
            };
            let Value::Array(values) = article else {
                return None;
            };
            // HGETALL: field, value, …; HMGET: the values of LISTED (nil if missing).
            let fields: HashMap<&str, String> = if content {
                values
                    .chunks(2)
                    .filter_map(|kv| match kv {
                        [k, v] => Some((field_name(k)?, text(v))),
                        _ => None,
                    })
                    .collect()
            } else {
                field::LISTED_ARTICLE
                    .iter()
                    .zip(values)
                    .filter(|(_, v)| **v != Value::Nil)
                    .map(|(k, v)| (*k, text(v)))
                    .collect()
            };
            if fields.is_empty() {
                return None;
            }
            // A model built before articles carried their author's name: look it up.
            let name = match fields.get(field::AUTHOR_NAME) {
                Some(name) => name.clone(),
                None => {
                    let author = fields.get(field::AUTHOR).cloned().unwrap_or_default();
                    let key = format!("{prefix}{}{author}", rm::cache::AUTHOR_NAME);
                    self.query::<Option<String>>(redis::cmd("HGET").arg(key).arg(field::NAME))
                        .await
                        .flatten()
                        .unwrap_or_default()
                }
            };
            let row = row(&fields, content, name, text(reads).parse().unwrap_or(0))
                .inspect_err(|e| {
                    tracing::warn!(error = format!("{e:#}"), "an unreadable cached article")
                })
                .ok()?;
            rows.push(row);
        }
        Some((v, rows))
    }

    /// Up to `count` published articles of `listing` (an index of `read_models::index`),
    /// newest publication first (then highest id, as PostgreSQL
    /// orders them), after the position `after` (publication time in microseconds, id) if
    /// given; without their content. `None` when Redis cannot answer (PostgreSQL does).
    ///
    /// Two round trips: the index's page at the active version, then the articles (an
    /// article withdrawn between the two reads makes it read again).
    pub async fn list(
        &self,
        listing: &Listing,
        after: Option<(i64, Uuid)>,
        count: usize,
        wanted: Option<&Wanted>,
    ) -> Option<Vec<NewsRow>> {
        let least = Least::of(wanted, &CACHE_STREAMS);
        let index = listing.key();
        for _ in 0..3 {
            let (_, answer) = self
                .read_active(&self.root, &self.active, &least, wanted, |pipe, prefix| {
                    let key = format!("{prefix}{index}");
                    pipe.get(format!("{prefix}{}", rm::LAYOUT));
                    match after {
                        // Equal times are ordered by id: those at the cursor's time, then
                        // the older ones.
                        Some((at, _)) => {
                            pipe.cmd("ZRANGE").arg(&key).arg(at).arg(at).arg("BYSCORE");
                            pipe.cmd("ZRANGE")
                                .arg(&key)
                                .arg(format!("({at}"))
                                .arg("-inf")
                                .arg("BYSCORE")
                                .arg("REV")
                                .arg("LIMIT")
                                .arg(0)
                                .arg(count);
                        }
                        None => {
                            pipe.zrevrange(&key, 0, count as isize - 1);
                        }
                    }
                })
                .await?;
            let (layout, answer) = answer.split_first()?;
            if !indexed(layout) {
                return None;
            }
            let ids = page(answer, after.map(|(_, id)| id), count)?;
            let rows = self.articles(&ids, false, None).await?;
            if listing.shows(&rows, after) {
                return Some(rows);
            }
        }
        None
    }

    /// A page of `listing` as `render` writes it (see [`Cache::list`] for the
    /// rest). A page asked without a consistency token (the first, or the one after a
    /// cursor) is answered from the one this process rendered last while the model's
    /// version and its count of listings and withdrawals (`listing`) are as they were
    /// then, for up to [`PAGE_FRESH`]: one small read instead of the articles (their read
    /// counts and authors' names may then be that much older; ADR 28). A page after a
    /// cursor is the same list's articles older than the cursor, so the same count says
    /// when it changed.
    pub async fn list_page(
        &self,
        listing: &Listing,
        after: Option<(i64, Uuid)>,
        limit: i64,
        wanted: Option<&Wanted>,
        render: impl Fn(Vec<NewsRow>, i64) -> Bytes,
    ) -> Option<(Bytes, Source)> {
        let count = usize::try_from(limit).ok()? + 1;
        if wanted.is_some() {
            let rows = self.list(listing, after, count, wanted).await?;
            return Some((render(rows, limit), Source::Redis));
        }
        let (version, answer) = self
            .read_active(
                &self.root,
                &self.active,
                &Least::none(),
                None,
                |pipe, prefix| {
                    pipe.get(format!("{prefix}{}", rm::index::LISTING))
                        .get(format!("{prefix}{}", rm::LAYOUT));
                },
            )
            .await?;
        let [changes, layout] = &answer[..] else {
            return None;
        };
        if !indexed(layout) {
            return None;
        }
        let changes = text(changes);
        let key = (listing.key(), after, limit);
        if let Some(memo) = self.pages.lock().ok()?.get(&key)
            && memo.version == version
            && memo.listing == changes
            && memo.at.elapsed() < PAGE_FRESH
        {
            return Some((memo.body.clone(), Source::Memo));
        }
        let rows = self.list(listing, after, count, None).await?;
        let body = render(rows, limit);
        self.pages.lock().ok()?.keep(
            key,
            PageMemo {
                version,
                listing: changes,
                at: std::time::Instant::now(),
                body: body.clone(),
            },
        );
        Some((body, Source::Redis))
    }

    /// Runs one atomic read of the model under `root` at the version this process last saw
    /// active (noted in `slot`): `reads` adds the reads, given the version's key prefix.
    /// Follows a replay's switch of versions, and waits while the model is behind what a
    /// consistency token asks (`least`, until `wanted`'s deadline). Returns the version
    /// read and the answers of `reads`; `None` when Redis cannot answer, no version is
    /// active, or the model stayed behind.
    async fn read_active(
        &self,
        root: &str,
        slot: &Mutex<Option<String>>,
        least: &Least,
        wanted: Option<&Wanted>,
        reads: impl Fn(&mut redis::Pipeline, &str),
    ) -> Option<(String, Vec<Value>)> {
        if !self.health.is_up() {
            return None;
        }
        let mut redis = self.redis()?;
        let active_key = format!("{root}:active");
        let mut version = slot.lock().ok()?.clone();
        loop {
            let Some(v) = version else {
                version = self.find_active(slot, &active_key).await?;
                continue;
            };
            let prefix = format!("{root}:v{v}:");
            let mut pipe = redis::pipe();
            pipe.atomic().get(&active_key);
            least.read(&mut pipe, &prefix);
            reads(&mut pipe, &prefix);
            let mut answer = self.run(&pipe, &mut redis).await?;
            let active = (!answer.is_empty()).then(|| answer.remove(0))?;
            if !still_active(slot, &active, &v)? {
                // A replay switched versions: read the new one.
                version = slot.lock().ok()?.clone();
                continue;
            }
            let (behind, rest) = least.behind(&answer)?;
            if behind {
                if again(wanted).await {
                    version = Some(v);
                    continue;
                }
                return None;
            }
            let rest = rest.to_vec();
            return Some((v, rest));
        }
    }

    /// Reads which version of a model is active and notes it in `slot`; `None` when none
    /// is (never built, or Redis lost it: PostgreSQL answers).
    async fn find_active(&self, slot: &Mutex<Option<String>>, key: &str) -> Option<Option<String>> {
        let active: Option<String> = self.query(redis::cmd("GET").arg(key)).await?;
        let active = Some(active?);
        *slot.lock().ok()? = active.clone();
        Some(active)
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

    /// The trending list: articles (without their content) and their reads in the last 24
    /// hours. Without a consistency token, a list this process computed less than
    /// [`TRENDING_FRESH`] ago is answered again; past that one request computes it afresh
    /// while the others answer the last one (up to [`TRENDING_OLDEST`] old, and for at
    /// most [`TRENDING_STALE`] per attempt). The script reads every article read in the
    /// last day.
    pub async fn trending(
        &self,
        category: Option<&str>,
        limit: i64,
        wanted: Option<&Wanted>,
    ) -> Option<(TrendingList, Source)> {
        let compute = |wanted| async move {
            let mut list = self.trending_now(category, limit, wanted).await?;
            for (row, _) in &mut list {
                row.content = String::new();
            }
            Some(Arc::new(list))
        };
        if wanted.is_some() || !self.health.is_up() {
            return compute(wanted).await.map(|l| (l, Source::Redis));
        }
        let key = (category.map(str::to_owned), limit);
        let kept = |refreshing_too: bool| -> Option<Option<TrendingList>> {
            let mut memos = self.trending.lock().ok()?;
            let Some(memo) = memos.get_mut(&key) else {
                return Some(None);
            };
            let age = memo.at.elapsed();
            let refreshing = memo
                .refresh_started
                .is_some_and(|at| at.elapsed() < TRENDING_STALE);
            if age < TRENDING_FRESH || (refreshing_too && refreshing && age < TRENDING_OLDEST) {
                return Some(Some(memo.list.clone()));
            }
            if refreshing_too && !refreshing {
                // This request computes it; the others answer the last one meanwhile.
                memo.refresh_started = Some(std::time::Instant::now());
            }
            Some(None)
        };
        if let Some(list) = kept(true)? {
            return Some((list, Source::Memo));
        }
        // No list recent enough to answer meanwhile (the first, or after a quiet minute):
        // one request at a time computes, the others then take what it computed.
        let Ok(_turn) = tokio::time::timeout(TRENDING_STALE, self.trending_turn.lock()).await
        else {
            return None;
        };
        if let Some(list) = kept(false)? {
            return Some((list, Source::Memo));
        }
        let fresh = compute(None).await;
        if let Some(list) = &fresh {
            self.trending.lock().ok()?.insert(
                key,
                TrendingMemo {
                    at: std::time::Instant::now(),
                    list: list.clone(),
                    refresh_started: None,
                },
            );
        }
        fresh.map(|l| (l, Source::Redis))
    }

    /// The trending list computed now.
    async fn trending_now(
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
    /// `user`'s ranked recommendations (at most `limit`), with the articles from the cache
    /// model.
    pub async fn recommendations(
        &self,
        user: Uuid,
        limit: i64,
        candidates: u32,
        wanted: Option<&Wanted>,
    ) -> Option<Vec<(Ranked, NewsRow)>> {
        let ranking = self.ranking(user, candidates, wanted).await?;
        let ranked: Vec<&Ranked> = ranking
            .iter()
            .take(usize::try_from(limit).unwrap_or(0))
            .collect();
        if ranked.is_empty() {
            return Some(Vec::new());
        }
        let ids: Vec<Uuid> = ranked
            .iter()
            .map(|r| Uuid::parse_str(&r.id).ok())
            .collect::<Option<_>>()?;
        // The articles read for this very ranking less than a second ago (not for a
        // consistency token): their read counts and authors' names may be that old.
        let kept = wanted.is_none().then(|| {
            let recommended = self.recommended.lock().ok()?;
            let kept = recommended.get(&(user, limit))?;
            (Arc::ptr_eq(&kept.ranking, &ranking) && kept.at.elapsed() < PAGE_FRESH)
                .then(|| kept.rows.clone())
        });
        let rows = match kept.flatten() {
            Some(rows) => rows,
            None => {
                // Every article must be in the cache; otherwise PostgreSQL answers.
                let rows = Arc::new(self.articles(&ids, false, None).await?);
                keep_bounded(
                    &self.recommended,
                    RECOMMENDED_KEPT,
                    (user, limit),
                    RecommendedArticles {
                        ranking: ranking.clone(),
                        at: std::time::Instant::now(),
                        rows: rows.clone(),
                    },
                )?;
                rows
            }
        };
        Some(
            ranked
                .into_iter()
                .cloned()
                .zip(rows.iter().cloned())
                .collect(),
        )
    }

    /// `user`'s ranking (the first [`KEPT`]) from the recommender's model: the ranking this
    /// process computed last if the model's version, its published index and the user's
    /// affinities and reads are as they were then (one atomic read), or else a new one
    /// from one atomic read of its inputs, ranked here rather than in Redis (ADR 20).
    async fn ranking(
        &self,
        user: Uuid,
        candidates: u32,
        wanted: Option<&Wanted>,
    ) -> Option<Arc<Vec<Ranked>>> {
        let least = Least::of(wanted, &RECOMMEND_STREAMS);
        let root = &self.recommend_root;
        let active_key = format!("{root}:active");
        let keys_of = |prefix: &str| {
            (
                format!("{prefix}{}{user}", rm::recommend::AFFINITIES),
                format!("{prefix}{}{user}", rm::recommend::USER_READS),
            )
        };
        let mut redis = self.redis()?;
        loop {
            let (v, answer) = self
                .read_active(
                    root,
                    &self.recommend_active,
                    &least,
                    wanted,
                    |pipe, prefix| {
                        let (aff, read) = keys_of(prefix);
                        pipe.get(format!("{prefix}{}", rm::index::LISTING))
                            .hgetall(&aff)
                            .scard(&read);
                    },
                )
                .await?;
            let [listing, affinities, reads] = &answer[..] else {
                return None;
            };
            let prefix = format!("{root}:v{v}:");
            let (aff, read) = keys_of(&prefix);
            let before = basis(&v, listing, affinities, reads, candidates);
            let kept = || before.as_ref().and_then(|b| self.rankings.get(user, b));
            if let Some(ranking) = kept() {
                return Some(ranking);
            }
            // Ranking is CPU work here and a large read for Redis: a few at a time, so that
            // a burst of them queues instead of timing out; the same user's ranking made
            // while this one waited is used as is.
            let Ok(Ok(_permit)) =
                tokio::time::timeout(RANKING_WAIT, self.ranking_permits.acquire()).await
            else {
                // A queue longer than this: PostgreSQL answers instead.
                return None;
            };
            if let Some(ranking) = kept() {
                return Some(ranking);
            }
            // The inputs, read at once: the windows of the affinities just read.
            let keys = hash(affinities);
            let mut pipe = redis::pipe();
            pipe.atomic()
                .get(&active_key)
                .get(format!("{prefix}{}", rm::index::LISTING))
                .hgetall(&aff)
                .smembers(&read);
            for (key, _) in &keys {
                pipe.zrevrange_withscores(
                    format!("{prefix}{}{key}", rm::index::BY),
                    0,
                    candidates as isize - 1,
                );
            }
            pipe.zrevrange_withscores(
                format!("{prefix}{}", rm::index::PUBLISHED),
                0,
                candidates as isize - 1,
            );
            let answer: Vec<Value> = self.run(&pipe, &mut redis).await?;
            let [active, listing, affinities, members, windows @ ..] = &answer[..] else {
                return None;
            };
            if !still_active(&self.recommend_active, active, &v)? || hash(affinities) != keys {
                // A switch, or a read that changed the affinities meanwhile: again.
                continue;
            }
            let read: std::collections::HashSet<String> = match members {
                Value::Array(ids) => ids.iter().map(text).collect(),
                _ => return None,
            };
            let weights: Vec<(String, f64)> = keys
                .iter()
                .map(|(k, w)| Some((k.clone(), w.parse().ok()?)))
                .collect::<Option<_>>()?;
            let scored: Vec<Vec<(String, f64)>> = windows
                .iter()
                .map(|w| {
                    pairs(w)
                        .into_iter()
                        .map(|(id, score)| Some((id, score.parse().ok()?)))
                        .collect::<Option<_>>()
                })
                .collect::<Option<_>>()?;
            let (recent, windows) = scored.split_last()?;
            let ranking = Arc::new(recommend::rank(&weights, &read, windows, recent, KEPT));
            let reads = Value::Int(read.len() as i64);
            if let Some(basis) = basis(&v, listing, affinities, &reads, candidates) {
                self.rankings.keep(user, basis, ranking.clone());
            }
            return Some(ranking);
        }
    }

    /// Runs an atomic pipeline; `None` (and Redis marked down) when it fails.
    async fn run(
        &self,
        pipe: &redis::Pipeline,
        redis: &mut ConnectionManager,
    ) -> Option<Vec<Value>> {
        match pipe.query_async(redis).await {
            Ok(answer) => Some(answer),
            Err(e) => {
                self.health.failed(&e);
                None
            }
        }
    }
}

/// Whether version `v` of a model is still the active one (`active`, as just read); if not,
/// notes the new one in `slot` (`None`: the model is gone).
fn still_active(slot: &Mutex<Option<String>>, active: &Value, v: &str) -> Option<bool> {
    let active = (*active != Value::Nil).then(|| text(active));
    if active.as_deref() == Some(v) {
        return Some(true);
    }
    let gone = active.is_none();
    *slot.lock().ok()? = active;
    (!gone).then_some(false)
}

/// A list of published articles the `cache` model indexes: all, or those of one category,
/// tag or author.
pub enum Listing {
    /// Every published article.
    All,
    /// Those of a category.
    Category(String),
    /// Those with a tag.
    Tag(String),
    /// Those of an author.
    Author(Uuid),
}

impl Listing {
    /// Its index's key (relative to a version's prefix).
    fn key(&self) -> String {
        use rm::index;
        match self {
            Listing::All => index::PUBLISHED.to_owned(),
            Listing::Category(c) => index::by(index::CATEGORY, c),
            Listing::Tag(t) => index::by(index::TAG, t),
            Listing::Author(a) => index::by(index::AUTHOR, a),
        }
    }

    /// Whether `rows`, read after the index, are a page of this list after `after`: each
    /// published and of the list, newest publication first (then highest id), all before
    /// `after`. An article changed between the two reads (withdrawn, moved to another
    /// category, published again) makes the page read again.
    fn shows(&self, rows: &[NewsRow], after: Option<(i64, Uuid)>) -> bool {
        let mut before = after;
        rows.iter().all(|row| {
            let Some(at) = row.published_at.map(|at| at.timestamp_micros()) else {
                return false;
            };
            let ordered = before.is_none_or(|b| (at, row.id) < b);
            before = Some((at, row.id));
            let member = match self {
                Listing::All => true,
                Listing::Category(c) => row.category == *c,
                Listing::Tag(t) => row.tags.contains(t),
                Listing::Author(a) => row.author_id == *a,
            };
            row.status == "published" && ordered && member
        })
    }
}

/// Keeps `value` under `key` in `kept`, dropping everything kept first once it holds `most`
/// (what is kept here is worth a second at most: dropping all is cheaper than an order of
/// use). `None` if the lock is poisoned.
fn keep_bounded<K: std::hash::Hash + Eq, V>(
    kept: &Mutex<HashMap<K, V>>,
    most: usize,
    key: K,
    value: V,
) -> Option<()> {
    let mut kept = kept.lock().ok()?;
    if kept.len() >= most {
        kept.clear();
    }
    kept.insert(key, value);
    Some(())
}

/// Whether a `cache` model version of layout `layout` (as read; none: 1) has the indexes
/// lists read (a version built before them is answered from PostgreSQL).
fn indexed(layout: &Value) -> bool {
    text(layout)
        .parse::<u32>()
        .is_ok_and(|l| l >= rm::cache::LAYOUT)
}

/// The ids of one page of an index, from the answers of [`Cache::list`]'s reads: without a
/// cursor, the newest; after a cursor, those at the cursor's time with a lower id (highest
/// first), then the older ones. At most `count`.
fn page(answer: &[Value], after: Option<Uuid>, count: usize) -> Option<Vec<Uuid>> {
    let members = |value: &Value| -> Option<Vec<Uuid>> {
        match value {
            Value::Array(members) => members
                .iter()
                .map(|m| Uuid::parse_str(&text(m)).ok())
                .collect(),
            _ => None,
        }
    };
    let mut ids = match (after, answer) {
        (Some(after), [ties, older]) => {
            let mut ids: Vec<Uuid> = members(ties)?
                .into_iter()
                .filter(|id| *id < after)
                .collect();
            ids.sort_unstable_by(|a, b| b.cmp(a));
            ids.extend(members(older)?);
            ids
        }
        (None, [newest]) => members(newest)?,
        _ => return None,
    };
    ids.truncate(count);
    Some(ids)
}

/// A `WITHSCORES` reply (or a hash, in Redis's order) as (member, score) pairs.
fn pairs(value: &Value) -> Vec<(String, String)> {
    match value {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => Some((text(k), text(v))),
                _ => None,
            })
            .collect(),
        Value::Map(map) => map.iter().map(|(k, v)| (text(k), text(v))).collect(),
        _ => Vec::new(),
    }
}

/// A hash as (field, value) pairs sorted by field.
fn hash(value: &Value) -> Vec<(String, String)> {
    let mut fields = pairs(value);
    fields.sort();
    fields
}

/// The basis of a ranking, if the model keeps count of changes to its published index (a
/// model built before it did is ranked every time).
fn basis(
    version: &str,
    listing: &Value,
    affinities: &Value,
    reads: &Value,
    candidates: u32,
) -> Option<recommend::Basis> {
    if *listing == Value::Nil {
        return None;
    }
    Some(recommend::Basis {
        version: version.to_owned(),
        listing: text(listing),
        affinities: hash(affinities),
        reads: usize::try_from(match reads {
            Value::Int(n) => *n,
            _ => return None,
        })
        .ok()?,
        candidates,
    })
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
    let fields: HashMap<&str, String> = pairs
        .chunks(2)
        .filter_map(|kv| match kv {
            [k, v] => Some((field_name(k)?, text(v))),
            _ => None,
        })
        .collect();
    let reads = parts
        .get(2)
        .map(text)
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    row(
        &fields,
        true,
        parts.get(1).map(text).unwrap_or_default(),
        reads,
    )
}

/// A field's name as one of the fields articles have (others are ignored).
fn field_name(value: &Value) -> Option<&'static str> {
    let Value::BulkString(bytes) = value else {
        return None;
    };
    field::LISTED_ARTICLE
        .iter()
        .chain(&[field::CONTENT])
        .find(|name| name.as_bytes() == bytes.as_slice())
        .copied()
}

/// A row from a cached article's `fields` (`content`: whether they hold it).
fn row(
    fields: &HashMap<&str, String>,
    content: bool,
    author_name: String,
    read_count: i64,
) -> anyhow::Result<NewsRow> {
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
        id: Uuid::parse_str(&field(field::ID)?)?,
        category: field(field::CATEGORY)?,
        title: field(field::TITLE)?,
        content: if content {
            field(field::CONTENT)?
        } else {
            String::new()
        },
        tags: serde_json::from_str(&field(field::TAGS)?).context("tags")?,
        author_id: Uuid::parse_str(&field(field::AUTHOR)?)?,
        author_name,
        status: field(field::STATUS)?,
        version: field(field::VERSION)?.parse()?,
        created_at: micros(field::CREATED)?.context("no creation time")?,
        updated_at: micros(field::UPDATED)?.context("no update time")?,
        published_at: micros(field::PUBLISHED)?,
        read_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[Uuid]) -> Value {
        Value::Array(
            ids.iter()
                .map(|id| Value::BulkString(id.to_string().into_bytes()))
                .collect(),
        )
    }

    #[test]
    fn a_page_after_a_cursor_takes_the_lower_ids_of_its_time_then_the_older_ones() {
        let mut tied: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        tied.sort();
        let older: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        // The cursor is the middle one of five articles published at the same time;
        // ZRANGE BYSCORE answers them in ascending order.
        let answer = [members(&tied), members(&older)];
        let ids = page(&answer, Some(tied[2]), 10).expect("a page");
        let mut expected = vec![tied[1], tied[0]];
        expected.extend(&older);
        assert_eq!(ids, expected);
        assert_eq!(
            page(&answer, Some(tied[2]), 3),
            Some(vec![tied[1], tied[0], older[0]])
        );
        // Without a cursor, the newest as Redis orders them.
        assert_eq!(page(&[members(&older)], None, 2), Some(older[..2].to_vec()));
        // A member that is no id, or an answer of another shape: Redis cannot answer.
        let bad = Value::Array(vec![Value::BulkString(b"x".to_vec())]);
        assert_eq!(page(&[bad], None, 2), None);
        assert_eq!(page(&answer, None, 2), None);
    }
}
