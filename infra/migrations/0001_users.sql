-- Offsets each projection has applied, written in the same transaction as its rows.
CREATE TABLE projection_offsets (
    projection  text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

-- The users read model (no password hash: the query side never needs it).
CREATE TABLE users (
    id                  uuid        PRIMARY KEY,
    name                text        NOT NULL,
    email               text        NOT NULL,
    role                text        NOT NULL,
    followed_categories text[]      NOT NULL DEFAULT '{}',
    email_notifications boolean     NOT NULL DEFAULT false,
    version             bigint      NOT NULL,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);
