-- The connection ledger: one row per WebSocket attempt, so users and tools can ask the
-- server how and why a connection ended.
CREATE TABLE connections (
    connection_id   TEXT PRIMARY KEY,
    attempt_id      TEXT NOT NULL,
    user_id         TEXT,
    bot_id          TEXT,
    remote_addr     TEXT,
    user_agent      TEXT,
    origin          TEXT,
    upgrade         TEXT,
    connection_hdr  TEXT,
    ws_version      TEXT,
    forwarded_for   TEXT,
    started_at      INTEGER NOT NULL,
    established     INTEGER NOT NULL DEFAULT 0,
    ended_at        INTEGER,
    close_code      INTEGER,
    close_reason    TEXT,
    closed_by       TEXT,
    msgs_in         INTEGER NOT NULL DEFAULT 0,
    msgs_out        INTEGER NOT NULL DEFAULT 0,
    bytes_in        INTEGER NOT NULL DEFAULT 0,
    bytes_out       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX connections_user ON connections(user_id, started_at);
CREATE INDEX connections_attempt ON connections(attempt_id);
CREATE INDEX connections_started ON connections(started_at);
