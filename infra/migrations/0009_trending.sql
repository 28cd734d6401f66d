-- Reads per article and hour, for the 24-hour trending lists (erased users' reads count
-- too: they stay counted, anonymously).
CREATE TABLE news_reads_hourly (
    news_id uuid        NOT NULL,
    hour    timestamptz NOT NULL,
    reads   bigint      NOT NULL,
    PRIMARY KEY (news_id, hour)
);
CREATE INDEX news_reads_hourly_by_hour ON news_reads_hourly (hour);
