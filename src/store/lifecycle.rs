//! The session lifecycle in SQL, built from the mapping: `sessiond_lookup`,
//! the function any application can call to find a session and learn why it
//! is not found, and the audit triggers a team applies to a table of its own
//! (`sessiond sql audit-triggers`). The reference table gets its triggers from
//! a migration; these are the same rules in the table's own words.
//!
//! Every value from the config (state values, the id pattern) is emitted as a
//! quoted literal, and every identifier double-quoted.

use super::mapping::{Col, Kind, Table};
use super::{q, Store, StoreError};
use crate::config::{Ident, SessionsConfig};
use crate::model::RowState;

/// `s` as an SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A stable fingerprint of generated SQL (FNV-1a, 64 bits): it names the
/// version of the lookup function that a config makes, so `check` can tell a
/// function made from another config.
pub fn fingerprint(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What the lookup function's comment says, for a function made from `sql`.
pub fn lookup_comment(sql: &str) -> String {
    format!("sessiond_lookup {}", fingerprint(sql))
}

impl Table {
    /// The canonical state of the row `rec` (`t`, `NEW`, `OLD`) as text, NULL
    /// for a value in no list.
    fn canonical_state(&self, rec: &str) -> String {
        let mut arms = Vec::new();
        if let Some(d) = &self.deleted {
            arms.push(format!("WHEN coalesce({rec}.{}, false) THEN 'deleted'", d.q()));
        }
        for state in RowState::ALL {
            let values = self.vocabulary.values(state);
            if values.is_empty() {
                continue;
            }
            let list: Vec<String> = values.iter().map(|v| literal(v)).collect();
            arms.push(format!(
                "WHEN {rec}.{}::text IN ({}) THEN '{}'",
                self.state.q(),
                list.join(", "),
                state.as_str()
            ));
        }
        format!("CASE {} END", arms.join(" "))
    }

    /// A check that text `$1` is a value the id column can hold (beyond the id
    /// pattern), so the cast below never fails.
    fn id_shape(&self) -> Option<String> {
        let digits = |n: usize| format!("'^-?[0-9]{{1,{n}}}$'");
        match (self.id.kind, self.id.sql_type.as_str()) {
            (Kind::Uuid, _) => {
                Some("'^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'".to_owned())
            }
            (Kind::Int, "smallint") => Some(digits(4)),
            (Kind::Int, "integer") => Some(digits(9)),
            (Kind::Int, _) => Some(digits(18)),
            _ => None,
        }
    }

    /// `sessiond_lookup(session_id, include_deleted)` in `schema`: one SQL
    /// statement, inlined by the planner into the caller's query, so the id
    /// column's index serves it.
    ///
    /// `found` is true for a live or ended session, and for a deleted one
    /// only with `include_deleted`; `reason` is `ok` (live), `ended` (stopped
    /// or failed), `deleted` (soft-deleted, or a row gone whose id the audit
    /// trail knows), `never_existed`, `invalid_format`, or `unknown_state` (a
    /// row whose state value is in no list of the mapping); `state` is the
    /// canonical state.
    pub fn lookup_sql(&self, schema: &Ident, id_pattern: &str) -> String {
        let valid = match self.id_shape() {
            Some(shape) => format!("$1 ~ {} AND $1 ~ {shape}", literal(id_pattern)),
            None => format!("$1 ~ {}", literal(id_pattern)),
        };
        let key = self.id.cast_text("$1");
        format!(
            "CREATE OR REPLACE FUNCTION {schema}.sessiond_lookup(session_id text, include_deleted boolean DEFAULT false)
RETURNS TABLE (found boolean, reason text, state text)
LANGUAGE sql STABLE AS $sessiond$
SELECT CASE WHEN NOT v.valid OR r.present IS NULL THEN false
            WHEN r.state = 'deleted' THEN coalesce($2, false)
            ELSE true END,
       CASE WHEN NOT v.valid THEN 'invalid_format'
            WHEN r.present IS NULL AND h.existed THEN 'deleted'
            WHEN r.present IS NULL THEN 'never_existed'
            WHEN r.state IN ('creating', 'active', 'paused') THEN 'ok'
            WHEN r.state IN ('stopped', 'failed') THEN 'ended'
            WHEN r.state = 'deleted' THEN 'deleted'
            ELSE 'unknown_state' END,
       r.state
  FROM (SELECT coalesce({valid}, false) AS valid,
               CASE WHEN coalesce({valid}, false) THEN {key} END AS key) v
  LEFT JOIN LATERAL (
       SELECT true AS present, {canonical} AS state
         FROM {table} t WHERE t.{id} = v.key
  ) r ON true
  LEFT JOIN LATERAL (
       SELECT true AS existed FROM {audit} a
        WHERE r.present IS NULL AND a.session_id = v.key::text LIMIT 1
  ) h ON true
$sessiond$",
            schema = schema.quoted(),
            canonical = self.canonical_state("t"),
            table = self.table,
            id = self.id.q(),
            audit = self.audit,
        )
    }

    /// The audit triggers for a table sessiond did not create, for its team
    /// to review and apply: every state change audited as `app` (sessiond's
    /// own repairs audit themselves), hard deletes refused.
    pub fn audit_triggers_sql(&self, schema: &Ident) -> String {
        let schema = schema.quoted();
        let name = self.table.rsplit('.').next().unwrap_or("sessions").trim_matches('"');
        let function = format!("{schema}.\"sessiond_audit_{}\"", name.replace('"', ""));
        let refuse = format!("{schema}.\"sessiond_refuse_delete_{}\"", name.replace('"', ""));
        let id = self.id.q();
        format!(
            "-- The audit triggers sessiond's reference table has, for {table}.
-- Generated by sessiond {version} from its config; review, then apply as the
-- table's owner (psql -f). sessiond never applies them itself.
--
-- 1. Every change of a session's canonical state (an insert, an update of the
--    state{deleted_note}, a delete) writes a row to {audit}
--    with trigger 'app'. sessiond's own repairs write their audit rows
--    themselves (trigger 'reconciler') and mark their transaction with
--    SET LOCAL sessiond.writer = 'reconciler', so they are not audited twice.
--    SECURITY DEFINER: the application's role needs no privilege on the trail.
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $sessiond$
DECLARE
    old_state text;
    new_state text;
BEGIN
    IF current_setting('sessiond.writer', true) IS NOT DISTINCT FROM 'reconciler' THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_state := {old_state};
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_state := {new_state};
    END IF;
    IF TG_OP = 'UPDATE' AND old_state IS NOT DISTINCT FROM new_state THEN
        RETURN NULL;
    END IF;
    INSERT INTO {audit} (session_id, old_state, new_state, trigger, actor, reason, details)
    VALUES (CASE WHEN TG_OP = 'DELETE' THEN OLD.{id}::text ELSE NEW.{id}::text END,
            old_state, new_state, 'app', session_user,
            CASE TG_OP WHEN 'INSERT' THEN 'created' WHEN 'DELETE' THEN 'hard_delete' END,
            jsonb_build_object('application_name', current_setting('application_name', true)));
    RETURN NULL;
END
$sessiond$;
DROP TRIGGER IF EXISTS sessiond_audit ON {table};
CREATE TRIGGER sessiond_audit AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {function}();

-- 2. Deletion is soft: a deleted session keeps its row ({deleted_value}), so
--    sessiond_lookup can say why it is gone and sessiond never mistakes it for a
--    session that was never stored. TRUNCATE is refused too. Leave this part out if you must delete
--    rows (a retention job): deletes are then audited as 'hard_delete', and
--    sessiond stops a live session whose row was deleted, never re-inserting it.
CREATE OR REPLACE FUNCTION {refuse}() RETURNS trigger
LANGUAGE plpgsql AS $sessiond$
BEGIN
    RAISE EXCEPTION 'sessions are never deleted (% refused): {instead} instead', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$sessiond$;
DROP TRIGGER IF EXISTS sessiond_no_delete ON {table};
CREATE TRIGGER sessiond_no_delete BEFORE DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {refuse}();
DROP TRIGGER IF EXISTS sessiond_no_truncate ON {table};
CREATE TRIGGER sessiond_no_truncate BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {refuse}();
",
            table = self.table,
            version = env!("CARGO_PKG_VERSION"),
            audit = self.audit,
            deleted_note = if self.deleted.is_some() { " or of the deleted flag" } else { "" },
            old_state = self.canonical_state("OLD"),
            new_state = self.canonical_state("NEW"),
            deleted_value = self.soft_delete(),
            // Inside a string literal inside the function body.
            instead = self.soft_delete().replace('\'', "''"),
        )
    }
}

impl Table {
    /// How the application soft-deletes a session in this table, in words.
    fn soft_delete(&self) -> String {
        if let Some(flag) = &self.deleted {
            return format!("set {} = true", flag.q());
        }
        match self.vocabulary.written(RowState::Deleted) {
            Some(v) => format!("set {} = {}", self.state.q(), literal(v)),
            None => match self.vocabulary.written(RowState::Stopped) {
                Some(v) => format!("set {} = {}", self.state.q(), literal(v)),
                None => "end the session by its state".to_owned(),
            },
        }
    }
}

impl Col {
    /// Text `$1` cast to the column's type.
    fn cast_text(&self, value: &str) -> String {
        format!("{value}::{}", self.sql_type)
    }
}

impl Store {
    /// Creates (or replaces) `sessiond_lookup` in sessiond's schema for the
    /// bound table and `sessions.id_pattern`, and checks that PostgreSQL reads
    /// the pattern. Its comment names the config it was made from.
    pub async fn install_lookup(&mut self, sessions: &SessionsConfig) -> Result<(), StoreError> {
        const WHAT: &str = "create sessiond_lookup";
        let sql = self.table()?.lookup_sql(&self.schema, sessions.id_pattern.as_str());
        let comment = lookup_comment(&sql);
        let schema = self.schema.quoted();
        let timeout = self.timeout;
        let tx = self.client.transaction().await.map_err(q(WHAT))?;
        let run = async {
            // Two migrates at once replace the function one after the other.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&super::migrate::MIGRATION_LOCK_KEY])
                .await
                .map_err(q(WHAT))?;
            tx.batch_execute(&sql).await.map_err(q(WHAT))?;
            tx.batch_execute(&format!(
                "COMMENT ON FUNCTION {schema}.sessiond_lookup(text, boolean) IS {}",
                literal(&comment)
            ))
            .await
            .map_err(q(WHAT))?;
            // A pattern PostgreSQL cannot read fails here, not in the application.
            tx.query_typed(&format!("SELECT * FROM {schema}.sessiond_lookup('')"), &[])
                .await
                .map_err(q("try sessiond_lookup (sessions.id_pattern must be a PostgreSQL regular expression too)"))?;
            tx.commit().await.map_err(q(WHAT))
        };
        tokio::time::timeout(timeout, run).await.map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
    }

    /// The comment of the installed `sessiond_lookup`, if there is one.
    pub async fn lookup_installed(&self) -> Result<Option<String>, StoreError> {
        let sql = "SELECT obj_description(to_regprocedure($1), 'pg_proc')";
        let name = format!("{}.sessiond_lookup(text, boolean)", self.schema.quoted());
        let row = self
            .bounded(
                "look for sessiond_lookup",
                self.client.query_typed_one(sql, &[(&name, tokio_postgres::types::Type::TEXT)]),
            )
            .await?;
        row.try_get(0).map_err(q("look for sessiond_lookup"))
    }

    /// Whether some index of the bound table leads with its `created_at`
    /// column, which the rapid-creates read of every pass needs.
    pub async fn created_at_indexed(&self) -> Result<bool, StoreError> {
        const WHAT: &str = "look for an index on created_at";
        let t = self.table()?;
        let sql = "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a \
                   ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                   WHERE i.indrelid = to_regclass($1) AND a.attname = $2)";
        let name = t.created_at.name.as_str().to_owned();
        let row = self
            .bounded(
                WHAT,
                self.client.query_typed_one(
                    sql,
                    &[(&t.table, tokio_postgres::types::Type::TEXT), (&name, tokio_postgres::types::Type::TEXT)],
                ),
            )
            .await?;
        row.try_get(0).map_err(q(WHAT))
    }

    /// What `sessiond_lookup`'s comment should say for this config.
    pub fn lookup_expected(&self, sessions: &SessionsConfig) -> Result<String, StoreError> {
        Ok(lookup_comment(&self.table()?.lookup_sql(&self.schema, sessions.id_pattern.as_str())))
    }
}
