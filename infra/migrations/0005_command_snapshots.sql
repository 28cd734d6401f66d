-- Snapshots of each partition writer's state: where its rebuild starts instead of offset 0.
-- A cache: deleting a row only makes the next takeover of that partition read more log.
CREATE TABLE cmd_snapshots (
    stream      text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    aggregates  integer     NOT NULL,
    state       bytea       NOT NULL,
    taken_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, partition)
);
