-- Nodes (DESIGN §8): one request, an environment on every worker host.
--
-- pack_environment stays the platform's contract: one row per (pack, runtime), the desired
-- environment, whose status becomes the summary over nodes. The queue moves to
-- pack_environment_node: one row per (environment, node), claimed, leased, fenced and verified
-- by the daemons of that node only. A node is one envs filesystem, registered in
-- packenvd_node.
--
-- The summary is kept in O(1) per node write: pack_environment counts its required node rows
-- by status (nodes_*), every packenvd statement that changes a node row's status adjusts the
-- counts of its parent in the same statement (bumping summary_seq), and the parent's trigger
-- derives the status from the counts. A node row is "required" when the parent waits for it:
-- rows of a request or reset are; rows of a node that joins or returns for an environment
-- that is already ready elsewhere are not until they are ready (catch-up), and rows of a
-- gone node are not.

CREATE TABLE IF NOT EXISTS packenvd_node (
    name        TEXT PRIMARY KEY,
    envs_root   TEXT NOT NULL,
    version     TEXT NOT NULL DEFAULT '',
    -- Per runtime ref: {"buildable": bool, "missing": [...], "commands": {name: path or null}}.
    runtimes    JSONB NOT NULL DEFAULT '{}',
    -- Interpreters and installers found: {"python3": {"path": ..., "version": ...}, ...}.
    tools       JSONB NOT NULL DEFAULT '{}',
    -- What confines steps on this node (the daemon's start-up check).
    protections JSONB NOT NULL DEFAULT '[]',
    -- Not seen for this long: gone; its rows stop counting.
    ttl         INTERVAL NOT NULL DEFAULT '10 minutes',
    first_seen  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen   TIMESTAMPTZ NOT NULL DEFAULT now(),
    gone        BOOLEAN NOT NULL DEFAULT false
);

ALTER TABLE pack_environment
    -- Bumped by every request or reset; node rows remember which one they answer.
    ADD COLUMN IF NOT EXISTS generation        BIGINT NOT NULL DEFAULT 1,
    -- The last generation that was a reset (rebuild from scratch everywhere).
    ADD COLUMN IF NOT EXISTS forced_generation BIGINT NOT NULL DEFAULT 1,
    -- True when packenvd wrote env_path (one node's), false when the platform did: a
    -- platform's env_path is where every node must build.
    ADD COLUMN IF NOT EXISTS env_path_by_packenvd BOOLEAN NOT NULL DEFAULT false,
    -- Required node rows of live nodes, by status.
    ADD COLUMN IF NOT EXISTS nodes_pending     INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS nodes_installing  INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS nodes_ready       INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS nodes_failed      INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS nodes_outdated    INTEGER NOT NULL DEFAULT 0,
    -- Bumped by every write of packenvd's: how the triggers tell it from the platform's.
    ADD COLUMN IF NOT EXISTS summary_seq       BIGINT NOT NULL DEFAULT 0,
    -- The node whose write the summary last took in.
    ADD COLUMN IF NOT EXISTS last_node         TEXT;

CREATE TABLE IF NOT EXISTS pack_environment_node (
    id               BIGSERIAL PRIMARY KEY,
    env_id           BIGINT NOT NULL REFERENCES pack_environment(id) ON DELETE CASCADE,
    node             TEXT NOT NULL REFERENCES packenvd_node(name) ON DELETE CASCADE,
    status           pack_environment_status_enum NOT NULL DEFAULT 'pending',
    required         BOOLEAN NOT NULL DEFAULT true,
    generation       BIGINT NOT NULL DEFAULT 0,
    built_generation BIGINT NOT NULL DEFAULT 0,
    skip_if_current  BOOLEAN NOT NULL DEFAULT false,
    env_path         TEXT,
    installed_at     TIMESTAMPTZ,
    last_verified    TIMESTAMPTZ,
    last_verify_result TEXT,
    install_log      TEXT,
    install_error    TEXT,
    metadata         JSONB NOT NULL DEFAULT '{}',
    fingerprint      TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    run_after        TIMESTAMPTZ NOT NULL DEFAULT now(),
    claimed_by       TEXT,
    claim_token      UUID,
    lease_expires_at TIMESTAMPTZ,
    created          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated          TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (env_id, node)
);

-- A node's claim, rescue and verification read only that node's rows (DESIGN §8): each index
-- leads with the node, and its WHERE is the statement's.
CREATE INDEX IF NOT EXISTS pack_environment_node_claimable_idx
    ON pack_environment_node (node, run_after, id) WHERE status IN ('pending', 'outdated');
CREATE INDEX IF NOT EXISTS pack_environment_node_installing_idx
    ON pack_environment_node (node, lease_expires_at) WHERE status = 'installing';
CREATE INDEX IF NOT EXISTS pack_environment_node_verify_idx
    ON pack_environment_node (node, last_verified NULLS FIRST, id) WHERE status = 'ready';
CREATE INDEX IF NOT EXISTS pack_environment_node_node_idx ON pack_environment_node (node, env_id);

-- The queue left pack_environment: its queue indexes would only slow its summary writes.
DROP INDEX IF EXISTS pack_environment_claimable_idx;
DROP INDEX IF EXISTS pack_environment_installing_idx;
DROP INDEX IF EXISTS pack_environment_verify_idx;

-- The summary of a parent's counts: any failure, else any build running, else any waiting,
-- else any outdated, else ready; with no required row of a live node, the status stays.
CREATE OR REPLACE FUNCTION pack_environment_summary(
    p_pending INTEGER, p_installing INTEGER, p_ready INTEGER, p_failed INTEGER,
    p_outdated INTEGER, p_current pack_environment_status_enum)
RETURNS pack_environment_status_enum
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_failed > 0 THEN 'failed'
        WHEN p_installing > 0 THEN 'installing'
        WHEN p_pending > 0 THEN 'pending'
        WHEN p_outdated > 0 THEN 'outdated'
        WHEN p_ready > 0 THEN 'ready'
        ELSE p_current END::pack_environment_status_enum
$$;

-- Whether a node may build a runtime: live, and not known to lack the runtime's commands.
CREATE OR REPLACE FUNCTION packenvd_node_builds(p_node packenvd_node, p_runtime_ref TEXT)
RETURNS BOOLEAN
LANGUAGE sql STABLE AS $$
    SELECT NOT p_node.gone
       AND p_node.last_seen + p_node.ttl >= now()
       AND coalesce((p_node.runtimes -> p_runtime_ref ->> 'buildable')::boolean, true)
$$;

-- Whether a node gets rows of a runtime: when it can build it; or when no live node can, then
-- every live node does, so that each says in its row what it lacks rather than the
-- environment waiting for a node that never comes.
CREATE OR REPLACE FUNCTION packenvd_node_takes(p_node packenvd_node, p_runtime_ref TEXT)
RETURNS BOOLEAN
LANGUAGE sql STABLE AS $$
    SELECT packenvd_node_builds(p_node, p_runtime_ref)
        OR (NOT p_node.gone AND p_node.last_seen + p_node.ttl >= now()
            AND NOT EXISTS (SELECT 1 FROM packenvd_node o
                            WHERE packenvd_node_builds(o, p_runtime_ref)))
$$;

-- Recounts one parent's node rows (a reset, a request, a node forgotten): O(nodes) for one
-- environment, never on a daemon's hot path.
CREATE OR REPLACE FUNCTION pack_environment_recount(p_env_id BIGINT)
RETURNS VOID
LANGUAGE sql AS $$
    UPDATE pack_environment pe
    SET nodes_pending    = c.pending,
        nodes_installing = c.installing,
        nodes_ready      = c.ready,
        nodes_failed     = c.failed,
        nodes_outdated   = c.outdated,
        summary_seq      = pe.summary_seq + 1
    FROM (SELECT count(*) FILTER (WHERE n.status = 'pending')    AS pending,
                 count(*) FILTER (WHERE n.status = 'installing') AS installing,
                 count(*) FILTER (WHERE n.status = 'ready')      AS ready,
                 count(*) FILTER (WHERE n.status = 'failed')     AS failed,
                 count(*) FILTER (WHERE n.status = 'outdated')   AS outdated
          FROM pack_environment_node n JOIN packenvd_node nd ON nd.name = n.node
          WHERE n.env_id = p_env_id AND n.required AND NOT nd.gone) c
    WHERE pe.id = p_env_id
$$;

-- Before each write of pack_environment: fills in what a plain INSERT leaves out; for a write
-- of packenvd's (summary_seq changed) derives the status from the counts; for the platform's
-- (a request, a reset, a pack update) starts a new generation.
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
    ELSIF NEW.summary_seq IS DISTINCT FROM OLD.summary_seq THEN
        NEW.status := pack_environment_summary(NEW.nodes_pending, NEW.nodes_installing,
            NEW.nodes_ready, NEW.nodes_failed, NEW.nodes_outdated, OLD.status);
        IF NEW.status = 'failed' AND NEW.install_error IS NULL THEN
            NEW.install_error := OLD.install_error;
        END IF;
    ELSE
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
    NEW.updated := now();
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS pack_environment_before_write ON pack_environment;
CREATE TRIGGER pack_environment_before_write
    BEFORE INSERT OR UPDATE ON pack_environment
    FOR EACH ROW EXECUTE FUNCTION pack_environment_before_write();

-- After the platform asks for an environment (an insert, a request, a reset, a pack update):
-- every live node that can build the runtime gets its row asked again, in one statement each;
-- then the counts are taken again.
CREATE OR REPLACE FUNCTION pack_environment_fan_out() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.summary_seq IS DISTINCT FROM OLD.summary_seq
            OR NEW.generation = OLD.generation) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' AND NEW.status NOT IN ('pending', 'outdated') THEN
        RETURN NULL;
    END IF;
    UPDATE pack_environment_node n
    SET status = NEW.status, required = true, generation = NEW.generation,
        skip_if_current = NEW.skip_if_current, attempts = 0, run_after = now(),
        -- Where the platform names the place, every node builds there.
        env_path = CASE WHEN NEW.env_path IS NOT NULL AND NOT NEW.env_path_by_packenvd
                        THEN NEW.env_path ELSE n.env_path END,
        claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL, updated = now()
    FROM packenvd_node nd
    WHERE n.env_id = NEW.id AND nd.name = n.node AND packenvd_node_takes(nd, NEW.runtime_ref);
    INSERT INTO pack_environment_node (env_id, node, status, required, generation, skip_if_current)
    SELECT NEW.id, nd.name, NEW.status, true, NEW.generation, NEW.skip_if_current
    FROM packenvd_node nd
    WHERE packenvd_node_takes(nd, NEW.runtime_ref)
    ON CONFLICT (env_id, node) DO NOTHING;
    PERFORM pack_environment_recount(NEW.id);
    RETURN NULL;
END $$;

-- The platform's roles write pack_environment only: the fan-out and the recount act on the node
-- rows with the rights of the schema's owner, and resolve names in this schema only.
ALTER FUNCTION pack_environment_fan_out() SECURITY DEFINER SET search_path FROM CURRENT;
ALTER FUNCTION pack_environment_recount(BIGINT) SECURITY DEFINER SET search_path FROM CURRENT;
REVOKE EXECUTE ON FUNCTION pack_environment_recount(BIGINT) FROM PUBLIC;

DROP TRIGGER IF EXISTS pack_environment_fan_out ON pack_environment;
CREATE TRIGGER pack_environment_fan_out
    AFTER INSERT OR UPDATE ON pack_environment
    FOR EACH ROW EXECUTE FUNCTION pack_environment_fan_out();

-- The wake-up moves to the node rows; its payload is the node, so each daemon wakes for its
-- own rows only (equal notifications of one transaction are folded into one).
DROP TRIGGER IF EXISTS pack_environment_notify ON pack_environment;
DROP FUNCTION IF EXISTS pack_environment_notify();
CREATE OR REPLACE FUNCTION pack_environment_node_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('packenvd_wakeup', NEW.node);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS pack_environment_node_notify ON pack_environment_node;
CREATE TRIGGER pack_environment_node_notify
    AFTER INSERT OR UPDATE OF status, run_after ON pack_environment_node
    FOR EACH ROW WHEN (NEW.status IN ('pending', 'outdated'))
    EXECUTE FUNCTION pack_environment_node_notify();

-- request_pack_environment() as before: it marks its write as a request, and the triggers
-- above do the rest.

-- A node's own row of an environment: what a runner on that host calls before an action.
CREATE OR REPLACE FUNCTION pack_environment_for_node(p_pack_ref TEXT, p_runtime_ref TEXT, p_node TEXT)
RETURNS TABLE (env_id BIGINT, node TEXT, status pack_environment_status_enum, env_path TEXT,
               build_dir TEXT, executables JSONB, env_vars JSONB, install_error TEXT)
LANGUAGE sql STABLE AS $$
    SELECT pe.id, n.node, n.status, n.env_path, n.metadata ->> 'build_dir',
           coalesce(n.metadata -> 'executables', '{}'), coalesce(n.metadata -> 'env_vars', '{}'),
           n.install_error
    FROM pack_environment pe JOIN pack_environment_node n ON n.env_id = pe.id
    WHERE pe.pack_ref = p_pack_ref AND pe.runtime_ref = p_runtime_ref AND n.node = p_node
$$;

CREATE OR REPLACE VIEW v_pack_environment_node AS
SELECT n.id, n.env_id, pe.pack_ref, pe.runtime_ref, n.node, n.status, n.required, n.env_path,
       n.metadata ->> 'build_dir' AS build_dir, n.metadata -> 'executables' AS executables,
       n.metadata -> 'env_vars' AS env_vars, n.installed_at, n.last_verified,
       n.last_verify_result, n.attempts, n.run_after, n.claimed_by, n.lease_expires_at,
       n.install_error, n.updated,
       (nd.gone OR nd.last_seen + nd.ttl < now()) AS node_gone
FROM pack_environment_node n
JOIN pack_environment pe ON pe.id = n.env_id
JOIN packenvd_node nd ON nd.name = n.node;

-- The single-host release wrote env_path itself when it built (the build is in the metadata):
-- such a path is that host's, not a place the platform chose for every node.
UPDATE pack_environment SET env_path_by_packenvd = true
WHERE env_path IS NOT NULL AND metadata ? 'build_dir' AND NOT env_path_by_packenvd;
