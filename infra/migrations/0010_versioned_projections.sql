-- Versioned read models (ADR 8). Each projection's tables live in a schema of their own,
-- `<projection>_v<n>`; the query side reads them through views in `public` that point at
-- the active version. `newsroom replay` builds version n+1 beside it and repoints the
-- views in one transaction.
CREATE TABLE projection_versions (
    projection      text        PRIMARY KEY,
    active          integer     NOT NULL,
    -- The version a replay is building, if one is.
    building        integer,
    -- While set and in the future, the live consumer holds its writes so that a replay
    -- can catch up with it and switch.
    switching_until timestamptz
);
INSERT INTO projection_versions (projection, active) VALUES ('users', 1), ('news', 1), ('reads', 1);

ALTER TABLE projection_offsets ADD COLUMN version integer NOT NULL DEFAULT 1;
ALTER TABLE projection_offsets DROP CONSTRAINT projection_offsets_pkey;
ALTER TABLE projection_offsets ADD PRIMARY KEY (projection, version, topic, partition);

-- Read counts belong to the reads projection (they were a column the news projection
-- owned, which two consumers wrote).
CREATE SCHEMA reads_v1;
CREATE TABLE reads_v1.news_read_counts (
    news_id uuid   PRIMARY KEY,
    reads   bigint NOT NULL
);
INSERT INTO reads_v1.news_read_counts (news_id, reads) SELECT id, read_count FROM news WHERE read_count > 0;
ALTER TABLE news DROP COLUMN read_count;
ALTER TABLE reading_history SET SCHEMA reads_v1;
ALTER TABLE news_reads_hourly SET SCHEMA reads_v1;

CREATE SCHEMA users_v1;
ALTER TABLE users SET SCHEMA users_v1;
CREATE SCHEMA news_v1;
ALTER TABLE news SET SCHEMA news_v1;

CREATE VIEW users AS SELECT * FROM users_v1.users;
CREATE VIEW news AS SELECT * FROM news_v1.news;
CREATE VIEW reading_history AS SELECT * FROM reads_v1.reading_history;
CREATE VIEW news_reads_hourly AS SELECT * FROM reads_v1.news_reads_hourly;
CREATE VIEW news_read_counts AS SELECT * FROM reads_v1.news_read_counts;

-- Events a consumer could not apply, and the later events of the same aggregate parked
-- behind them (per consumer and version). `reason` is set on the ones that failed;
-- `action` is what `newsroom dead-letters retry|skip` asked the consumer to do.
CREATE TABLE dead_letters (
    consumer   text        NOT NULL,
    version    integer     NOT NULL,
    topic      text        NOT NULL,
    partition  integer     NOT NULL,
    "offset"   bigint      NOT NULL,
    aggregate  text        NOT NULL,
    payload    bytea,
    reason     text,
    attempts   integer     NOT NULL DEFAULT 0,
    action     text        CHECK (action IN ('retry', 'skip')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, version, topic, partition, "offset")
);
CREATE INDEX dead_letters_by_aggregate ON dead_letters (consumer, version, topic, aggregate, partition, "offset");
