-- The status notification (channel pack_environment_status, payload "<id> <status>", what the
-- client's ensure waits for) without a trigger call per write of packenvd's. Each of
-- packenvd's statements that moves a parent's summary (it bumps summary_seq) notifies in its
-- own RETURNING when the parent becomes ready or failed: store/summary.rs, the withdrawal in
-- store/nodes.rs, and the recount below. On the queue's path the trigger's PL/pgSQL call and
-- queued event cost more than the notification itself. The trigger stays for the writes of
-- everyone else (a platform or an operator that sets the status itself).
DROP TRIGGER IF EXISTS pack_environment_status_notify ON pack_environment;
CREATE TRIGGER pack_environment_status_notify
    AFTER UPDATE ON pack_environment
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.status IN ('ready', 'failed')
          AND NEW.summary_seq IS NOT DISTINCT FROM OLD.summary_seq)
    EXECUTE FUNCTION pack_environment_status_notify();

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
ALTER FUNCTION pack_environment_recount(BIGINT) SECURITY DEFINER SET search_path FROM CURRENT;
REVOKE EXECUTE ON FUNCTION pack_environment_recount(BIGINT) FROM PUBLIC;
