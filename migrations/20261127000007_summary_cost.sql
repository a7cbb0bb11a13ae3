-- What the nodes summary costs on the queue's path (issue 12: single-node throughput within
-- 10 % of the single-host release). Every claim and every write-back also writes the parent;
-- this migration makes that write cheap. Nothing here changes what any column means.

-- The parent write is the summary only: the platform's columns, no indexed one. Room on the
-- page lets PostgreSQL update it in place (HOT): no new entry in the parent's four indexes per
-- write. Rows written from now on get the room; existing ones get it as they move.
ALTER TABLE pack_environment SET (fillfactor = 70);

-- Triggers that have nothing to do on packenvd's summary writes are filtered by WHEN, which
-- PostgreSQL checks without calling the function (and, for AFTER triggers, without queueing
-- an event).
DROP TRIGGER IF EXISTS pack_environment_fill_nulls ON pack_environment;
CREATE TRIGGER pack_environment_fill_nulls
    BEFORE INSERT OR UPDATE ON pack_environment
    FOR EACH ROW WHEN (NEW.metadata IS NULL OR NEW.created IS NULL OR NEW.updated IS NULL)
    EXECUTE FUNCTION pack_environment_fill_nulls();

-- The fan-out runs for a platform's request, reset or pack update (a new generation, not a
-- summary write), and for a new row that asks for an environment.
DROP TRIGGER IF EXISTS pack_environment_fan_out ON pack_environment;
DROP TRIGGER IF EXISTS pack_environment_fan_out_insert ON pack_environment;
CREATE TRIGGER pack_environment_fan_out_insert
    AFTER INSERT ON pack_environment
    FOR EACH ROW WHEN (NEW.status IN ('pending', 'outdated'))
    EXECUTE FUNCTION pack_environment_fan_out();
CREATE TRIGGER pack_environment_fan_out
    AFTER UPDATE ON pack_environment
    FOR EACH ROW WHEN (NEW.summary_seq IS NOT DISTINCT FROM OLD.summary_seq
                       AND NEW.generation IS DISTINCT FROM OLD.generation)
    EXECUTE FUNCTION pack_environment_fan_out();

-- The recount in PL/pgSQL: a LANGUAGE sql function called from a trigger is planned again on
-- every call; PL/pgSQL keeps the plan for the session.
CREATE OR REPLACE FUNCTION pack_environment_recount(p_env_id BIGINT)
RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pack_environment pe
    SET nodes_pending    = c.pending,
        nodes_installing = c.installing,
        nodes_ready      = c.ready,
        nodes_failed     = c.failed,
        nodes_outdated   = c.outdated,
        status = pack_environment_summary(c.pending::int, c.installing::int, c.ready::int,
                                          c.failed::int, c.outdated::int, pe.status),
        summary_seq      = pe.summary_seq + 1,
        updated          = now()
    FROM (SELECT count(*) FILTER (WHERE n.status = 'pending')    AS pending,
                 count(*) FILTER (WHERE n.status = 'installing') AS installing,
                 count(*) FILTER (WHERE n.status = 'ready')      AS ready,
                 count(*) FILTER (WHERE n.status = 'failed')     AS failed,
                 count(*) FILTER (WHERE n.status = 'outdated')   AS outdated
          FROM pack_environment_node n JOIN packenvd_node nd ON nd.name = n.node
          WHERE n.env_id = p_env_id AND n.required AND NOT nd.gone) c
    WHERE pe.id = p_env_id;
END $$;

-- The fan-out with what packenvd_node_takes() decides written out: whether any live node
-- builds the runtime is asked once per environment, not once per node row (that function's
-- NOT EXISTS keeps it from being inlined, so each call was a query planned anew).
CREATE OR REPLACE FUNCTION pack_environment_fan_out() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_any_builds BOOLEAN := EXISTS (SELECT 1 FROM packenvd_node o
                                    WHERE packenvd_node_builds(o, NEW.runtime_ref));
BEGIN
    IF TG_OP = 'UPDATE' THEN
        UPDATE pack_environment_node n
        SET status = NEW.status, required = true, generation = NEW.generation,
            skip_if_current = NEW.skip_if_current, attempts = 0, run_after = now(),
            -- Where the platform names the place, every node builds there.
            env_path = CASE WHEN NEW.env_path IS NOT NULL AND NOT NEW.env_path_by_packenvd
                            THEN NEW.env_path ELSE n.env_path END,
            claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL, updated = now()
        FROM packenvd_node nd
        WHERE n.env_id = NEW.id AND nd.name = n.node
          AND NOT nd.gone AND nd.last_seen + nd.ttl >= now()
          AND (NOT v_any_builds OR packenvd_node_builds(nd, NEW.runtime_ref));
    END IF;
    INSERT INTO pack_environment_node (env_id, node, status, required, generation, skip_if_current)
    SELECT NEW.id, nd.name, NEW.status, true, NEW.generation, NEW.skip_if_current
    FROM packenvd_node nd
    WHERE NOT nd.gone AND nd.last_seen + nd.ttl >= now()
      AND (NOT v_any_builds OR packenvd_node_builds(nd, NEW.runtime_ref))
    ON CONFLICT (env_id, node) DO NOTHING;
    PERFORM pack_environment_recount(NEW.id);
    RETURN NULL;
END $$;

-- CREATE OR REPLACE reset what the nodes migration set: both run with the owner's rights (the
-- platform's roles have none on the node rows) and resolve names in this schema only.
ALTER FUNCTION pack_environment_fan_out() SECURITY DEFINER SET search_path FROM CURRENT;
ALTER FUNCTION pack_environment_recount(BIGINT) SECURITY DEFINER SET search_path FROM CURRENT;
REVOKE EXECUTE ON FUNCTION pack_environment_recount(BIGINT) FROM PUBLIC;

-- The parent's BEFORE trigger runs for the platform's writes and inserts only. Every write of
-- packenvd's to the summary (it bumps summary_seq) derives the status from the new counts
-- itself, with the rule the trigger applied (a failed parent keeps its error when the write
-- brings none): store/summary.rs, the recount above, the withdrawal in store/nodes.rs. On the
-- queue's path the parent's triggers then cost a comparison each and no function call.
DROP TRIGGER IF EXISTS pack_environment_before_write ON pack_environment;
DROP TRIGGER IF EXISTS pack_environment_before_insert ON pack_environment;
CREATE TRIGGER pack_environment_before_insert
    BEFORE INSERT ON pack_environment
    FOR EACH ROW EXECUTE FUNCTION pack_environment_before_write();
CREATE TRIGGER pack_environment_before_write
    BEFORE UPDATE ON pack_environment
    FOR EACH ROW WHEN (NEW.summary_seq IS NOT DISTINCT FROM OLD.summary_seq)
    EXECUTE FUNCTION pack_environment_before_write();
