//! The sessions table as the store uses it: the configured mapping checked
//! against the database's catalog at connect, and the statements built from
//! it once.
//!
//! Identifiers come from the validated config and are always double-quoted.
//! Values (ids, states, owners) are only ever bound parameters, cast to the
//! column's own type, never the column to text, so the table's indexes serve
//! the lookups. Timestamps without a time zone are read and written as UTC.

use std::fmt;

use crate::config::{Columns, Ident, Policy, PolicyConfig, SessionsConfig};
use crate::model::RowState;

/// How a column's type is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Uuid,
    Int,
    Timestamp,
    TimestampTz,
    Bool,
    Enum,
    Other,
}

/// A mapped column and its type.
#[derive(Clone, Debug)]
pub struct Col {
    pub name: Ident,
    /// The type as SQL (`format_type`), for casts.
    pub sql_type: String,
    pub kind: Kind,
}

impl Col {
    pub fn q(&self) -> String {
        self.name.quoted()
    }

    /// The column read as text.
    fn text(&self, alias: &str) -> String {
        format!("{alias}.{}::text", self.q())
    }

    /// The column read as a `timestamptz` (UTC for a plain `timestamp`).
    fn instant(&self, alias: &str) -> String {
        match self.kind {
            Kind::Timestamp => format!("({alias}.{} AT TIME ZONE 'UTC')", self.q()),
            _ => format!("{alias}.{}", self.q()),
        }
    }

    /// A text value cast to the column's type.
    fn cast(&self, value: &str) -> String {
        format!("{value}::text::{}", self.sql_type)
    }

    /// A `timestamptz` value as the column stores it.
    fn store_instant(&self, value: &str) -> String {
        match self.kind {
            Kind::Timestamp => format!("({value} AT TIME ZONE 'UTC')"),
            _ => value.to_owned(),
        }
    }
}

/// Why the mapping cannot work against this database. Fatal: the process
/// stops (exit 78), because no pass could be right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError {
    pub table: String,
    pub problems: Vec<String>,
}

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sessions table {}: {}", self.table, self.problems.join("; "))
    }
}

impl std::error::Error for MappingError {}

/// A column of the table as the catalog describes it.
#[derive(Clone, Debug)]
pub struct CatalogColumn {
    pub name: String,
    pub sql_type: String,
    pub type_name: String,
    pub type_kind: String,
    pub not_null: bool,
    /// A default, an identity or a generated value.
    pub filled: bool,
}

impl CatalogColumn {
    fn kind(&self) -> Kind {
        match (self.type_kind.as_str(), self.type_name.as_str()) {
            ("e", _) => Kind::Enum,
            (_, "text" | "varchar" | "bpchar" | "name" | "citext") => Kind::Text,
            (_, "uuid") => Kind::Uuid,
            (_, "int2" | "int4" | "int8") => Kind::Int,
            (_, "timestamp") => Kind::Timestamp,
            (_, "timestamptz") => Kind::TimestampTz,
            (_, "bool") => Kind::Bool,
            _ => Kind::Other,
        }
    }
}

/// Part of a table's pages: those before page `n`, or page `n` and after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pages {
    Below(u64),
    From(u64),
}

/// The mapped table, checked against the catalog, with its statements.
#[derive(Clone, Debug)]
pub struct Table {
    /// The table, quoted and schema-qualified as found.
    pub table: String,
    /// The same, for messages (`schema.name`).
    pub name: String,
    pub id: Col,
    pub state: Col,
    pub created_at: Col,
    pub owner: Option<Col>,
    pub instance: Option<Col>,
    pub updated_at: Option<Col>,
    pub ended_at: Option<Col>,
    pub end_reason: Option<Col>,
    pub deleted: Option<Col>,
    pub also_changed: Vec<Col>,
    pub vocabulary: crate::config::Vocabulary,
    /// sessiond's own tables, quoted and qualified.
    pub audit: String,
    pub intents: String,
}

/// What the catalog says about the configured table: `None` if it does not
/// exist.
pub struct Catalog {
    /// The table's schema and name as found (through the search path when the
    /// config names no schema).
    pub schema: String,
    pub name: String,
    pub relkind: String,
    pub columns: Vec<CatalogColumn>,
    /// Labels of enum-typed columns, by column name.
    pub enum_labels: Vec<(String, Vec<String>)>,
}

impl Table {
    /// Checks the mapping against the catalog. Every problem is named, not just
    /// the first.
    pub fn bind(
        sessions: &SessionsConfig,
        catalog: Option<Catalog>,
        own_schema: &Ident,
        policy: &PolicyConfig,
    ) -> Result<Table, MappingError> {
        let shown = sessions.table.to_string();
        let fail = |problems: Vec<String>| MappingError { table: shown.clone(), problems };
        let Some(cat) = catalog else {
            return Err(fail(vec![if sessions.reference {
                "does not exist: run `sessiond migrate`".into()
            } else {
                "does not exist (or this role cannot see it): check sessions.table, and the search_path".into()
            }]));
        };
        let mut problems = Vec::new();
        if !matches!(cat.relkind.as_str(), "r" | "p") {
            problems.push(format!(
                "is not a plain or partitioned table (relkind {}); compare-and-set on xmin needs one",
                cat.relkind
            ));
        }
        let c: &Columns = &sessions.columns;
        let mut find = |key: &str, ident: &Ident, allowed: &[Kind], wanted: &str| -> Option<Col> {
            match cat.columns.iter().find(|col| col.name == ident.as_str()) {
                None => {
                    problems.push(format!("column {ident} (sessions.columns.{key}) does not exist"));
                    None
                }
                Some(col) if !allowed.contains(&col.kind()) => {
                    problems.push(format!(
                        "column {ident} (sessions.columns.{key}) is {}, and must be {wanted}",
                        col.sql_type
                    ));
                    None
                }
                Some(col) => Some(Col { name: ident.clone(), sql_type: col.sql_type.clone(), kind: col.kind() }),
            }
        };
        const TEXT: &[Kind] = &[Kind::Text];
        const TIME: &[Kind] = &[Kind::Timestamp, Kind::TimestampTz];
        let id = find("id", &c.id, &[Kind::Text, Kind::Uuid, Kind::Int], "text, varchar, uuid or an integer");
        let state = find("state", &c.state, &[Kind::Text, Kind::Enum], "text, varchar or an enum");
        let created_at = find("created_at", &c.created_at, TIME, "timestamptz or timestamp");
        let mut optional = |key: &str, ident: &Option<Ident>, allowed: &[Kind], wanted: &str| {
            ident.as_ref().and_then(|i| find(key, i, allowed, wanted))
        };
        let owner =
            optional("owner", &c.owner, &[Kind::Text, Kind::Uuid, Kind::Int], "text, varchar, uuid or an integer");
        let instance = optional("instance", &c.instance, TEXT, "text or varchar");
        let updated_at = optional("updated_at", &c.updated_at, TIME, "timestamptz or timestamp");
        let ended_at = optional("ended_at", &c.ended_at, TIME, "timestamptz or timestamp");
        let end_reason = optional("end_reason", &c.end_reason, TEXT, "text or varchar");
        let deleted = optional("deleted", &c.deleted, &[Kind::Bool], "boolean");
        let also_changed: Vec<Col> =
            c.also_changed.iter().filter_map(|i| find("also_changed", i, TIME, "a timestamp")).collect();

        // A state value written by a repair must exist in an enum column.
        let labels = state.as_ref().and_then(|s| cat.enum_labels.iter().find(|(n, _)| n == s.name.as_str()));
        if let (Some(state), Some((_, labels))) = (&state, labels) {
            for s in RowState::ALL {
                if let Some(v) = sessions.states.written(s) {
                    if !labels.iter().any(|l| l == v) {
                        problems.push(format!(
                            "state value {v:?} (sessions.states.{}) is not a label of the enum {}",
                            s.as_str(),
                            state.sql_type
                        ));
                    }
                }
            }
        }
        // An insert of an unpersisted session fills the mapped columns; any
        // other NOT NULL column without a default would refuse every one.
        if policy.unpersisted == Policy::Repair {
            let written: Vec<&str> = c.all().into_iter().map(|(_, i)| i.as_str()).collect();
            for col in cat.columns.iter().filter(|col| col.not_null && !col.filled) {
                if !written.contains(&col.name.as_str()) {
                    problems.push(format!(
                        "column {} is NOT NULL with no default and is not mapped, so inserting an unpersisted \
                         session would fail: map it, give it a default, or set reconcile.policy.unpersisted = \
                         \"report\"",
                        col.name
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        let (Some(id), Some(state), Some(created_at)) = (id, state, created_at) else {
            return Err(fail(vec!["a required column is missing".into()]));
        };
        let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        Ok(Table {
            table: format!("{}.{}", q(&cat.schema), q(&cat.name)),
            name: format!("{}.{}", cat.schema, cat.name),
            id,
            state,
            created_at,
            owner,
            instance,
            updated_at,
            ended_at,
            end_reason,
            deleted,
            also_changed,
            vocabulary: sessions.states.clone(),
            audit: format!("{}.\"session_audit\"", own_schema.quoted()),
            intents: format!("{}.\"sessiond_stop_intents\"", own_schema.quoted()),
        })
    }

    /// The columns a snapshot reads, in order: id, state, created_at,
    /// changed_at, xmin, owner, instance, deleted.
    fn select_list(&self) -> String {
        let a = "t";
        let mut changed = vec![self.created_at.instant(a)];
        for c in self.updated_at.iter().chain(&self.ended_at).chain(&self.also_changed) {
            changed.push(c.instant(a));
        }
        let opt_text = |c: &Option<Col>| c.as_ref().map_or("NULL::text".to_owned(), |c| c.text(a));
        format!(
            "{}, {}, {}, greatest({}), {a}.xmin::text, {}, {}, {}",
            self.id.text(a),
            self.state.text(a),
            self.created_at.instant(a),
            changed.join(", "),
            opt_text(&self.owner),
            opt_text(&self.instance),
            self.deleted.as_ref().map_or("false".to_owned(), |d| format!("coalesce({a}.{}, false)", d.q())),
        )
    }

    /// The condition for a live row: a live state, and not flagged deleted.
    fn live(&self, states_param: &str) -> String {
        let state = format!("t.{} = ANY({states_param}::text[]::{}[])", self.state.q(), self.state.sql_type);
        match &self.deleted {
            Some(d) => format!("({state} AND NOT coalesce(t.{}, false))", d.q()),
            None => state,
        }
    }

    /// Every live row, as `COPY … (FORMAT binary)`: the select list's fields
    /// in the binary wire format, with no per-row protocol message to decode.
    /// `COPY` takes no parameters, so the live values are written as escaped
    /// literals (they come from the config, never from a controller). With
    /// `pages`, only the live rows in those of the table's pages (a TID range
    /// scan, since PostgreSQL 14).
    pub fn live_rows_copy_sql(&self, live_values: &[&str], pages: Option<Pages>) -> String {
        let values: Vec<String> = live_values.iter().map(|v| literal(v)).collect();
        let part = match pages {
            None => String::new(),
            Some(Pages::Below(p)) => format!(" AND t.ctid < '({p},0)'::tid"),
            Some(Pages::From(p)) => format!(" AND t.ctid >= '({p},0)'::tid"),
        };
        format!(
            "COPY (SELECT {} FROM {} t WHERE {}{part}) TO STDOUT (FORMAT binary)",
            self.select_list(),
            self.table,
            self.live(&format!("ARRAY[{}]", values.join(", ")))
        )
    }

    /// The rows of these ids that are not live. `$1`: ids, distinct, `$2`: the
    /// live values.
    ///
    /// One index lookup per id, whatever the planner estimates: with
    /// `id = ANY($1)` and some thousands of ids it scans the whole table
    /// instead, which grows with every ended row the table keeps. The
    /// `OFFSET 0` keeps the lookup a subquery run per id.
    pub fn rows_by_id_sql(&self) -> String {
        format!(
            "SELECT r.* FROM unnest($1::text[]) AS i(k)
               CROSS JOIN LATERAL (SELECT {} FROM {} t WHERE t.{} = i.k::{} AND {} IS NOT TRUE OFFSET 0) r",
            self.select_list(),
            self.table,
            self.id.q(),
            self.id.sql_type,
            self.live("$2")
        )
    }

    /// The last audit row of each of these ids (`$1`, distinct): one index
    /// lookup per id, for the same reason as [`Table::rows_by_id_sql`]; the
    /// audit table only grows. The `OFFSET 0` matters twice here: without
    /// it, `ORDER BY id DESC LIMIT 1` invites a walk of the whole table in
    /// id order for every id.
    pub fn last_audit_sql(&self) -> String {
        format!(
            "SELECT i.k, a.old_state, a.new_state, a.trigger, a.at FROM unnest($1::text[]) AS i(k)
               CROSS JOIN LATERAL (
                   SELECT * FROM (SELECT id, old_state, new_state, trigger, at FROM {} a
                                   WHERE a.session_id = i.k OFFSET 0) a
                    ORDER BY a.id DESC LIMIT 1) a",
            self.audit
        )
    }

    /// The row of one id. `$1`: the id as text.
    pub fn row_by_id_sql(&self) -> String {
        format!(
            "SELECT {} FROM {} t WHERE t.{} = $1::text::{}",
            self.select_list(),
            self.table,
            self.id.q(),
            self.id.sql_type
        )
    }

    /// `(id, owner, created_at)` of the rows created in the last `$1`
    /// milliseconds, comparing the column as stored so an index on it is
    /// used; `None` without an owner column.
    pub fn recent_creates_sql(&self) -> Option<String> {
        let owner = self.owner.as_ref()?;
        Some(format!(
            "SELECT {}, {}, {} FROM {} t WHERE t.{} > {} AND t.{} IS NOT NULL",
            self.id.text("t"),
            owner.text("t"),
            self.created_at.instant("t"),
            self.table,
            self.created_at.q(),
            self.created_at.store_instant("(now() - $1::bigint * interval '1 millisecond')"),
            owner.q()
        ))
    }

    fn now(c: &Col) -> String {
        c.store_instant("now()")
    }

    /// Row repairs, compare-and-set on xmin, rows others hold skipped, each
    /// with its audit row in the same statement.
    ///
    /// `$1` ids, `$2` versions, `$3` new state values, `$4` owners, `$5`
    /// instances, `$6` end reasons, `$7` ending, `$8` old canonical states,
    /// `$9` new canonical states, `$10` reasons, `$11` details, `$12` actor.
    pub fn update_sql(&self) -> String {
        let mut set = vec![format!("{} = {}", self.state.q(), self.state.cast("i.new_value"))];
        if let Some(o) = &self.owner {
            set.push(format!("{} = coalesce({}, s.{})", o.q(), o.cast("i.owner_id"), o.q()));
        }
        if let Some(c) = &self.instance {
            set.push(format!("{} = coalesce({}, s.{})", c.q(), c.cast("i.controller_instance"), c.q()));
        }
        if let Some(c) = &self.updated_at {
            set.push(format!("{} = {}", c.q(), Self::now(c)));
        }
        if let Some(c) = &self.ended_at {
            set.push(format!(
                "{q} = CASE WHEN i.ending THEN coalesce(s.{q}, {now}) ELSE s.{q} END",
                q = c.q(),
                now = Self::now(c)
            ));
        }
        if let Some(c) = &self.end_reason {
            set.push(format!("{} = coalesce({}, s.{})", c.q(), c.cast("i.end_reason"), c.q()));
        }
        format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                                      $7::bool[], $8::text[], $9::text[], $10::text[], $11::text[])
                     AS t(session_id, version, new_value, owner_id, controller_instance, end_reason, ending,
                          old_state, new_state, reason, details)
             ),
             -- Rows still as classified, and not locked by the application: a
             -- row it holds is a conflict now, never a wait that stalls the pass.
             locked AS (
                 SELECT s.{id} AS k FROM {table} s JOIN input i ON s.{id} = {id_in}
                  WHERE s.xmin = i.version::xid
                    FOR UPDATE OF s SKIP LOCKED
             ),
             changed AS (
                 UPDATE {table} s SET {set}
                   FROM input i JOIN locked l ON l.k = {id_in}
                  WHERE s.{id} = l.k
                 RETURNING s.{id}::text AS session_id
             )
             INSERT INTO {audit} (session_id, old_state, new_state, trigger, actor, reason, details)
             SELECT i.session_id, i.old_state, i.new_state, 'reconciler', $12, i.reason, i.details::jsonb
               FROM changed c JOIN input i ON i.session_id = c.session_id
             RETURNING session_id",
            id = self.id.q(),
            id_in = self.id.cast("i.session_id"),
            table = self.table,
            set = set.join(", "),
            audit = self.audit,
        )
    }

    /// Inserts for live sessions with no row; a row that exists (or an owner's
    /// live row, by the table's unique indexes) makes it a conflict.
    ///
    /// `$1` ids, `$2` state values, `$3` canonical states, `$4` owners, `$5`
    /// instances, `$6` created_at, `$7` details, `$8` actor.
    pub fn insert_sql(&self) -> String {
        let mut cols = vec![self.id.q(), self.state.q(), self.created_at.q()];
        let mut vals = vec![
            self.id.cast("i.session_id"),
            self.state.cast("i.value"),
            self.created_at.store_instant("i.created_at"),
        ];
        if let Some(o) = &self.owner {
            cols.push(o.q());
            vals.push(o.cast("i.owner_id"));
        }
        if let Some(c) = &self.instance {
            cols.push(c.q());
            vals.push(c.cast("i.controller_instance"));
        }
        if let Some(c) = &self.updated_at {
            cols.push(c.q());
            vals.push(Self::now(c));
        }
        if let Some(c) = &self.deleted {
            cols.push(c.q());
            vals.push("false".into());
        }
        format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                      $6::timestamptz[], $7::text[])
                     AS t(session_id, value, state, owner_id, controller_instance, created_at, details)
             ),
             added AS (
                 INSERT INTO {table} ({cols})
                 SELECT {vals} FROM input i
                 ON CONFLICT DO NOTHING
                 RETURNING {id}::text AS session_id
             )
             INSERT INTO {audit} (session_id, old_state, new_state, trigger, actor, reason, details)
             SELECT a.session_id, NULL, i.state, 'reconciler', $8, 'unpersisted', i.details::jsonb
               FROM added a JOIN input i ON i.session_id = a.session_id
             RETURNING session_id",
            table = self.table,
            cols = cols.join(", "),
            vals = vals.join(", "),
            id = self.id.q(),
            audit = self.audit,
        )
    }

    /// Records stop intents for rows still as classified and not locked, and
    /// for sessions whose row was deleted (version `''`) that still have none.
    ///
    /// `$1` ids, `$2` versions, `$3` canonical states, `$4` end_row, `$5`
    /// controllers, `$6` kinds, `$7` details, `$8` pass id, `$9` actor, `$10`
    /// expiry in ms.
    pub fn open_stops_sql(&self) -> String {
        format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::text[],
                                      $6::text[], $7::text[])
                     AS t(session_id, version, state, end_row, controller, kind, details)
             ),
             current AS (
                 SELECT i.* FROM input i JOIN {table} s ON s.{id} = {id_in}
                  WHERE i.version <> ''
                    AND s.xmin = CASE WHEN i.version = '' THEN NULL ELSE i.version::xid END
                    FOR SHARE OF s SKIP LOCKED
             ),
             still_absent AS (
                 SELECT i.* FROM input i
                  WHERE i.version = '' AND NOT EXISTS (SELECT 1 FROM {table} s WHERE s.{id} = {id_in})
             )
             INSERT INTO {intents}
                    (session_id, controller, kind, row_version, row_state, end_row, pass_id, actor, details,
                     expires_at)
             SELECT session_id, controller, kind, version, state, end_row, $8, $9, details::jsonb,
                    now() + $10::bigint * interval '1 millisecond'
               FROM (SELECT * FROM current UNION ALL SELECT * FROM still_absent) c
             ON CONFLICT (session_id) WHERE settled_at IS NULL DO NOTHING
             RETURNING id, session_id",
            table = self.table,
            id = self.id.q(),
            id_in = self.id.cast("i.session_id"),
            intents = self.intents,
        )
    }

    /// Of the intents just recorded (`$1`), settles as `not_sent` those whose
    /// session had a stop settled as done at or after `$2`: a sessiond stopped
    /// the session after this pass's evidence was gathered, so the evidence is
    /// stale. It runs as its own statement, after the insert, so it sees a
    /// settle that committed while the insert waited. It reads only sessiond's
    /// own intents (by the index of migration 7), so it works while the audit
    /// trail is locked or full, and needs no privilege the role lacks.
    pub fn stale_stops_sql(&self) -> String {
        format!(
            "UPDATE {intents} n
                SET settled_at = now(), outcome = 'not_sent',
                    details = n.details || jsonb_build_object('not_sent_because',
                        'the session was stopped after this pass gathered its evidence')
              WHERE n.id IN (SELECT unnest($1::bigint[]))
                AND EXISTS (SELECT 1 FROM {intents} p
                             WHERE p.session_id = n.session_id AND p.outcome = 'stopped' AND p.settled_at >= $2)
             RETURNING n.id",
            intents = self.intents,
        )
    }

    /// Settles stop intents (see `Store::settle_stops`).
    ///
    /// `$1` intent ids, `$2` outcomes, `$3` details, `$4` actor, `$5` the
    /// stopped state's value, `$6` the leader's term (or NULL).
    pub fn settle_stops_sql(&self) -> String {
        // A stopped zombie's row is touched, so its version changes; a
        // duplicate's is ended.
        // Without an updated_at column, the state's assignment (to itself for
        // a zombie) is the touch.
        let mut set = Vec::new();
        if let Some(c) = &self.updated_at {
            set.push(format!("{} = {}", c.q(), Self::now(c)));
        }
        set.push(format!(
            "{q} = CASE WHEN st.end_row THEN {v} ELSE s.{q} END",
            q = self.state.q(),
            v = self.state.cast("$5")
        ));
        if let Some(c) = &self.ended_at {
            set.push(format!(
                "{q} = CASE WHEN st.end_row THEN coalesce(s.{q}, {now}) ELSE s.{q} END",
                q = c.q(),
                now = Self::now(c)
            ));
        }
        if let Some(c) = &self.end_reason {
            set.push(format!("{q} = CASE WHEN st.end_row THEN {v} ELSE s.{q} END", q = c.q(), v = c.cast("st.kind")));
        }
        format!(
            "WITH input AS (
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) AS t(id, outcome, details)
             ),
             -- An uncertain stop stays open, expired at once, for the next
             -- pass to settle from what the controller's list shows.
             settled AS (
                 UPDATE {intents} n
                    SET settled_at = CASE WHEN i.outcome = 'uncertain' THEN NULL ELSE now() END,
                        expires_at = CASE WHEN i.outcome = 'uncertain' THEN now() ELSE n.expires_at END,
                        outcome = CASE WHEN i.outcome = 'uncertain' THEN NULL ELSE i.outcome END,
                        details = n.details || i.details::jsonb
                   FROM input i
                  WHERE n.id = i.id AND n.settled_at IS NULL
                 RETURNING n.id, n.session_id, n.kind, n.row_version, n.row_state, n.end_row, n.outcome, n.details
             ),
             -- The planner takes every CTE written to for one row: a join
             -- of two of them is a nested loop, quadratic in the batch (30 ms
             -- for 200 stops). So each CTE carries what the next one needs,
             -- and whether a row was touched is a hashed `IN`, not a join.
             unchanged AS (
                 SELECT s.{id} AS k, st.end_row, st.kind FROM {table} s JOIN settled st ON s.{id} = {id_st}
                  WHERE st.outcome = 'stopped' AND st.row_version <> ''
                    AND s.xmin = CASE WHEN st.row_version = '' THEN NULL ELSE st.row_version::xid END
                    FOR UPDATE OF s SKIP LOCKED
             ),
             touched AS (
                 UPDATE {table} s SET {set}
                   FROM unchanged st
                  WHERE s.{id} = st.k
                 RETURNING s.{id}::text AS session_id
             ),
             audited AS (
                 INSERT INTO {audit} (session_id, old_state, new_state, trigger, actor, reason, details)
                 SELECT st.session_id, st.row_state,
                        CASE WHEN st.end_row AND st.session_id IN (SELECT session_id FROM touched)
                             THEN 'stopped' ELSE st.row_state END,
                        'reconciler', $4, st.kind,
                        st.details || jsonb_build_object('intent', st.id, 'row_updated',
                                                  st.session_id IN (SELECT session_id FROM touched))
                          -- the term of whoever settles it, which wrote this row
                          || CASE WHEN $6::bigint IS NULL THEN '{{}}'::jsonb
                                  ELSE jsonb_build_object('term', $6::bigint) END
                   FROM settled st
                  WHERE st.outcome = 'stopped'
                 RETURNING session_id
             )
             SELECT st.id, st.session_id IN (SELECT session_id FROM touched)
               FROM settled st",
            intents = self.intents,
            table = self.table,
            id = self.id.q(),
            id_st = self.id.cast("st.session_id"),
            set = set.join(", "),
            audit = self.audit,
        )
    }
}

/// A string as an SQL literal that reads the same whatever
/// `standard_conforming_strings` is: an `E''` string with `\` and `'` doubled.
pub(super) fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod literal_tests {
    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(super::literal("active"), "E'active'");
        assert_eq!(super::literal(r"it's \o/"), r"E'it''s \\o/'");
    }
}
