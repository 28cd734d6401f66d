-- Erased users stay as rows without personal data, so that a redelivered or replayed
-- registration cannot bring them back (writes are guarded by version).
ALTER TABLE users
    ADD COLUMN erased boolean NOT NULL DEFAULT false,
    ADD COLUMN notifications_read_at timestamptz;
