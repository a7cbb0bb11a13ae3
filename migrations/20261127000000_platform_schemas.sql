-- What packenvd's first migration needs of a platform's earlier schema (issue 15).
--
-- Numbered before the first migration so that, on a platform's database, it runs first. The
-- migrations before it are deployed and sqlx refuses a database whose applied migration's
-- text changed, so they stay as they are; on a database that already has them, this one runs
-- after them (sqlx 0.8 applies every missing version, in order, whatever the newest applied
-- one) and finds nothing to do (tests/original_design.rs checks both).
--
-- Two things of the original design's schema stop the first migration:
--
-- * Its view v_pack_environment_status has other columns in another order, which CREATE OR
--   REPLACE VIEW cannot change. It is renamed out of the way, with its grants;
--   20261127000006_original_design.sql puts its columns back beside packenvd's, gives the
--   new view its grants and drops it.
-- * Its `runtime` table has columns that are NOT NULL without a default (`distributions`), so
--   the seed rows' INSERT is refused, even for refs that exist (PostgreSQL checks NOT NULL
--   before ON CONFLICT). Such columns get an empty default of their type; a column whose type
--   has no obvious empty value keeps failing the migration, naming the column.

DO $$
BEGIN
    IF to_regclass('v_pack_environment_status') IS NOT NULL
       AND to_regclass('v_pack_environment_status_original') IS NULL
       AND NOT EXISTS (SELECT 1 FROM pg_attribute
                       WHERE attrelid = to_regclass('v_pack_environment_status')
                         AND attname = 'health' AND NOT attisdropped) THEN
        ALTER VIEW v_pack_environment_status RENAME TO v_pack_environment_status_original;
    END IF;
END $$;

DO $$
DECLARE
    c RECORD;
    empty TEXT;
BEGIN
    FOR c IN
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, t.typcategory
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = to_regclass('runtime') AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''
          AND a.attname NOT IN ('ref', 'name', 'installers')
    LOOP
        -- An expression, not a literal: a literal 'now' would be the migration's moment forever.
        empty := CASE
            WHEN c.typcategory = 'A' OR c.type IN ('json', 'jsonb') THEN format('%L::%s', '{}', c.type)
            WHEN c.typcategory = 'S' THEN format('%L::%s', '', c.type)
            WHEN c.typcategory = 'B' THEN 'false'
            WHEN c.typcategory = 'N' THEN format('0::%s', c.type)
            WHEN c.typcategory = 'D' THEN format('now()::%s', c.type)
        END;
        IF empty IS NOT NULL THEN
            EXECUTE format('ALTER TABLE runtime ALTER COLUMN %I SET DEFAULT %s', c.attname, empty);
        END IF;
    END LOOP;
END $$;
