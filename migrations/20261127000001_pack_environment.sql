-- packenvd schema (DESIGN §1). Every object is created IF NOT EXISTS, and columns that an
-- existing platform table may lack are added, so packenvd can join a platform database that
-- already has `pack` and `runtime` tables, or stand alone.

CREATE TABLE IF NOT EXISTS pack (
    id           BIGSERIAL PRIMARY KEY,
    ref          TEXT NOT NULL UNIQUE,
    label        TEXT NOT NULL DEFAULT '',
    version      TEXT NOT NULL DEFAULT '0.0.0',
    storage_path TEXT,
    created      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated      TIMESTAMPTZ NOT NULL DEFAULT now()
);
ALTER TABLE pack ADD COLUMN IF NOT EXISTS storage_path TEXT;

CREATE TABLE IF NOT EXISTS runtime (
    id         BIGSERIAL PRIMARY KEY,
    ref        TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL DEFAULT '',
    installers JSONB NOT NULL DEFAULT '[]',
    created    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated    TIMESTAMPTZ NOT NULL DEFAULT now()
);
ALTER TABLE runtime ADD COLUMN IF NOT EXISTS name TEXT NOT NULL DEFAULT '';
ALTER TABLE runtime ADD COLUMN IF NOT EXISTS installers JSONB NOT NULL DEFAULT '[]';

DO $$ BEGIN
    CREATE TYPE pack_environment_status_enum AS ENUM
        ('pending', 'installing', 'ready', 'failed', 'outdated');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS pack_environment (
    id            BIGSERIAL PRIMARY KEY,
    pack          BIGINT NOT NULL REFERENCES pack(id) ON DELETE CASCADE,
    pack_ref      TEXT NOT NULL,
    runtime       BIGINT NOT NULL REFERENCES runtime(id) ON DELETE CASCADE,
    runtime_ref   TEXT NOT NULL,
    env_path      TEXT,
    status        pack_environment_status_enum NOT NULL DEFAULT 'pending',
    installed_at  TIMESTAMPTZ,
    last_verified TIMESTAMPTZ,
    install_log   TEXT,
    install_error TEXT,
    metadata      JSONB NOT NULL DEFAULT '{}',
    UNIQUE (pack, runtime)
);
-- The queue's columns (DESIGN §1, §3).
ALTER TABLE pack_environment
    ADD COLUMN IF NOT EXISTS attempts         INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS run_after        TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS claimed_by       TEXT,
    ADD COLUMN IF NOT EXISTS claim_token      UUID,
    ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS fingerprint      TEXT,
    ADD COLUMN IF NOT EXISTS created          TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS updated          TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- True only while request_pack_environment() writes the row: such a request may be
    -- answered by the current build when its fingerprint still matches. Every other way to
    -- pending or outdated (an operator's UPDATE, `packenvd rebuild`, a failed verification)
    -- rebuilds from scratch, because that is how operators repair an environment.
    ADD COLUMN IF NOT EXISTS skip_if_current  BOOLEAN NOT NULL DEFAULT false,
    -- The last verification: "ok", or what failed ("executable 'python' ... is missing").
    ADD COLUMN IF NOT EXISTS last_verify_result TEXT;

-- The claim reads exactly this index: its WHERE matches the claim's, and its order is the
-- claim's ORDER BY, so a claim never walks finished rows (DESIGN §3).
CREATE INDEX IF NOT EXISTS pack_environment_claimable_idx
    ON pack_environment (run_after, id) WHERE status IN ('pending', 'outdated');
-- The rescuer's scan for expired leases.
CREATE INDEX IF NOT EXISTS pack_environment_installing_idx
    ON pack_environment (lease_expires_at) WHERE status = 'installing';
CREATE INDEX IF NOT EXISTS pack_environment_runtime_idx ON pack_environment (runtime);
-- The verifier's scan: ready rows by age of their last check.
CREATE INDEX IF NOT EXISTS pack_environment_verify_idx
    ON pack_environment (last_verified NULLS FIRST, id) WHERE status = 'ready';

-- Fills in what a plain INSERT may leave out, keeps `updated` current, and treats an outside
-- reset to pending/outdated (an operator or a pack update) as a fresh request: attempts start
-- over and the claim is dropped, which fences out a build still running for the old claim.
-- packenvd's own transitions always change claim_token in the same statement; outside writers
-- do not touch it, and that is how the two are told apart.
CREATE OR REPLACE FUNCTION pack_environment_before_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.pack_ref IS NULL THEN
            SELECT ref INTO NEW.pack_ref FROM pack WHERE id = NEW.pack;
        END IF;
        IF NEW.runtime_ref IS NULL THEN
            SELECT ref INTO NEW.runtime_ref FROM runtime WHERE id = NEW.runtime;
        END IF;
        NEW.skip_if_current := false;
    ELSIF NEW.status IN ('pending', 'outdated')
          AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.claim_token IS NOT DISTINCT FROM OLD.claim_token THEN
        -- An outside reset: attempts start over and the claim is dropped, which fences out a
        -- build still running for the old claim.
        NEW.attempts := 0;
        NEW.run_after := now();
        NEW.claimed_by := NULL;
        NEW.claim_token := NULL;
        NEW.lease_expires_at := NULL;
        NEW.skip_if_current := coalesce(current_setting('packenvd.request', true), '') = 'on';
    END IF;
    NEW.updated := now();
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS pack_environment_before_write ON pack_environment;
CREATE TRIGGER pack_environment_before_write
    BEFORE INSERT OR UPDATE ON pack_environment
    FOR EACH ROW EXECUTE FUNCTION pack_environment_before_write();

-- Wakes packenvd within milliseconds. The payload is constant on purpose: Postgres folds equal
-- notifications of one transaction into one, so a bulk insert sends a single wake-up.
CREATE OR REPLACE FUNCTION pack_environment_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('packenvd_wakeup', '');
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS pack_environment_notify ON pack_environment;
CREATE TRIGGER pack_environment_notify
    AFTER INSERT OR UPDATE OF status, run_after ON pack_environment
    FOR EACH ROW WHEN (NEW.status IN ('pending', 'outdated'))
    EXECUTE FUNCTION pack_environment_notify();

-- What a pack install calls: creates the row, or sends an existing one back to pending.
CREATE OR REPLACE FUNCTION request_pack_environment(p_pack_ref TEXT, p_runtime_ref TEXT)
RETURNS pack_environment
LANGUAGE plpgsql AS $$
DECLARE
    v_pack BIGINT;
    v_runtime BIGINT;
    v_row pack_environment;
BEGIN
    SELECT id INTO v_pack FROM pack WHERE ref = p_pack_ref;
    IF v_pack IS NULL THEN
        RAISE EXCEPTION 'no pack with ref %', p_pack_ref USING ERRCODE = 'no_data_found';
    END IF;
    SELECT id INTO v_runtime FROM runtime WHERE ref = p_runtime_ref;
    IF v_runtime IS NULL THEN
        RAISE EXCEPTION 'no runtime with ref %', p_runtime_ref USING ERRCODE = 'no_data_found';
    END IF;
    -- Marks this write as a request for the trigger; cleared again right after, so a later
    -- statement of the same transaction is not mistaken for one.
    PERFORM set_config('packenvd.request', 'on', true);
    INSERT INTO pack_environment (pack, pack_ref, runtime, runtime_ref, status)
    VALUES (v_pack, p_pack_ref, v_runtime, p_runtime_ref, 'pending')
    ON CONFLICT (pack, runtime) DO UPDATE SET status = 'pending'
        WHERE pack_environment.status <> 'pending'
    RETURNING * INTO v_row;
    PERFORM set_config('packenvd.request', '', true);
    IF v_row.id IS NULL THEN
        SELECT * INTO v_row FROM pack_environment WHERE pack = v_pack AND runtime = v_runtime;
    END IF;
    RETURN v_row;
END $$;

-- Kept for platforms written against the original design. packenvd itself places environments
-- under its configured envs_root and writes the real path into pack_environment.env_path.
CREATE OR REPLACE FUNCTION get_pack_environment_path(p_pack_ref TEXT, p_runtime_ref TEXT)
RETURNS TEXT
LANGUAGE sql STABLE AS $$
    SELECT replace(replace(replace(
               COALESCE(r.installers->>'base_path_template',
                        '/opt/attune/packenvs/{pack_ref}/{runtime_name_lower}'),
               '{pack_ref}', p_pack_ref),
               '{runtime_name_lower}', lower(r.name)),
               '{runtime_name}', r.name)
    FROM runtime r WHERE r.ref = p_runtime_ref
$$;

CREATE OR REPLACE FUNCTION runtime_requires_environment(p_runtime_ref TEXT)
RETURNS BOOLEAN
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN jsonb_typeof(installers) = 'object'
                THEN COALESCE((installers->>'requires_environment')::boolean, true)
                ELSE true END
    FROM runtime WHERE ref = p_runtime_ref
$$;

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
       pe.last_verify_result
FROM pack_environment pe;

-- Seed runtimes. ON CONFLICT keeps a platform's own definitions of these refs. core.python-uv
-- is core.python with uv (much faster) for hosts that have uv; Python downloads are off, so its
-- environments use the host's interpreter like core.python's.
INSERT INTO runtime (ref, name, installers) VALUES
('core.python', 'Python', $json${
  "installers": [
    {"name": "create venv", "order": 1,
     "command": "python3", "args": ["-m", "venv", "{env_path}"]},
    {"name": "install requirements", "order": 2,
     "condition": {"file_exists": "{pack_path}/requirements.txt"},
     "command": "{env_path}/bin/python",
     "args": ["-m", "pip", "install", "--no-input", "-r", "{pack_path}/requirements.txt"]}
  ],
  "executable_templates": {"python": "{env_path}/bin/python", "pip": "{env_path}/bin/pip"},
  "env_vars": {"VIRTUAL_ENV": "{env_path}"},
  "requires_environment": true
}$json$),
('core.nodejs', 'Node.js', $json${
  "installers": [
    {"name": "copy package.json", "order": 1,
     "condition": {"file_exists": "{pack_path}/package.json"},
     "command": "cp", "args": ["{pack_path}/package.json", "{env_path}/package.json"]},
    {"name": "copy package-lock.json", "order": 2,
     "condition": {"file_exists": "{pack_path}/package-lock.json"},
     "command": "cp", "args": ["{pack_path}/package-lock.json", "{env_path}/package-lock.json"]},
    {"name": "npm install", "order": 3, "cwd": "{env_path}",
     "condition": {"file_exists": "{env_path}/package.json"},
     "command": "npm", "args": ["install", "--omit=dev", "--no-audit", "--no-fund"]}
  ],
  "executable_templates": {"node": "node"},
  "env_vars": {"NODE_PATH": "{env_path}/node_modules"},
  "requires_environment": true
}$json$),
('core.python-uv', 'Python-uv', $json${
  "installers": [
    {"name": "create venv", "order": 1,
     "command": "uv", "args": ["venv", "--quiet", "--python", "python3", "{env_path}"],
     "env": {"UV_PYTHON_DOWNLOADS": "never"}},
    {"name": "install requirements", "order": 2,
     "condition": {"file_exists": "{pack_path}/requirements.txt"},
     "command": "uv",
     "args": ["pip", "install", "--python", "{env_path}/bin/python", "-r", "{pack_path}/requirements.txt"],
     "env": {"UV_PYTHON_DOWNLOADS": "never"}}
  ],
  "executable_templates": {"python": "{env_path}/bin/python"},
  "env_vars": {"VIRTUAL_ENV": "{env_path}"},
  "requires_environment": true
}$json$),
('core.shell', 'Shell', '{"installers": [], "requires_environment": false}'),
('core.native', 'Native', '{"installers": [], "requires_environment": false}')
ON CONFLICT (ref) DO NOTHING;
