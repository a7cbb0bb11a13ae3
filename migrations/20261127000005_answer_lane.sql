-- The answer lane's claim (requests whose current build may still match, taken beside the
-- build slots) reads its own partial index: ordered like the build lane's, holding only the
-- rows it may take, so it never walks the queue's other rows.
CREATE INDEX IF NOT EXISTS pack_environment_node_answerable_idx
    ON pack_environment_node (node, run_after, id)
    WHERE status IN ('pending', 'outdated') AND skip_if_current AND fingerprint IS NOT NULL;
