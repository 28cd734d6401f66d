-- Idempotency keys of commands: the first request with a key records its outcome; a
-- retry with the same key and the same request gets that outcome again, a different
-- request with the key is refused. Rows older than 24 hours no longer count.
CREATE TABLE cmd_idempotency (
    caller       text        NOT NULL,
    key          text        NOT NULL,
    request_hash text        NOT NULL,
    state        text        NOT NULL CHECK (state IN ('pending', 'done')),
    status       integer,
    headers      jsonb,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key)
);
CREATE INDEX cmd_idempotency_created ON cmd_idempotency (created_at);
