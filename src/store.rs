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
use crate::model::{BootRecord, BootRecords, DbSnapshot, RowState, SessionId, SessionRow};

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
const MIGRATIONS: &[(i32, &str, &str)] = &[(
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
)];

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
    Conflict,
    Failed,
}

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
        Ok(DbSnapshot { rows, read_at })
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

    /// sessiond's memory of each instance's boot id.
    pub async fn load_boots(&self) -> Result<BootRecords, StoreError> {
        let rows = self
            .bounded(
                "read instance state",
                self.client
                    .query("SELECT controller_instance, boot_id, boot_changed_at FROM sessiond_instance_state", &[]),
            )
            .await?;
        let mut out = HashMap::new();
        for r in rows {
            out.insert(
                r.try_get(0).map_err(q("read instance state"))?,
                BootRecord {
                    boot_id: r.try_get(1).map_err(q("read instance state"))?,
                    changed_at: r.try_get(2).map_err(q("read instance state"))?,
                },
            );
        }
        Ok(out)
    }

    /// Saves boot records in one statement.
    pub async fn save_boots(&self, boots: &BootRecords) -> Result<(), StoreError> {
        let mut names = Vec::new();
        let mut ids = Vec::new();
        let mut changed: Vec<Option<DateTime<Utc>>> = Vec::new();
        for (name, rec) in boots {
            names.push(name.as_str());
            ids.push(rec.boot_id.as_str());
            changed.push(rec.changed_at);
        }
        self.bounded(
            "save instance state",
            self.client.execute(
                "INSERT INTO sessiond_instance_state (controller_instance, boot_id, boot_changed_at, updated_at)
                 SELECT * , now() FROM unnest($1::text[], $2::text[], $3::timestamptz[])
                 ON CONFLICT (controller_instance) DO UPDATE
                    SET boot_id = EXCLUDED.boot_id, boot_changed_at = EXCLUDED.boot_changed_at, updated_at = now()
                  WHERE sessiond_instance_state.boot_id IS DISTINCT FROM EXCLUDED.boot_id
                     OR sessiond_instance_state.boot_changed_at IS DISTINCT FROM EXCLUDED.boot_changed_at",
                &[&names, &ids, &changed],
            ),
        )
        .await?;
        Ok(())
    }

    /// Applies row updates in one transaction. Each applies only if the row still
    /// has the version and state it was classified with; the others are conflicts.
    /// If the batch trips a unique index (an owner change onto an owner with a
    /// live row), it is retried a row at a time so only the offending row is lost.
    pub async fn update_rows(&mut self, batch: &[RowUpdate], audit: &AuditContext) -> Result<Vec<Outcome>, StoreError> {
        match self.update_rows_once(batch, audit).await {
            Err(e) if e.sql_state() == Some(&SqlState::UNIQUE_VIOLATION) && batch.len() > 1 => {
                let mut out = Vec::with_capacity(batch.len());
                for one in batch {
                    out.push(match self.update_rows_once(std::slice::from_ref(one), audit).await {
                        Ok(o) => o[0],
                        Err(e) if e.sql_state() == Some(&SqlState::UNIQUE_VIOLATION) => Outcome::Conflict,
                        Err(e) => return Err(e),
                    });
                }
                Ok(out)
            }
            Err(e) if e.sql_state() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(vec![Outcome::Conflict]),
            other => other,
        }
    }

    async fn update_rows_once(
        &mut self,
        batch: &[RowUpdate],
        audit: &AuditContext,
    ) -> Result<Vec<Outcome>, StoreError> {
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
        self.count(3); // BEGIN, the statement, COMMIT
        let tx = self.client.transaction().await.map_err(q(WHAT))?;
        let work = tx.query(
            "WITH input AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                      $6::text[], $7::text[], $8::text[], $9::text[])
                     AS t(session_id, version, old_state, new_state, owner_id,
                          controller_instance, end_reason, reason, details)
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
                   FROM input i
                  WHERE s.session_id = i.session_id
                    AND s.xmin = i.version::xid
                    AND s.state = i.old_state
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
    /// id exists and its owner has no live row; anything else is a conflict.
    pub async fn insert_rows(&mut self, batch: &[RowInsert], audit: &AuditContext) -> Result<Vec<Outcome>, StoreError> {
        const WHAT: &str = "insert unpersisted rows";
        let ids: Vec<&str> = batch.iter().map(|u| u.id.as_str()).collect();
        let owners: Vec<&str> = batch.iter().map(|u| u.owner_id.as_str()).collect();
        let instances: Vec<&str> = batch.iter().map(|u| u.controller_instance.as_str()).collect();
        let states: Vec<&str> = batch.iter().map(|u| u.state.as_str()).collect();
        let created: Vec<DateTime<Utc>> = batch.iter().map(|u| u.created_at).collect();
        let details: Vec<String> = batch.iter().map(|u| u.details.to_string()).collect();
        let timeout = self.timeout;
        let params: [&(dyn ToSql + Sync); 7] = [&ids, &owners, &instances, &states, &created, &details, &audit.actor];
        self.count(3); // BEGIN, the statement, COMMIT
        let tx = self.client.transaction().await.map_err(q(WHAT))?;
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

    /// Begins a zombie batch: locks the rows that are still exactly as classified.
    /// The caller stops the sessions at their controller while the locks are held,
    /// then records which stops succeeded with [`ZombieBatch::finish`]. A second
    /// sessiond classifying the same zombie waits on the lock and then finds the
    /// row changed, so each zombie is stopped and audited once.
    pub async fn begin_zombies(&mut self, ids: &[&str], versions: &[&str]) -> Result<ZombieBatch<'_>, StoreError> {
        const WHAT: &str = "lock zombie rows";
        let timeout = self.timeout;
        self.count(2); // BEGIN, the locking query
        let counter = Arc::clone(&self.round_trips);
        let tx = self.client.transaction().await.map_err(q(WHAT))?;
        let rows = tokio::time::timeout(
            timeout,
            tx.query(
                "SELECT s.session_id FROM sessions s
                   JOIN unnest($1::text[], $2::text[]) AS i(session_id, version) ON i.session_id = s.session_id
                  WHERE s.xmin = i.version::xid
                    FOR UPDATE OF s",
                &[&ids, &versions],
            ),
        )
        .await
        .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
        .map_err(q(WHAT))?;
        let locked = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        Ok(ZombieBatch { tx, locked, timeout, counter })
    }
}

/// An open zombie batch holding row locks.
pub struct ZombieBatch<'a> {
    tx: tokio_postgres::Transaction<'a>,
    /// Ids whose rows are still as classified; the others are conflicts.
    pub locked: BTreeSet<String>,
    timeout: Duration,
    counter: Arc<AtomicU64>,
}

/// A session the controller stopped, for its row and audit row.
pub struct StoppedZombie {
    pub id: String,
    /// The row's state as classified.
    pub state: RowState,
    /// Also mark the row stopped (a duplicate); otherwise only touch it.
    pub end_row: bool,
    /// The finding kind, for the audit row.
    pub reason: &'static str,
    pub details: serde_json::Value,
}

impl ZombieBatch<'_> {
    /// Updates the rows of the stopped sessions — touched, so their version
    /// changes, or ended for duplicates — and writes their audit rows, then commits.
    pub async fn finish(self, stopped: &[StoppedZombie], audit: &AuditContext) -> Result<(), StoreError> {
        const WHAT: &str = "record stopped sessions";
        let ids: Vec<&str> = stopped.iter().map(|z| z.id.as_str()).collect();
        let states: Vec<&str> = stopped.iter().map(|z| z.state.as_str()).collect();
        let ends: Vec<bool> = stopped.iter().map(|z| z.end_row).collect();
        let reasons: Vec<&str> = stopped.iter().map(|z| z.reason).collect();
        let details: Vec<String> = stopped.iter().map(|z| z.details.to_string()).collect();
        let timeout = self.timeout;
        self.counter.fetch_add(if stopped.is_empty() { 1 } else { 2 }, Ordering::Relaxed);
        if !stopped.is_empty() {
            let params: [&(dyn ToSql + Sync); 6] = [&ids, &states, &ends, &reasons, &details, &audit.actor];
            tokio::time::timeout(
                timeout,
                self.tx.execute(
                    "WITH input AS (
                         SELECT * FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[], $5::text[])
                             AS t(session_id, state, end_row, reason, details)
                     ),
                     touched AS (
                         UPDATE sessions s
                            SET updated_at = now(),
                                state = CASE WHEN i.end_row THEN 'stopped' ELSE s.state END,
                                ended_at = CASE WHEN i.end_row THEN coalesce(s.ended_at, now()) ELSE s.ended_at END,
                                end_reason = CASE WHEN i.end_row THEN i.reason ELSE s.end_reason END
                           FROM input i WHERE s.session_id = i.session_id
                         RETURNING s.session_id, s.state
                     )
                     INSERT INTO session_audit (session_id, old_state, new_state, trigger, actor, reason, details)
                     SELECT i.session_id, i.state, t.state, 'reconciler', $6, i.reason, i.details::jsonb
                       FROM touched t JOIN input i ON i.session_id = t.session_id",
                    &params,
                ),
            )
            .await
            .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
            .map_err(q(WHAT))?;
        }
        tokio::time::timeout(timeout, self.tx.commit())
            .await
            .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
            .map_err(q(WHAT))
    }
}

fn outcomes<'a>(asked: impl Iterator<Item = &'a str>, done: impl Iterator<Item = String>) -> Vec<Outcome> {
    let done: BTreeSet<String> = done.collect();
    asked.map(|id| if done.contains(id) { Outcome::Repaired } else { Outcome::Conflict }).collect()
}
