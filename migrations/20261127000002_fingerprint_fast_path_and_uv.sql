-- Requests whose inputs have not changed finish without a rebuild (DESIGN §4), and the uv
-- runtime.

-- True only while request_pack_environment() writes the row: such a request may be answered
-- by the current build when its fingerprint still matches. Every other way to pending or
-- outdated (an operator's UPDATE, `packenvd rebuild`, a failed verification) rebuilds from
-- scratch, because that is how operators repair an environment.
ALTER TABLE pack_environment
    ADD COLUMN IF NOT EXISTS skip_if_current BOOLEAN NOT NULL DEFAULT false;

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

-- uv: the same layout and guarantees as core.python, much faster, for operators who install
-- uv. Python downloads are off: environments use the host's interpreter, like core.python.
INSERT INTO runtime (ref, name, installers) VALUES
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
}$json$)
ON CONFLICT (ref) DO NOTHING;
