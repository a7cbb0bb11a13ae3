-- A database of the original design, converged (issue 15): its rows keep what they meant, its
-- readers keep their columns and functions, and its writers keep working next to packenvd's.
--
-- The original design created pack_environment with `env_path TEXT NOT NULL`, `metadata JSONB`
-- that may be NULL, and (in its documented form) `status` without a default and no
-- `created`/`updated`; the first migration adds what is missing but leaves what exists as it
-- is. packenvd assigns env_path, reads metadata as JSON and lets a plain INSERT leave out
-- status, so each of those is relaxed or filled here; on packenvd's own tables each statement
-- finds nothing to change.

-- env_path first: the fill below turns the original's '' into NULL.
ALTER TABLE pack_environment ALTER COLUMN env_path DROP NOT NULL;

-- Filling in what the original left empty is not a change the platform made: no trigger may
-- take it for a request (a new generation, a fan-out) or move `updated`. Only the triggers
-- enabled now are switched off and on again, so one a DBA disabled stays disabled.
DO $$
DECLARE
    t TEXT;
    enabled TEXT[];
BEGIN
    SELECT coalesce(array_agg(tgname), '{}') INTO enabled
    FROM pg_trigger
    WHERE tgrelid = 'pack_environment'::regclass AND NOT tgisinternal AND tgenabled <> 'D';
    FOREACH t IN ARRAY enabled LOOP
        EXECUTE format('ALTER TABLE pack_environment DISABLE TRIGGER %I', t);
    END LOOP;
    -- The original wrote '' as the env_path of a runtime that needs no environment; packenvd
    -- says that with NULL, and would otherwise fail the row for a path outside its root.
    UPDATE pack_environment
    SET metadata = coalesce(metadata, '{}'),
        env_path = nullif(env_path, ''),
        created = coalesce(created, installed_at, now()),
        updated = coalesce(updated, created, installed_at, now())
    WHERE metadata IS NULL OR env_path = '' OR created IS NULL OR updated IS NULL;
    FOREACH t IN ARRAY enabled LOOP
        EXECUTE format('ALTER TABLE pack_environment ENABLE TRIGGER %I', t);
    END LOOP;
END $$;

ALTER TABLE pack_environment
    ALTER COLUMN metadata SET DEFAULT '{}',
    ALTER COLUMN metadata SET NOT NULL,
    ALTER COLUMN status SET DEFAULT 'pending',
    ALTER COLUMN created SET DEFAULT now(),
    ALTER COLUMN created SET NOT NULL,
    ALTER COLUMN updated SET DEFAULT now(),
    ALTER COLUMN updated SET NOT NULL;

-- The original's writers may still send an explicit NULL (metadata from a struct field that
-- was None): it means "nothing recorded", which is '{}', not a refused write.
CREATE OR REPLACE FUNCTION pack_environment_fill_nulls() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.metadata := coalesce(NEW.metadata, '{}');
    NEW.created := coalesce(NEW.created, now());
    NEW.updated := coalesce(NEW.updated, now());
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS pack_environment_fill_nulls ON pack_environment;
CREATE TRIGGER pack_environment_fill_nulls
    BEFORE INSERT OR UPDATE ON pack_environment
    FOR EACH ROW EXECUTE FUNCTION pack_environment_fill_nulls();

-- The runtimes as the original design seeded them are that design's defaults, which packenvd
-- replaces, like its own first seeds (third migration): left alone, core.python would upgrade
-- pip from the network in every build and copy pip into every environment. A definition the
-- platform changed is its own and is kept; the base_path_template the original's
-- get_pack_environment_path() reads is kept either way.
CREATE TEMPORARY TABLE packenvd_original_runtimes (ref TEXT PRIMARY KEY, old JSONB, new JSONB)
    ON COMMIT DROP;

INSERT INTO packenvd_original_runtimes VALUES
('core.python', $old${
  "installers": [
    {"name": "create_venv", "description": "Create Python virtual environment",
     "command": "python3", "args": ["-m", "venv", "{env_path}"], "cwd": "{pack_path}",
     "env": {}, "order": 1, "optional": false},
    {"name": "upgrade_pip", "description": "Upgrade pip to latest version",
     "command": "{env_path}/bin/pip", "args": ["install", "--upgrade", "pip"],
     "cwd": "{pack_path}", "env": {}, "order": 2, "optional": true},
    {"name": "install_requirements", "description": "Install pack Python dependencies",
     "command": "{env_path}/bin/pip", "args": ["install", "-r", "{pack_path}/requirements.txt"],
     "cwd": "{pack_path}", "env": {}, "order": 3, "optional": false,
     "condition": {"file_exists": "{pack_path}/requirements.txt"}}
  ],
  "executable_templates": {"python": "{env_path}/bin/python", "pip": "{env_path}/bin/pip"}
}$old$, $new${
  "interpreter": "python",
  "installers": [
    {"name": "create venv (uv)", "order": 1,
     "condition": {"command_exists": "uv"},
     "command": "uv", "args": ["venv", "--quiet", "--python", "{python}", "{env_path}"],
     "env": {"UV_PYTHON_DOWNLOADS": "never"}},
    {"name": "create venv", "order": 1,
     "condition": {"command_missing": "uv"},
     "command": "{python}", "args": ["-m", "venv", "--without-pip", "{env_path}"]},
    {"name": "install requirements (uv)", "order": 2,
     "condition": {"command_exists": "uv", "file_exists": "{pack_path}/requirements.txt"},
     "command": "uv",
     "args": ["pip", "install", "--python", "{env_path}/bin/python", "-r", "{pack_path}/requirements.txt"],
     "env": {"UV_PYTHON_DOWNLOADS": "never"}},
    {"name": "install requirements", "order": 2,
     "condition": {"command_missing": "uv", "file_exists": "{pack_path}/requirements.txt"},
     "command": "{python}",
     "args": ["-m", "pip", "--python", "{env_path}/bin/python", "install", "--no-input",
              "--disable-pip-version-check", "-r", "{pack_path}/requirements.txt"]}
  ],
  "executable_templates": {"python": "{env_path}/bin/python"},
  "env_vars": {"VIRTUAL_ENV": "{env_path}"},
  "requires_environment": true
}$new$),
('core.nodejs', $old${
  "installers": [
    {"name": "npm_install", "description": "Install Node.js dependencies",
     "command": "npm", "args": ["install", "--prefix", "{env_path}"], "cwd": "{pack_path}",
     "env": {"NODE_PATH": "{env_path}/node_modules"}, "order": 1, "optional": false,
     "condition": {"file_exists": "{pack_path}/package.json"}}
  ],
  "executable_templates": {"node": "node", "npm": "npm"},
  "env_vars": {"NODE_PATH": "{env_path}/node_modules"}
}$old$, $new${
  "interpreter": "node",
  "installers": [
    {"name": "copy package.json", "order": 1,
     "condition": {"file_exists": "{pack_path}/package.json"},
     "command": "cp", "args": ["{pack_path}/package.json", "{env_path}/package.json"]},
    {"name": "copy package-lock.json", "order": 2,
     "condition": {"file_exists": "{pack_path}/package-lock.json"},
     "command": "cp", "args": ["{pack_path}/package-lock.json", "{env_path}/package-lock.json"]},
    {"name": "copy npm-shrinkwrap.json", "order": 2,
     "condition": {"file_exists": "{pack_path}/npm-shrinkwrap.json"},
     "command": "cp", "args": ["{pack_path}/npm-shrinkwrap.json", "{env_path}/npm-shrinkwrap.json"]},
    {"name": "npm ci", "order": 3, "cwd": "{env_path}",
     "condition": {"file_exists": ["{env_path}/package.json", "{env_path}/package-lock.json"]},
     "command": "npm", "args": ["ci", "--omit=dev", "--no-audit", "--no-fund"]},
    {"name": "npm ci (shrinkwrap)", "order": 3, "cwd": "{env_path}",
     "condition": {"file_exists": ["{env_path}/package.json", "{env_path}/npm-shrinkwrap.json"],
                   "file_missing": "{env_path}/package-lock.json"},
     "command": "npm", "args": ["ci", "--omit=dev", "--no-audit", "--no-fund"]},
    {"name": "npm install", "order": 3, "cwd": "{env_path}",
     "condition": {"file_exists": "{env_path}/package.json",
                   "file_missing": ["{env_path}/package-lock.json", "{env_path}/npm-shrinkwrap.json"]},
     "command": "npm", "args": ["install", "--omit=dev", "--no-audit", "--no-fund"]}
  ],
  "executable_templates": {"node": "node"},
  "env_vars": {"NODE_PATH": "{env_path}/node_modules"},
  "requires_environment": true
}$new$),
('core.shell', $old${
  "installers": [],
  "executable_templates": {"sh": "sh", "bash": "bash"},
  "requires_environment": false
}$old$, '{"installers": [], "requires_environment": false}'),
('core.native', $old${
  "installers": [],
  "executable_templates": {},
  "requires_environment": false
}$old$, '{"installers": [], "requires_environment": false}');

UPDATE runtime r
SET installers = d.new || CASE WHEN r.installers ? 'base_path_template'
                               THEN jsonb_build_object('base_path_template',
                                                       r.installers -> 'base_path_template')
                               ELSE '{}'::jsonb END
FROM packenvd_original_runtimes d
WHERE r.ref = d.ref AND jsonb_typeof(r.installers) = 'object'
  AND r.installers - 'base_path_template' = d.old;

-- The original functions as the original answered: get_pack_environment_path() also fills in
-- {runtime_ref}, and runtime_requires_environment() is false for a runtime that does not exist.
CREATE OR REPLACE FUNCTION get_pack_environment_path(p_pack_ref TEXT, p_runtime_ref TEXT)
RETURNS TEXT
LANGUAGE sql STABLE AS $$
    SELECT replace(replace(replace(replace(
               COALESCE(r.installers->>'base_path_template',
                        '/opt/attune/packenvs/{pack_ref}/{runtime_name_lower}'),
               '{pack_ref}', p_pack_ref),
               '{runtime_ref}', p_runtime_ref),
               '{runtime_name_lower}', lower(r.name)),
               '{runtime_name}', r.name)
    FROM runtime r WHERE r.ref = p_runtime_ref
$$;

CREATE OR REPLACE FUNCTION runtime_requires_environment(p_runtime_ref TEXT)
RETURNS BOOLEAN
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT CASE WHEN jsonb_typeof(installers) = 'object'
                                 THEN COALESCE((installers->>'requires_environment')::boolean, true)
                                 ELSE true END
                     FROM runtime WHERE ref = p_runtime_ref), false)
$$;

-- The status view answers both ways: packenvd's columns first, in the order CREATE OR REPLACE
-- keeps for its readers and grants, then the original's (`health_status` with its values;
-- `needs_verification` is packenvd's, which also counts a ready row never verified). The
-- pack's label is read through to_jsonb: a platform's pack table may have no `label`.
CREATE OR REPLACE VIEW v_pack_environment_status AS
SELECT pe.id,
       pe.pack_ref,
       pe.runtime_ref,
       pe.status,
       pe.env_path,
       pe.installed_at,
       pe.last_verified,
       pe.attempts,
       pe.run_after,
       pe.claimed_by,
       pe.lease_expires_at,
       pe.install_error,
       CASE
           WHEN pe.status = 'ready' AND pe.last_verified >= now() - interval '7 days' THEN 'healthy'
           WHEN pe.status = 'ready' THEN 'stale'
           WHEN pe.status = 'failed' THEN 'unhealthy'
           WHEN pe.status = 'installing' THEN 'installing'
           ELSE 'waiting'
       END AS health,
       (pe.status = 'ready'
        AND (pe.last_verified IS NULL OR pe.last_verified < now() - interval '7 days'))
           AS needs_verification,
       pe.updated,
       pe.last_verify_result,
       pe.pack,
       to_jsonb(p) ->> 'label' AS pack_name,
       pe.runtime,
       r.name AS runtime_name,
       CASE
           WHEN pe.status = 'ready' THEN 'healthy'
           WHEN pe.status = 'failed' THEN 'unhealthy'
           WHEN pe.status IN ('pending', 'installing') THEN 'provisioning'
           WHEN pe.status = 'outdated' THEN 'needs_update'
           ELSE 'unknown'
       END AS health_status,
       pe.created
FROM pack_environment pe
JOIN pack p ON p.id = pe.pack
JOIN runtime r ON r.id = pe.runtime;

-- The original view, moved aside by the platform-schemas migration: whoever could read it
-- (a dashboard's role) can read this one, then it goes.
DO $$
DECLARE
    g RECORD;
BEGIN
    IF to_regclass('v_pack_environment_status_original') IS NULL THEN
        RETURN;
    END IF;
    FOR g IN
        SELECT a.privilege_type, a.grantee, a.is_grantable
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = to_regclass('v_pack_environment_status_original')
          AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON v_pack_environment_status TO %s%s', g.privilege_type,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                            ELSE quote_ident(pg_get_userbyid(g.grantee)) END,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
    DROP VIEW v_pack_environment_status_original;
END $$;

-- pack_environment_for_node() finds the parent by its refs: without this index that is a scan
-- of every environment, on the path a runner takes before each action.
CREATE INDEX IF NOT EXISTS pack_environment_refs_idx ON pack_environment (pack_ref, runtime_ref);

-- Wakes whoever waits for an environment (the client's ensure) when its summary becomes ready
-- or failed. A channel of its own, so daemons are not woken for it; the payload is the id and
-- the status ("42 ready"). The status is derived by the BEFORE trigger, not named in packenvd's
-- UPDATEs, hence no `UPDATE OF status`.
CREATE OR REPLACE FUNCTION pack_environment_status_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pack_environment_status', NEW.id || ' ' || NEW.status);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS pack_environment_status_notify ON pack_environment;
CREATE TRIGGER pack_environment_status_notify
    AFTER UPDATE ON pack_environment
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.status IN ('ready', 'failed'))
    EXECUTE FUNCTION pack_environment_status_notify();

-- A verification asked for now: the node rows' `last_verified` is what the verifier's claim
-- orders by (NULLS FIRST, and NULL counts as stale whatever verify_max_age), so each node's
-- next pass checks the environment first. Runs with the owner's rights, like the fan-out: the
-- platform's roles need no rights on the node rows. Returns how many node rows were marked.
CREATE OR REPLACE FUNCTION request_pack_environment_verification(
    p_pack_ref TEXT, p_runtime_ref TEXT)
RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    v_env BIGINT;
    v_marked INTEGER;
BEGIN
    SELECT id INTO v_env FROM pack_environment
    WHERE pack_ref = p_pack_ref AND runtime_ref = p_runtime_ref;
    IF v_env IS NULL THEN
        RAISE EXCEPTION 'no environment of pack % for runtime %', p_pack_ref, p_runtime_ref
            USING ERRCODE = 'no_data_found';
    END IF;
    UPDATE pack_environment_node SET last_verified = NULL
    WHERE env_id = v_env AND status = 'ready';
    GET DIAGNOSTICS v_marked = ROW_COUNT;
    UPDATE pack_environment SET last_verified = NULL WHERE id = v_env AND status = 'ready';
    RETURN v_marked;
END $$;
ALTER FUNCTION request_pack_environment_verification(TEXT, TEXT)
    SECURITY DEFINER SET search_path FROM CURRENT;
