-- The rights the platform's role needs to call packenvd through packenv-client (issue 15).
--
-- The daemon's own role is deploy/db-role.sql. This one is for the role the platform (its
-- action runners, its pack installer) connects as. Run it as the owner of packenvd's tables
-- after `packenvd migrate`, and again after every upgrade that brings migrations:
--
--   psql "$OWNER_URL" -v ON_ERROR_STOP=1 -v role=platform -f deploy/client-role.sql
--
-- `role` defaults to platform; it is created (LOGIN, no password) when it does not exist. The
-- file only grants: the platform's role keeps whatever else it has (its own tables, `pack` and
-- `runtime`, which the platform writes and packenvd only reads).
--
-- What the client does with each right:
--   pack, runtime              SELECT   the lookup finds the pack and the runtime by their refs;
--                                       errors name the one that is missing
--   pack_environment           SELECT, INSERT, UPDATE, DELETE
--                                       get, list, lookup; INSERT and UPDATE through
--                                       request_pack_environment() (request, ensure), which runs
--                                       with the caller's rights; DELETE for remove (the node
--                                       rows go by the foreign key's cascade)
--   pack_environment_id_seq    USAGE    the id a request gives a new row
--   pack_environment_node, packenvd_node
--                              SELECT   each node's copy (build directory, executables,
--                                       variables, step) and whether its node is gone
--   v_pack_environment_status, v_pack_environment_node
--                              SELECT   the platform's dashboards (the original design's view)
--   request_pack_environment(), request_pack_environment_verification(),
--   get_pack_environment_path(), runtime_requires_environment(), pack_environment_for_node()
--                              EXECUTE  PostgreSQL grants it to PUBLIC by default; granted here
--                                       for databases where a DBA revoked that.
--                                       request_pack_environment_verification() runs with the
--                                       owner's rights: the role needs no UPDATE on node rows
-- ensure() also LISTENs on pack_environment_status, which needs no right.
--
-- psql meta-commands (the lines starting with a backslash) are for psql only: the test
-- crates/packenvd/tests/client.rs applies this file without them, substituting :'role' and
-- :"role" itself.

\set ON_ERROR_STOP on
\if :{?role}
\else
\set role platform
\endif

BEGIN;

SET LOCAL packenv_client.role = :'role';

DO $$
DECLARE
    r   text := current_setting('packenv_client.role');
    seq regclass;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
        EXECUTE format('CREATE ROLE %I LOGIN', r);
    END IF;
    -- Looked up by column: a platform's own pack_environment may name its sequence otherwise.
    seq := pg_get_serial_sequence('pack_environment', 'id')::regclass;
    IF seq IS NOT NULL THEN
        EXECUTE format('GRANT USAGE ON SEQUENCE %s TO %I', seq, r);
    END IF;
END $$;

GRANT SELECT ON pack, runtime, pack_environment_node, packenvd_node TO :"role";
GRANT SELECT, INSERT, UPDATE, DELETE ON pack_environment TO :"role";
GRANT SELECT ON v_pack_environment_status, v_pack_environment_node TO :"role";
GRANT EXECUTE ON FUNCTION
    request_pack_environment(text, text),
    request_pack_environment_verification(text, text),
    get_pack_environment_path(text, text),
    runtime_requires_environment(text),
    pack_environment_for_node(text, text, text)
    TO :"role";

COMMIT;
