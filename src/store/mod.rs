//! The store: the only code that talks to PostgreSQL. It owns sessiond's
//! schema and its migrations (`migrate`), the sessions table's mapping
//! (`mapping`), the snapshot read of a pass (`snapshot`), and the repairs
//! (`repair`).
//!
//! Architecture Invariant: the number of statements a pass sends does not
//! depend on the number of sessions. The read is one transaction of a few
//! streamed statements; writes are one statement per batch.
//!
//! Every statement runs in a transaction that sets its own timeouts (`SET
//! LOCAL`), and every query is an unnamed statement: nothing session-level is
//! relied on, so sessiond works through a transaction-pooling PgBouncer, and
//! the `options` of the database URL (a `search_path`, say) are left alone.
//!
//! Every row repair is a compare-and-set on the row's `xmin`, which PostgreSQL
//! changes on every write to the row: a repair applies only to the row exactly
//! as it was classified, and its audit row is written by the same statement, so
//! the two commit together or not at all.

pub mod lease;
pub mod lifecycle;
pub mod mapping;
mod migrate;
pub mod operator;
mod repair;
mod snapshot;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, IsolationLevel, Transaction};

use crate::config::{DatabaseConfig, Ident, PolicyConfig, SessionsConfig, SslMode};
use crate::model::{BootRecord, BootRecords, RowState, SessionId, StopOutcome};
pub use lease::{Fence, LeaseRow};
pub use mapping::{MappingError, Pages, Table};
pub use migrate::SCHEMA_VERSION;

/// A database failure, naming the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("connect to {url}: {}", describe(.source))]
    Connect { url: String, source: tokio_postgres::Error },
    #[error("connect to {url}: timed out after {timeout:?}")]
    ConnectTimeout { url: String, timeout: Duration },
    #[error("connect to {url}: {problem}")]
    Tls { url: String, problem: String },
    #[error("{what}: {}", describe(.source))]
    Query { what: &'static str, source: tokio_postgres::Error },
    #[error("{what}: timed out after {timeout:?}")]
    Timeout { what: &'static str, timeout: Duration },
    #[error("database schema is at version {found}, this sessiond needs {wanted}: run `sessiond migrate`")]
    SchemaOutdated { found: i32, wanted: i32 },
    #[error("database schema version {found} is newer than this sessiond knows ({wanted}): upgrade sessiond")]
    SchemaTooNew { found: i32, wanted: i32 },
    #[error("{table} exists and sessiond did not create it: {difference}; nothing was changed ({hint})")]
    ForeignTable { table: String, difference: String, hint: &'static str },
    /// The configured table does not fit this database: fatal, exit 78.
    #[error("{0}")]
    Mapping(#[from] MappingError),
    #[error("the sessions table is not bound: call bind_table first")]
    Unbound,
    /// The lease this store's writes are fenced by no longer names it: another
    /// replica leads now. Nothing was written.
    #[error("the lease of term {term} is no longer held: another replica leads; nothing was written")]
    Fenced { term: i64 },
    /// The database answered something sessiond cannot read.
    #[error("{what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// An operator paused sessiond: nothing was written.
    #[error("sessiond is paused (by {by}); nothing was written")]
    Paused { by: String },
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
    if let Some(hint) = crate::tls::hint(&s) {
        s.push_str(&format!(" ({hint})"));
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

    /// A failure no retry can fix: the configured table does not fit.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StoreError::Mapping(_))
    }
}

fn q(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// Who writes the audit rows, and for which pass.
#[derive(Clone, Debug)]
pub struct AuditContext {
    pub actor: String,
    pub pass_id: String,
    /// The leader's term, with several replicas.
    pub term: Option<i64>,
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
    /// Client-side bound on each call: the server's statement_timeout plus
    /// room for the network, in case the server never answers at all.
    timeout: Duration,
    statement_timeout: Duration,
    /// sessiond's own schema.
    schema: Ident,
    connection: tokio::task::JoinHandle<()>,
    /// Statements and transaction commands sent, each one round trip.
    round_trips: Arc<AtomicU64>,
    /// The sessions table, once checked against the catalog.
    table: Option<Table>,
    /// With several replicas: every write checks this lease first.
    fence: Option<Fence>,
    /// What the second connection of a read on two is opened with, if the
    /// config allows one (`database.read_connections = 2`).
    second_cfg: Option<DatabaseConfig>,
    /// That connection, once a table large enough has needed it.
    second: Option<Box<Store>>,
    /// Tables of fewer pages are read on one connection.
    split_min_pages: i64,
    /// Tests: holds a read on two connections between its snapshot's export
    /// and its import.
    split_gate: Option<SplitGate>,
}

/// A table of this many pages (16 MiB at PostgreSQL's default 8 kB pages,
/// some 150 000 rows of the reference table with executor ids) or more is read on two
/// connections, if the config allows.
pub const SPLIT_READ_MIN_PAGES: i64 = 2048;

/// Holds a read on two connections once its snapshot is exported, until told
/// to go on: for tests that change the table in between.
#[doc(hidden)]
pub struct SplitGate {
    pub exported: tokio::sync::oneshot::Sender<()>,
    pub resume: tokio::sync::oneshot::Receiver<()>,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// What a transaction is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tx {
    /// One consistent view of the database.
    Read,
    /// A repair: lock waits are short.
    Write,
    /// The lease: it may wait for a repair holding the lease row.
    Lease,
}

/// A transaction's own bounds: see [`Store::begin`].
fn local_settings(statement_ms: u128, lock_ms: u128) -> String {
    format!(
        "SET LOCAL statement_timeout = {statement_ms}; SET LOCAL lock_timeout = {lock_ms}; \
         SET LOCAL idle_in_transaction_session_timeout = {statement_ms}; SET LOCAL jit = off"
    )
}

/// How long a repair waits for a lock the application holds before giving up
/// on that row (a conflict, looked at again next pass). Rows themselves are
/// never waited for (`SKIP LOCKED`); this bounds the rest, such as an insert
/// racing the application's own uncommitted insert of the same id.
const WRITE_LOCK_TIMEOUT: Duration = Duration::from_secs(1);

impl Store {
    /// Connects with the URL's TLS settings (`sslmode`, libpq's meanings).
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        let pg = pg_config(cfg)?;
        let wait = cfg.statement_timeout + Duration::from_secs(1);
        let timed_out = || StoreError::ConnectTimeout { url: cfg.url.clone(), timeout: cfg.statement_timeout };
        let failed = |source| StoreError::Connect { url: cfg.url.clone(), source };
        let (client, connection) = match cfg.sslmode {
            SslMode::Disable => {
                let (client, conn) = tokio::time::timeout(wait, pg.connect(tokio_postgres::NoTls))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(failed)?;
                (client, spawn_connection(conn))
            }
            mode => {
                let tls = crate::tls::postgres(mode, cfg.ca_file.as_deref())
                    .map_err(|problem| StoreError::Tls { url: cfg.url.clone(), problem })?;
                let (client, conn) =
                    tokio::time::timeout(wait, pg.connect(tls)).await.map_err(|_| timed_out())?.map_err(failed)?;
                (client, spawn_connection(conn))
            }
        };
        Ok(Store {
            client,
            timeout: cfg.statement_timeout + Duration::from_secs(5),
            statement_timeout: cfg.statement_timeout,
            schema: cfg.schema.clone(),
            connection,
            round_trips: Arc::new(AtomicU64::new(0)),
            table: None,
            fence: None,
            second_cfg: (cfg.read_connections > 1).then(|| cfg.clone()),
            second: None,
            split_min_pages: SPLIT_READ_MIN_PAGES,
            split_gate: None,
        })
    }

    /// Tests: reads tables of `pages` pages or more on two connections.
    #[doc(hidden)]
    pub fn set_split_read_min_pages(&mut self, pages: i64) {
        self.split_min_pages = pages;
    }

    /// Tests: holds the next read on two connections at `gate`.
    #[doc(hidden)]
    pub fn hold_split_read(&mut self, gate: SplitGate) {
        self.split_gate = Some(gate);
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

    /// The sessions table, once bound.
    pub fn table(&self) -> Result<&Table, StoreError> {
        self.table.as_ref().ok_or(StoreError::Unbound)
    }

    /// sessiond's own schema, quoted.
    fn own(&self, table: &str) -> String {
        format!("{}.\"{table}\"", self.schema.quoted())
    }

    /// Runs `fut` within the client-side bound, counting one round trip.
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

    /// Begins a transaction with its own timeouts. A read is one consistent
    /// snapshot (repeatable read, read only).
    async fn begin(&mut self, what: &'static str, kind: Tx) -> Result<Transaction<'_>, StoreError> {
        let statement_ms = self.statement_timeout.as_millis();
        let lock_ms = match kind {
            Tx::Read | Tx::Lease => statement_ms,
            Tx::Write => WRITE_LOCK_TIMEOUT.as_millis().min(statement_ms),
        };
        let timeout = self.timeout;
        self.count(2); // BEGIN, SET LOCAL
        let builder = match kind {
            Tx::Read => self.client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true),
            Tx::Write | Tx::Lease => self.client.build_transaction(),
        };
        let tx = tokio::time::timeout(timeout, builder.start())
            .await
            .map_err(|_| StoreError::Timeout { what, timeout })?
            .map_err(q(what))?;
        // A transaction left open by a process that stopped mid-way (paused,
        // partitioned) is ended by the server, so the locks it holds (a row,
        // the lease row) are not held for longer than a statement may take.
        // A repair marks its transaction as sessiond's: it writes its own audit
        // rows, so the reference table's transition trigger (and the ones
        // `sessiond sql audit-triggers` prints) do not audit it twice.
        // JIT is off: every statement sessiond sends is a lookup by key, a batch
        // of them, or the live rows' sequential scan, and compiling one costs
        // more than it saves. The planner's estimate for a lookup per listed id can
        // pass `jit_optimize_above_cost`, and the server then spent 50-90 ms a
        // pass compiling the audit lookup (measured at 1M sessions).
        let writer = if matches!(kind, Tx::Write) { "; SET LOCAL sessiond.writer = 'reconciler'" } else { "" };
        let settings = format!("{}{writer}", local_settings(statement_ms, lock_ms));
        tokio::time::timeout(timeout, tx.batch_execute(&settings))
            .await
            .map_err(|_| StoreError::Timeout { what, timeout })?
            .map_err(q(what))?;
        Ok(tx)
    }

    /// Begins, in one round trip, a read-only transaction on `snapshot`, one
    /// another transaction exported (`pg_export_snapshot()`): it sees exactly
    /// what that one sees. The transaction is left open on this connection;
    /// the caller ends it, or drops the connection.
    async fn begin_on_snapshot(&mut self, what: &'static str, snapshot: &str) -> Result<(), StoreError> {
        let statement_ms = self.statement_timeout.as_millis();
        let sql = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; {}",
            mapping::literal(snapshot),
            local_settings(statement_ms, statement_ms)
        );
        self.bounded(what, self.client.batch_execute(&sql)).await
    }

    /// A read for `sessiond check`, as one unnamed statement.
    pub async fn query(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.bounded("check the database", self.client.query_typed(sql, params)).await
    }

    /// Whether something sits between this connection and the server (a
    /// pooler such as PgBouncer, or a proxy): the server's own port differs
    /// from the one the URL reached, or the server sees a Unix-socket session
    /// where the URL used TCP. Returns what gave it away.
    pub async fn intermediary(&self, cfg: &DatabaseConfig) -> Result<Option<String>, StoreError> {
        let pg = pg_config(cfg)?;
        let tcp = match pg.get_hosts() {
            [tokio_postgres::config::Host::Tcp(h)] => h.clone(),
            // A Unix socket, or several hosts: nothing to compare with.
            _ => return Ok(None),
        };
        let url_port = match pg.get_ports() {
            [] => 5432,
            [p] => *p,
            _ => return Ok(None),
        };
        let row = self
            .bounded("read the server's port", self.client.query_typed_one("SELECT inet_server_port()", &[]))
            .await?;
        let server_port: Option<i32> = row.try_get(0).map_err(q("read the server's port"))?;
        Ok(match server_port {
            None => {
                Some(format!("the URL reaches {tcp}:{url_port} over TCP, but the server sees a Unix-socket session"))
            }
            Some(p) if i64::from(p) != i64::from(url_port) => {
                Some(format!("the URL reaches port {url_port}, but the server listens on port {p}"))
            }
            Some(_) => None,
        })
    }

    /// The TLS version of this connection, if it is encrypted.
    pub async fn tls(&self) -> Result<Option<String>, StoreError> {
        let rows = self.query("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl", &[]).await?;
        Ok(rows.first().and_then(|r| r.try_get(0).ok()))
    }

    /// Fails unless sessiond's schema is exactly the version this build needs.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        const WHAT: &str = "read the schema version";
        let record = self.own("sessiond_schema_migrations");
        let exists = self
            .bounded(WHAT, self.client.query_typed_one("SELECT to_regclass($1) IS NOT NULL", &[(&record, Type::TEXT)]))
            .await?;
        let found: i32 = if exists.get::<_, bool>(0) {
            self.bounded(
                WHAT,
                self.client.query_typed_one(&format!("SELECT coalesce(max(version), 0) FROM {record}"), &[]),
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

    /// Reads what the catalog says about the configured sessions table.
    pub async fn catalog(&self, sessions: &SessionsConfig) -> Result<Option<mapping::Catalog>, StoreError> {
        const WHAT: &str = "read the sessions table's catalog";
        let name = sessions.table.quoted();
        let table = self
            .bounded(
                WHAT,
                self.client.query_typed_opt(
                    "SELECT n.nspname::text, c.relname::text, c.relkind::text, c.oid
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.oid = to_regclass($1)",
                    &[(&name, Type::TEXT)],
                ),
            )
            .await?;
        let Some(table) = table else { return Ok(None) };
        let oid: u32 = table.try_get(3).map_err(q(WHAT))?;
        let rows = self
            .bounded(
                WHAT,
                self.client.query_typed(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typname::text, t.typtype::text,
                            a.attnotnull, a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '',
                            ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid
                                   ORDER BY e.enumsortorder)
                       FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                      WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                      ORDER BY a.attnum",
                    &[(&oid, Type::OID)],
                ),
            )
            .await?;
        let mut columns = Vec::with_capacity(rows.len());
        let mut enum_labels = Vec::new();
        for r in rows {
            let name: String = r.try_get(0).map_err(q(WHAT))?;
            let labels: Vec<String> = r.try_get(6).map_err(q(WHAT))?;
            let type_kind: String = r.try_get(3).map_err(q(WHAT))?;
            if type_kind == "e" {
                enum_labels.push((name.clone(), labels));
            }
            columns.push(mapping::CatalogColumn {
                name,
                sql_type: r.try_get(1).map_err(q(WHAT))?,
                type_name: r.try_get(2).map_err(q(WHAT))?,
                type_kind,
                not_null: r.try_get(4).map_err(q(WHAT))?,
                filled: r.try_get(5).map_err(q(WHAT))?,
            });
        }
        Ok(Some(mapping::Catalog {
            schema: table.try_get(0).map_err(q(WHAT))?,
            name: table.try_get(1).map_err(q(WHAT))?,
            relkind: table.try_get(2).map_err(q(WHAT))?,
            columns,
            enum_labels,
        }))
    }

    /// Checks the configured sessions table against the catalog and builds its
    /// statements. A table that does not fit is a [`MappingError`].
    pub async fn bind_table(&mut self, sessions: &SessionsConfig, policy: &PolicyConfig) -> Result<&Table, StoreError> {
        let catalog = self.catalog(sessions).await?;
        let table = Table::bind(sessions, catalog, &self.schema, policy)?;
        Ok(self.table.insert(table))
    }

    /// sessiond's memory of each instance's boot ids.
    pub async fn load_boots(&self) -> Result<BootRecords, StoreError> {
        const WHAT: &str = "read instance state";
        let sql = format!(
            "SELECT controller_instance, boot_id, boot_changed_at, seen_boot_ids, inconsistent_since FROM {}",
            self.own("sessiond_instance_state")
        );
        let rows = self.bounded(WHAT, self.client.query_typed(&sql, &[])).await?;
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
    pub async fn save_boots(&mut self, boots: &BootRecords) -> Result<(), StoreError> {
        const WHAT: &str = "save instance state";
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
        let sql = format!(
            "INSERT INTO {t} (controller_instance, boot_id, boot_changed_at, seen_boot_ids, inconsistent_since,
                              updated_at)
             SELECT n, b, c, ARRAY(SELECT jsonb_array_elements_text(h::jsonb)), i, now()
               FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::timestamptz[])
                 AS t(n, b, c, h, i)
             ON CONFLICT (controller_instance) DO UPDATE
                SET boot_id = EXCLUDED.boot_id, boot_changed_at = EXCLUDED.boot_changed_at,
                    seen_boot_ids = EXCLUDED.seen_boot_ids, inconsistent_since = EXCLUDED.inconsistent_since,
                    updated_at = now()",
            t = self.own("sessiond_instance_state")
        );
        let params: [(&(dyn ToSql + Sync), Type); 5] = [
            (&names, Type::TEXT_ARRAY),
            (&trusted, Type::TEXT_ARRAY),
            (&changed, Type::TIMESTAMPTZ_ARRAY),
            (&history, Type::TEXT_ARRAY),
            (&inconsistent, Type::TIMESTAMPTZ_ARRAY),
        ];
        self.write(WHAT, &sql, &params).await.map(|_| ())
    }
}

fn spawn_connection<S, T>(conn: tokio_postgres::Connection<S, T>) -> tokio::task::JoinHandle<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "database connection ended");
        }
    })
}

/// The connection settings of the URL, without the parameters tokio-postgres
/// does not know (`sslmode`'s verify modes and `sslrootcert`, which sessiond
/// handles itself), and with the password from `password_file`.
fn pg_config(cfg: &DatabaseConfig) -> Result<tokio_postgres::Config, StoreError> {
    let bad = |problem: String| StoreError::Tls { url: cfg.url.clone(), problem };
    let mut url = reqwest::Url::parse(&cfg.url).map_err(|e| bad(e.to_string()))?;
    // The other parameters are kept exactly as written (their encoding too).
    let kept: Vec<String> = url
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("sslmode=") && !p.starts_with("sslrootcert="))
        .map(str::to_owned)
        .collect();
    url.set_query((!kept.is_empty()).then(|| kept.join("&")).as_deref());
    let mut pg: tokio_postgres::Config =
        url.as_str().parse().map_err(|source| StoreError::Connect { url: cfg.url.clone(), source })?;
    if let Some(p) = &cfg.password {
        pg.password(p.expose());
    }
    // Which process each server session belongs to, in pg_stat_activity.
    pg.application_name(format!("sessiond/{}", std::process::id()))
        .connect_timeout(cfg.statement_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .ssl_mode(match cfg.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
    Ok(pg)
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
