-- Messages are stored in batches (one statement for many messages, see store/sqlite.rs), and
-- SQLite does not promise in which order a statement's rows are inserted: last_seq only ever
-- moves forward, to the highest seq stored.
DROP TRIGGER messages_advance_last_seq;
CREATE TRIGGER messages_advance_last_seq AFTER INSERT ON messages
BEGIN
    UPDATE conversations SET last_seq = MAX(last_seq, NEW.seq) WHERE id = NEW.conversation_id;
END;
