-- The OpenTelemetry trace id of a connection (issue 20), when the server exports traces.
ALTER TABLE connections ADD COLUMN trace_id TEXT;
