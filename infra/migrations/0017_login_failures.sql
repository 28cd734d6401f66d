-- Failed logins per account in the current one-minute window, shared by every command
-- process (ADR 17): a guesser spreading attempts over several processes meets one limit.
-- Only held claims get a row (a guess at an address nobody has costs no row), and rows
-- of ended windows are deleted every minute.
CREATE TABLE cmd_login_failures (
    claim        text        PRIMARY KEY,
    window_start timestamptz NOT NULL,
    failures     integer     NOT NULL
);
