-- pgwarden DDL watch: a counter that every committed DDL statement moves, so that a gateway
-- can tell with one cheap read whether its catalog cache still describes this database.
-- Install as a superuser (event triggers need one), in every database a target names:
--   pgwarden targets install-ddl-watch NAME            (runs this with the target's credential)
--   pgwarden targets install-ddl-watch NAME --print    (prints it for psql -f)
-- Idempotent. To remove: DROP EVENT TRIGGER pgwarden_ddl_watch; DROP SCHEMA pgwarden CASCADE;
BEGIN;

CREATE SCHEMA IF NOT EXISTS pgwarden;

-- Several rows, so that concurrent DDL transactions never wait on one another: each moves
-- a row no other open transaction holds (a new one if all are held). The gateway reads the
-- sum, which grows with every committed DDL statement and never shrinks.
CREATE TABLE IF NOT EXISTS pgwarden.ddl_generation (
    slot bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    n bigint NOT NULL DEFAULT 0
);
INSERT INTO pgwarden.ddl_generation (n)
SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM pgwarden.ddl_generation);

GRANT USAGE ON SCHEMA pgwarden TO PUBLIC;
GRANT SELECT ON pgwarden.ddl_generation TO PUBLIC;

-- SECURITY DEFINER: it runs inside the DDL of any role, which may not write this table.
CREATE OR REPLACE FUNCTION pgwarden.ddl_bump() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    chosen bigint;
BEGIN
    SELECT slot INTO chosen FROM pgwarden.ddl_generation
    ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF chosen IS NULL THEN
        INSERT INTO pgwarden.ddl_generation (n) VALUES (1);
    ELSE
        UPDATE pgwarden.ddl_generation SET n = n + 1 WHERE slot = chosen;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pgwarden.ddl_bump() FROM PUBLIC;

-- ddl_command_end fires for CREATE, ALTER and DROP alike (renames, columns, views, schemas).
DROP EVENT TRIGGER IF EXISTS pgwarden_ddl_watch;
CREATE EVENT TRIGGER pgwarden_ddl_watch ON ddl_command_end EXECUTE FUNCTION pgwarden.ddl_bump();
-- ALWAYS: also under session_replication_role = replica. The gateway trusts the counter
-- only while the trigger is enabled this way.
ALTER EVENT TRIGGER pgwarden_ddl_watch ENABLE ALWAYS;

COMMIT;
