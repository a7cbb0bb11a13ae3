-- The status notification (channel pack_environment_status, payload "<id> <status>", what the
-- client's ensure waits for) without a trigger call per write of packenvd's. Each of
-- packenvd's statements that moves a parent's summary (it bumps summary_seq) notifies in its
-- own RETURNING when the parent becomes ready or failed: store/summary.rs, the withdrawal in
-- store/nodes.rs, and the recount below. On the queue's path the trigger's PL/pgSQL call and
-- queued event cost more than the notification itself. A trigger still notifies for the writes
-- of everyone else (a platform or an operator that sets the status itself).
--
-- PostgreSQL also prepares the WHEN of every row trigger on a table again for each statement
-- that updates a row of it, fired or not, so the parent keeps one BEFORE and one AFTER UPDATE
-- trigger, each filtered to the writes of others: the status notification joins the fan-out
-- (both follow a platform's write), and filling in NULLs joins the BEFORE trigger (packenvd's
-- writes never write NULL there).
DROP TRIGGER IF EXISTS pack_environment_status_notify ON pack_environment;
DROP TRIGGER IF EXISTS pack_environment_fill_nulls ON pack_environment;
DROP TRIGGER IF EXISTS pack_environment_fan_out ON pack_environment;

CREATE OR REPLACE FUNCTION pack_environment_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_request BOOLEAN := coalesce(current_setting('packenvd.request', true), '') = 'on';
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.pack_ref IS NULL THEN
            SELECT ref INTO NEW.pack_ref FROM pack WHERE id = NEW.pack;
        END IF;
        IF NEW.runtime_ref IS NULL THEN
            SELECT ref INTO NEW.runtime_ref FROM runtime WHERE id = NEW.runtime;
        END IF;
        NEW.skip_if_current := false;
        NEW.env_path_by_packenvd := false;
    ELSE
        -- An UPDATE of the platform's: packenvd's own writes (they move summary_seq) derive
        -- the status themselves and are left out by the trigger's WHEN.
        IF NEW.status IN ('pending', 'outdated') AND OLD.status IS DISTINCT FROM NEW.status THEN
            -- A request (request_pack_environment) may be answered by a node's current build;
            -- any other way to pending or outdated rebuilds from scratch, everywhere.
            NEW.generation := OLD.generation + 1;
            IF NOT v_request THEN
                NEW.forced_generation := NEW.generation;
            END IF;
            NEW.skip_if_current := v_request;
            NEW.attempts := 0;
            NEW.run_after := now();
            NEW.claimed_by := NULL;
            NEW.claim_token := NULL;
            NEW.lease_expires_at := NULL;
        END IF;
        IF NEW.env_path IS DISTINCT FROM OLD.env_path THEN
            NEW.env_path_by_packenvd := false;
        END IF;
    END IF;
    -- What the original design's columns may leave NULL (its platform inserts and updates
    -- without them).
    NEW.metadata := coalesce(NEW.metadata, '{}');
    NEW.created := coalesce(NEW.created, now());
    NEW.updated := now();
    RETURN NEW;
END $$;

-- After a write of the platform's: tells waiters the environment became ready or failed, and
-- for a request, reset or pack update (a new generation) fans it out to the nodes. Whether any
-- live node builds the runtime is asked once per environment, not once per node row.
CREATE OR REPLACE FUNCTION pack_environment_fan_out() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_any_builds BOOLEAN;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.status IS DISTINCT FROM NEW.status AND NEW.status IN ('ready', 'failed') THEN
            PERFORM pg_notify('pack_environment_status', NEW.id || ' ' || NEW.status);
        END IF;
        IF NEW.generation IS NOT DISTINCT FROM OLD.generation THEN
            RETURN NULL;
        END IF;
    END IF;
    v_any_builds := EXISTS (SELECT 1 FROM packenvd_node o
                            WHERE packenvd_node_builds(o, NEW.runtime_ref));
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

CREATE TRIGGER pack_environment_fan_out
    AFTER UPDATE ON pack_environment
    FOR EACH ROW WHEN (NEW.summary_seq IS NOT DISTINCT FROM OLD.summary_seq
                       AND (NEW.generation IS DISTINCT FROM OLD.generation
                            OR (OLD.status IS DISTINCT FROM NEW.status
                                AND NEW.status IN ('ready', 'failed'))))
    EXECUTE FUNCTION pack_environment_fan_out();

CREATE OR REPLACE FUNCTION pack_environment_recount(p_env_id BIGINT)
RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    v_before pack_environment_status_enum;
    v_after pack_environment_status_enum;
BEGIN
    SELECT status INTO v_before FROM pack_environment WHERE id = p_env_id FOR UPDATE;
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
    WHERE pe.id = p_env_id
    RETURNING pe.status INTO v_after;
    IF v_after IN ('ready', 'failed') AND v_after IS DISTINCT FROM v_before THEN
        PERFORM pg_notify('pack_environment_status', p_env_id || ' ' || v_after);
    END IF;
END $$;

-- CREATE OR REPLACE resets these (as in the summary-cost migration).
ALTER FUNCTION pack_environment_fan_out() SECURITY DEFINER SET search_path FROM CURRENT;
ALTER FUNCTION pack_environment_recount(BIGINT) SECURITY DEFINER SET search_path FROM CURRENT;
REVOKE EXECUTE ON FUNCTION pack_environment_recount(BIGINT) FROM PUBLIC;

-- Every claim and write-back moves a node row between the partial indexes, so each index on
-- the node rows costs an insert per state change. This one served only reads of all of a
-- node's rows whatever their status (operator commands, a node's start or withdrawal), which
-- are rare and may read the table whole; what the daemon reads per row has its own index.
DROP INDEX IF EXISTS pack_environment_node_node_idx;

-- The daemons' wake-up, for the writes that make a node row claimable. Each of them sets
-- run_after (when the row may be claimed: the fan-out, a rebuild, a retry or hand-back, a
-- rescue, a failed verification, a missing build, a node's start), so the trigger names only
-- that column, and the claim and the write-back of a ready build, which do not set it, no
-- longer prepare its WHEN. An UPDATE of a node row by hand that leaves run_after out is
-- picked up at the next poll.
DROP TRIGGER IF EXISTS pack_environment_node_notify ON pack_environment_node;
CREATE TRIGGER pack_environment_node_notify
    AFTER INSERT OR UPDATE OF run_after ON pack_environment_node
    FOR EACH ROW WHEN (NEW.status IN ('pending', 'outdated'))
    EXECUTE FUNCTION pack_environment_node_notify();
