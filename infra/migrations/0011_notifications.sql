-- The notifier's read model (ADR 11), versioned like the others: who follows which
-- category over which interval, the articles with their first publication, the inbox, and
-- e-mail preferences. Its own copies, so that a replay gives the same inbox whatever order
-- the users and news streams are read in.
CREATE SCHEMA notify_v1;
CREATE TABLE notify_v1.notify_follows (
    user_id  uuid        NOT NULL,
    category text        NOT NULL,
    since    timestamptz NOT NULL,
    until    timestamptz,
    PRIMARY KEY (user_id, category, since)
);
CREATE INDEX notify_follows_by_category ON notify_v1.notify_follows (category, since);
CREATE TABLE notify_v1.notify_articles (
    news_id      uuid        PRIMARY KEY,
    title        text        NOT NULL,
    category     text        NOT NULL,
    version      bigint      NOT NULL,
    -- The first publication: later ones notify nobody again.
    published_at timestamptz
);
CREATE INDEX notify_articles_published ON notify_v1.notify_articles (category, published_at) WHERE published_at IS NOT NULL;
CREATE TABLE notify_v1.notify_subscribers (
    user_id  uuid    PRIMARY KEY,
    email_on boolean NOT NULL
);
-- One entry per (user, article), created at the article's first publication.
CREATE TABLE notify_v1.notify_inbox (
    user_id    uuid        NOT NULL,
    news_id    uuid        NOT NULL,
    title      text        NOT NULL,
    category   text        NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, news_id)
);
CREATE INDEX notify_inbox_by_user ON notify_v1.notify_inbox (user_id, created_at DESC, news_id DESC);
INSERT INTO projection_versions (projection, active) VALUES ('notify', 1);
CREATE VIEW notify_follows AS SELECT * FROM notify_v1.notify_follows;
CREATE VIEW notify_articles AS SELECT * FROM notify_v1.notify_articles;
CREATE VIEW notify_subscribers AS SELECT * FROM notify_v1.notify_subscribers;
CREATE VIEW notify_inbox AS SELECT * FROM notify_v1.notify_inbox;

-- E-mails to send: a side effect, not a read model. Rows are written by the live notifier
-- in the same transaction as the inbox entries (never by a replay), one per (user,
-- article), and the mailer marks them sent.
CREATE TABLE email_outbox (
    user_id         uuid        NOT NULL,
    news_id         uuid        NOT NULL,
    title           text        NOT NULL,
    category        text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    last_error      text,
    PRIMARY KEY (user_id, news_id)
);
CREATE INDEX email_outbox_due ON email_outbox (next_attempt_at) WHERE sent_at IS NULL;
