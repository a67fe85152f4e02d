-- Connection slots and reply leases (see store/coordination.rs). On one SQLite node they make
-- a reply cut off by a crash end as `incomplete` when the node restarts.

CREATE TABLE connection_slots (
    connection_id TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    node_id       TEXT NOT NULL,
    expires_at    INTEGER NOT NULL
);
CREATE INDEX connection_slots_user ON connection_slots(user_id);
CREATE INDEX connection_slots_node ON connection_slots(node_id);

CREATE TABLE generations (
    message_id      TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    in_reply_to     TEXT NOT NULL,
    node_id         TEXT NOT NULL,
    text            TEXT NOT NULL DEFAULT '',
    lease_until     INTEGER NOT NULL
);
CREATE INDEX generations_node ON generations(node_id);
CREATE INDEX generations_lease ON generations(lease_until);
