//! Hostile environments, against the real binary and a real PostgreSQL: bad
//! values in a controller's list, a process paused between its reads, rows and
//! tables the application holds locked, a database connection killed while
//! stops are in flight, a daemon killed in the middle of a stop batch, a
//! controller whose clock is wrong, ambiguous listings, a password flood, and
//! credentials in URLs. `docs/reliability.md` lists what each guarantees.

mod common;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{ago, config_text, run, sessiond, sid, signal, text, write, Daemon, TestConfig, TestDb, IMMEDIATE};
use sessiond::simctl::{Fault, SimController};

/// Writes `config` and runs `sessiond once --json` on it, off the test's
/// runtime, which serves the simulated controllers meanwhile.
async fn once(dir: &tempfile::TempDir, config: &str) -> (Output, serde_json::Value) {
    let path = write(dir.path(), "sessiond.toml", config);
    let p = path.to_str().expect("utf-8 path").to_owned();
    let out = tokio::task::spawn_blocking(move || run(&["once", "--json", "--config", &p])).await.expect("join");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("once printed no JSON ({e}):\n{}\n{}", text(&out.stdout), text(&out.stderr)));
    (out, report)
}

/// `kind.outcome` of every finding that has an outcome, sorted.
fn outcomes(report: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = report["findings"]
        .as_array()
        .map(|fs| {
            fs.iter().filter_map(|f| Some(format!("{}.{}", f["kind"].as_str()?, f["outcome"].as_str()?))).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn count(items: &[String], what: &str) -> usize {
    items.iter().filter(|i| *i == what).count()
}

/// (kind, session) of every finding.
fn findings(report: &serde_json::Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .map(|f| (f["kind"].as_str().unwrap_or("").to_owned(), f["subject"].as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Every row's id and version: equal before and after means nothing was written.
async fn fingerprint(db: &TestDb) -> String {
    let sql = "SELECT coalesce(string_agg(session_id || ':' || xmin::text, ',' ORDER BY session_id), '') FROM sessions";
    db.client().await.query_one(sql, &[]).await.expect("fingerprint").get(0)
}

#[tokio::test]
async fn one_entry_or_row_that_cannot_be_stored_costs_only_itself() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    // The application's own rule, which sessiond knows nothing about.
    db.client()
        .await
        .batch_execute("ALTER TABLE sessions ADD CONSTRAINT no_banned_owner CHECK (owner_id NOT LIKE 'banned%')")
        .await
        .expect("add a constraint");
    for i in 0..10 {
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(600)));
    }
    a.add(&sid(20), "nul\0owner", "running", Some(ago(600)));
    a.add(&sid(21), &"x".repeat(1 << 20), "running", Some(ago(600)));
    a.add(&sid(22), "banned-1", "running", Some(ago(600)));
    for i in 30..33 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "stopped", ago(600)).await;
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(700)));
    }
    let dir = tempfile::tempdir().expect("tempdir");

    let (out, report) = once(&dir, &config_text(&db, &[&a], IMMEDIATE)).await;

    let o = outcomes(&report);
    assert_eq!(count(&o, "unpersisted.repaired"), 10, "{o:?}");
    assert_eq!(count(&o, "unpersisted.failed"), 1, "only the refused row fails: {o:?}");
    assert_eq!(count(&o, "zombie.repaired"), 3, "{o:?}");
    let refused = report["findings"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["subject"] == sid(22).as_str()))
        .expect("the refused row's finding");
    assert!(refused["error"].as_str().unwrap_or("").contains("no_banned_owner"), "{refused}");
    let f = findings(&report);
    assert!(f.contains(&("invalid_entry".into(), sid(20))), "{f:?}");
    assert!(f.contains(&("invalid_entry".into(), sid(21))), "{f:?}");
    assert_eq!(out.status.code(), Some(1), "a failed repair makes the pass partial");
    assert_eq!(db.scalar("SELECT count(*) FROM sessions WHERE state = 'active'").await, 10);
    assert_eq!(a.stops().len(), 3);
}

#[tokio::test]
async fn a_nul_byte_in_an_id_is_an_invalid_id_even_under_a_permissive_pattern() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.add("bad\0id", "u9", "running", Some(ago(600)));
    a.add(&"y".repeat(300), "u8", "running", Some(ago(600)));
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await; // an orphan
    let cfg = format!("{}\n[sessions]\nid_pattern = '^[^/]+$'\n", config_text(&db, &[&a], IMMEDIATE));
    let dir = tempfile::tempdir().expect("tempdir");

    let (out, report) = once(&dir, &cfg).await;

    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(report["outcome"], "ok");
    assert_eq!(outcomes(&report), ["orphaned.repaired"]);
    assert_eq!(findings(&report).iter().filter(|(k, _)| k == "invalid_id").count(), 2, "{report}");
}

#[tokio::test]
async fn a_daemon_paused_between_its_reads_writes_nothing_from_its_stale_view() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "paused", ago(600)).await;
    a.add(&sid(1), "u1", "paused", Some(ago(600)));
    let d = Daemon::start(&config_text(&db, &[&a], "grace = \"2s\"\nconfirmations = 1")).await;
    d.wait_ready().await;

    // Hold the daemon's next read: it has fetched the list (s1 paused) and
    // waits for the table. Then stop the process there, as a GC pause or a VM
    // migration would.
    let mut gate = db.client().await;
    let tx = gate.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE").await.expect("lock");
    assert!(common::wait_for_blocked_sessiond(&db, 1).await, "the daemon reached its read");
    signal(d.child.id(), "STOP");
    // Meanwhile the application resumes the session, on both sides.
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    tx.execute("UPDATE sessions SET state = 'active', updated_at = now() WHERE session_id = $1", &[&sid(1)])
        .await
        .expect("the application's write");
    tx.commit().await.expect("commit");
    // Longer than grace: measured against "now", the write would look settled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(d.child.id(), "CONT");
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"), "the stale list must not set the row back");
    assert_eq!(db.audit(&sid(1)).await, []);
}

#[tokio::test]
async fn a_row_the_application_holds_locked_costs_one_conflict_and_no_time() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    for i in 0..10 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
        // orphans
    }
    for i in 50..80 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "active", ago(600)).await; // healthy
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(600)));
    }
    for i in 10..15 {
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(600))); // unpersisted
    }
    for i in 20..23 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "stopped", ago(600)).await; // zombies
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(700)));
    }
    let mut app = db.client().await;
    let tx = app.transaction().await.expect("begin");
    tx.execute("UPDATE sessions SET updated_at = updated_at WHERE session_id = $1", &[&sid(3)])
        .await
        .expect("the application holds one orphan's row");
    let dir = tempfile::tempdir().expect("tempdir");

    let started = Instant::now();
    let (out, report) = once(&dir, &config_text(&db, &[&a], IMMEDIATE)).await;
    let took = started.elapsed();
    tx.rollback().await.expect("release");

    assert_eq!(out.status.code(), Some(0), "a conflict is not a failure: {}", text(&out.stderr));
    let o = outcomes(&report);
    assert_eq!(count(&o, "orphaned.repaired"), 9, "{o:?}");
    assert_eq!(count(&o, "orphaned.conflict"), 1, "{o:?}");
    assert_eq!(count(&o, "unpersisted.repaired"), 5, "{o:?}");
    assert_eq!(count(&o, "zombie.repaired"), 3, "{o:?}");
    // Without SKIP LOCKED the batch waits out the 1 s write lock timeout, then
    // the row alone does again: over 2 s. With it, nothing waits.
    assert!(took < Duration::from_millis(1500), "the pass waited on the lock: {took:?}");
}

/// Zombies `100..100+n` on `a`: stopped rows the controller still runs.
async fn zombies(db: &TestDb, a: &SimController, n: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 100..100 + n {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "stopped", ago(600)).await;
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(700)));
        ids.push(sid(i));
    }
    ids
}

/// Every zombie was stopped exactly once at the controller and has exactly one
/// audit row, and no intent is left open.
async fn each_stopped_and_audited_once(db: &TestDb, a: &SimController, ids: &[String]) {
    let mut stops = a.stops();
    stops.sort();
    assert_eq!(stops, ids, "one stop request per zombie");
    for id in ids {
        let audit = db.audit(id).await;
        assert_eq!(audit.len(), 1, "{id} has {audit:?}");
        assert_eq!(audit[0].2, "zombie");
    }
    assert_eq!(db.scalar("SELECT count(*) FROM sessiond_stop_intents WHERE settled_at IS NULL").await, 0);
}

/// Config for the stop tests: short timeouts, so abandoned intents expire soon.
fn stop_config(db: &TestDb, a: &SimController) -> String {
    TestConfig::new(db)
        .controllers(&[a])
        .reconcile_toml(IMMEDIATE)
        .database("statement_timeout", "1s")
        .controller("timeout", "1s")
        .toml()
}

#[tokio::test]
async fn stops_whose_audit_cannot_be_written_are_audited_by_a_later_pass() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let ids = zombies(&db, &a, 5).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = stop_config(&db, &a);

    // The audit table is locked for the whole pass: the stops go out, their
    // audit rows cannot be written.
    let mut gate = db.client().await;
    let tx = gate.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE session_audit IN ACCESS EXCLUSIVE MODE").await.expect("lock");
    let (out, report) = once(&dir, &cfg).await;
    tx.rollback().await.expect("release");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(count(&outcomes(&report), "zombie.failed"), 5, "{report}");
    assert_eq!(a.stops().len(), 5, "the stops were sent");
    assert_eq!(db.scalar("SELECT count(*) FROM sessiond_stop_intents WHERE settled_at IS NULL").await, 5);

    // Once the intents expire, the next pass settles them from the list.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (out, _) = once(&dir, &cfg).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    each_stopped_and_audited_once(&db, &a, &ids).await;
}

#[tokio::test]
async fn a_database_connection_killed_while_stops_are_in_flight_loses_no_audit_row() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let ids = zombies(&db, &a, 5).await;
    a.set_stop_delay(Duration::from_millis(1500));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "sessiond.toml", &config_text(&db, &[&a], IMMEDIATE));
    let child = common::Guarded(Some(
        sessiond(&["once", "--config", path.to_str().expect("utf-8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn once"),
    ));

    // Once the intents are on record the stops are in flight: kill the backend.
    let watcher = db.client().await;
    let mut open = 0;
    for _ in 0..100 {
        open = db.scalar("SELECT count(*) FROM sessiond_stop_intents WHERE settled_at IS NULL").await;
        if open == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, 5, "the intents were recorded");
    watcher
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name LIKE 'sessiond/%'",
            &[],
        )
        .await
        .expect("terminate sessiond's backend");
    let mut child = child.take();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");

    assert_eq!(status.code(), Some(0), "the pass re-made its connection and settled the stops");
    each_stopped_and_audited_once(&db, &a, &ids).await;
}

#[tokio::test]
async fn a_daemon_killed_in_the_middle_of_a_stop_batch_leaves_no_stop_unaudited_or_repeated() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let ids = zombies(&db, &a, 20).await;
    a.set_stop_delay(Duration::from_millis(400));
    let cfg = stop_config(&db, &a);
    let d = Daemon::start(&cfg).await;
    // Kill it once the first wave of stops has been carried out.
    for _ in 0..200 {
        if a.stops().len() >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(d.child.id(), "KILL");
    drop(d);
    assert!(a.stops().len() < 20, "killed before the batch ended");

    let d = Daemon::start(&cfg).await;
    for _ in 0..300 {
        let audited = db.scalar("SELECT count(*) FROM session_audit WHERE trigger = 'reconciler'").await;
        if audited >= 20 && a.stops().len() >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // nothing more may happen
    drop(d);
    each_stopped_and_audited_once(&db, &a, &ids).await;
}

#[tokio::test]
async fn a_controller_clock_behind_ours_does_not_turn_the_creation_race_into_inserts() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.set_clock_offset(chrono::Duration::seconds(-120));
    // Started a second ago: the application is about to insert these itself.
    for i in 0..40 {
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(1)));
    }
    // Started ten minutes ago and never persisted.
    a.add(&sid(99), "u99", "running", Some(ago(600)));
    let dir = tempfile::tempdir().expect("tempdir");

    let (_, report) = once(&dir, &config_text(&db, &[&a], "grace = \"30s\"\nconfirmations = 1")).await;

    assert_eq!(outcomes(&report), ["unpersisted.repaired"], "only the old one is inserted");
    assert_eq!(db.scalar("SELECT count(*) FROM sessions").await, 1);
}

#[tokio::test]
async fn an_id_listed_twice_or_by_two_instances_drives_no_write() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let b = SimController::start("ctrl-b").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "paused", ago(600)).await;
    db.insert(&sid(2), "u2", "ctrl-b", "active", ago(600)).await;
    let doc = serde_json::json!({
        "instance": "ctrl-a", "boot_id": "b1", "generated_at": chrono::Utc::now().to_rfc3339(),
        "sessions": [
            {"session_id": sid(1), "owner_id": "u1", "state": "running", "started_at": ago(600).to_rfc3339()},
            {"session_id": sid(1), "owner_id": "u1", "state": "paused", "started_at": ago(600).to_rfc3339()},
            {"session_id": sid(2), "owner_id": "u2", "state": "running", "started_at": ago(600).to_rfc3339()},
        ]
    });
    a.set_fault(Fault::Raw(doc.to_string()));
    b.add(&sid(2), "u2", "running", Some(ago(600)));
    let before = fingerprint(&db).await;
    let dir = tempfile::tempdir().expect("tempdir");

    let (_, report) = once(&dir, &config_text(&db, &[&a, &b], IMMEDIATE)).await;

    assert_eq!(outcomes(&report), Vec::<String>::new(), "nothing is repaired");
    let f = findings(&report);
    assert!(f.contains(&("invalid_entry".into(), sid(1))) && f.contains(&("invalid_entry".into(), sid(2))), "{f:?}");
    assert_eq!(fingerprint(&db).await, before, "no row was written");
    assert!(a.stops().is_empty() && b.stops().is_empty());
}

/// A web config with one bcrypt user, `prom` / `right`.
fn web_config(dir: &tempfile::TempDir) -> PathBuf {
    let hash = bcrypt::hash("right", 10).expect("hash");
    write(dir.path(), "web.yml", &format!("basic_auth_users:\n  prom: '{hash}'\n"))
}

async fn get(client: &reqwest::Client, url: &str, user: &str, password: &str) -> (u16, Duration) {
    let started = Instant::now();
    let status = client.get(url).basic_auth(user, Some(password)).send().await.map(|r| r.status().as_u16());
    (status.unwrap_or(0), started.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn a_password_flood_neither_stalls_the_probes_nor_tells_which_users_exist() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let dir = tempfile::tempdir().expect("tempdir");
    let web = web_config(&dir);
    let d =
        Daemon::start_with(&config_text(&db, &[&a], IMMEDIATE), &format!("web_config_file = \"{}\"", web.display()))
            .await;
    d.wait_ready().await;
    let client = common::http();
    let metrics = d.url("/metrics");
    assert_eq!(get(&client, &metrics, "prom", "right").await.0, 200);

    // Timing does not tell a wrong password from an unknown user.
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..5 {
        known.push(get(&client, &metrics, "prom", "wrong").await.1);
        unknown.push(get(&client, &metrics, "nobody", "wrong").await.1);
    }
    let (known, unknown) = (median(known), median(unknown));
    assert!(unknown * 2 >= known, "an unknown user answers in {unknown:?}, a wrong password in {known:?}");

    // Sixteen clients flood wrong passwords; the probes still answer at once.
    let stop = Instant::now() + Duration::from_secs(4);
    let flood: Vec<_> = (0..16)
        .map(|_| {
            let (client, url) = (client.clone(), metrics.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    let _ = get(&client, &url, "prom", "wrong").await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut probes = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let ok = client.get(d.url("/healthz")).send().await.is_ok_and(|r| r.status().is_success());
        assert!(ok, "/healthz answered");
        probes.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for f in flood {
        f.await.expect("flood task");
    }
    let probe = median(probes);
    assert!(probe < Duration::from_millis(100), "/healthz median {probe:?} during the flood");
}

#[tokio::test]
async fn credentials_in_a_controller_url_are_used_and_never_shown() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.require_authorization(Some("Basic YWRtaW46czNjcmV0")); // admin:s3cret
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    let with_creds = |url: &str| url.replace("http://", "http://admin:s3cret@");
    let cfg = config_text(&db, &[&a], IMMEDIATE)
        .replace(&a.url(), &with_creds(&a.url()))
        .replace(&a.stop_url(), &with_creds(&a.stop_url()));
    let dir = tempfile::tempdir().expect("tempdir");

    let (out, report) = once(&dir, &cfg).await;
    assert_eq!(report["instances"][0]["reachable"], true, "the credentials were sent: {report}");
    assert_eq!(out.status.code(), Some(0));

    let path = write(dir.path(), "check.toml", &cfg);
    let p = path.to_str().expect("utf-8").to_owned();
    let checked = tokio::task::spawn_blocking(move || run(&["check-config", "--config", &p])).await.expect("join");
    assert_eq!(checked.status.code(), Some(0));
    // The controller goes away: its error names the URL, without the secret.
    // Its listener closes once the server task sees the shutdown, not at once.
    a.shutdown();
    let addr = a.addr();
    common::eventually("the controller's port refuses connections", async || {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    let (down, report) = once(&dir, &cfg).await;
    assert_eq!(report["instances"][0]["reachable"], false);
    let error = report["instances"][0]["error"].as_str().unwrap_or("");
    assert!(error.contains("Connection refused"), "the error names its cause: {error}");
    for (what, shown) in [("check-config", text(&checked.stdout)), ("once", format!("{report}{}", text(&down.stderr)))]
    {
        assert!(!shown.contains("s3cret") && !shown.contains("admin:"), "{what} shows the credentials:\n{shown}");
    }
}

#[test]
fn configs_that_cannot_work_are_refused_at_load_and_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = "[database]\nurl = \"postgres://app@127.0.0.1:5432/app\"\n\n[[controller]]\nname = \"a\"\nurl = \"http://127.0.0.1:8080/internal/sessions\"\n";
    let cases = [
        (format!("{base}[reconcile]\ngrace = \"300000years\"\n"), "reconcile.grace"),
        (format!("[daemon]\ninterval = \"100000000000s\"\n{base}"), "daemon.interval"),
        (base.replace("app\"\n", "app\"\nstatement_timeout = \"30d\"\n"), "database.statement_timeout"),
        (base.replace("app\"\n", "app\"\nstatement_timeout = \"500us\"\n"), "database.statement_timeout"),
        (base.replace("app\"\n", "app\"\nread_connections = 3\n"), "database.read_connections"),
        (base.replace("app\"\n", "app\"\nread_connections = 0\n"), "database.read_connections"),
        (format!("{base}[sessions]\nid_pattern = '^exec_.*|.*$'\n"), "escapes the anchors"),
        (format!("{base}[sessions]\nid_pattern = '(^a$)'\n"), "anchored"),
    ];
    for (i, (body, needle)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("c{i}.toml"), body);
        let out = run(&["once", "--config", path.to_str().expect("utf-8")]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "case {i}: {err}");
        assert!(err.contains(needle), "case {i}: {err:?} does not name {needle:?}");
    }
}

#[tokio::test]
async fn after_a_database_outage_the_first_pass_comes_within_15_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let mut cluster = sessiond::pgcluster::PrivateCluster::new(&dir.path().join("pg"), port).expect("binaries");
    cluster.stop_on_drop = true;
    tokio::task::spawn_blocking({
        let c = sessiond::pgcluster::PrivateCluster::new(&dir.path().join("pg"), port).expect("binaries");
        move || c.start()
    })
    .await
    .expect("join")
    .expect("start a private PostgreSQL");
    let url = cluster.url("postgres");
    let db = TestDb { name: "postgres".into(), url: url.clone() };
    db.migrate().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let cfg = TestConfig::new(&db)
        .controllers(&[&a])
        .reconcile_toml(IMMEDIATE)
        .database("statement_timeout", "1s")
        .unset_daemon("interval")
        .toml();
    std::mem::forget(db); // the cluster goes away with its directory
    let d = Daemon::start(&cfg).await;
    d.wait_ready().await;

    cluster.stop().expect("stop the database");
    tokio::time::sleep(Duration::from_secs(31)).await;
    tokio::task::spawn_blocking({
        let c = sessiond::pgcluster::PrivateCluster::new(&dir.path().join("pg"), port).expect("binaries");
        move || c.start()
    })
    .await
    .expect("join")
    .expect("restart the database");
    let back = Instant::now();
    let mut ready = None;
    while back.elapsed() < Duration::from_secs(40) {
        if let Some((200, _, _)) = d.get("/readyz").await {
            ready = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = ready.expect("the daemon recovered");
    assert!(took <= Duration::from_secs(17), "first good pass {took:?} after the database came back");
}

#[tokio::test]
async fn an_application_write_while_a_stop_is_in_flight_is_never_waited_on_and_wins() {
    application_write_during_stops("").await;
}

#[tokio::test]
async fn an_application_write_while_a_leaders_stop_is_in_flight_is_never_waited_on_and_wins() {
    // The same with [ha]: the fence adds a lock on the lease row, never on the
    // application's rows.
    application_write_during_stops("\n[ha]\nenabled = true\nlease = \"10s\"\n").await;
}

async fn application_write_during_stops(extra: &str) {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    // A zombie, and a duplicate pair (the older one is stopped and its row ended).
    db.insert(&sid(1), "u1", "ctrl-a", "stopped", ago(600)).await;
    a.add(&sid(1), "u1", "running", Some(ago(700)));
    db.insert(&sid(2), "u2", "ctrl-a", "active", ago(600)).await;
    db.client()
        .await
        .batch_execute("DROP INDEX sessions_one_live_per_owner") // the application's own schema lacks it
        .await
        .expect("drop the index");
    db.insert(&sid(3), "u2", "ctrl-a", "active", ago(500)).await;
    a.add(&sid(2), "u2", "running", Some(ago(600)));
    a.add(&sid(3), "u2", "running", Some(ago(500)));
    a.set_stop_delay(Duration::from_millis(1500));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "sessiond.toml", &format!("{}{extra}", config_text(&db, &[&a], IMMEDIATE)));
    let child = common::Guarded(Some(
        sessiond(&["once", "--config", path.to_str().expect("utf-8")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn once"),
    ));
    for _ in 0..100 {
        if db.scalar("SELECT count(*) FROM sessiond_stop_intents WHERE settled_at IS NULL").await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // While both stops are in flight, the application re-activates the zombie's
    // row and touches the duplicate's: neither write waits on sessiond.
    let app = db.client().await;
    let started = Instant::now();
    app.execute("UPDATE sessions SET state = 'active', ended_at = NULL WHERE session_id = $1", &[&sid(1)])
        .await
        .expect("re-activate");
    app.execute("UPDATE sessions SET updated_at = now() WHERE session_id = $1", &[&sid(2)]).await.expect("touch");
    let took = started.elapsed();
    let mut child = child.take();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");

    assert!(took < Duration::from_millis(500), "the application's writes waited {took:?}");
    assert_eq!(status.code(), Some(0));
    assert_eq!(a.stops().len(), 2, "both stops went out");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"), "the application's write wins");
    assert_eq!(db.state(&sid(2)).await.as_deref(), Some("active"), "the duplicate's row is not ended");
    let left_as_written = "SELECT count(*) FROM session_audit \
         WHERE (details->>'row_updated')::boolean = false AND reason IN ('zombie', 'duplicate')";
    let left: i64 = db.scalar(left_as_written).await;
    assert_eq!(left, 2, "both audit rows say the row was left as the application wrote it");
    let ended: i64 =
        db.scalar("SELECT count(*) FROM session_audit WHERE reason = 'duplicate' AND new_state = 'stopped'").await;
    assert_eq!(ended, 0, "no audit row says the duplicate's row was ended");
}

#[tokio::test]
async fn a_pass_stalled_past_its_plans_deadline_sends_nothing_more_and_defers_the_rest() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let ids = zombies(&db, &a, 30).await;
    a.set_stop_delay(Duration::from_secs(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = TestConfig::new(&db).controllers(&[&a]).reconcile_toml(IMMEDIATE).controller("timeout", "3s").toml();
    let path = write(dir.path(), "sessiond.toml", &cfg);
    let p = path.to_str().expect("utf-8").to_owned();
    let child = common::Guarded(Some(
        sessiond(&["once", "--json", "--config", &p])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("once"),
    ));
    // Wait for the first wave to reach the controller: a stall that lands
    // between the intents' commit and the first request's write leaves those
    // stops neither sent nor answered, and a later pass rightly waits out such
    // an intent before it sends again, which is not what this test is about.
    for _ in 0..300 {
        if db.scalar("SELECT count(*) FROM sessiond_stop_intents").await == 30 && a.stop_requests().len() >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.stop_requests().len(), 8, "the first wave reached the controller before the stall");
    // The process stalls (a VM migration) for longer than its plan may live.
    signal(child.child().id(), "STOP");
    tokio::time::sleep(Duration::from_secs(11)).await;
    signal(child.child().id(), "CONT");
    let child = child.take();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.expect("join").expect("wait");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");

    let o = outcomes(&report);
    // The first wave's answers may have timed out during the stall: those are
    // failed now, and settled from the list by the next pass.
    let sent = count(&o, "zombie.repaired") + count(&o, "zombie.failed");
    assert!(sent <= 8, "at most the first wave went out before the stall: {o:?}");
    assert_eq!(count(&o, "zombie.deferred"), 30 - sent, "{o:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(a.stops().len() <= sent, "no stop went out after the deadline: {}", a.stops().len());
    assert_eq!(out.status.code(), Some(1), "a pass that ran out of time is partial");
    assert!(report["error"].as_str().unwrap_or("").contains("deferred"), "{}", report["error"]);
    let not_sent = db.scalar("SELECT count(*) FROM sessiond_stop_intents WHERE outcome = 'not_sent'").await;
    assert_eq!(not_sent as usize, 30 - sent);

    // A fresh pass stops the rest.
    a.set_stop_delay(Duration::ZERO);
    let (out, _) = once(&dir, &cfg).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    each_stopped_and_audited_once(&db, &a, &ids).await;
}
