-- The news read model: one row per article, deleted ones kept as hidden tombstones so that
-- a replayed creation cannot bring them back (writes are guarded by version).
CREATE TABLE news (
    id           uuid        PRIMARY KEY,
    author_id    uuid        NOT NULL,
    category     text        NOT NULL,
    title        text        NOT NULL,
    content      text        NOT NULL,
    tags         text[]      NOT NULL DEFAULT '{}',
    status       text        NOT NULL CHECK (status IN ('draft', 'published', 'archived', 'deleted')),
    version      bigint      NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    published_at timestamptz,
    read_count   bigint      NOT NULL DEFAULT 0
);

-- Lists: published only, newest publication first, keyset pagination on (published_at, id).
CREATE INDEX news_published ON news (published_at DESC, id DESC) WHERE status = 'published';
CREATE INDEX news_published_by_category ON news (category, published_at DESC, id DESC) WHERE status = 'published';
CREATE INDEX news_published_by_author ON news (author_id, published_at DESC, id DESC) WHERE status = 'published';
CREATE INDEX news_tags ON news USING gin (tags) WHERE status = 'published';
