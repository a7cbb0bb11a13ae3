-- A node writes only its own rows (issue 21, DESIGN §6): a role per node, enforced by
-- PostgreSQL. Without this any daemon's role could rewrite another node's rows (their
-- `metadata.executables`, their `env_vars`), and the runners of that host would run what it
-- named.
--
-- packenvd_node_role maps a database role to the one node it may write for (deploy/db-role.sql
-- with `-v node=...` fills it). Row-level security on the node tables then lets a mapped role
-- change only its node's rows. Roles that are not mapped keep what they had: the tables' owner
-- (which bypasses row-level security: migrations, tests, a quick start run as the owner), the
-- platform's roles (they only read the node tables), and a daemon role shared by every node,
-- which is what a single-node setup needs and what an upgrade finds.
--
-- Writes that must reach other nodes' rows go through functions that run with the owner's
-- rights and do one fixed thing each: the fan-out and the recount (a platform's request), the
-- reaping of nodes past their ttl below. A mapped role may not make the platform's writes on
-- pack_environment (which fan out to every node), only its summary writes.

CREATE TABLE IF NOT EXISTS packenvd_node_role (
    -- A database role (pg_roles.rolname); not a foreign key, roles are not rows of a table.
    role_name TEXT PRIMARY KEY,
    -- The node its daemon runs as; not a foreign key, the role exists before its node
    -- registers, and forgetting a node must not unmap its role.
    node      TEXT NOT NULL
);
-- Who maps roles is the owner's (deploy/db-role.sql); the mapping itself is no secret, and the
-- policies below read it with the caller's rights.
REVOKE ALL ON packenvd_node_role FROM PUBLIC;
GRANT SELECT ON packenvd_node_role TO PUBLIC;

-- The node the connected role writes for, NULL for a role that is not mapped. current_user,
-- not session_user: a SET ROLE counts as the role it sets. Not SECURITY DEFINER, or
-- current_user would be the owner.
CREATE OR REPLACE FUNCTION packenvd_role_node() RETURNS TEXT
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT node FROM packenvd_node_role WHERE role_name = current_user
$$;

ALTER TABLE pack_environment_node ENABLE ROW LEVEL SECURITY;
ALTER TABLE packenvd_node ENABLE ROW LEVEL SECURITY;

-- Everyone who may read the tables reads every row: `packenvd nodes`, the client's lookups,
-- the fan-out's and catch-up's reads of other nodes.
DROP POLICY IF EXISTS packenvd_read ON pack_environment_node;
CREATE POLICY packenvd_read ON pack_environment_node FOR SELECT USING (true);
DROP POLICY IF EXISTS packenvd_read ON packenvd_node;
CREATE POLICY packenvd_read ON packenvd_node FOR SELECT USING (true);

-- Writes: a mapped role its own node's rows only. `(SELECT ...)` is evaluated once per
-- statement, not per row.
DROP POLICY IF EXISTS packenvd_own_insert ON pack_environment_node;
CREATE POLICY packenvd_own_insert ON pack_environment_node FOR INSERT
    WITH CHECK ((SELECT packenvd_role_node()) IS NULL OR node = (SELECT packenvd_role_node()));
DROP POLICY IF EXISTS packenvd_own_update ON pack_environment_node;
CREATE POLICY packenvd_own_update ON pack_environment_node FOR UPDATE
    USING ((SELECT packenvd_role_node()) IS NULL OR node = (SELECT packenvd_role_node()))
    WITH CHECK ((SELECT packenvd_role_node()) IS NULL OR node = (SELECT packenvd_role_node()));
-- DELETE also reaches the rows a node withdraws when it joins (store/nodes.rs WITHDRAW_SQL):
-- rows of nodes that said themselves, in their own packenvd_node row, that they cannot build
-- the runtime, and that hold no build. Deleting them points nothing anywhere.
DROP POLICY IF EXISTS packenvd_own_delete ON pack_environment_node;
CREATE POLICY packenvd_own_delete ON pack_environment_node FOR DELETE
    USING ((SELECT packenvd_role_node()) IS NULL OR node = (SELECT packenvd_role_node())
           OR (status IN ('pending', 'outdated', 'failed')
               AND EXISTS (SELECT 1 FROM packenvd_node nd
                           JOIN pack_environment pe ON pe.id = env_id
                           WHERE nd.name = node
                             AND (nd.runtimes -> pe.runtime_ref ->> 'buildable')::boolean = false)));

DROP POLICY IF EXISTS packenvd_own_insert ON packenvd_node;
CREATE POLICY packenvd_own_insert ON packenvd_node FOR INSERT
    WITH CHECK ((SELECT packenvd_role_node()) IS NULL OR name = (SELECT packenvd_role_node()));
DROP POLICY IF EXISTS packenvd_own_update ON packenvd_node;
CREATE POLICY packenvd_own_update ON packenvd_node FOR UPDATE
    USING ((SELECT packenvd_role_node()) IS NULL OR name = (SELECT packenvd_role_node()))
    WITH CHECK ((SELECT packenvd_role_node()) IS NULL OR name = (SELECT packenvd_role_node()));
DROP POLICY IF EXISTS packenvd_own_delete ON packenvd_node;
CREATE POLICY packenvd_own_delete ON packenvd_node FOR DELETE
    USING ((SELECT packenvd_role_node()) IS NULL OR name = (SELECT packenvd_role_node()));

-- Every daemon's rescuer declares gone the nodes past their ttl and stops counting their rows
-- (store/nodes.rs reap_gone_nodes). A mapped role may not write those rows, so this does it
-- with the owner's rights, and does nothing else: only `gone` and `required` change, only for
-- nodes whose own last_seen and ttl say they are gone. The parents' counts move as
-- store/summary.rs parents_cte moves them (one row per parent per node), and a parent that
-- becomes ready or failed notifies as there. Returns the nodes it declared gone.
CREATE OR REPLACE FUNCTION packenvd_reap_gone_nodes() RETURNS SETOF TEXT
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_node TEXT;
    v_notified BIGINT;
BEGIN
    FOR v_node IN
        UPDATE packenvd_node SET gone = true
        WHERE NOT gone AND last_seen + ttl < now()
        RETURNING name
    LOOP
        WITH c AS MATERIALIZED (
            SELECT id FROM pack_environment_node WHERE node = v_node AND required FOR UPDATE),
        u AS (
            UPDATE pack_environment_node n SET required = false
            FROM c WHERE n.id = c.id
            RETURNING n.env_id, n.node, (n.status = 'pending')::int AS dp,
                      (n.status = 'installing')::int AS di, (n.status = 'ready')::int AS dr,
                      (n.status = 'failed')::int AS df, (n.status = 'outdated')::int AS do_),
        p AS (
            UPDATE pack_environment pe
            SET nodes_pending = pe.nodes_pending - u.dp,
                nodes_installing = pe.nodes_installing - u.di,
                nodes_ready = pe.nodes_ready - u.dr,
                nodes_failed = pe.nodes_failed - u.df,
                nodes_outdated = pe.nodes_outdated - u.do_,
                status = pack_environment_summary(pe.nodes_pending - u.dp,
                    pe.nodes_installing - u.di, pe.nodes_ready - u.dr, pe.nodes_failed - u.df,
                    pe.nodes_outdated - u.do_, pe.status),
                summary_seq = pe.summary_seq + 1,
                updated = now(),
                last_node = u.node
            FROM u WHERE pe.id = u.env_id
            RETURNING pe.id, pe.status,
                      pack_environment_summary(pe.nodes_pending + u.dp,
                          pe.nodes_installing + u.di, pe.nodes_ready + u.dr,
                          pe.nodes_failed + u.df, pe.nodes_outdated + u.do_, NULL) AS before)
        SELECT count(pg_notify('pack_environment_status', p.id || ' ' || p.status))
        INTO v_notified FROM p
        WHERE p.status IN ('ready', 'failed') AND p.status IS DISTINCT FROM p.before;
        RETURN NEXT v_node;
    END LOOP;
END $$;

-- The platform's writes of pack_environment (an insert, a request, a reset, a pack update, a
-- removal) reach every node's rows: the fan-out rewrites them with the owner's rights, the
-- foreign key's cascade deletes them. A mapped role is one node's daemon and makes none of
-- them; its summary writes (they move summary_seq) do not fire this trigger and fan nothing
-- out. The body is migration 8's with the refusal first: the parent keeps one BEFORE UPDATE
-- trigger (PostgreSQL prepares the WHEN of each one for every update of the table). Its names
-- now resolve in this schema only: the refusal must not be shadowed by a caller's own
-- packenvd_role_node().
CREATE OR REPLACE FUNCTION pack_environment_before_write() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_request BOOLEAN := coalesce(current_setting('packenvd.request', true), '') = 'on';
    v_node TEXT := packenvd_role_node();
BEGIN
    IF v_node IS NOT NULL THEN
        RAISE EXCEPTION 'role % writes for node % only: it may not % environments (that reaches every node''s rows)',
            current_user, v_node, lower(TG_OP)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'request, reset or change environments as the platform''s role or the owner';
    END IF;
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

-- A removal by a mapped role: once per statement, so no row trigger is added to the parent.
CREATE OR REPLACE FUNCTION pack_environment_node_role_delete() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_node TEXT := packenvd_role_node();
BEGIN
    IF v_node IS NOT NULL THEN
        RAISE EXCEPTION 'role % writes for node % only: it may not delete environments (that deletes every node''s rows)',
            current_user, v_node
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'remove environments as the platform''s role or the owner';
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS pack_environment_node_role_delete ON pack_environment;
CREATE TRIGGER pack_environment_node_role_delete
    BEFORE DELETE ON pack_environment
    FOR EACH STATEMENT EXECUTE FUNCTION pack_environment_node_role_delete();

-- Each function above resolves names in this schema only, with pg_catalog first and pg_temp
-- last: a caller cannot shadow packenvd_node_role or a catalog function with an object of its
-- own, nor with a temporary table. Set in this migration's transaction, so no caller ever sees
-- them without it; the schema is the migration's (a migration cannot name it in the CREATE, and
-- with pg_catalog first in the migration's own path CREATE would put the objects there).
DO $$
DECLARE
    f TEXT;
BEGIN
    FOREACH f IN ARRAY ARRAY['packenvd_role_node()', 'packenvd_reap_gone_nodes()',
                             'pack_environment_before_write()',
                             'pack_environment_node_role_delete()'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp',
                       f, current_schema());
    END LOOP;
END $$;
