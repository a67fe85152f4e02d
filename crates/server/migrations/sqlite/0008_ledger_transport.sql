-- The transport of a connection attempt (issue 17): 'websocket' or 'sse'.
ALTER TABLE connections ADD COLUMN transport TEXT NOT NULL DEFAULT 'websocket';
