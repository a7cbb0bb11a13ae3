-- Rows the database refused to claim or record, and that packenvd could not fail either
-- (issue 21): the daemon keeps them out of its claims for a backoff and lists them here, on
-- its node's row, so `packenvd status` shows them. An array of
-- {"id", "env_id", "pack_ref", "runtime_ref", "what", "error", "since", "retry_at"}; the daemon
-- rewrites it whenever the list changes, and empties it when it starts.
ALTER TABLE packenvd_node ADD COLUMN IF NOT EXISTS refused_rows JSONB NOT NULL DEFAULT '[]';
