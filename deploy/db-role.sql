-- The least-privilege database role packenvd runs as (DESIGN §6).
--
-- Run it as a superuser, or as a role that may create roles and owns packenvd's tables (the
-- role that runs `packenvd migrate`), once at installation and again after every upgrade that
-- brings migrations. It is idempotent: each run converges the role's rights on exactly the list
-- below, in one transaction, so a running daemon never sees them half-done.
--
--   psql "$OWNER_URL" -v ON_ERROR_STOP=1 -v role=packenvd -f deploy/db-role.sql
--
-- A role per node (DESIGN §6: a node writes only its own rows, PostgreSQL enforces it): give
-- each host's daemon its own role and name its node (the daemon's node_name):
--
--   psql "$OWNER_URL" -v ON_ERROR_STOP=1 -v role=packenvd_web2 -v node=web-2 -f deploy/db-role.sql
--
-- The role may then insert, update and delete only node web-2's rows of pack_environment_node
-- and packenvd_node (row-level security, migration 9), and may not make the platform's writes
-- of pack_environment (insert, request, reset, delete: they reach every node's rows); nodes
-- past their ttl are declared gone through packenvd_reap_gone_nodes(), which runs with the
-- owner's rights. Without `node` the role is every node's (a single-node setup): a run without
-- it takes a mapping of an earlier run away.
--
-- `role` defaults to packenvd. No password is set here, so none ends up in a file, a shell
-- history or the server log; set it once, interactively (psql sends it hashed):
--
--   psql "$OWNER_URL" -c '\password packenvd'
--
-- or let the daemon in without one (peer authentication over the local socket).
--
-- What the daemon does with each right:
--   pack, runtime              SELECT   read a claimed row's pack path and installer spec
--   pack_environment           SELECT, INSERT, UPDATE, DELETE
--                                       claim, heartbeat, write back, rescue, verify; INSERT for
--                                       `packenvd request`; DELETE for `packenvd remove`
--   pack_environment_id_seq    USAGE, SELECT   the ids INSERT gives new rows
--   packenvd_node              SELECT, INSERT, UPDATE, DELETE
--                                       register this node, its heartbeat, declare nodes gone;
--                                       DELETE for `packenvd node forget`
--   pack_environment_node      SELECT, INSERT, UPDATE, DELETE
--                                       this node's queue: claim, heartbeat, write back, rescue,
--                                       verify, catch up; DELETE withdraws the rows of nodes
--                                       that lack a runtime's commands once a node that has
--                                       them joins
--   pack_environment_node_id_seq USAGE, SELECT   the ids of the node rows it adds
--   v_pack_environment_status, v_pack_environment_node
--                              SELECT   `packenvd status`, `packenvd status --node`
--   request_pack_environment(), get_pack_environment_path(), runtime_requires_environment(),
--   pack_environment_for_node(), pack_environment_summary(), packenvd_node_builds(),
--   packenvd_node_takes()
--                              EXECUTE  PostgreSQL grants it to PUBLIC by default; granted here
--                                       for databases where a DBA revoked that. The trigger
--                                       functions need none: triggers fire without the check,
--                                       and the fan-out runs with the owner's rights, so the
--                                       platform's roles need no rights on the node tables.
--                                       request_pack_environment_verification() is the
--                                       platform's (the client's), not the daemon's.
--   packenvd_reap_gone_nodes()  EXECUTE  the rescuer declares gone the nodes past their ttl
--   packenvd_node_role         SELECT   (PUBLIC's) the row-level security policies read which
--                                       node the connected role writes for
--   _sqlx_migrations           SELECT   `packenvd run` checks at start-up that the schema is
--                                       current; applying migrations is the owner's job
-- plus CONNECT on the database and USAGE on the schema (PUBLIC's by default). Nothing else: no
-- CREATE anywhere, no TRUNCATE, no writes to pack or runtime (the platform owns those).
--
-- psql meta-commands (the lines starting with a backslash) are for psql only: the test
-- crates/packenvd/tests/db_role.rs applies this file without them, substituting :'role' and
-- :"role" itself.

\set ON_ERROR_STOP on
\if :{?role}
\else
\set role packenvd
\endif
\if :{?node}
\else
\set node ''
\endif

BEGIN;

-- psql does not substitute variables inside the DO blocks' dollar quotes: they read the role
-- name from this transaction-local setting instead.
SET LOCAL packenvd.db_role = :'role';
SET LOCAL packenvd.db_node = :'node';

DO $$
DECLARE
    r   text := current_setting('packenvd.db_role');
    s   text;
    bad text;
    seq regclass;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
        EXECUTE format('CREATE ROLE %I LOGIN', r);
    ELSE
        EXECUTE format('ALTER ROLE %I LOGIN', r);
    END IF;

    -- Attributes that would make the rest of this file meaningless. Taking some of them away
    -- needs a superuser, so this refuses to go on rather than change them silently.
    SELECT concat_ws(', ',
                     CASE WHEN rolsuper THEN 'SUPERUSER' END,
                     CASE WHEN rolcreaterole THEN 'CREATEROLE' END,
                     CASE WHEN rolcreatedb THEN 'CREATEDB' END,
                     CASE WHEN rolreplication THEN 'REPLICATION' END,
                     CASE WHEN rolbypassrls THEN 'BYPASSRLS' END)
    INTO bad FROM pg_roles WHERE rolname = r;
    IF bad <> '' THEN
        RAISE EXCEPTION 'role % has %; packenvd''s role must have none of these', r, bad
            USING HINT = format('ALTER ROLE %I NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS', r);
    END IF;

    -- The schema the migrations put pack_environment in, found through the same search_path
    -- as the unqualified names below. Fails with "relation "pack_environment" does not exist"
    -- when the database has not been migrated: run `packenvd migrate` as the owner first.
    SELECT n.nspname INTO s
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'pack_environment'::regclass;

    -- Granted only where a DBA took them from PUBLIC: in the usual case this file then needs
    -- no rights on the database or on schema public (which belongs to the database owner).
    IF NOT has_database_privilege(r, current_database(), 'CONNECT') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), r);
    END IF;
    IF NOT has_schema_privilege(r, s, 'USAGE') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, r);
    END IF;
    -- Name resolution pinned to that schema: packenvd's unqualified names cannot be shadowed by
    -- objects in a schema named after the role ("$user" comes first in the default path).
    EXECUTE format('ALTER ROLE %I IN DATABASE %I SET search_path = %I', r, current_database(), s);

    -- The sequence behind pack_environment.id: pack_environment_id_seq when packenvd created
    -- the table; looked up by column so that a platform's own table works too.
    seq := pg_get_serial_sequence(format('%I.pack_environment', s), 'id')::regclass;
    IF seq IS NOT NULL THEN
        EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %I', seq, r);
        EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO %I', seq, r);
    END IF;
    seq := pg_get_serial_sequence(format('%I.pack_environment_node', s), 'id')::regclass;
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %I', seq, r);
    EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO %I', seq, r);

    -- The node the role writes for (migration 9), or none: every node's.
    IF current_setting('packenvd.db_node') <> '' THEN
        INSERT INTO packenvd_node_role (role_name, node)
        VALUES (r, current_setting('packenvd.db_node'))
        ON CONFLICT (role_name) DO UPDATE SET node = EXCLUDED.node;
    ELSE
        DELETE FROM packenvd_node_role WHERE role_name = r;
        RAISE NOTICE 'role % may write every node''s rows: give each node its own role with -v node=NAME where there is more than one', r;
    END IF;
END $$;

-- Start from nothing on packenvd's objects, so that a right granted by an earlier version of
-- this file, or by hand, does not survive a re-run: the grants below are the whole list.
REVOKE ALL ON pack, runtime, pack_environment, v_pack_environment_status, _sqlx_migrations,
    packenvd_node, pack_environment_node, v_pack_environment_node
    FROM :"role";
REVOKE ALL ON FUNCTION
    request_pack_environment(text, text),
    get_pack_environment_path(text, text),
    runtime_requires_environment(text),
    pack_environment_for_node(text, text, text),
    pack_environment_summary(integer, integer, integer, integer, integer,
                             pack_environment_status_enum),
    packenvd_node_builds(packenvd_node, text),
    packenvd_node_takes(packenvd_node, text),
    pack_environment_recount(bigint),
    pack_environment_before_write(),
    pack_environment_fan_out(),
    pack_environment_node_notify(),
    pack_environment_fill_nulls(),
    pack_environment_status_notify(),
    request_pack_environment_verification(text, text),
    packenvd_reap_gone_nodes()
    FROM :"role";

GRANT SELECT ON pack, runtime TO :"role";
GRANT SELECT, INSERT, UPDATE, DELETE ON pack_environment TO :"role";
GRANT SELECT ON v_pack_environment_status, v_pack_environment_node TO :"role";
GRANT SELECT, INSERT, UPDATE, DELETE ON packenvd_node TO :"role";
GRANT SELECT, INSERT, UPDATE, DELETE ON pack_environment_node TO :"role";
GRANT EXECUTE ON FUNCTION
    request_pack_environment(text, text),
    get_pack_environment_path(text, text),
    runtime_requires_environment(text),
    pack_environment_for_node(text, text, text),
    pack_environment_summary(integer, integer, integer, integer, integer,
                             pack_environment_status_enum),
    packenvd_node_builds(packenvd_node, text),
    packenvd_node_takes(packenvd_node, text),
    packenvd_reap_gone_nodes()
    TO :"role";
GRANT SELECT ON _sqlx_migrations TO :"role";

-- What the role can do in the end, counting rights it holds through PUBLIC or through roles
-- it is a member of, which the REVOKEs above cannot reach: anything beyond the list above, in
-- packenvd's schema, is reported. (The platform's own tables there included.)
DO $$
DECLARE
    r     text := current_setting('packenvd.db_role');
    s     text := (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE c.oid = 'pack_environment'::regclass);
    seq   regclass := pg_get_serial_sequence(format('%I.pack_environment', s), 'id')::regclass;
    nseq  regclass := pg_get_serial_sequence(format('%I.pack_environment_node', s), 'id')::regclass;
    extra text;
BEGIN
    SELECT string_agg(format('%s on %s', p.priv, c.oid::regclass), ', '
                      ORDER BY c.relname, p.priv)
    INTO extra
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES',
                            'TRIGGER', 'USAGE']) AS p(priv)
    WHERE n.nspname = s
      AND CASE WHEN c.relkind = 'S'
               THEN p.priv IN ('SELECT', 'UPDATE', 'USAGE')
                    AND has_sequence_privilege(r, c.oid, p.priv)
                    AND NOT (c.oid IN (seq, nseq) AND p.priv IN ('SELECT', 'USAGE'))
               WHEN c.relkind IN ('r', 'p', 'v', 'm', 'f')
               THEN p.priv <> 'USAGE'
                    AND has_table_privilege(r, c.oid, p.priv)
                    AND (c.relname, p.priv) NOT IN (
                        ('pack', 'SELECT'), ('runtime', 'SELECT'),
                        ('pack_environment', 'SELECT'), ('pack_environment', 'INSERT'),
                        ('pack_environment', 'UPDATE'), ('pack_environment', 'DELETE'),
                        ('v_pack_environment_status', 'SELECT'), ('_sqlx_migrations', 'SELECT'),
                        ('packenvd_node', 'SELECT'), ('packenvd_node', 'INSERT'),
                        ('packenvd_node', 'UPDATE'), ('packenvd_node', 'DELETE'),
                        ('pack_environment_node', 'SELECT'), ('pack_environment_node', 'INSERT'),
                        ('pack_environment_node', 'UPDATE'), ('pack_environment_node', 'DELETE'),
                        ('v_pack_environment_node', 'SELECT'),
                        ('packenvd_node_role', 'SELECT'))
               ELSE false END;
    IF extra IS NOT NULL THEN
        RAISE WARNING 'role % holds rights packenvd does not need (granted by someone else, to PUBLIC or to a role it is a member of): %', r, extra;
    END IF;
    IF has_schema_privilege(r, s, 'CREATE') THEN
        -- PostgreSQL 14 and older grant CREATE on schema public to PUBLIC.
        RAISE WARNING 'role % may create objects in schema %', r, s
            USING HINT = format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC (the default since PostgreSQL 15)', s);
    END IF;
    IF has_database_privilege(r, current_database(), 'CREATE') THEN
        RAISE WARNING 'role % may create schemas in database %', r, current_database();
    END IF;
END $$;

COMMIT;
