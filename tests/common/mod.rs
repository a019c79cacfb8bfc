//! Test harness: every test gets its own throw-away database on a real
//! PostgreSQL server, and real simulated controllers over HTTP.
//!
//! The server is `SESSIOND_TEST_DATABASE_URL` (default the local one on
//! 127.0.0.1:5432). If nothing answers there, the harness starts a private server
//! from the installed binaries in `/tmp/sessiond-test-pg-<uid>` (port
//! `SESSIOND_TEST_PG_PORT`, default 54329), shared by all test processes through
//! a file lock and left running for the next run. If there are no binaries
//! either, the test fails with what to install: it never skips.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sessiond::config::{Config, Overrides};
use sessiond::pgcluster::PrivateCluster;
use sessiond::simctl::SimController;
use tokio_postgres::NoTls;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

static SERVER: OnceLock<String> = OnceLock::new();

fn probe(url: &str) -> bool {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return false };
        rt.block_on(async {
            matches!(
                tokio::time::timeout(Duration::from_secs(3), tokio_postgres::connect(&url, NoTls)).await,
                Ok(Ok(_))
            )
        })
    })
    .join()
    .unwrap_or(false)
}

/// The admin URL of the server tests use, starting a private one if needed.
pub fn server_url() -> String {
    SERVER
        .get_or_init(|| {
            let url = std::env::var("SESSIOND_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
            if probe(&url) {
                return url;
            }
            let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
            let dir = PathBuf::from(format!("/tmp/sessiond-test-pg-{uid}"));
            let port: u16 = std::env::var("SESSIOND_TEST_PG_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(54329);
            std::fs::create_dir_all("/tmp").ok();
            let lock_path = PathBuf::from(format!("/tmp/sessiond-test-pg-{uid}.lock"));
            let lock = std::fs::File::create(&lock_path)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", lock_path.display()));
            lock.lock().unwrap_or_else(|e| panic!("cannot lock {}: {e}", lock_path.display()));
            let cluster = PrivateCluster::new(&dir, port)
                .unwrap_or_else(|e| panic!("no PostgreSQL answers at {url} and no private server can be started: {e}"));
            let private = cluster.url("postgres");
            if !probe(&private) {
                cluster
                    .start()
                    .unwrap_or_else(|e| panic!("no PostgreSQL answers at {url}; starting a private one failed: {e}"));
            }
            drop(lock);
            assert!(probe(&private), "the private PostgreSQL at {private} does not answer");
            private
        })
        .clone()
}

fn with_db(url: &str, db: &str) -> String {
    let mut u = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("bad server URL {url}: {e}"));
    u.set_path(&format!("/{db}"));
    u.to_string()
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&server_url(), NoTls).await.expect("connect to the admin database");
    tokio::spawn(conn);
    client
}

/// A throw-away database, dropped when this value is.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A new empty database.
    pub async fn empty() -> TestDb {
        let name = format!("sessiond_test_{}", uuid::Uuid::new_v4().simple());
        admin().await.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create the test database");
        let url = with_db(&server_url(), &name);
        TestDb { name, url }
    }

    /// A new database with the reference schema applied.
    pub async fn migrated() -> TestDb {
        let db = TestDb::empty().await;
        db.migrate().await;
        db
    }

    /// Applies sessiond's schema with the reference table.
    pub async fn migrate(&self) {
        let cfg = sessiond::config::DatabaseConfig::for_url(&self.url);
        let mut store = sessiond::store::Store::connect(&cfg).await.expect("connect");
        let sessions = sessiond::config::SessionsConfig::reference(&cfg.schema);
        store.migrate(&sessions).await.expect("migrate");
        // As `sessiond migrate` does: the lookup function, made from the table.
        store.bind_table(&sessions, &Default::default()).await.expect("bind the reference table");
        store.install_lookup(&sessions).await.expect("make sessiond_lookup");
    }

    /// The repair that ends the reference row of `id` as an orphan, at the
    /// version it has now.
    pub async fn orphan_update(&self, id: &str) -> sessiond::store::RowUpdate {
        let version: String = self
            .client()
            .await
            .query_one("SELECT xmin::text FROM sessions WHERE session_id = $1", &[&id])
            .await
            .expect("xmin")
            .get(0);
        sessiond::store::RowUpdate {
            id: sessiond::model::SessionId::from_row(id.to_owned()),
            version,
            from: sessiond::model::RowState::Active,
            to: sessiond::model::RowState::Stopped,
            owner_id: None,
            controller_instance: None,
            end_reason: Some("orphaned"),
            reason: "orphaned",
            details: serde_json::json!({}),
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, NoTls).await.expect("connect to the test database");
        tokio::spawn(conn);
        client
    }

    /// Inserts a row with explicit timestamps.
    pub async fn insert(&self, id: &str, owner: &str, instance: &str, state: &str, created_at: DateTime<Utc>) {
        let deleted_at = (state == "deleted").then_some(created_at);
        self.client()
            .await
            .execute(
                "INSERT INTO sessions (session_id, owner_id, controller_instance, state, created_at, updated_at, deleted_at)
                 VALUES ($1, $2, $3, $4, $5, $5, $6)",
                &[&id, &owner, &instance, &state, &created_at, &deleted_at],
            )
            .await
            .expect("insert a session row");
    }

    /// The state of a row, or None if it does not exist.
    pub async fn state(&self, id: &str) -> Option<String> {
        self.client()
            .await
            .query_opt("SELECT state FROM sessions WHERE session_id = $1", &[&id])
            .await
            .expect("read a row")
            .map(|r| r.get(0))
    }

    /// (old_state, new_state, reason) of every audit row sessiond wrote for
    /// `id` (trigger `reconciler`), oldest first. The reference table also
    /// audits the tests' own writes, as the application's (`app`).
    pub async fn audit(&self, id: &str) -> Vec<(Option<String>, Option<String>, String)> {
        self.client()
            .await
            .query(
                "SELECT old_state, new_state, reason FROM session_audit
                  WHERE session_id = $1 AND trigger = 'reconciler' ORDER BY id",
                &[&id],
            )
            .await
            .expect("read the audit trail")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// The one value of a one-row, one-column `bigint` query.
    pub async fn scalar(&self, sql: &str) -> i64 {
        self.client().await.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    /// Audit rows sessiond wrote (trigger `reconciler`).
    pub async fn audit_count(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM session_audit WHERE trigger = 'reconciler'", &[])
            .await
            .expect("count audit")
            .get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        admin_blocking(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

/// Runs one admin statement on the test server from a plain thread: for `Drop`,
/// which runs outside any runtime (or while one unwinds). Errors are ignored.
pub fn admin_blocking(sql: String) {
    let url = server_url();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            if let Ok((client, conn)) = tokio_postgres::connect(&url, NoTls).await {
                tokio::spawn(conn);
                let _ = client.batch_execute(&sql).await;
            }
        })
    })
    .join();
}

/// Waits (up to 10 s) until at least `n` sessiond backends of `db` are blocked on
/// a lock; returns whether they were.
pub async fn wait_for_blocked_sessiond(db: &TestDb, n: i64) -> bool {
    let c = db.client().await;
    for _ in 0..200 {
        let blocked: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND application_name LIKE 'sessiond/%' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("read pg_stat_activity")
            .get(0);
        if blocked >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A pass's repair outcomes as sorted `kind.outcome=count` strings.
pub fn outcomes(rep: &sessiond::reconcile::PassReport) -> Vec<String> {
    let mut v: Vec<String> =
        rep.outcomes_by_kind().into_iter().map(|((k, o), n)| format!("{}.{o}={n}", k.as_str())).collect();
    v.sort();
    v
}

/// A valid session id, distinct per `n`.
pub fn sid(n: u32) -> String {
    format!("exec_20261121_095958_{n:08x}")
}

/// `seconds` ago.
pub fn ago(seconds: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::seconds(seconds)
}

/// A config for these controllers and this database. `extra` is TOML appended
/// under `[reconcile]` (e.g. `"grace = \"0s\""`).
pub fn config_text(db: &TestDb, ctrls: &[&SimController], reconcile: &str) -> String {
    TestConfig::new(db).controllers(ctrls).reconcile_toml(reconcile).toml()
}

/// A sessiond config for the tests, built as TOML values rather than by
/// editing text: `[daemon]` (interval 1 s), `[database]` (this database,
/// statement_timeout 5 s), a `[[controller]]` per simulated controller
/// (timeout 2 s) and `[reconcile]`.
pub struct TestConfig {
    daemon: toml::Table,
    database: toml::Table,
    controllers: Vec<toml::Table>,
    reconcile: toml::Table,
}

impl TestConfig {
    pub fn new(db: &TestDb) -> TestConfig {
        TestConfig::for_url(&db.url)
    }

    /// For a database that is not a [`TestDb`] (a private cluster, say).
    pub fn for_url(url: &str) -> TestConfig {
        let mut daemon = toml::Table::new();
        daemon.insert("interval".into(), "1s".into());
        let mut database = toml::Table::new();
        database.insert("url".into(), url.into());
        database.insert("statement_timeout".into(), "5s".into());
        TestConfig { daemon, database, controllers: Vec::new(), reconcile: toml::Table::new() }
    }

    pub fn controllers(mut self, ctrls: &[&SimController]) -> TestConfig {
        for c in ctrls {
            let mut t = toml::Table::new();
            t.insert("name".into(), c.instance().into());
            t.insert("url".into(), c.url().into());
            t.insert("stop_url".into(), c.stop_url().into());
            t.insert("timeout".into(), "2s".into());
            self.controllers.push(t);
        }
        self
    }

    pub fn daemon(mut self, key: &str, value: impl Into<toml::Value>) -> TestConfig {
        self.daemon.insert(key.into(), value.into());
        self
    }

    /// Removes `key` from `[daemon]`: its default applies.
    pub fn unset_daemon(mut self, key: &str) -> TestConfig {
        self.daemon.remove(key);
        self
    }

    pub fn database(mut self, key: &str, value: impl Into<toml::Value>) -> TestConfig {
        self.database.insert(key.into(), value.into());
        self
    }

    /// Sets `key` on every controller.
    pub fn controller(mut self, key: &str, value: impl Into<toml::Value>) -> TestConfig {
        let value = value.into();
        for c in &mut self.controllers {
            c.insert(key.into(), value.clone());
        }
        self
    }

    pub fn reconcile(mut self, key: &str, value: impl Into<toml::Value>) -> TestConfig {
        self.reconcile.insert(key.into(), value.into());
        self
    }

    /// Keys for `[reconcile]` written as TOML (e.g. [`IMMEDIATE`]).
    pub fn reconcile_toml(mut self, text: &str) -> TestConfig {
        let extra: toml::Table = text.parse().unwrap_or_else(|e| panic!("bad [reconcile] TOML {text:?}: {e}"));
        self.reconcile.extend(extra);
        self
    }

    pub fn toml(&self) -> String {
        let mut doc = toml::Table::new();
        doc.insert("daemon".into(), self.daemon.clone().into());
        doc.insert("database".into(), self.database.clone().into());
        if !self.controllers.is_empty() {
            let controllers = self.controllers.iter().cloned().map(Into::into).collect();
            doc.insert("controller".into(), toml::Value::Array(controllers));
        }
        doc.insert("reconcile".into(), self.reconcile.clone().into());
        toml::to_string(&doc).unwrap_or_else(|e| panic!("render the test config: {e}"))
    }
}

pub fn config(db: &TestDb, ctrls: &[&SimController], reconcile: &str) -> Arc<Config> {
    let text = config_text(db, ctrls, reconcile);
    Arc::new(
        Config::from_toml(std::path::Path::new("test.toml"), &text, &Overrides::default())
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}")),
    )
}

/// Settings that let a single `once`-style pass act immediately.
pub const IMMEDIATE: &str = "grace = \"0s\"\nconfirmations = 1";

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A `sessiond run` process, killed on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `sessiond run` with `config` (its `[daemon]` table is replaced so the
    /// daemon listens on a free port) and waits until /healthz answers.
    pub async fn start(config: &str) -> Daemon {
        Daemon::start_with(config, "").await
    }

    /// As [`Daemon::start`], with extra `[daemon]` keys (e.g. `mode = "observe"`).
    pub async fn start_with(config: &str, daemon_extra: &str) -> Daemon {
        Daemon::start_on(config, daemon_extra, 0).await
    }

    /// As [`Daemon::start_with`], on a given port (0: any free one, read back
    /// from the daemon's start-up line); a given port makes a restart at the
    /// same address, as Prometheus sees one.
    pub async fn start_on(config: &str, daemon_extra: &str, port: u16) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = String::new();
        let mut skipping = false;
        for line in config.lines() {
            if line.starts_with('[') {
                skipping = line == "[daemon]";
            }
            if !skipping {
                text.push_str(line);
                text.push('\n');
            }
        }
        let text = format!("[daemon]\ninterval = \"500ms\"\nlisten = \"127.0.0.1:{port}\"\n{daemon_extra}\n\n{text}");
        let path = dir.path().join("sessiond.toml");
        std::fs::write(&path, text).expect("write the config");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .args(["run", "--config"])
            .arg(&path)
            // Warnings, and the start-up line that says where it listens.
            .env("SESSIOND_LOG", "warn,sessiond::cli=info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sessiond run");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = listen_addr(&line) {
                    let _ = tx.send(addr);
                } else {
                    eprintln!("{line}");
                }
            }
        });
        let bound =
            tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20))).await.expect("join").ok();
        let Some(bound) = bound else {
            let _ = child.kill();
            panic!("sessiond run never said where it listens (config {})", path.display());
        };
        let port = bound.port();
        let d = Daemon { child, port, dir };
        if daemon_extra.contains("web_config_file") {
            return d; // TLS or auth: the caller knows how to talk to it
        }
        for _ in 0..100 {
            if d.get("/healthz").await.is_some() {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sessiond run never answered /healthz on port {port}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// (status, content type, body) of a GET, or None if nothing answered.
    pub async fn get(&self, path: &str) -> Option<(u16, String, String)> {
        let resp = http().get(self.url(path)).send().await.ok()?;
        let status = resp.status().as_u16();
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        Some((status, ct, resp.text().await.ok()?))
    }

    /// Waits until /readyz says ready.
    pub async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Some((200, _, _)) = self.get("/readyz").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sessiond never became ready: {:?}", self.get("/readyz").await);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of an external tool the tests need, or a failure saying what to install.
pub fn tool(name: &str, package: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    // Daemons (pgbouncer) install to sbin, which a user's PATH may lack.
    for dir in ["/usr/sbin", "/sbin"] {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not installed: install Debian's `{package}` package (apt-get install {package}); .ci/run does this"
    );
}

/// A child process killed when dropped, so a failing assertion leaks no daemon.
pub struct Guarded(pub Option<std::process::Child>);

impl Guarded {
    pub fn child(&self) -> &std::process::Child {
        self.0.as_ref().expect("the child is held until taken")
    }
    pub fn take(mut self) -> std::process::Child {
        self.0.take().expect("the child is held until taken")
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `sessiond` binary with a clean environment: no `DATABASE_URL` or
/// `SESSIOND_CONFIG` from the caller, logs at `warn`.
pub fn sessiond(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_sessiond"));
    c.args(args).env_remove("DATABASE_URL").env_remove("SESSIOND_CONFIG").env("SESSIOND_LOG", "warn");
    c
}

/// Runs the binary to completion.
pub fn run(args: &[&str]) -> std::process::Output {
    sessiond(args).output().expect("run sessiond")
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write a file");
    p
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The address in a `sessiond run` start-up line (`serving /metrics …
/// listen=ADDR`), if `line` is one.
pub fn listen_addr(line: &str) -> Option<std::net::SocketAddr> {
    if !line.contains("serving /metrics") {
        return None;
    }
    line.split_whitespace().find_map(|w| w.strip_prefix("listen=")).and_then(|a| a.parse().ok())
}

/// The port a `sessiond run` that logs at info to `log` listens on, once it
/// has said so (a config with `listen = "127.0.0.1:0"` binds any free port).
pub async fn listen_port_from_log(log: &std::path::Path) -> u16 {
    for _ in 0..400 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = text.lines().find_map(listen_addr) {
            return addr.port();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "sessiond never said where it listens; its log {}:\n{}",
        log.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Polls `check` every 100 ms for up to 10 s; fails naming `what` if it
/// never holds.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never: {what}");
}

/// Waits up to `timeout` for `child` to exit, then kills it; returns its
/// output, with the status it exited with (or the kill's).
pub async fn wait_exit(mut child: std::process::Child, timeout: Duration) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait_with_output().expect("wait for the child")
    })
    .await
    .expect("join")
}

/// Sends a signal (`STOP`, `CONT`, `KILL`, `TERM`, …) to a process.
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("kill");
    assert!(ok.success(), "kill -{sig} {pid} failed");
}

/// An HTTP client for the tests (rustls with the `ring` provider).
pub fn http() -> reqwest::Client {
    sessiond::tls::install_default_provider();
    reqwest::Client::new()
}

/// A certificate authority made for a test with `openssl`, and the certificates
/// it issues.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            path(&key),
            "-out",
            path(&cert),
        ]);
        TestCa { dir, cert, key }
    }

    /// A server certificate for `sans` (e.g. `IP:127.0.0.1,DNS:localhost`):
    /// (certificate, key).
    pub fn issue(&self, name: &str, sans: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let (cert, key, csr, ext) = (
            d.join(format!("{name}.crt")),
            d.join(format!("{name}.key")),
            d.join(format!("{name}.csr")),
            d.join(format!("{name}.ext")),
        );
        std::fs::write(&ext, format!("subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")).expect("write ext");
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            path(&key),
            "-out",
            path(&csr),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            path(&csr),
            "-CA",
            path(&self.cert),
            "-CAkey",
            path(&self.key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            path(&ext),
            "-out",
            path(&cert),
        ]);
        (cert, key)
    }
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn openssl(args: &[&str]) {
    let out = std::process::Command::new(tool("openssl", "openssl")).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The Python of a virtual environment with the reference controller's
/// requirements (`examples/python/requirements.txt`), made on first use in
/// `target/test-venv` from the machine's `python3` and PyPI (`.ci/run` makes it
/// up front). Shared by every test process through a file lock; remade when
/// the requirements change.
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            let venv = root.join("target/test-venv");
            let requirements = root.join("examples/python/requirements.txt");
            let wanted = std::fs::read_to_string(&requirements).expect("read examples/python/requirements.txt");
            let stamp = venv.join("requirements.stamp");
            std::fs::create_dir_all(root.join("target")).expect("create target/");
            let lock_path = root.join("target/test-venv.lock");
            let lock = std::fs::File::create(&lock_path).expect("create the venv lock");
            lock.lock().expect("lock the venv");
            let python = venv.join("bin/python");
            if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
                let system = tool("python3", "python3-venv");
                let made = std::process::Command::new(system).args(["-m", "venv", "--clear"]).arg(&venv).output();
                let made = made.expect("run python3 -m venv");
                assert!(
                    made.status.success(),
                    "python3 -m venv failed: install Debian's python3-venv (.ci/run does): {}",
                    String::from_utf8_lossy(&made.stderr)
                );
                let pip = std::process::Command::new(&python)
                    .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
                    .arg(&requirements)
                    .output()
                    .expect("run pip");
                assert!(
                    pip.status.success(),
                    "pip install -r examples/python/requirements.txt failed (PyPI must be reachable): {}",
                    String::from_utf8_lossy(&pip.stderr)
                );
                std::fs::write(&stamp, &wanted).expect("write the venv stamp");
            }
            drop(lock);
            python
        })
        .clone()
}

/// The reference controller (`examples/python/serve.py`) in `processes`
/// processes sharing one port; killed on drop.
pub struct PythonController {
    pub child: Guarded,
    pub port: u16,
}

impl Drop for PythonController {
    fn drop(&mut self) {
        // serve.py forks its workers into its own process group: end them all.
        if let Some(child) = &self.child.0 {
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
        }
    }
}

impl PythonController {
    pub async fn start(instance: &str, processes: usize) -> PythonController {
        let python = python();
        let port = free_port();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python");
        let child = std::process::Command::new(python)
            .arg("serve.py")
            .args(["--port", &port.to_string(), "--processes", &processes.to_string()])
            .current_dir(dir)
            .process_group(0)
            .env("CONTROLLER_INSTANCE", instance)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start the reference controller");
        let c = PythonController { child: Guarded(Some(child)), port };
        for _ in 0..200 {
            if http().get(c.url()).send().await.is_ok_and(|r| r.status().is_success()) {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the reference controller never answered on port {port}");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/internal/sessions", self.port)
    }

    pub fn stop_url(&self) -> String {
        format!("http://127.0.0.1:{}/internal/sessions/{{session_id}}/stop", self.port)
    }

    /// A new session in whichever process takes the connection: (id, boot id).
    pub async fn create(&self, owner: &str) -> (String, String) {
        let body = http()
            .post(format!("http://127.0.0.1:{}/sessions", self.port))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "owner_id": owner }).to_string())
            .send()
            .await
            .expect("POST /sessions")
            .text()
            .await
            .expect("a body");
        let resp: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        (
            resp["session_id"].as_str().expect("an id").to_owned(),
            resp["boot_id"].as_str().expect("a boot id").to_owned(),
        )
    }

    /// A cleanup that cleared memory but not the row (single process only).
    pub async fn forget(&self, id: &str) {
        let resp = http()
            .post(format!("http://127.0.0.1:{}/sessions/{id}/forget", self.port))
            .send()
            .await
            .expect("POST forget");
        assert!(resp.status().is_success());
    }

    /// This controller as a `[[controller]]` table.
    pub fn controller_toml(&self, name: &str) -> String {
        format!(
            "[[controller]]\nname = \"{name}\"\nurl = \"{}\"\nstop_url = \"{}\"\ntimeout = \"3s\"\n\n",
            self.url(),
            self.stop_url()
        )
    }
}

/// The controller document's JSON Schema (`docs/controller-contract.schema.json`),
/// with formats (date-time) checked.
pub fn contract_schema() -> jsonschema::Validator {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/controller-contract.schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read the schema")).expect("the schema is JSON");
    jsonschema::options().should_validate_formats(true).build(&schema).expect("a valid schema")
}

/// Why `doc` does not match the contract's schema, if it does not.
pub fn schema_errors(doc: &serde_json::Value) -> Vec<String> {
    contract_schema().iter_errors(doc).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

/// Runs the binary to completion off the test's runtime, which keeps serving
/// the simulated controllers meanwhile.
pub async fn run_async(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&a)
    })
    .await
    .expect("join")
}

/// The definition of a table as `pg_dump --schema-only` prints it: columns,
/// constraints, indexes and triggers.
pub fn table_definition(url: &str, table: &str) -> String {
    let out = std::process::Command::new(tool("pg_dump", "postgresql-client"))
        .args(["--schema-only", "--no-owner", "--no-privileges", "--table", table, url])
        .output()
        .expect("run pg_dump");
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
    // Newer pg_dump fences its output with a random key: not part of the table.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A role created from one of the shipped SQL templates, dropped (after its
/// database, so declare it first) on drop.
pub struct Role {
    pub name: String,
}

impl Role {
    pub fn create(db: &TestDb, template: &str) -> Role {
        let name = format!("sessiond_role_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let sql = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(template);
        let out = std::process::Command::new(tool("psql", "postgresql-client"))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-v"])
            .arg(format!("role={name}"))
            .arg("-d")
            .arg(&db.url)
            .arg("-f")
            .arg(&sql)
            .output()
            .expect("run psql");
        assert!(out.status.success(), "{template} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        Role { name }
    }

    /// `url` with this role as its user.
    pub fn url(&self, url: &str) -> String {
        let mut u = reqwest::Url::parse(url).expect("a URL");
        let _ = u.set_username(&self.name);
        u.to_string()
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        admin_blocking(format!("DROP ROLE IF EXISTS {}", self.name));
    }
}

/// A PgBouncer in transaction pooling mode in front of the test server, as
/// replicas behind a pooler would use it; stopped when dropped.
pub struct Bouncer {
    pub port: u16,
    process: Guarded,
    dir: PathBuf,
}

impl Bouncer {
    /// Starts Debian's `pgbouncer` on a free port. It refuses to run as root,
    /// so as root it switches to `postgres` (or `nobody`).
    pub async fn start() -> Bouncer {
        Bouncer::start_with_pool(20).await
    }

    /// The same with `pool_size` server connections per database and user.
    pub async fn start_with_pool(pool_size: u32) -> Bouncer {
        let bin = tool("pgbouncer", "pgbouncer");
        let server = reqwest::Url::parse(&server_url()).expect("the server URL parses");
        let host = server.host_str().unwrap_or("127.0.0.1").to_owned();
        let server_port = server.port().unwrap_or(5432);
        let user = server.username().to_owned();
        let port = free_port();
        // Not a private temp dir: the unprivileged user must read it.
        let dir = PathBuf::from(format!("/tmp/sessiond-test-bouncer-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the PgBouncer directory");
        let ini = format!(
            "[databases]\n* = host={host} port={server_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
             pool_mode = transaction\nmax_client_conn = 500\ndefault_pool_size = {pool_size}\n\
             server_reset_query =\nignore_startup_parameters = extra_float_digits\n",
            users = dir.join("userlist.txt").display()
        );
        write(&dir, "pgbouncer.ini", &ini);
        write(&dir, "userlist.txt", &format!("\"{user}\" \"\"\n"));
        let mut cmd = std::process::Command::new(bin);
        if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0) == 0 {
            use std::os::unix::fs::PermissionsExt;
            for p in [dir.clone(), dir.join("pgbouncer.ini"), dir.join("userlist.txt")] {
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
            }
            let run_as = if std::process::Command::new("id").arg("postgres").output().is_ok_and(|o| o.status.success())
            {
                "postgres"
            } else {
                "nobody"
            };
            cmd.args(["-u", run_as]);
        }
        let log = std::fs::File::create(dir.join("pgbouncer.log")).expect("create the PgBouncer log");
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pgbouncer");
        let b = Bouncer { port, process: Guarded(Some(child)), dir };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("pgbouncer never listened on {port}: {}", b.log());
    }

    /// `db`'s URL through this PgBouncer.
    pub fn url(&self, db: &TestDb) -> String {
        let mut u = reqwest::Url::parse(&db.url).expect("the database URL parses");
        u.set_port(Some(self.port)).expect("set the port");
        u.to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if let Some(mut c) = self.process.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
