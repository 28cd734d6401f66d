-- Reading history (one row per read; the event id makes redelivery a no-op) and the
-- per-article read counts it feeds.
CREATE TABLE reading_history (
    event_id uuid        PRIMARY KEY,
    user_id  uuid        NOT NULL,
    news_id  uuid        NOT NULL,
    read_at  timestamptz NOT NULL
);
CREATE INDEX reading_history_by_user ON reading_history (user_id, read_at DESC, event_id DESC);
