-- Sessions of the web console (ADR 29). The cookie holds a random secret; only its SHA-256
-- is kept, so that reading this table opens no session. Logging out deletes the row.
CREATE TABLE console_sessions (
    secret_hash bytea       PRIMARY KEY,
    user_id     uuid        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
