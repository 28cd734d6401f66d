-- Command-side indexes. Kafka stays the source of truth: each table can be rebuilt from
-- the log (claims and keys from the User events, owners from the consumer group).

-- Per-user data keys for crypto-shredding. Deleting a row makes that user's personal
-- fields in every event unreadable.
CREATE TABLE cmd_user_keys (
    user_id    uuid        PRIMARY KEY,
    key        bytea       NOT NULL,
    partition  integer     NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per claimed e-mail (keyed hash of the normalised address): the uniqueness
-- rule across users, also under racing requests (the primary key decides).
-- 'pending' while the claiming command is in flight; the owner of the user's partition
-- settles pending rows when it takes the partition over.
CREATE TABLE cmd_email_claims (
    claim      text        PRIMARY KEY,
    user_id    uuid        NOT NULL,
    partition  integer     NOT NULL,
    event_id   uuid        NOT NULL,
    state      text        NOT NULL CHECK (state IN ('pending', 'held')),
    releases   text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cmd_email_claims_user ON cmd_email_claims (user_id);
CREATE INDEX cmd_email_claims_pending ON cmd_email_claims (partition) WHERE state = 'pending';

-- Where each partition's writer runs, for forwarding requests to it.
CREATE TABLE cmd_partition_owners (
    partition  integer     PRIMARY KEY,
    owner      text        NOT NULL,
    address    text        NOT NULL,
    since      timestamptz NOT NULL DEFAULT now()
);
