-- The least-privileged database role for sessiond on a table of your own
-- (sessions.table set), as a template: edit the table and column names to your
-- mapping, read it, then run it as the owner of both schemas, after
-- `sessiond migrate`:
--
--   psql -d app -v role=sessiond -f docs/sessiond-role-mapped.sql
--
-- Shown for the data_collection_sessions example of docs/adopting.md:
--   table app.data_collection_sessions, sessiond's own tables in schema sessiond.
--
-- What the daemon does, and the privilege it needs for it:
--   read the sessions                        SELECT on the table (its rows' xmin included)
--   end orphans, duplicates and stuck rows   UPDATE on state, updated_at, ended_at, end_reason
--   make a row follow its controller         UPDATE on state (and owner, instance) and updated_at
--   touch a stopped zombie's row             UPDATE on updated_at (or state, if unmapped)
--   insert rows for unpersisted sessions     INSERT on id, state, created_at (owner, instance,
--                                            updated_at, deleted)
--   append the audit trail, and read which   INSERT on session_audit, SELECT on its id,
--   ids it knows (no resurrection)           session_id, old_state, new_state, trigger, at
--   record stops, remember boot ids          SELECT, INSERT, UPDATE on sessiond_stop_intents
--                                            and sessiond_instance_state
--   with [ha]: the leader lease              SELECT, INSERT, UPDATE on sessiond_leases
--   the pause (read in every repair, set by  SELECT, INSERT, UPDATE on sessiond_pause
--   the admin endpoints)
--   with [audit] retain: prune old rows      EXECUTE on sessiond_audit_prune
--   check the schema version                 SELECT on sessiond_schema_migrations
-- A kind whose policy is "report" needs none of its writes; `sessiond check`
-- names every privilege an enabled repair lacks.
-- It never deletes anything, never changes a schema, and never touches the
-- audit trail after writing it.

CREATE ROLE :"role" LOGIN;
GRANT CONNECT ON DATABASE :"DBNAME" TO :"role";

-- Your table.
GRANT USAGE ON SCHEMA app TO :"role";
-- SELECT on the whole table: each row's version (the system column xmin, on
-- which every repair is a compare-and-set) is not covered by column grants.
GRANT SELECT ON app.data_collection_sessions TO :"role";
GRANT UPDATE (status, updated_at, end_time)
    ON app.data_collection_sessions TO :"role";
GRANT INSERT (session_id, status, start_time, updated_at, is_deleted)
    ON app.data_collection_sessions TO :"role";

-- sessiond's own tables.
GRANT USAGE ON SCHEMA sessiond TO :"role";
GRANT INSERT ON sessiond.session_audit TO :"role";
GRANT SELECT (id, session_id, old_state, new_state, trigger, at) ON sessiond.session_audit TO :"role";
GRANT SELECT ON sessiond.sessiond_schema_migrations TO :"role";
GRANT SELECT, INSERT, UPDATE ON sessiond.sessiond_instance_state TO :"role";
GRANT SELECT, INSERT, UPDATE ON sessiond.sessiond_stop_intents TO :"role";
GRANT SELECT, INSERT, UPDATE ON sessiond.sessiond_leases TO :"role";
GRANT SELECT, INSERT, UPDATE ON sessiond.sessiond_pause TO :"role";
GRANT EXECUTE ON FUNCTION sessiond.sessiond_audit_prune(interval, integer) TO :"role";
