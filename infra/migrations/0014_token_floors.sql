-- Tokens issued before a user's floor are refused (ADR 18): set when their password or
-- role changes or they are erased. Rebuilt from the users' committed states by the owner
-- of their partition, like the e-mail claims.
CREATE TABLE cmd_token_floors (
    user_id    uuid        PRIMARY KEY,
    valid_from timestamptz NOT NULL
);
