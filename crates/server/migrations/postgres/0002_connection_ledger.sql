-- The connection ledger: one row per WebSocket attempt (see the SQLite migration 0002).
CREATE TABLE connections (
    connection_id   UUID PRIMARY KEY,
    attempt_id      UUID NOT NULL,
    user_id         UUID,
    bot_id          UUID,
    remote_addr     TEXT,
    user_agent      TEXT,
    origin          TEXT,
    upgrade         TEXT,
    connection_hdr  TEXT,
    ws_version      TEXT,
    forwarded_for   TEXT,
    started_at      BIGINT NOT NULL,
    established     BOOLEAN NOT NULL DEFAULT FALSE,
    ended_at        BIGINT,
    close_code      INTEGER,
    close_reason    TEXT,
    closed_by       TEXT,
    msgs_in         BIGINT NOT NULL DEFAULT 0,
    msgs_out        BIGINT NOT NULL DEFAULT 0,
    bytes_in        BIGINT NOT NULL DEFAULT 0,
    bytes_out       BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX connections_user ON connections(user_id, started_at);
CREATE INDEX connections_attempt ON connections(attempt_id);
CREATE INDEX connections_started ON connections(started_at);
