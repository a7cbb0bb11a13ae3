-- Periodic verification (DESIGN §7): the outcome of the last check of a ready environment.
-- "ok", or what failed ("executable 'python' ... does not run", "inputs changed", ...).
ALTER TABLE pack_environment ADD COLUMN IF NOT EXISTS last_verify_result TEXT;

-- The verifier's scan: ready rows by age of their last check.
CREATE INDEX IF NOT EXISTS pack_environment_verify_idx
    ON pack_environment (last_verified NULLS FIRST, id) WHERE status = 'ready';

-- New columns go last: CREATE OR REPLACE VIEW may only append.
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
