//! The key layout of the Redis read models, in one place for the projector that writes
//! them, the query API that reads them and the Lua scripts of both (issue 12): a change of
//! layout is a change here. Every key is relative to a model version's prefix,
//! `<topic prefix>:<model>:v<version>:` (see `redis::root`).

use std::fmt::Display;

/// Where a model version keeps the offsets its consumer applied: a hash from
/// `<topic>~<partition>` to the next offset (`offsets`).
pub const OFFSETS: &str = "offsets";
/// The layout number a model version was built with, set by its first batch (a version
/// built before layouts were numbered has none: layout 1).
pub const LAYOUT: &str = "layout";
/// The channel on which a model's live batches announce what they wrote
/// (`<root>:changed`, beside `<root>:active`): each message is the version written, then
/// the keys written, relative to the version's prefix, separated by spaces (a document
/// created by the write is left out, ADR 36; a batch that only creates sends none); a
/// replay's switch announces the new version alone. Query processes forget what they
/// kept of those keys (ADR 33).
pub const CHANGED: &str = "changed";

/// The `cache` model: articles, their readers' counts and the trending buckets.
pub mod cache {
    /// An article: a hash of its fields (`news:<id>`).
    pub const ARTICLE: &str = "news:";
    /// How often an article was read: a counter (`reads:<id>`).
    pub const READS: &str = "reads:";
    /// Reads per article in one hour: a sorted set (`trending:<unix hour start>`).
    pub const TRENDING: &str = "trending:";
    /// An author's display name: a hash with the field `name` (`name:<user id>`).
    pub const AUTHOR_NAME: &str = "name:";
    /// The article keys of an author: a set (`authored:<user id>`).
    pub const AUTHORED: &str = "authored:";
    /// The layout's number: layout 2 added the [`index`](super::index) of published
    /// articles that lists read. A version built from scratch records the layout it was
    /// built with under [`LAYOUT`](super::LAYOUT); the query API reads lists from a
    /// version of this layout or later only (PostgreSQL answers them from an older one,
    /// until `newsroom replay cache` builds a new version).
    pub const LAYOUT: u32 = 2;
}

/// The indexes of published documents, by publication time (microseconds as the score,
/// the id as the member, so that equal times order by id as PostgreSQL does): the
/// `recommend` model's articles (`art:<id>`) and, since its layout 2, the `cache` model's
/// (`news:<id>`), in each model's own keys. A listed document's hash has a
/// [`LISTED`](field::LISTED) field; its [`AUTHOR`](field::AUTHOR) field, if any, indexes
/// it by author too.
pub mod index {
    use std::fmt::Display;

    /// Every published document: a sorted set.
    pub const PUBLISHED: &str = "published";
    /// The prefix of the per-category, per-tag and per-author indexes.
    pub const BY: &str = "by:";
    /// What follows [`BY`] for a category (`by:cat:<category>`).
    pub const CATEGORY: &str = super::recommend::CATEGORY;
    /// What follows [`BY`] for a tag (`by:tag:<tag>`).
    pub const TAG: &str = super::recommend::TAG;
    /// What follows [`BY`] for an author (`by:author:<user id>`).
    pub const AUTHOR: &str = "author:";
    /// A counter of the changes to the indexes (a ranking computed before the last change
    /// may be stale).
    pub const LISTING: &str = "listing";

    /// The index of one category, tag or author (`kind` one of [`CATEGORY`], [`TAG`],
    /// [`AUTHOR`]).
    pub fn by(kind: &str, name: impl Display) -> String {
        format!("{BY}{kind}{name}")
    }
}

/// The `recommend` model: what each reader read and likes, and (in the
/// [`index`](super::index)) the published articles by category and tag.
pub mod recommend {
    /// An article's category and tags: a hash (`art:<id>`).
    pub const ARTICLE: &str = "art:";
    /// The articles a user read: a set (`read:<user id>`).
    pub const USER_READS: &str = "read:";
    /// A user's affinities: a hash from `cat:<category>` / `tag:<tag>` to a weight
    /// (`aff:<user id>`).
    pub const AFFINITIES: &str = "aff:";
    /// An affinity to a category (field of [`AFFINITIES`], part of a [`BY`] key).
    pub const CATEGORY: &str = "cat:";
    /// An affinity to a tag.
    pub const TAG: &str = "tag:";
    /// The ids of erased users: a set. Their [`AFFINITIES`] and [`USER_READS`] are deleted
    /// and reads of theirs applied later (a replay reads the users and reads topics in any
    /// interleaving) write nothing.
    pub const ERASED: &str = "erased";

    /// The category or tag an affinity field names (`cat:sports` → `sports`).
    pub fn affinity_name(field: &str) -> &str {
        field
            .strip_prefix(CATEGORY)
            .or_else(|| field.strip_prefix(TAG))
            .unwrap_or(field)
    }
}

/// The fields of the models' hashes. An article of the `cache` model (`news:<id>`) has
/// every one from [`ID`](field::ID) to [`PUBLISHED`](field::PUBLISHED); an article of the
/// `recommend` model (`art:<id>`) has [`CATEGORY`](field::CATEGORY),
/// [`TAGS`](field::TAGS), [`VERSION`](field::VERSION) and, while it is listed,
/// [`LISTED`](field::LISTED); an author's name hash has [`NAME`](field::NAME).
pub mod field {
    /// The article's id.
    pub const ID: &str = "id";
    /// Its category (`famous`, `politics`, `sports`).
    pub const CATEGORY: &str = "category";
    /// Its title.
    pub const TITLE: &str = "title";
    /// Its text.
    pub const CONTENT: &str = "content";
    /// Its tags: a JSON array of strings.
    pub const TAGS: &str = "tags";
    /// Its author's user id.
    pub const AUTHOR: &str = "author";
    /// Its author's display name, copied from the author's name hash.
    pub const AUTHOR_NAME: &str = "author_name";
    /// `draft`, `published`, `archived` or `deleted`.
    pub const STATUS: &str = "status";
    /// The aggregate version the hash was last written at (every versioned hash has it).
    pub const VERSION: &str = "version";
    /// When it was drafted: microseconds since the epoch, as text.
    pub const CREATED: &str = "created";
    /// When it last changed: microseconds since the epoch, as text.
    pub const UPDATED: &str = "updated";
    /// When it was published: microseconds since the epoch, as text; empty unless published.
    pub const PUBLISHED: &str = "published";
    /// A listed `recommend` article's score in its indexes (its publication time).
    pub const LISTED: &str = "_listed";
    /// A user's display name, in the user's name hash.
    pub const NAME: &str = "name";
    /// The fields of a `cache` article a list shows: all but its content.
    pub const LISTED_ARTICLE: [&str; 11] = [
        ID,
        CATEGORY,
        TITLE,
        TAGS,
        AUTHOR,
        AUTHOR_NAME,
        STATUS,
        VERSION,
        CREATED,
        UPDATED,
        PUBLISHED,
    ];
}

/// The key of `id` in the family `family` (one of the constants above).
pub fn key(family: &str, id: impl Display) -> String {
    format!("{family}{id}")
}

/// A Lua script with each `{{NAME}}` of the layout replaced by its value (the scripts name
/// keys this way, so that they follow the layout too).
pub fn lua(script: &str) -> String {
    [
        ("{{ARTICLE}}", cache::ARTICLE),
        ("{{OFFSETS}}", OFFSETS),
        ("{{LAYOUT}}", LAYOUT),
        ("{{CHANGED}}", CHANGED),
        ("{{READS}}", cache::READS),
        ("{{TRENDING}}", cache::TRENDING),
        ("{{AUTHOR_NAME}}", cache::AUTHOR_NAME),
        ("{{AUTHORED}}", cache::AUTHORED),
        ("{{CATEGORY}}", index::CATEGORY),
        ("{{TAG}}", index::TAG),
        ("{{BY_AUTHOR}}", index::AUTHOR),
        ("{{BY}}", index::BY),
        ("{{PUBLISHED}}", index::PUBLISHED),
        ("{{LISTING}}", index::LISTING),
        ("{{F_CATEGORY}}", field::CATEGORY),
        ("{{F_TAGS}}", field::TAGS),
        ("{{F_AUTHOR}}", field::AUTHOR),
        ("{{F_STATUS}}", field::STATUS),
        ("{{F_VERSION}}", field::VERSION),
        ("{{F_PUBLISHED}}", field::PUBLISHED),
        ("{{F_LISTED}}", field::LISTED),
        ("{{F_NAME}}", field::NAME),
    ]
    .iter()
    .fold(script.to_owned(), |text, (name, value)| {
        text.replace(name, value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_get_the_layout_and_no_placeholder_is_left() {
        let text = lua(
            "redis.call('GET', prefix .. '{{READS}}' .. id); '{{BY}}{{TAG}}'; '{{PUBLISHED}}{{F_PUBLISHED}}'",
        );
        assert_eq!(
            text,
            "redis.call('GET', prefix .. 'reads:' .. id); 'by:tag:'; 'publishedpublished'"
        );
        assert_eq!(recommend::affinity_name("cat:sports"), "sports");
        assert_eq!(recommend::affinity_name("tag:f1"), "f1");
        assert_eq!(key(cache::ARTICLE, 7), "news:7");
    }

    #[test]
    fn both_scripts_are_left_with_no_placeholder() {
        for script in [
            include_str!("../../projector/src/redis_batch.lua"),
            include_str!("../../query/src/cache_trending.lua"),
        ] {
            assert!(
                script.contains("{{"),
                "the script names keys through the layout"
            );
            assert!(!lua(script).contains("{{"), "{}", lua(script));
        }
    }
}
