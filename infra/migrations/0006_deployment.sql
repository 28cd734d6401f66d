-- The deployment (topic prefix) this database belongs to: read models, claims, keys and
-- snapshots only make sense with the topics they came from.
CREATE TABLE deployment (
    only_row     boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    topic_prefix text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
