//! What a query process keeps of what it answered, to answer it again without asking
//! Redis: bounded maps of rendered answers ([`Bounded`]), and the articles kept until the
//! cache projection says they changed ([`KeptArticles`], ADR 33).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use futures::StreamExt as _;
use newsroom_infra::read_models as rm;
use newsroom_infra::settings::RedisSettings;
use uuid::Uuid;

use crate::routes::news::NewsRow;

/// Something kept: when it was read, and what it costs to keep.
pub trait Weighed {
    /// When it was read.
    fn at(&self) -> Instant;
    /// Its bytes.
    fn size(&self) -> usize;
}

/// A map bounded by count and by bytes. At a bound, what is older than `fresh` goes first,
/// and if that is not enough, everything (a client walking every key empties the map
/// rather than growing it; what is kept here is cheap to read again).
pub struct Bounded<K, V> {
    entries: HashMap<K, V>,
    bytes: usize,
    most: usize,
    most_bytes: usize,
    fresh: Duration,
}

impl<K: Hash + Eq, V: Weighed> Bounded<K, V> {
    /// Empty; at most `most` entries and `most_bytes` bytes.
    pub fn new(most: usize, most_bytes: usize, fresh: Duration) -> Self {
        Bounded {
            entries: HashMap::new(),
            bytes: 0,
            most,
            most_bytes,
            fresh,
        }
    }

    /// What is kept under `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    /// Keeps `value` under `key`, within the bounds.
    pub fn keep(&mut self, key: K, value: V) {
        let size = value.size();
        // Replacing an entry adds none, and takes its bytes back.
        let full = |kept: &Self| {
            let old = kept.entries.get(&key);
            kept.entries.len() + usize::from(old.is_none()) > kept.most
                || kept.bytes - old.map_or(0, V::size) + size > kept.most_bytes
        };
        if full(self) {
            let fresh = self.fresh;
            self.entries.retain(|_, v| v.at().elapsed() < fresh);
            self.bytes = self.entries.values().map(V::size).sum();
        }
        if full(self) {
            self.clear();
        }
        self.bytes += size;
        if let Some(old) = self.entries.insert(key, value) {
            self.bytes -= old.size();
        }
    }

    /// Forgets what is kept under `key`.
    pub fn forget(&mut self, key: &K) {
        if let Some(old) = self.entries.remove(key) {
            self.bytes -= old.size();
        }
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// How many entries are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<T: Weighed> Weighed for Arc<T> {
    fn at(&self) -> Instant {
        T::at(self)
    }
    fn size(&self) -> usize {
        T::size(self)
    }
}

/// At most this many articles are kept per process.
const ARTICLES_KEPT: usize = 65_536;
/// At most this many bytes of kept articles (rendered, with their content) per process.
const ARTICLES_BYTES: usize = 64 << 20;
/// An article is read again from Redis after this long even if no change was announced
/// (a bound on what a lost announcement could cost; announcements are not lost while the
/// subscription lives, and a subscription that dies empties the kept articles).
pub const ARTICLE_FRESH: Duration = Duration::from_secs(10);
/// How often the subscription is checked with a PING, and how long the answer may take.
const SUBSCRIPTION_PING: Duration = Duration::from_millis(500);
/// How long to wait before subscribing again after the subscription failed.
const RESUBSCRIBE: Duration = Duration::from_millis(500);

/// An article as this process rendered it, with the row its visibility and the reads it
/// records are decided from.
pub struct KeptArticle {
    /// The row.
    pub row: NewsRow,
    /// Its JSON.
    pub body: Bytes,
    at: Instant,
}

impl KeptArticle {
    /// `row`, rendered as `body`, read now.
    pub fn new(row: NewsRow, body: Bytes) -> Self {
        KeptArticle {
            row,
            body,
            at: Instant::now(),
        }
    }
}

impl Weighed for KeptArticle {
    fn at(&self) -> Instant {
        self.at
    }
    fn size(&self) -> usize {
        self.body.len() + self.row.content.len() + 512
    }
}

/// Which kept article is newer: a higher version, then more reads (both only grow).
fn newer(a: &NewsRow, b: &NewsRow) -> bool {
    (a.version, a.read_count) > (b.version, b.read_count)
}

struct ArticlesState {
    /// Whether the subscription to the model's announcements is live: nothing is kept or
    /// answered from what is kept otherwise.
    live: bool,
    /// Counts the announcements (and subscriptions) this process took in: an article read
    /// from Redis is kept only if none came in while it was read (the one that did may be
    /// about it, and may have come in before the answer that is already stale).
    generation: u64,
    /// The model version the last announcement named.
    version: Option<String>,
    articles: Bounded<Uuid, Arc<KeptArticle>>,
}

/// Articles of the `cache` model kept per process until the cache projection announces a
/// change to them (ADR 33). The projector's batch script publishes, with each live batch,
/// the keys it wrote on `<root>:changed` (read_models.rs `CHANGED`), but for the articles
/// it created (no process can have kept those, ADR 36); a replay's switch
/// publishes the new version. A kept article is answered to requests without a
/// consistency token only, while the subscription lives.
#[derive(Clone)]
pub struct KeptArticles {
    state: Arc<Mutex<ArticlesState>>,
}

/// Taken before an article is read from Redis, handed back to keep it.
pub struct Ticket(u64);

impl KeptArticles {
    /// Kept articles of the model under `root`, following its announcements on the Redis
    /// of `settings` from a task of their own (stopped once every handle is gone).
    pub fn follow(settings: &RedisSettings, root: &str) -> Self {
        let kept = KeptArticles::unfollowed();
        let weak = Arc::downgrade(&kept.state);
        let url = settings.url.clone();
        let channel = format!("{root}:{}", rm::CHANGED);
        tokio::spawn(async move {
            while let Some(state) = weak.upgrade() {
                let followed = follow(&url, &channel, &state).await;
                end_subscription(&state);
                drop(state);
                if let Err(e) = followed {
                    tracing::debug!(
                        error = format!("{e:#}"),
                        "the kept articles' subscription ended"
                    );
                }
                tokio::time::sleep(RESUBSCRIBE).await;
            }
        });
        kept
    }

    /// Kept articles that nothing follows yet (none is kept until a subscription lives).
    fn unfollowed() -> Self {
        KeptArticles {
            state: Arc::new(Mutex::new(ArticlesState {
                live: false,
                generation: 0,
                version: None,
                articles: Bounded::new(ARTICLES_KEPT, ARTICLES_BYTES, ARTICLE_FRESH),
            })),
        }
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, ArticlesState>> {
        self.state.lock().ok()
    }

    /// The article `id` as kept, if the subscription lives and it was read less than
    /// [`ARTICLE_FRESH`] ago.
    pub fn get(&self, id: Uuid) -> Option<Arc<KeptArticle>> {
        let state = self.lock()?;
        let kept = state.articles.get(&id).filter(|_| state.live)?;
        (kept.at.elapsed() < ARTICLE_FRESH).then(|| kept.clone())
    }

    /// A ticket to keep an article read after this call; `None` while the subscription is
    /// not live.
    pub fn ticket(&self) -> Option<Ticket> {
        let state = self.lock()?;
        state.live.then_some(Ticket(state.generation))
    }

    /// Keeps `article` (read at model version `version` after `ticket` was taken), unless an announcement came in since the ticket, or a newer copy is kept.
    pub fn keep(&self, ticket: Ticket, version: &str, article: Arc<KeptArticle>) {
        let Some(mut state) = self.lock() else {
            return;
        };
        if !state.live
            || state.generation != ticket.0
            || state.version.as_deref().is_some_and(|v| v != version)
            || (state.articles.get(&article.row.id)).is_some_and(|k| newer(&k.row, &article.row))
        {
            return;
        }
        state.articles.keep(article.row.id, article);
    }

    /// Forgets the kept copy of `row`'s article if `row` is newer (read with a consistency
    /// token), and keeps nothing read before now (a read still under way may be older
    /// than `row`): a request without a token then reads no older copy than the one
    /// answered with it, even before the change is announced.
    pub fn saw(&self, row: &NewsRow) {
        if let Some(mut state) = self.lock() {
            state.generation += 1;
            if state
                .articles
                .get(&row.id)
                .is_some_and(|k| newer(row, &k.row))
            {
                state.articles.forget(&row.id);
            }
        }
    }
}

/// Subscribes to `channel` and applies its announcements to `state` until the subscription
/// fails or every handle of the kept articles is gone.
async fn follow(url: &str, channel: &str, state: &Arc<Mutex<ArticlesState>>) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let pubsub = tokio::time::timeout(SUBSCRIPTION_PING, client.get_async_pubsub()).await??;
    let (mut sink, mut stream) = pubsub.split();
    tokio::time::timeout(SUBSCRIPTION_PING, sink.subscribe(channel)).await??;
    subscribed(&mut *state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let mut ping = tokio::time::interval(SUBSCRIPTION_PING);
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    anyhow::bail!("the subscription was closed");
                };
                let text: String = message.get_payload()?;
                let mut state = state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                announced(&mut state, &text);
            }
            _ = ping.tick() => {
                tokio::time::timeout(SUBSCRIPTION_PING, sink.ping::<redis::Value>()).await??;
                // Only this task holds the state: the process dropped the kept articles.
                if Arc::strong_count(state) == 1 {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Starts keeping articles: the subscription lives from now on.
fn subscribed(state: &mut ArticlesState) {
    state.live = true;
    state.generation += 1;
    state.articles.clear();
    state.version = None;
}

/// Empties the kept articles and stops keeping them until the next subscription.
fn end_subscription(state: &Mutex<ArticlesState>) {
    if let Ok(mut state) = state.lock() {
        state.live = false;
        state.generation += 1;
        state.articles.clear();
    }
}

/// Applies one announcement: `<version>` then the keys written, relative to the version's
/// prefix. Another version than the last one named empties the kept articles.
fn announced(state: &mut ArticlesState, text: &str) {
    state.generation += 1;
    let mut words = text.split(' ');
    let version = words.next().unwrap_or_default();
    if state.version.as_deref() != Some(version) {
        state.articles.clear();
        state.version = Some(version.to_owned());
        return;
    }
    for key in words {
        let id = key
            .strip_prefix(rm::cache::ARTICLE)
            .or_else(|| key.strip_prefix(rm::cache::READS));
        if let Some(id) = id.and_then(|id| Uuid::parse_str(id).ok()) {
            state.articles.forget(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> KeptArticles {
        let kept = KeptArticles::unfollowed();
        subscribed(&mut kept.lock().expect("state"));
        kept
    }

    fn article(id: Uuid, version: i64, read_count: i64) -> Arc<KeptArticle> {
        let at = chrono::Utc::now();
        let row = NewsRow {
            id,
            category: "sports".into(),
            title: format!("version {version}"),
            content: "Text.".into(),
            tags: Vec::new(),
            author_id: Uuid::nil(),
            author_name: "Ann".into(),
            status: "published".into(),
            version,
            created_at: at,
            updated_at: at,
            published_at: Some(at),
            read_count,
        };
        Arc::new(KeptArticle::new(
            row,
            Bytes::from(format!("{version}/{read_count}")),
        ))
    }

    fn announce(kept: &KeptArticles, text: &str) {
        announced(&mut kept.lock().expect("state"), text);
    }

    /// Keeps `article` read at `version` with a ticket taken just before.
    fn keep_now(kept: &KeptArticles, version: &str, article: Arc<KeptArticle>) {
        kept.keep(kept.ticket().expect("live"), version, article);
    }

    fn body(kept: &KeptArticles, id: Uuid) -> Option<Bytes> {
        kept.get(id).map(|a| a.body.clone())
    }

    #[test]
    fn an_article_is_kept_until_a_change_to_its_keys_is_announced() {
        let kept = live();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        announce(&kept, "1");
        for id in [a, b] {
            let ticket = kept.ticket().expect("live");
            kept.keep(ticket, "1", article(id, 2, 0));
        }
        assert_eq!(body(&kept, a).as_deref(), Some(&b"2/0"[..]));
        announce(&kept, &format!("1 {}{a} published", rm::cache::ARTICLE));
        assert_eq!(body(&kept, a), None, "its hash was written");
        assert!(body(&kept, b).is_some(), "another article stays");
        announce(&kept, &format!("1 {}{b}", rm::cache::READS));
        assert_eq!(body(&kept, b), None, "its read count was written");
    }

    #[test]
    fn an_article_read_while_an_announcement_came_in_is_not_kept() {
        let kept = live();
        let a = Uuid::now_v7();
        announce(&kept, "1");
        let ticket = kept.ticket().expect("live");
        // The answer may be older than the change announced meanwhile.
        announce(
            &kept,
            &format!("1 {}{}", rm::cache::ARTICLE, Uuid::now_v7()),
        );
        kept.keep(ticket, "1", article(a, 2, 0));
        assert_eq!(body(&kept, a), None);
    }

    #[test]
    fn an_older_copy_does_not_replace_a_newer_one_and_a_newer_read_forgets_it() {
        let kept = live();
        let a = Uuid::now_v7();
        announce(&kept, "1");
        keep_now(&kept, "1", article(a, 3, 5));
        keep_now(&kept, "1", article(a, 3, 4));
        keep_now(&kept, "1", article(a, 2, 9));
        assert_eq!(body(&kept, a).as_deref(), Some(&b"3/5"[..]));
        keep_now(&kept, "1", article(a, 3, 6));
        assert_eq!(body(&kept, a).as_deref(), Some(&b"3/6"[..]));
        kept.saw(&article(a, 3, 6).row);
        assert!(body(&kept, a).is_some(), "the same copy stays");
        kept.saw(&article(a, 4, 6).row);
        assert_eq!(body(&kept, a), None, "a newer one read with a token");
        // A read under way while a newer copy was read with a token is not kept.
        let ticket = kept.ticket().expect("live");
        kept.saw(&article(a, 5, 6).row);
        kept.keep(ticket, "1", article(a, 4, 6));
        assert_eq!(body(&kept, a), None);
    }

    #[test]
    fn a_bounded_map_drops_expired_entries_then_all_and_replacing_one_adds_none() {
        let mut kept = Bounded::new(2, 10_000, Duration::from_secs(60));
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        kept.keep(a, article(a, 1, 0));
        kept.keep(b, article(b, 1, 0));
        kept.keep(b, article(b, 2, 0));
        assert_eq!(kept.len(), 2, "a replaced entry is not one more");
        kept.keep(c, article(c, 1, 0));
        assert_eq!(kept.len(), 1, "none expired: all dropped");
        assert!(kept.get(&c).is_some());
        let mut expired = Bounded::new(2, 10_000, Duration::ZERO);
        expired.keep(a, article(a, 1, 0));
        expired.keep(b, article(b, 1, 0));
        expired.keep(c, article(c, 1, 0));
        assert_eq!(expired.len(), 1, "the expired ones dropped");
        let mut small = Bounded::new(10, 1000, Duration::from_secs(60));
        small.keep(a, article(a, 1, 0));
        small.keep(b, article(b, 1, 0));
        assert_eq!(small.len(), 1, "the bytes bound");
        assert!(!small.is_empty());
    }

    #[test]
    fn another_version_or_a_lost_subscription_forgets_every_article() {
        let kept = live();
        let a = Uuid::now_v7();
        announce(&kept, "1");
        keep_now(&kept, "1", article(a, 2, 0));
        keep_now(&kept, "2", article(Uuid::now_v7(), 2, 0));
        assert!(
            body(&kept, a).is_some(),
            "only the announced version is kept"
        );
        announce(&kept, "2");
        assert_eq!(body(&kept, a), None, "a replay switched versions");
        keep_now(&kept, "2", article(a, 2, 0));
        assert!(body(&kept, a).is_some());
        end_subscription(&kept.state);
        assert_eq!(body(&kept, a), None);
        assert!(
            kept.ticket().is_none(),
            "nothing is kept without a subscription"
        );
    }
}
