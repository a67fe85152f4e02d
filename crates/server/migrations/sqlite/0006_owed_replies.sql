-- User messages still owed the bot's answer (see store/coordination.rs, `claim_owed`). A row is
-- written with its user message, in the same statement (trigger), and deleted with the first
-- bot message in reply to it: a crash in between leaves the row, and recovery settles it.
-- `node_id`/`lease_until` are set when a node queues the reply (and renewed with its leases);
-- a row never leased is settled once it is older than a node lease.
CREATE TABLE owed_replies (
    message_id      TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    created_at      INTEGER NOT NULL,
    node_id         TEXT,
    lease_until     INTEGER
);
CREATE INDEX owed_replies_node ON owed_replies(node_id);
CREATE INDEX owed_replies_created ON owed_replies(created_at);

CREATE TRIGGER messages_owe_reply AFTER INSERT ON messages WHEN NEW.role = 'user'
BEGIN
    INSERT OR IGNORE INTO owed_replies (message_id, conversation_id, created_at)
    VALUES (NEW.id, NEW.conversation_id, NEW.created_at);
END;

CREATE TRIGGER messages_settle_reply AFTER INSERT ON messages WHEN NEW.in_reply_to IS NOT NULL
BEGIN
    DELETE FROM owed_replies WHERE message_id = NEW.in_reply_to;
END;
