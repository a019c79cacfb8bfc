//! The store: the only code that talks to PostgreSQL. It owns the reference
//! schema and its migrations, the snapshot read of a pass, and the repairs.
//!
//! Architecture Invariant: the number of queries a pass sends does not depend on
//! the number of sessions. Reads are two streamed statements; writes are one
//! statement per batch.
//!
//! Every row repair is a compare-and-set on the row's `xmin`, which PostgreSQL
//! changes on every write to the row: a repair applies only to the row exactly
//! as it was classified, and its audit row is written by the same statement, so
//! the two commit together or not at all.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseConfig;
use crate::model::{BootRecord, BootRecords, DbSnapshot, OpenIntent, RowState, SessionId, SessionRow, StopOutcome};

/// A database failure, naming the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("connect to {url}: {}", describe(.source))]
    Connect { url: String, source: tokio_postgres::Error },
    #[error("connect to {url}: timed out after {timeout:?}")]
    ConnectTimeout { url: String, timeout: Duration },
    #[error("{what}: {}", describe(.source))]
    Query { what: &'static str, source: tokio_postgres::Error },
    #[error("{what}: timed out after {timeout:?}")]
    Timeout { what: &'static str, timeout: Duration },
    #[error("database schema is at version {found}, this sessiond needs {wanted}: run `sessiond migrate`")]
    SchemaOutdated { found: i32, wanted: i32 },
    #[error("database schema version {found} is newer than this sessiond knows ({wanted}): upgrade sessiond")]
    SchemaTooNew { found: i32, wanted: i32 },
    #[error("row {id} has an unknown state {state:?}")]
    BadRow { id: String, state: String },
}

/// The server's own words for a database error (its `Display` is only "db
/// error"), or the client-side cause for anything else.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            s.push_str(&format!("; {detail}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    s
}

impl StoreError {
    /// The SQLSTATE of the failure, if the server sent one.
    pub fn sql_state(&self) -> Option<&SqlState> {
        match self {
            StoreError::Query { source, .. } | StoreError::Connect { source, .. } => source.code(),
            _ => None,
        }
    }
}

fn q(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// The schema's migrations, in order. Each runs in the transaction that records it.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "sessions, audit trail and sessiond's own state",
        r#"
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
    ),
    (
        2,
        "stop intents: every stop request is recorded before it is sent",
        r#"
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
    ),
    (
        3,
        "instance state: boot ids seen and inconsistency, for several processes behind one URL",
        r#"
-- boot_id is now the trusted (confirmed) boot id, unset until one is.
ALTER TABLE sessiond_instance_state ALTER COLUMN boot_id DROP NOT NULL;
ALTER TABLE sessiond_instance_state ADD COLUMN IF NOT EXISTS seen_boot_ids text[] NOT NULL DEFAULT '{}';
ALTER TABLE sessiond_instance_state ADD COLUMN IF NOT EXISTS inconsistent_since timestamptz;
"#,
    ),
];

/// The schema version this build needs.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// An arbitrary, fixed key for the advisory lock that serialises migrations.
const MIGRATION_LOCK_KEY: i64 = 0x5e55_10d0_0001;

/// Who writes the audit rows, and for which pass.
#[derive(Clone, Debug)]
pub struct AuditContext {
    pub actor: String,
    pub pass_id: String,
}

/// The outcome of one repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Repaired,
    /// The row changed since it was read, is locked by someone else, or another
    /// sessiond has a stop for it in flight: looked at again next pass.
    Conflict,
    /// The database or the controller refused or failed; the error says why.
    Failed,
    /// Not attempted this pass; the next pass looks at it afresh.
    Deferred,
}

/// A write's result for one row of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowResult {
    Done,
    Conflict,
    /// This row alone failed (a value the table refused, …).
    Failed(String),
}

impl RowResult {
    pub fn outcome(&self) -> Outcome {
        match self {
            RowResult::Done => Outcome::Repaired,
            RowResult::Conflict => Outcome::Conflict,
            RowResult::Failed(_) => Outcome::Failed,
        }
    }
}

/// Errors that concern the rows of a batch, not the connection: a value the
/// table refuses (class 22), a constraint (23), a limit (54), or a lock held
/// by someone else past the write lock timeout (55P03). A batch failing so is
/// retried a row at a time, so one bad row costs only itself.
fn is_row_error(e: &StoreError) -> bool {
    e.sql_state().is_some_and(|s| {
        let code = s.code();
        code.starts_with("22") || code.starts_with("23") || code.starts_with("54") || code == "55P03"
    })
}

/// How one row fares when it fails alone.
fn row_result_of(e: &StoreError) -> RowResult {
    match e.sql_state() {
        Some(s) if *s == SqlState::UNIQUE_VIOLATION || *s == SqlState::LOCK_NOT_AVAILABLE => RowResult::Conflict,
        _ => RowResult::Failed(e.to_string()),
    }
}

/// How long a repair waits for a lock the application holds before giving up
/// on that row (a conflict, looked at again next pass). Rows themselves are
/// never waited for (`SKIP LOCKED`); this bounds the rest, such as an insert
/// racing the application's own uncommitted insert of the same id.
const WRITE_LOCK_TIMEOUT_MS: u128 = 1000;

/// A row update to apply with compare-and-set.
#[derive(Clone, Debug)]
pub struct RowUpdate {
    pub id: SessionId,
    pub version: String,
    pub from: RowState,
    pub to: RowState,
    pub owner_id: Option<String>,
    pub controller_instance: Option<String>,
    pub end_reason: Option<&'static str>,
    /// The finding kind, written to the audit row's `reason`.
    pub reason: &'static str,
    pub details: serde_json::Value,
}

/// A row to insert for a live session with none.
#[derive(Clone, Debug)]
pub struct RowInsert {
    pub id: SessionId,
    pub owner_id: String,
    pub controller_instance: String,
    pub state: RowState,
    pub created_at: DateTime<Utc>,
    pub details: serde_json::Value,
}

/// A connection to the application database.
pub struct Store {
    client: Client,
    timeout: Duration,
    connection: tokio::task::JoinHandle<()>,
    /// Statements and transaction commands sent, each one round trip.
    round_trips: Arc<AtomicU64>,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Store {
    /// Connects, with `statement_timeout` and `lock_timeout` set on the session so
    /// a stuck query or a row lock held by the application cannot stall a pass.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        let mut pg: tokio_postgres::Config =
            cfg.url.parse().map_err(|source| StoreError::Connect { url: cfg.url.clone(), source })?;
        if let Some(p) = &cfg.password {
            pg.password(p.expose());
        }
        let ms = cfg.statement_timeout.as_millis();
        pg.application_name("sessiond")
            .connect_timeout(cfg.statement_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .options(format!("-c statement_timeout={ms} -c lock_timeout={ms} -c TimeZone=UTC"));
        let connect = pg.connect(NoTls);
        let (client, connection) = tokio::time::timeout(cfg.statement_timeout + Duration::from_secs(1), connect)
            .await
            .map_err(|_| StoreError::ConnectTimeout { url: cfg.url.clone(), timeout: cfg.statement_timeout })?
            .map_err(|source| StoreError::Connect { url: cfg.url.clone(), source })?;
        let handle = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "database connection ended");
            }
        });
        Ok(Store {
            client,
            // Client-side bound on each call: the server's statement_timeout plus
            // room for the network, in case the server never answers at all.
            timeout: cfg.statement_timeout + Duration::from_secs(5),
            connection: handle,
            round_trips: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Counts this connection's round trips into `counter` from now on, so a
    /// pass that re-makes its connection still counts them all.
    pub fn share_round_trips(&mut self, counter: Arc<AtomicU64>) {
        self.round_trips = counter;
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Round trips to the server so far (statements, and BEGIN/COMMIT).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    fn count(&self, n: u64) {
        self.round_trips.fetch_add(n, Ordering::Relaxed);
    }

    async fn bounded<T>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        self.count(1);
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| StoreError::Timeout { what, timeout: self.timeout })?
            .map_err(q(what))
    }

    /// Creates or upgrades the schema. Idempotent, and safe when several processes
    /// migrate at once: they queue on an advisory lock and the later ones find
    /// nothing left to do.
    pub async fn migrate(&mut self) -> Result<Vec<i32>, StoreError> {
        let timeout = self.timeout;
        let tx = self.client.transaction().await.map_err(q("begin migration"))?;
        tokio::time::timeout(timeout, tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY]))
            .await
            .map_err(|_| StoreError::Timeout { what: "take the migration lock", timeout })?
            .map_err(q("take the migration lock"))?;
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
        let mut done = Vec::new();
        for (version, description, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            tx.batch_execute(sql).await.map_err(q("apply a migration"))?;
            tx.execute(
                "INSERT INTO sessiond_schema_migrations (version, description) VALUES ($1, $2)",
                &[version, description],
            )
            .await
            .map_err(q("record a migration"))?;
            done.push(*version);
        }
        tx.commit().await.map_err(q("commit the migration"))?;
        Ok(done)
    }

    /// Fails unless the schema is exactly the version this build needs.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        const WHAT: &str = "read the schema version";
        let exists = self
            .bounded(WHAT, self.client.query_one("SELECT to_regclass('sessiond_schema_migrations') IS NOT NULL", &[]))
            .await?;
        let found: i32 = if exists.get::<_, bool>(0) {
            self.bounded(
                WHAT,
                self.client.query_one("SELECT coalesce(max(version), 0) FROM sessiond_schema_migrations", &[]),
            )
            .await?
            .get(0)
        } else {
            0
        };
        match found.cmp(&SCHEMA_VERSION) {
            std::cmp::Ordering::Less => Err(StoreError::SchemaOutdated { found, wanted: SCHEMA_VERSION }),
            std::cmp::Ordering::Greater => Err(StoreError::SchemaTooNew { found, wanted: SCHEMA_VERSION }),
            std::cmp::Ordering::Equal => Ok(()),
        }
    }

    /// Reads every live row, and the row (in whatever state) of every id in
    /// `live_ids` that has no live row: two streamed statements whatever the
    /// number of sessions. Only the ids without a live row — the zombie and
    /// unpersisted candidates, normally a few — are sent to the server.
    pub async fn snapshot(&self, live_ids: &[&str]) -> Result<DbSnapshot, StoreError> {
        let (read_at, offset) = self.clock_offset().await?;
        // Sized for the usual case (about one live row per live session), so the
        // vector is not reallocated, and briefly held twice, while it fills.
        let mut rows = Vec::with_capacity(live_ids.len() + live_ids.len() / 16 + 16);
        self.stream_rows(
            "read the live rows",
            "SELECT session_id, owner_id, controller_instance, state, created_at,
                    greatest(created_at, updated_at, ended_at, deleted_at), xmin::text
               FROM sessions
              WHERE state IN ('creating', 'active', 'paused')",
            &[],
            &mut rows,
        )
        .await?;
        let mut have: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        have.sort_unstable();
        let missing: Vec<&str> = live_ids.iter().copied().filter(|id| have.binary_search(id).is_err()).collect();
        drop(have);
        if !missing.is_empty() {
            let mut others = Vec::new();
            self.stream_rows(
                "read the rows of live sessions",
                "SELECT session_id, owner_id, controller_instance, state, created_at,
                        greatest(created_at, updated_at, ended_at, deleted_at), xmin::text
                   FROM sessions
                  WHERE session_id = ANY($1::text[])
                    AND state NOT IN ('creating', 'active', 'paused')",
                &[&missing],
                &mut others,
            )
            .await?;
            rows.append(&mut others);
        }
        // Row times move onto sessiond's clock, the one the controller lists
        // were fetched by, so every comparison in the classifier uses one clock.
        if !offset.is_zero() {
            for row in &mut rows {
                row.created_at -= offset;
                row.changed_at -= offset;
            }
        }
        let open_intents = self.open_intents().await?;
        Ok(DbSnapshot { rows, read_at, open_intents })
    }

    /// How far the database's clock is ahead of ours (negative if behind), and
    /// our time when the measurement began. The error is at most half the round
    /// trip: a fraction of a millisecond near the server, far below any grace.
    pub async fn clock_offset(&self) -> Result<(DateTime<Utc>, chrono::Duration), StoreError> {
        let sent = Utc::now();
        let row =
            self.bounded("read the database clock", self.client.query_one("SELECT clock_timestamp()", &[])).await?;
        let answered = Utc::now();
        let db_now: DateTime<Utc> = row.try_get(0).map_err(q("read the database clock"))?;
        let midpoint = sent + (answered - sent) / 2;
        Ok((sent, db_now - midpoint))
    }

    /// Runs a row query, converting each row as it streams in (the raw rows are
    /// never all held at once).
    async fn stream_rows(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        out: &mut Vec<SessionRow>,
    ) -> Result<(), StoreError> {
        self.count(2); // parse, then the streamed execution
        let work = async {
            let stream = self.client.query_raw(sql, params.iter().copied()).await.map_err(q(what))?;
            pin_mut!(stream);
            while let Some(r) = stream.try_next().await.map_err(q(what))? {
                let state_text: &str = r.try_get(3).map_err(q(what))?;
                let id: String = r.try_get(0).map_err(q(what))?;
                let state = RowState::parse(state_text)
                    .ok_or_else(|| StoreError::BadRow { id: id.clone(), state: state_text.to_owned() })?;
                out.push(SessionRow {
                    id: SessionId::from_row(id),
                    owner_id: r.try_get(1).map_err(q(what))?,
                    controller_instance: r.try_get(2).map_err(q(what))?,
                    state,
                    created_at: r.try_get(4).map_err(q(what))?,
                    changed_at: r.try_get(5).map_err(q(what))?,
                    version: r.try_get(6).map_err(q(what))?,
                });
            }
            Ok::<_, StoreError>(())
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Timeout { what, timeout: self.timeout })?
    }

    /// sessiond's memory of each instance's boot ids.
    pub async fn load_boots(&self) -> Result<BootRecords, StoreError> {
        const WHAT: &str = "read instance state";
        let rows = self
            .bounded(
                WHAT,
                self.client.query(
                    "SELECT controller_instance, boot_id, boot_changed_at, seen_boot_ids, inconsistent_since
                       FROM sessiond_instance_state",
                    &[],
                ),
            )
            .await?;
        let mut out = HashMap::new();
        for r in rows {
            out.insert(
                r.try_get(0).map_err(q(WHAT))?,
                BootRecord {
                    trusted: r.try_get(1).map_err(q(WHAT))?,
                    changed_at: r.try_get(2).map_err(q(WHAT))?,
                    history: r.try_get(3).map_err(q(WHAT))?,
                    inconsistent_since: r.try_get(4).map_err(q(WHAT))?,
                    candidate: None,
                },
            );
        }
        Ok(out)
    }

    /// Saves boot records in one statement.
    pub async fn save_boots(&self, boots: &BootRecords) -> Result<(), StoreError> {
        let mut names = Vec::new();
        let mut trusted: Vec<Option<&str>> = Vec::new();
        let mut changed: Vec<Option<DateTime<Utc>>> = Vec::new();
        let mut history: Vec<String> = Vec::new();
        let mut inconsistent: Vec<Option<DateTime<Utc>>> = Vec::new();
        for (name, rec) in boots {
            names.push(name.as_str());
            trusted.push(rec.trusted.as_deref());
            changed.push(rec.changed_at);
            // As JSON: unnest cannot take an array of arrays of another length.
            history.push(serde_json::to_string(&rec.history).unwrap_or_else(|_| "[]".into()));
            inconsistent.push(rec.inconsistent_since);
        }
        self.bounded(
            "save instance state",
            self.client.execute(
                "INSERT INTO sessiond_instance_state
                        (controller_instance, boot_id, boot_changed_at, seen_boot_ids, inconsistent_since, updated_at)
                 SELECT n, b, c, ARRAY(SELECT jsonb_array_elements_text(h::jsonb)), i, now()
                   FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::timestamptz[])
                     AS t(n, b, c, h, i)
                 ON CONFLICT (controller_instance) DO UPDATE
                    SET boot_id = EXCLUDED.boot_id, boot_changed_at = EXCLUDED.boot_changed_at,
                        seen_boot_ids = EXCLUDED.seen_boot_ids, inconsistent_since = EXCLUDED.inconsistent_since,
                        updated_at = now()",
                &[&names, &trusted, &changed, &history, &inconsistent],
            ),
        )
        .await?;
        Ok(())
    }

    /// Applies row updates in one transaction. Each applies only if the row still
    /// has the version and state it was classified with, and is not locked by
    /// anyone else; the others are conflicts. A batch that fails on a row's data
    /// is retried a row at a time, so only the offending row is lost.
    pub async fn update_rows(
        &mut self,
        batch: &[RowUpdate],
        audit: &AuditContext,
    ) -> Result<Vec<RowResult>, StoreError> {
        match self.update_rows_once(batch, audit).await {
            Err(e) if is_row_error(&e) && batch.len() > 1 => {
                let mut out = Vec::with_capacity(batch.len());
                for one in batch {
                    out.push(match self.update_rows_once(std::slice::from_ref(one), audit).await {
                        Ok(mut o) => o.pop().unwrap_or(RowResult::Conflict),
                        Err(e) if is_row_error(&e) => row_result_of(&e),
                        Err(e) => return Err(e),
                    });
                }
                Ok(out)
            }
            Err(e) if is_row_error(&e) => Ok(vec![row_result_of(&e)]),
            other => other,
        }
    }

    /// Begins a write transaction whose lock waits are short.
    async fn begin_write(&mut self, what: &'static str) -> Result<tokio_postgres::Transaction<'_>, StoreError> {
        let ms = WRITE_LOCK_TIMEOUT_MS.min(self.timeout.as_millis());
        self.count(2); // BEGIN, SET LOCAL
        let timeout = self.timeout;
        let tx = tokio::time::timeout(timeout, self.client.transaction())
            .await
            .map_err(|_| StoreError::Timeout { what, timeout })?
            .map_err(q(what))?;
        tokio::time::timeout(timeout, tx.batch_execute(&format!("SET LOCAL lock_timeout = {ms}")))
            .await
            .map_err(|_| StoreError::Timeout { what, timeout })?
            .map_err(q(what))?;
        Ok(tx)
    }

    async fn update_rows_once(
        &mut self,
        batch: &[RowUpdate],
        audit: &AuditContext,
    ) -> Result<Vec<RowResult>, StoreError> {
        const WHAT: &str = "apply row repairs";
        let ids: Vec<&str> = batch.iter().map(|u| u.id.as_str()).collect();
        let versions: Vec<&str> = batch.iter().map(|u| u.version.as_str()).collect();
        let from: Vec<&str> = batch.iter().map(|u| u.from.as_str()).collect();
        let to: Vec<&str> = batch.iter().map(|u| u.to.as_str()).collect();
        let owners: Vec<Option<&str>> = batch.iter().map(|u| u.owner_id.as_deref()).collect();
        let instances: Vec<Option<&str>> = batch.iter().map(|u| u.controller_instance.as_deref()).collect();
        let end_reasons: Vec<Option<&str>> = batch.iter().map(|u| u.end_reason).collect();
        let reasons: Vec<&str> = batch.iter().map(|u| u.reason).collect();
        let details: Vec<String> = batch.iter().map(|u| u.details.to_string()).collect();
        let timeout = self.timeout;
        let params: [&(dyn ToSql + Sync); 10] =
            [&ids, &versions, &from, &to, &owners, &instances, &end_reasons, &reasons, &details, &audit.actor];
        self.count(2); // the statement, COMMIT
        let tx = self.begin_write(WHAT).await?;
        let work = tx.query(
            "WITH input AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                      $6::text[], $7::text[], $8::text[], $9::text[])
                     AS t(session_id, version, old_state, new_state, owner_id,
                          controller_instance, end_reason, reason, details)
             ),
             -- Rows still as classified, and not locked by the application: a
             -- row it holds is a conflict now, never a wait that stalls the pass.
             locked AS (
                 SELECT s.session_id FROM sessions s JOIN input i ON i.session_id = s.session_id
                  WHERE s.xmin = i.version::xid AND s.state = i.old_state
                    FOR UPDATE OF s SKIP LOCKED
             ),
             changed AS (
                 UPDATE sessions s
                    SET state = i.new_state,
                        owner_id = coalesce(i.owner_id, s.owner_id),
                        controller_instance = coalesce(i.controller_instance, s.controller_instance),
                        updated_at = now(),
                        ended_at = CASE WHEN i.new_state IN ('stopped', 'failed')
                                        THEN coalesce(s.ended_at, now()) ELSE s.ended_at END,
                        end_reason = coalesce(i.end_reason, s.end_reason)
                   FROM input i JOIN locked l ON l.session_id = i.session_id
                  WHERE s.session_id = i.session_id
                 RETURNING s.session_id
             )
             INSERT INTO session_audit (session_id, old_state, new_state, trigger, actor, reason, details)
             SELECT i.session_id, i.old_state, i.new_state, 'reconciler', $10, i.reason, i.details::jsonb
               FROM changed c JOIN input i ON i.session_id = c.session_id
             RETURNING session_id",
            &params,
        );
        let rows = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
            .map_err(q(WHAT))?;
        tokio::time::timeout(timeout, tx.commit())
            .await
            .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
            .map_err(q(WHAT))?;
        Ok(outcomes(batch.iter().map(|u| u.id.as_str()), rows.iter().map(|r| r.get::<_, String>(0))))
    }

    /// Inserts rows for live sessions that have none, each only if no row with its
    /// id exists and its owner has no live row; anything else is a conflict. A
    /// batch that fails on a row's data is retried a row at a time.
    pub async fn insert_rows(
        &mut self,
        batch: &[RowInsert],
        audit: &AuditContext,
    ) -> Result<Vec<RowResult>, StoreError> {
        match self.insert_rows_once(batch, audit).await {
            Err(e) if is_row_error(&e) && batch.len() > 1 => {
                let mut out = Vec::with_capacity(batch.len());
                for one in batch {
                    out.push(match self.insert_rows_once(std::slice::from_ref(one), audit).await {
                        Ok(mut o) => o.pop().unwrap_or(RowResult::Conflict),
                        Err(e) if is_row_error(&e) => row_result_of(&e),
                        Err(e) => return Err(e),
                    });
                }
                Ok(out)
            }
            Err(e) if is_row_error(&e) => Ok(vec![row_result_of(&e)]),
            other => other,
        }
    }

    async fn insert_rows_once(
        &mut self,
        batch: &[RowInsert],
        audit: &AuditContext,
    ) -> Result<Vec<RowResult>, StoreError> {
        const WHAT: &str = "insert unpersisted rows";
        let ids: Vec<&str> = batch.iter().map(|u| u.id.as_str()).collect();
        let owners: Vec<&str> = batch.iter().map(|u| u.owner_id.as_str()).collect();
        let instances: Vec<&str> = batch.iter().map(|u| u.controller_instance.as_str()).collect();
        let states: Vec<&str> = batch.iter().map(|u| u.state.as_str()).collect();
        let created: Vec<DateTime<Utc>> = batch.iter().map(|u| u.created_at).collect();
        let details: Vec<String> = batch.iter().map(|u| u.details.to_string()).collect();
        let timeout = self.timeout;
        let params: [&(dyn ToSql + Sync); 7] = [&ids, &owners, &instances, &states, &created, &details, &audit.actor];
        self.count(2); // the statement, COMMIT
        let tx = self.begin_write(WHAT).await?;
        let work = tx.query(
            "WITH input AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[])
                     AS t(session_id, owner_id, controller_instance, state, created_at, details)
             ),
             added AS (
                 INSERT INTO sessions (session_id, owner_id, controller_instance, state, created_at, updated_at)
                 SELECT session_id, owner_id, controller_instance, state, created_at, now() FROM input
                 ON CONFLICT DO NOTHING
                 RETURNING session_id, state
             )
             INSERT INTO session_audit (session_id, old_state, new_state, trigger, actor, reason, details)
             SELECT a.session_id, NULL, a.state, 'reconciler', $7, 'unpersisted', i.details::jsonb
               FROM added a JOIN input i ON i.session_id = a.session_id
             RETURNING session_id",
            &params,
        );
        let rows = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
            .map_err(q(WHAT))?;
        tokio::time::timeout(timeout, tx.commit())
            .await
            .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
            .map_err(q(WHAT))?;
        Ok(outcomes(batch.iter().map(|u| u.id.as_str()), rows.iter().map(|r| r.get::<_, String>(0))))
    }

    /// Records the intent to stop these sessions, before any request is sent.
    /// An intent is recorded only for a row still exactly as classified and not
    /// locked by the application at this instant, and only if no other stop of
    /// the same session is in flight (whoever sends it). The transaction is
    /// short: no lock is held while the stops are sent. Returns each stop's
    /// intent id, or `None` for a conflict.
    pub async fn open_stops(
        &mut self,
        stops: &[StopIntent],
        audit: &AuditContext,
        expires_in: Duration,
    ) -> Result<Vec<Option<i64>>, StoreError> {
        const WHAT: &str = "record stop intents";
        let ids: Vec<&str> = stops.iter().map(|z| z.id.as_str()).collect();
        let versions: Vec<&str> = stops.iter().map(|z| z.version.as_str()).collect();
        let states: Vec<&str> = stops.iter().map(|z| z.state.as_str()).collect();
        let ends: Vec<bool> = stops.iter().map(|z| z.end_row).collect();
        let controllers: Vec<&str> = stops.iter().map(|z| z.controller.as_str()).collect();
        let kinds: Vec<&str> = stops.iter().map(|z| z.reason).collect();
        let details: Vec<String> = stops.iter().map(|z| z.details.to_string()).collect();
        let expires_ms = i64::try_from(expires_in.as_millis()).unwrap_or(i64::MAX);
        let timeout = self.timeout;
        self.count(2); // the statement, COMMIT
        let tx = self.begin_write(WHAT).await?;
        let params: [&(dyn ToSql + Sync); 10] = [
            &ids,
            &versions,
            &states,
            &ends,
            &controllers,
            &kinds,
            &details,
            &audit.pass_id,
            &audit.actor,
            &expires_ms,
        ];
        let rows = tokio::time::timeout(
            timeout,
            tx.query(
                "WITH input AS (
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::text[],
                                          $6::text[], $7::text[])
                         AS t(session_id, version, state, end_row, controller, kind, details)
                 ),
                 current AS (
                     SELECT i.* FROM input i JOIN sessions s ON s.session_id = i.session_id
                      WHERE s.xmin = i.version::xid AND s.state = i.state
                        FOR SHARE OF s SKIP LOCKED
                 )
                 INSERT INTO sessiond_stop_intents
                        (session_id, controller, kind, row_version, row_state, end_row, pass_id, actor, details,
                         expires_at)
                 SELECT session_id, controller, kind, version, state, end_row, $8, $9, details::jsonb,
                        now() + $10::bigint * interval '1 millisecond'
                   FROM current
                 ON CONFLICT (session_id) WHERE settled_at IS NULL DO NOTHING
                 RETURNING id, session_id",
                &params,
            ),
        )
        .await
        .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
        .map_err(q(WHAT))?;
        tokio::time::timeout(timeout, tx.commit())
            .await
            .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
            .map_err(q(WHAT))?;
        let mut by_id: HashMap<String, i64> = HashMap::with_capacity(rows.len());
        for r in &rows {
            by_id.insert(r.try_get(1).map_err(q(WHAT))?, r.try_get(0).map_err(q(WHAT))?);
        }
        Ok(ids.iter().map(|id| by_id.get(*id).copied()).collect())
    }

    /// Settles stop intents with what became of them, in one statement: the
    /// intent is closed; for a stop that took effect, the audit row is written
    /// and the session's row touched (or, for a duplicate, ended), but only if
    /// the row is still as it was when the intent was recorded and nobody holds
    /// it: an application that re-activated the session meanwhile keeps its
    /// write. An intent already settled (by another pass) is left alone, so a
    /// stop is audited exactly once. Returns, per intent, whether this call
    /// settled it and whether the row was changed.
    pub async fn settle_stops(&mut self, settles: &[Settle], audit: &AuditContext) -> Result<Vec<Settled>, StoreError> {
        const WHAT: &str = "settle stop intents";
        let ids: Vec<i64> = settles.iter().map(|s| s.intent).collect();
        let outcomes: Vec<&str> = settles.iter().map(|s| s.outcome.as_str()).collect();
        let details: Vec<String> = settles.iter().map(|s| s.details.to_string()).collect();
        let timeout = self.timeout;
        self.count(2); // the statement, COMMIT
        let tx = self.begin_write(WHAT).await?;
        let params: [&(dyn ToSql + Sync); 4] = [&ids, &outcomes, &details, &audit.actor];
        let rows = tokio::time::timeout(
            timeout,
            tx.query(
                "WITH input AS (
                     SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) AS t(id, outcome, details)
                 ),
                 -- An uncertain stop stays open, expired at once, for the next
                 -- pass to settle from what the controller's list shows.
                 settled AS (
                     UPDATE sessiond_stop_intents n
                        SET settled_at = CASE WHEN i.outcome = 'uncertain' THEN NULL ELSE now() END,
                            expires_at = CASE WHEN i.outcome = 'uncertain' THEN now() ELSE n.expires_at END,
                            outcome = CASE WHEN i.outcome = 'uncertain' THEN NULL ELSE i.outcome END,
                            details = n.details || i.details::jsonb
                       FROM input i
                      WHERE n.id = i.id AND n.settled_at IS NULL
                     RETURNING n.id, n.session_id, n.kind, n.row_version, n.row_state, n.end_row, n.outcome,
                               n.details
                 ),
                 unchanged AS (
                     SELECT s.session_id FROM sessions s JOIN settled st ON st.session_id = s.session_id
                      WHERE st.outcome = 'stopped' AND s.xmin = st.row_version::xid
                        FOR UPDATE OF s SKIP LOCKED
                 ),
                 touched AS (
                     UPDATE sessions s
                        SET updated_at = now(),
                            state = CASE WHEN st.end_row THEN 'stopped' ELSE s.state END,
                            ended_at = CASE WHEN st.end_row THEN coalesce(s.ended_at, now()) ELSE s.ended_at END,
                            end_reason = CASE WHEN st.end_row THEN st.kind ELSE s.end_reason END
                       FROM settled st JOIN unchanged u ON u.session_id = st.session_id
                      WHERE s.session_id = st.session_id
                     RETURNING s.session_id, s.state
                 ),
                 audited AS (
                     INSERT INTO session_audit (session_id, old_state, new_state, trigger, actor, reason, details)
                     SELECT st.session_id, st.row_state, coalesce(t.state, st.row_state), 'reconciler', $4, st.kind,
                            st.details || jsonb_build_object('intent', st.id, 'row_updated', t.session_id IS NOT NULL)
                       FROM settled st LEFT JOIN touched t ON t.session_id = st.session_id
                      WHERE st.outcome = 'stopped'
                     RETURNING session_id
                 )
                 SELECT st.id, t.session_id IS NOT NULL
                   FROM settled st LEFT JOIN touched t ON t.session_id = st.session_id",
                &params,
            ),
        )
        .await
        .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
        .map_err(q(WHAT))?;
        tokio::time::timeout(timeout, tx.commit())
            .await
            .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
            .map_err(q(WHAT))?;
        let mut done: HashMap<i64, bool> = HashMap::with_capacity(rows.len());
        for r in &rows {
            done.insert(r.try_get(0).map_err(q(WHAT))?, r.try_get(1).map_err(q(WHAT))?);
        }
        Ok(ids
            .iter()
            .map(|id| match done.get(id) {
                Some(&row_updated) => Settled { by_us: true, row_updated },
                None => Settled { by_us: false, row_updated: false },
            })
            .collect())
    }

    /// Stop intents not settled yet: in flight elsewhere (not expired), or left
    /// by a process that stopped before it could settle them (expired).
    pub async fn open_intents(&self) -> Result<Vec<OpenIntent>, StoreError> {
        const WHAT: &str = "read open stop intents";
        let rows = self
            .bounded(
                WHAT,
                self.client.query(
                    "SELECT id, session_id, controller, kind, expires_at < now()
                       FROM sessiond_stop_intents WHERE settled_at IS NULL",
                    &[],
                ),
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(OpenIntent {
                intent: r.try_get(0).map_err(q(WHAT))?,
                session_id: r.try_get(1).map_err(q(WHAT))?,
                controller: r.try_get(2).map_err(q(WHAT))?,
                kind: r.try_get(3).map_err(q(WHAT))?,
                expired: r.try_get(4).map_err(q(WHAT))?,
            });
        }
        Ok(out)
    }
}

/// A stop to record before it is sent.
#[derive(Clone, Debug)]
pub struct StopIntent {
    pub id: SessionId,
    pub controller: String,
    /// The row's version and state as classified.
    pub version: String,
    pub state: RowState,
    /// Also end the row once stopped (a duplicate); otherwise only touch it.
    pub end_row: bool,
    /// The finding kind, for the audit row.
    pub reason: &'static str,
    pub details: serde_json::Value,
}

/// What became of a stop.
#[derive(Clone, Debug)]
pub struct Settle {
    pub intent: i64,
    pub outcome: StopOutcome,
    pub details: serde_json::Value,
}

/// The result of settling one intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settled {
    /// This call settled it (false: already settled by another pass).
    pub by_us: bool,
    /// The session's row was touched or ended.
    pub row_updated: bool,
}

fn outcomes<'a>(asked: impl Iterator<Item = &'a str>, done: impl Iterator<Item = String>) -> Vec<RowResult> {
    let done: BTreeSet<String> = done.collect();
    asked.map(|id| if done.contains(id) { RowResult::Done } else { RowResult::Conflict }).collect()
}
