-- Which attempt holds a pending idempotency record: a retry that takes over a stale
-- record (its process died, or is very slow) gets a new attempt id, and the old request's
-- later finish or forget no longer touches the record (ADR 16).
ALTER TABLE cmd_idempotency ADD COLUMN attempt uuid;
