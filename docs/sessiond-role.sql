-- The least-privileged database role for the sessiond daemon (`run` and `once`).
--
-- Run it as the owner of the schema (the role that ran `sessiond migrate`), in
-- the application database, after `sessiond migrate`:
--
--   psql -d app -v role=sessiond -f docs/sessiond-role.sql
--   psql -d app -c "ALTER ROLE sessiond PASSWORD '...'"   -- or use certificates
--
-- What the daemon does, and the privilege it needs for it:
--   read live rows and the rows of live sessions    SELECT on sessions
--   repair rows (compare-and-set on xmin)           UPDATE on sessions
--   insert rows for unpersisted sessions            INSERT on sessions
--   append the audit trail                          INSERT on session_audit, and
--                                                   SELECT on its session_id (the
--                                                   repair reads back what it audited)
--   tell a deleted row from one never written       SELECT on session_audit's id, session_id,
--   (a live session whose row is gone is stopped,   old_state, new_state, trigger, at
--   never re-inserted)
--   check the schema version                        SELECT on sessiond_schema_migrations
--   remember controller boot ids                    SELECT, INSERT, UPDATE on
--                                                   sessiond_instance_state
--   record a stop before sending it, settle it      SELECT, INSERT, UPDATE on
--   after                                           sessiond_stop_intents
--   with [ha]: take and renew the leader lease,     SELECT, INSERT, UPDATE on
--   and lock it (FOR SHARE) in every repair         sessiond_leases
--   honour the pause (FOR SHARE in every repair),   SELECT, INSERT, UPDATE on
--   and set it from the admin endpoints             sessiond_pause
--   with [audit] retain: prune old audit rows       EXECUTE on sessiond_audit_prune (the
--                                                   only way to delete from the trail)
-- It never deletes anything, never changes the schema, and never touches the
-- audit trail after writing it (the trail is append-only for everyone).

CREATE ROLE :"role" LOGIN;
GRANT CONNECT ON DATABASE :"DBNAME" TO :"role";
GRANT USAGE ON SCHEMA public TO :"role";
GRANT SELECT, INSERT, UPDATE ON sessions TO :"role";
GRANT INSERT ON session_audit TO :"role";
GRANT SELECT (id, session_id, old_state, new_state, trigger, at) ON session_audit TO :"role";
GRANT SELECT ON sessiond_schema_migrations TO :"role";
GRANT SELECT, INSERT, UPDATE ON sessiond_instance_state TO :"role";
GRANT SELECT, INSERT, UPDATE ON sessiond_stop_intents TO :"role";
GRANT SELECT, INSERT, UPDATE ON sessiond_leases TO :"role";
GRANT SELECT, INSERT, UPDATE ON sessiond_pause TO :"role";
GRANT EXECUTE ON FUNCTION sessiond_audit_prune(interval, integer) TO :"role";
