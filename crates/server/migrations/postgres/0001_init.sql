-- natter schema v1 (PostgreSQL). The same tables as the SQLite schema, with native UUIDs;
-- times are Unix milliseconds (BIGINT), as on SQLite, so both stores round-trip the same values.

CREATE TABLE users (
    id            UUID PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_admin      BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    BIGINT NOT NULL
);

-- Refresh tokens are stored as SHA-256 hashes; a token used twice revokes its family.
CREATE TABLE refresh_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    family_id   UUID NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,
    revoked_at  BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens(family_id);

CREATE TABLE bots (
    id          UUID PRIMARY KEY,
    owner_id    UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    visibility  TEXT NOT NULL CHECK (visibility IN ('private', 'public')),
    engine      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX bots_owner ON bots(owner_id);
CREATE INDEX bots_public ON bots(visibility);

CREATE TABLE bot_members (
    bot_id     UUID NOT NULL REFERENCES bots(id) ON DELETE CASCADE,
    user_id    UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role       TEXT NOT NULL CHECK (role IN ('chat', 'admin')),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (bot_id, user_id)
);
CREATE INDEX bot_members_user ON bot_members(user_id);

-- One conversation per (user, bot). A new message takes last_seq + 1 with
-- `UPDATE conversations SET last_seq = last_seq + 1 ... RETURNING` in the transaction that
-- inserts it: the row lock serialises writers on every node, so seqs are gap-free and unique.
CREATE TABLE conversations (
    id         UUID PRIMARY KEY,
    user_id    UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    bot_id     UUID NOT NULL REFERENCES bots(id) ON DELETE CASCADE,
    last_seq   BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    UNIQUE (user_id, bot_id)
);

CREATE TABLE messages (
    id              UUID PRIMARY KEY,
    conversation_id UUID NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('user', 'bot')),
    content         TEXT NOT NULL,
    client_id       TEXT,
    in_reply_to     UUID,
    status          TEXT NOT NULL DEFAULT 'complete',
    created_at      BIGINT NOT NULL,
    UNIQUE (conversation_id, seq),
    UNIQUE (conversation_id, client_id)
);

-- Single-use WebSocket tickets, stored as SHA-256 hashes.
CREATE TABLE ws_tickets (
    ticket_hash TEXT PRIMARY KEY,
    user_id     UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    bot_id      UUID NOT NULL,
    expires_at  BIGINT NOT NULL
);

-- Open sockets of every node, for the per-user limit across nodes. A node renews its rows'
-- lease while it lives; the rows of a node that died stop counting when their lease ends.
CREATE TABLE connection_slots (
    connection_id UUID PRIMARY KEY,
    user_id       UUID NOT NULL,
    node_id       UUID NOT NULL,
    expires_at    BIGINT NOT NULL
);
CREATE INDEX connection_slots_user ON connection_slots(user_id);
CREATE INDEX connection_slots_node ON connection_slots(node_id);

-- Bot replies being generated, with the text of the last checkpoint. A node renews the lease
-- of its own; a reply whose lease ended (its node died) is stored as `incomplete` by whichever
-- node sweeps first.
CREATE TABLE generations (
    message_id      UUID PRIMARY KEY,
    conversation_id UUID NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    in_reply_to     UUID NOT NULL,
    node_id         UUID NOT NULL,
    text            TEXT NOT NULL DEFAULT '',
    lease_until     BIGINT NOT NULL
);
CREATE INDEX generations_node ON generations(node_id);
CREATE INDEX generations_lease ON generations(lease_until);
