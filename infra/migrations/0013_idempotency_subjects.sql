-- The user a stored answer is about (its path or Location names them), so that erasing
-- them also forgets answers that hold their name and e-mail (the primary key serves the
-- look-up by caller).
ALTER TABLE cmd_idempotency ADD COLUMN subject uuid;
CREATE INDEX cmd_idempotency_subject ON cmd_idempotency (subject) WHERE subject IS NOT NULL;
