-- natter schema v1 (SQLite). Ids are UUID text; times are Unix milliseconds.

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_admin      INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
);

-- Refresh tokens are stored as SHA-256 hashes. A login starts a family; each refresh
-- uses one token and issues the next of the same family. A token used twice means it
-- leaked: the whole family is revoked.
CREATE TABLE refresh_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    family_id   TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    revoked_at  INTEGER
);
CREATE INDEX refresh_tokens_family ON refresh_tokens(family_id);

CREATE TABLE bots (
    id          TEXT PRIMARY KEY,
    owner_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    visibility  TEXT NOT NULL CHECK (visibility IN ('private', 'public')),
    engine      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX bots_owner ON bots(owner_id);
CREATE INDEX bots_public ON bots(visibility);

CREATE TABLE bot_members (
    bot_id     TEXT NOT NULL REFERENCES bots(id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('chat', 'admin')),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (bot_id, user_id)
);
CREATE INDEX bot_members_user ON bot_members(user_id);

-- One conversation per (user, bot). last_seq is the seq of its newest message; a new
-- message takes last_seq + 1 in the same transaction, so seqs are gap-free.
CREATE TABLE conversations (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    bot_id     TEXT NOT NULL REFERENCES bots(id) ON DELETE CASCADE,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    UNIQUE (user_id, bot_id)
);

CREATE TABLE messages (
    id              TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('user', 'bot')),
    content         TEXT NOT NULL,
    client_id       TEXT,
    in_reply_to     TEXT,
    status          TEXT NOT NULL DEFAULT 'complete',
    created_at      INTEGER NOT NULL,
    UNIQUE (conversation_id, seq),
    UNIQUE (conversation_id, client_id)
);

-- Single-use WebSocket tickets, stored as SHA-256 hashes.
CREATE TABLE ws_tickets (
    ticket_hash TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    bot_id      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);
