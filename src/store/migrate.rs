//! sessiond's schema and its migrations.
//!
//! `migrate` creates sessiond's own tables (the audit trail, instance state,
//! stop intents, the migration record) in `database.schema`, and the
//! reference `sessions` table there when `sessions.table` is unset. It never
//! alters a table it did not create: before its first migration it refuses,
//! naming the difference, if a table of one of its names already exists there.
//! Migrations are versioned, each applied in the transaction that records it,
//! and serialised by an advisory lock, so running it twice (or twice at once)
//! is safe.

use std::collections::BTreeSet;

use super::{q, Store, StoreError};
use crate::config::SessionsConfig;

/// One migration: sessiond's own objects, and the reference table's (applied
/// only when the reference table is in use).
struct Migration {
    version: i32,
    description: &'static str,
    own: &'static str,
    reference: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "sessions, audit trail and sessiond's own state",
        reference: r#"
CREATE TABLE IF NOT EXISTS sessions (
    session_id          text PRIMARY KEY,
    owner_id            text NOT NULL,
    controller_instance text NOT NULL,
    state               text NOT NULL
        CHECK (state IN ('creating', 'active', 'paused', 'stopped', 'failed', 'deleted')),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    ended_at            timestamptz,
    deleted_at          timestamptz,
    end_reason          text,
    CHECK (state <> 'deleted' OR deleted_at IS NOT NULL)
);

-- One live session per owner: the constraint whose absence let duplicate
-- sessions pile up in the incidents.
CREATE UNIQUE INDEX IF NOT EXISTS sessions_one_live_per_owner
    ON sessions (owner_id) WHERE state IN ('creating', 'active', 'paused');

-- The snapshot read scans live rows only.
CREATE INDEX IF NOT EXISTS sessions_live_by_instance
    ON sessions (controller_instance) WHERE state IN ('creating', 'active', 'paused');
"#,
        own: r#"
CREATE TABLE IF NOT EXISTS session_audit (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id  text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    old_state   text,
    new_state   text,
    trigger     text NOT NULL,
    actor       text NOT NULL,
    reason      text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS session_audit_by_session ON session_audit (session_id, at);

CREATE OR REPLACE FUNCTION session_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'session_audit is append-only (% refused)', TG_OP;
END
$$;
DROP TRIGGER IF EXISTS session_audit_no_update ON session_audit;
CREATE TRIGGER session_audit_no_update BEFORE UPDATE OR DELETE ON session_audit
    FOR EACH ROW EXECUTE FUNCTION session_audit_append_only();
DROP TRIGGER IF EXISTS session_audit_no_truncate ON session_audit;
CREATE TRIGGER session_audit_no_truncate BEFORE TRUNCATE ON session_audit
    FOR EACH STATEMENT EXECUTE FUNCTION session_audit_append_only();

CREATE TABLE IF NOT EXISTS sessiond_instance_state (
    controller_instance text PRIMARY KEY,
    boot_id             text NOT NULL,
    boot_changed_at     timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
"#,
    },
    Migration {
        version: 2,
        description: "stop intents: every stop request is recorded before it is sent",
        reference: "",
        own: r#"
CREATE TABLE IF NOT EXISTS sessiond_stop_intents (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id  text NOT NULL,
    controller  text NOT NULL,
    kind        text NOT NULL,
    row_version text NOT NULL,
    row_state   text NOT NULL,
    end_row     boolean NOT NULL,
    pass_id     text NOT NULL,
    actor       text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Until then the sender may still settle it; after, any pass may.
    expires_at  timestamptz NOT NULL,
    settled_at  timestamptz,
    outcome     text
);
-- At most one stop in flight per session, whoever sends it.
CREATE UNIQUE INDEX IF NOT EXISTS sessiond_stop_intents_one_open
    ON sessiond_stop_intents (session_id) WHERE settled_at IS NULL;
"#,
    },
    Migration {
        version: 3,
        description: "instance state: boot ids seen and inconsistency, for several processes behind one URL",
        reference: "",
        own: r#"
-- boot_id is now the trusted (confirmed) boot id, unset until one is.
ALTER TABLE sessiond_instance_state ALTER COLUMN boot_id DROP NOT NULL;
ALTER TABLE sessiond_instance_state ADD COLUMN IF NOT EXISTS seen_boot_ids text[] NOT NULL DEFAULT '{}';
ALTER TABLE sessiond_instance_state ADD COLUMN IF NOT EXISTS inconsistent_since timestamptz;
"#,
    },
    Migration {
        version: 4,
        description: "leases: one leader among several replicas, fenced by term",
        reference: "",
        own: r#"
CREATE TABLE IF NOT EXISTS sessiond_leases (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    -- Increases on every takeover; every write of a leader carries its term.
    term        bigint NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
"#,
    },
    Migration {
        version: 5,
        description: "lifecycle: the reference table audits every transition and refuses hard deletes",
        reference: r#"
-- Every state change of a session is audited. The application's (and any
-- other writer's) with trigger 'app'; sessiond's repairs audit themselves
-- (trigger 'reconciler') in the statement that makes them, and mark their
-- transaction (SET LOCAL sessiond.writer) so they are not audited twice.
-- SECURITY DEFINER: the application's role needs no privilege on the trail.
CREATE OR REPLACE FUNCTION sessions_audit_transition() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF current_setting('sessiond.writer', true) IS NOT DISTINCT FROM 'reconciler' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO session_audit (session_id, old_state, new_state, trigger, actor, reason, details)
        VALUES (NEW.session_id, NULL, NEW.state, 'app', session_user, 'created',
                jsonb_build_object('application_name', current_setting('application_name', true)));
    ELSIF NEW.state IS DISTINCT FROM OLD.state THEN
        INSERT INTO session_audit (session_id, old_state, new_state, trigger, actor, reason, details)
        VALUES (NEW.session_id, OLD.state, NEW.state, 'app', session_user, NEW.end_reason,
                jsonb_build_object('application_name', current_setting('application_name', true)));
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS sessions_audit_transition ON sessions;
CREATE TRIGGER sessions_audit_transition AFTER INSERT OR UPDATE OF state ON sessions
    FOR EACH ROW EXECUTE FUNCTION sessions_audit_transition();

-- Deletion is soft: a deleted session stays, with state 'deleted', so a
-- lookup can say why it is gone and sessiond never mistakes it for one that
-- was never stored.
CREATE OR REPLACE FUNCTION sessions_refuse_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'sessions are never deleted (% refused): set state = ''deleted'' and deleted_at = now() instead', TG_OP
        USING ERRCODE = 'restrict_violation',
              HINT = 'a soft-deleted session stays visible to sessiond_lookup(id, include_deleted => true)';
END
$$;
DROP TRIGGER IF EXISTS sessions_no_delete ON sessions;
CREATE TRIGGER sessions_no_delete BEFORE DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION sessions_refuse_delete();
DROP TRIGGER IF EXISTS sessions_no_truncate ON sessions;
CREATE TRIGGER sessions_no_truncate BEFORE TRUNCATE ON sessions
    FOR EACH STATEMENT EXECUTE FUNCTION sessions_refuse_delete();

-- Rapid creates: each pass reads the rows created since the last one.
CREATE INDEX IF NOT EXISTS sessions_by_created_at ON sessions (created_at);
"#,
        own: "-- nothing of sessiond's own: the lookup function is made from the config by every migrate",
    },
    Migration {
        version: 6,
        description: "operator: a pause every replica honours, and audit retention through one guarded function",
        reference: "",
        own: r#"
-- One row: while paused, no replica writes a row or sends a stop. Every write
-- transaction of sessiond reads it first (FOR SHARE), so a pause takes effect
-- before the next batch, and a restart or another replica honours it.
CREATE TABLE IF NOT EXISTS sessiond_pause (
    name        text PRIMARY KEY,
    paused      boolean NOT NULL,
    changed_by  text NOT NULL,
    changed_at  timestamptz NOT NULL,
    reason      text
);

-- Retention: the trail stays append-only, except that rows older than a day
-- may be deleted by sessiond_audit_prune, and only by it (it marks its own
-- transaction; only a role with DELETE on the trail, such as its owner, can
-- delete at all). Recent rows can never be deleted.
CREATE INDEX IF NOT EXISTS session_audit_by_at ON session_audit (at);
CREATE OR REPLACE FUNCTION session_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('sessiond.pruning', true) = 'on'
       AND OLD.at < now() - interval '1 day' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'session_audit is append-only (% refused)', TG_OP;
END
$$;
CREATE OR REPLACE FUNCTION sessiond_audit_prune(retain interval, batch integer DEFAULT 10000) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    gone bigint;
BEGIN
    IF retain < interval '1 day' THEN
        RAISE EXCEPTION 'audit rows are kept for at least a day (asked to keep %)', retain;
    END IF;
    PERFORM set_config('sessiond.pruning', 'on', true);
    DELETE FROM session_audit WHERE id IN (
        SELECT id FROM session_audit WHERE at < now() - retain ORDER BY at LIMIT greatest(batch, 1));
    GET DIAGNOSTICS gone = ROW_COUNT;
    PERFORM set_config('sessiond.pruning', 'off', true);
    RETURN gone;
END
$$;
REVOKE ALL ON FUNCTION sessiond_audit_prune(interval, integer) FROM PUBLIC;
"#,
    },
    Migration {
        version: 7,
        description: "stop intents: the stops settled as done, by session, so a stop on stale evidence is refused",
        reference: "",
        own: r#"
-- A stop is refused when its session was stopped (settled 'stopped') after
-- the pass began gathering its evidence: looked up here, per session.
CREATE INDEX IF NOT EXISTS sessiond_stop_intents_stopped
    ON sessiond_stop_intents (session_id, settled_at) WHERE outcome = 'stopped';
"#,
    },
];

/// The schema version this build needs.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// sessiond's own tables, which must not exist before its first migration.
const OWN_TABLES: [&str; 4] = ["session_audit", "sessiond_instance_state", "sessiond_stop_intents", "sessiond_leases"];

/// An arbitrary, fixed key for the advisory lock that serialises migrations.
pub(super) const MIGRATION_LOCK_KEY: i64 = 0x5e55_10d0_0001;

/// The reference table's columns and types, to name what a foreign table of
/// that name lacks.
const REFERENCE_COLUMNS: [(&str, &str); 9] = [
    ("session_id", "text"),
    ("owner_id", "text"),
    ("controller_instance", "text"),
    ("state", "text"),
    ("created_at", "timestamp with time zone"),
    ("updated_at", "timestamp with time zone"),
    ("ended_at", "timestamp with time zone"),
    ("deleted_at", "timestamp with time zone"),
    ("end_reason", "text"),
];

impl Store {
    /// Creates or upgrades sessiond's schema in `database.schema`, and the
    /// reference table when `sessions` uses it. Returns the versions applied.
    pub async fn migrate(&mut self, sessions: &SessionsConfig) -> Result<Vec<i32>, StoreError> {
        let timeout = self.timeout;
        let schema = self.schema.clone();
        let tx = self.client.transaction().await.map_err(q("begin migration"))?;
        let bounded = |what: &'static str| move |_| StoreError::Timeout { what, timeout };
        tokio::time::timeout(timeout, tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY]))
            .await
            .map_err(bounded("take the migration lock"))?
            .map_err(q("take the migration lock"))?;
        let exists = tx
            .query_one("SELECT count(*) > 0 FROM pg_namespace WHERE nspname = $1", &[&schema.as_str()])
            .await
            .map_err(q("look up the schema"))?
            .get::<_, bool>(0);
        if !exists {
            tx.batch_execute(&format!("CREATE SCHEMA {}", schema.quoted())).await.map_err(q("create the schema"))?;
        }
        // Everything below is created in sessiond's schema.
        tx.batch_execute(&format!("SET LOCAL search_path = {}", schema.quoted()))
            .await
            .map_err(q("set the search path"))?;
        let recorded = tx
            .query_one("SELECT to_regclass('sessiond_schema_migrations') IS NOT NULL", &[])
            .await
            .map_err(q("look for the migration record"))?
            .get::<_, bool>(0);
        if !recorded {
            refuse_foreign_tables(&tx, &schema, sessions.reference).await?;
        }
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS sessiond_schema_migrations (
                 version     integer PRIMARY KEY,
                 description text NOT NULL,
                 applied_at  timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(q("create the migrations table"))?;
        let applied: BTreeSet<i32> = tx
            .query("SELECT version FROM sessiond_schema_migrations", &[])
            .await
            .map_err(q("read applied migrations"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(&newest) = applied.iter().next_back() {
            if newest > SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew { found: newest, wanted: SCHEMA_VERSION });
            }
        }
        // The reference table may be wanted after migrations made without it
        // (the config stopped mapping a table of its own): its parts are
        // idempotent, and run whenever it is missing.
        let reference_missing = sessions.reference
            && !tx
                .query_one("SELECT to_regclass('sessions') IS NOT NULL", &[])
                .await
                .map_err(q("look for the reference table"))?
                .get::<_, bool>(0);
        let mut done = Vec::new();
        for m in MIGRATIONS {
            let new = !applied.contains(&m.version);
            if sessions.reference && (new || reference_missing) && !m.reference.is_empty() {
                tx.batch_execute(m.reference).await.map_err(q("create the reference sessions table"))?;
            }
            if !new {
                continue;
            }
            tx.batch_execute(m.own).await.map_err(q("apply a migration"))?;
            tx.execute(
                "INSERT INTO sessiond_schema_migrations (version, description) VALUES ($1, $2)",
                &[&m.version, &m.description],
            )
            .await
            .map_err(q("record a migration"))?;
            done.push(m.version);
        }
        tx.commit().await.map_err(q("commit the migration"))?;
        Ok(done)
    }
}

/// Before sessiond's first migration in a schema, none of its tables may
/// exist there: one that does belongs to someone else, and sessiond must not
/// add indexes, triggers or columns to it.
async fn refuse_foreign_tables(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &crate::config::Ident,
    reference: bool,
) -> Result<(), StoreError> {
    let mut names: Vec<&str> = OWN_TABLES.to_vec();
    if reference {
        names.push("sessions");
    }
    for name in names {
        let columns: Vec<(String, String)> = tx
            .query(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod)
                   FROM pg_attribute a
                  WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                &[&name],
            )
            .await
            .map_err(q("look for existing tables"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if columns.is_empty() {
            continue;
        }
        let difference = if name == "sessions" {
            let missing: Vec<String> = REFERENCE_COLUMNS
                .iter()
                .filter(|(c, t)| !columns.iter().any(|(n, ty)| n == c && ty == t))
                .map(|(c, t)| format!("{c} {t}"))
                .collect();
            if missing.is_empty() {
                "it has the reference columns, but no migration record says sessiond made it".to_owned()
            } else {
                format!("it lacks {} of the reference table", missing.join(", "))
            }
        } else {
            "it is not one sessiond made (no migration is recorded)".to_owned()
        };
        return Err(StoreError::ForeignTable {
            table: format!("{schema}.{name}"),
            difference,
            hint: if name == "sessions" {
                "to reconcile that table, set sessions.table and map its columns and states; to keep sessiond's \
                 tables apart, set database.schema to a schema of their own"
            } else {
                "set database.schema to a schema of sessiond's own"
            },
        });
    }
    Ok(())
}
