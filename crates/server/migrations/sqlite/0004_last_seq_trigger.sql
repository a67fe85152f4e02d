-- A message's insert advances its conversation's last_seq in the same statement, so storing
-- a message is one statement (one round trip to SQLite's writer) instead of a transaction of
-- four. Seqs stay gap-free: the insert takes last_seq + 1 and all writes go through one
-- connection.
CREATE TRIGGER messages_advance_last_seq AFTER INSERT ON messages
BEGIN
    UPDATE conversations SET last_seq = NEW.seq WHERE id = NEW.conversation_id;
END;
