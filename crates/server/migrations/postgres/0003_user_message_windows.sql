-- Messages per user in fixed windows (`--user-message-burst` / `--user-messages-per-second` s), counted by every node (issue 14): the per-user
-- message budget holds however many nodes a user's sockets are spread over. A rate counter
-- needs no durability: UNLOGGED (not written to the WAL, emptied after a crash).
CREATE UNLOGGED TABLE user_message_windows (
    user_id UUID PRIMARY KEY,
    window_start BIGINT NOT NULL, -- the window's number: epoch ms / its length
    count INTEGER NOT NULL
);
