-- Which attempt holds a pending idempotency record: a retry that takes over a stale
-- record (its process died, or is very slow) gets a new attempt id, and the old request's
-- later finish or forget no longer touches the record (ADR 16).
ALTER TABLE cmd_idempotency ADD COLUMN attempt uuid;

-- The user a stored answer is about (its path or Location names them), so that erasing
-- them also forgets answers that hold their name and e-mail.
ALTER TABLE cmd_idempotency ADD COLUMN subject uuid;
CREATE INDEX cmd_idempotency_caller ON cmd_idempotency (caller);
CREATE INDEX cmd_idempotency_subject ON cmd_idempotency (subject) WHERE subject IS NOT NULL;
