//! The `sessiond` binary as operators run it: exit codes, `check-config`,
//! `migrate`, `once` (table and JSON), and two processes racing each other.

mod common;

use std::process::{Output, Stdio};

use common::{ago, config_text, run, sessiond, sid, text, write, TestConfig, TestDb, IMMEDIATE};
use sessiond::simctl::SimController;

const MINIMAL: &str = "[database]\nurl = \"postgres://app@127.0.0.1:5432/app\"\n\n[[controller]]\nname = \"a\"\nurl = \"http://127.0.0.1:8080/internal/sessions\"\n";

#[test]
fn bad_configs_exit_78_naming_the_file_the_key_and_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&str, String, &str)] = &[
        ("unknown-key.toml", format!("{MINIMAL}\n[reconcile]\ngrase = \"30s\"\n"), "unknown field `grase`"),
        ("bad-duration.toml", format!("{MINIMAL}\n[reconcile]\ngrace = \"thirty\"\n"), "reconcile.grace"),
        ("bad-mode.toml", format!("[daemon]\nmode = \"fix\"\n{MINIMAL}"), "daemon.mode"),
        ("no-db.toml", "[[controller]]\nname = \"a\"\nurl = \"http://x/\"\n".into(), "database"),
        ("no-ctrl.toml", "[database]\nurl = \"postgres://a@h/db\"\n".into(), "controller"),
        ("scheme.toml", MINIMAL.replace("http://127", "ftp://127"), "controller[0].url"),
        (
            "ca.toml",
            MINIMAL.replace("name = \"a\"", "name = \"a\"\nca_file = \"/nonexistent/ca.pem\""),
            "controller[0].ca_file",
        ),
        ("fraction.toml", format!("{MINIMAL}\n[reconcile]\nmax_orphan_fraction = 1.5\n"), "max_orphan_fraction"),
        ("policy.toml", format!("{MINIMAL}\n[reconcile.policy]\nzombie = \"ignore\"\n"), "reconcile.policy.zombie"),
        ("pattern.toml", format!("{MINIMAL}\n[sessions]\nid_pattern = \"exec_.*\"\n"), "anchored"),
        ("stop.toml", MINIMAL.replace("name = \"a\"", "name = \"a\"\nstop_url = \"http://x/stop\""), "{session_id}"),
        ("dup.toml", format!("{MINIMAL}\n[[controller]]\nname = \"a\"\nurl = \"http://x/\"\n"), "used by two"),
        ("syntax.toml", "[database\n".into(), "invalid TOML"),
        ("ha-key.toml", format!("{MINIMAL}\n[ha]\nenable = true\n"), "unknown field `enable`"),
        ("ha-lease.toml", format!("{MINIMAL}\n[ha]\nenabled = true\nlease = \"500ms\"\n"), "ha.lease"),
        ("ha-long.toml", format!("{MINIMAL}\n[ha]\nenabled = true\nlease = \"1h\"\n"), "ha.lease"),
        ("ha-type.toml", format!("{MINIMAL}\n[ha]\nenabled = \"yes\"\n"), "enabled"),
        (
            "secret.toml",
            MINIMAL.replace("[[controller]]", "password_file = \"/nonexistent/pw\"\n\n[[controller]]"),
            "database.password_file",
        ),
    ];
    for (name, body, needle) in cases {
        let path = write(dir.path(), name, body);
        let out = run(&["check-config", "--config", path.to_str().expect("utf-8 path")]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{name}: {err}");
        assert!(err.contains(name), "{name}: the message names the file: {err}");
        assert!(err.contains(needle), "{name}: the message says {needle:?}: {err}");
    }
    let out = run(&["check-config", "--config", "/nonexistent/sessiond.toml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("/nonexistent/sessiond.toml"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(run(&["once"]).status.code(), Some(2), "--config is required");
    assert_eq!(run(&["once", "--config", "x", "--bogus"]).status.code(), Some(2));
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = write(dir.path(), "pw", "hunter2-password\n");
    let token = write(dir.path(), "tok", "tok-abcdef\n");
    let body = format!(
        "[database]\nurl = \"postgres://app:url-password@db.internal:5432/app\"\npassword_file = \"{}\"\n\n\
         [[controller]]\nname = \"a\"\nurl = \"http://127.0.0.1:8080/internal/sessions\"\ntoken_file = \"{}\"\n",
        pw.display(),
        token.display()
    );
    let path = write(dir.path(), "s.toml", &body);
    let out = sessiond(&["check-config"]).env("SESSIOND_CONFIG", &path).output().expect("run");
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for secret in ["hunter2", "url-password", "tok-abcdef"] {
        assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
    }
    assert!(shown.contains("<redacted>"));
    assert!(shown.contains("interval = \"15s\""), "defaults are shown:\n{shown}");
    assert!(shown.contains("instance_dead_after = \"off\""));

    // DATABASE_URL overrides database.url.
    let out = sessiond(&["check-config", "--config", path.to_str().expect("utf-8")])
        .env("DATABASE_URL", "postgres://other@10.1.2.3:6543/otherdb")
        .output()
        .expect("run");
    assert!(text(&out.stdout).contains("10.1.2.3:6543/otherdb"), "{}", text(&out.stdout));

    // ... and its password_file, which belongs to database.url's role: the
    // schema owner's `DATABASE_URL=… sessiond migrate` does not read it.
    let gone = body.replace(&pw.display().to_string(), "/nonexistent/db-password");
    let path = write(dir.path(), "gone.toml", &gone);
    let p = path.to_str().expect("utf-8");
    let out = sessiond(&["check-config", "--config", p]).env_remove("DATABASE_URL").output().expect("run");
    assert_eq!(out.status.code(), Some(78), "database.url's password_file is read: {}", text(&out.stderr));
    let out = sessiond(&["check-config", "--config", p])
        .env("DATABASE_URL", "postgres://owner:owner-pw@10.1.2.3:6543/otherdb")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("owner-pw"), "{}", text(&out.stdout));
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_when_two_processes_migrate_at_once() {
    let db = TestDb::empty().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "s.toml", &config_text(&db, &[&a], IMMEDIATE));
    let p = path.to_str().expect("utf-8");
    let children: Vec<_> = (0..3)
        .map(|_| {
            sessiond(&["migrate", "--config", p]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn")
        })
        .collect();
    let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().expect("wait")).collect();
    for o in &outs {
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }
    assert_eq!(outs.iter().filter(|o| text(&o.stdout).contains("applied migrations")).count(), 1);
    let again = run(&["migrate", "--config", p]);
    assert!(text(&again.stdout).contains("up to date"), "{}", text(&again.stdout));

    let c = db.client().await;
    let n: i64 = c.query_one("SELECT count(*) FROM sessiond_schema_migrations", &[]).await.expect("count").get(0);
    assert_eq!(n, i64::from(sessiond::store::SCHEMA_VERSION), "each migration is recorded once");
    // The audit trail is append-only.
    c.batch_execute("INSERT INTO session_audit (session_id, trigger, actor) VALUES ('x', 'test', 'test')")
        .await
        .expect("append");
    let err = c.batch_execute("UPDATE session_audit SET reason = 'rewritten'").await.expect_err("update refused");
    assert!(err.to_string().contains("append-only") || format!("{err:?}").contains("append-only"), "{err:?}");
    assert!(c.batch_execute("DELETE FROM session_audit").await.is_err());
    // One live session per owner.
    c.batch_execute(
        "INSERT INTO sessions (session_id, owner_id, controller_instance, state) VALUES ('a', 'u', 'c', 'active')",
    )
    .await
    .expect("insert");
    assert!(c
        .batch_execute(
            "INSERT INTO sessions (session_id, owner_id, controller_instance, state) VALUES ('b', 'u', 'c', 'paused')"
        )
        .await
        .is_err());
}

#[tokio::test]
async fn once_prints_a_table_or_json_and_exits_1_on_a_partial_pass() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let down = SimController::start("ctrl-down").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "s.toml", &config_text(&db, &[&a], IMMEDIATE));
    let p = path.to_str().expect("utf-8").to_owned();

    let out = tokio::task::spawn_blocking({
        let p = p.clone();
        move || run(&["once", "--config", &p, "--dry-run"])
    })
    .await
    .expect("join");
    let table = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(table.contains("orphaned") && table.contains(&sid(1)) && table.contains("dry run"), "{table}");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"));

    let out = tokio::task::spawn_blocking({
        let p = p.clone();
        move || run(&["once", "--config", &p, "--json"])
    })
    .await
    .expect("join");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("once --json prints JSON");
    assert_eq!(json["outcome"], "ok");
    assert_eq!(json["findings"][0]["kind"], "orphaned");
    assert_eq!(json["findings"][0]["outcome"], "repaired");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("stopped"));

    down.set_fault(sessiond::simctl::Fault::Status(503));
    let path2 = write(dir.path(), "s2.toml", &config_text(&db, &[&a, &down], IMMEDIATE));
    let out = tokio::task::spawn_blocking(move || run(&["once", "--config", path2.to_str().expect("utf-8")]))
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(1), "an unreachable instance makes the pass partial");
    assert!(text(&out.stdout).contains("UNREACHABLE"));
}

#[tokio::test]
async fn two_once_processes_at_once_repair_each_finding_once_with_one_audit_row() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    // 20 healthy sessions, 6 orphans, 4 zombies, 4 unpersisted, 2 stuck rows.
    for i in 0..20 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(600)));
    }
    for i in 100..106 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
    }
    for i in 200..204 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "stopped", ago(600)).await;
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(700)));
    }
    for i in 300..304 {
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(600)));
    }
    for i in 400..402 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "creating", ago(600)).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "s.toml", &config_text(&db, &[&a], IMMEDIATE));
    let p = path.to_str().expect("utf-8").to_owned();

    // Gate both processes on a table lock that holds their reads, so both read
    // the same rows and then repair at the same moment.
    let mut gate = db.client().await;
    let tx = gate.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE").await.expect("lock");
    let children: Vec<_> = (0..2)
        .map(|_| {
            sessiond(&["once", "--config", &p, "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    assert!(common::wait_for_blocked_sessiond(&db, 2).await, "both processes reached the read");
    tx.rollback().await.expect("open the gate");
    let outs = tokio::task::spawn_blocking(move || {
        children.into_iter().map(|c| c.wait_with_output().expect("wait")).collect::<Vec<_>>()
    })
    .await
    .expect("join");

    for o in &outs {
        assert_eq!(o.status.code(), Some(0), "conflicts are not failures: {}", text(&o.stderr));
    }
    let c = db.client().await;
    let per_session = c
        .query("SELECT session_id, count(*) FROM session_audit WHERE trigger = 'reconciler' GROUP BY session_id HAVING count(*) <> 1", &[])
        .await
        .expect("audit per session");
    assert!(per_session.is_empty(), "a finding was audited twice");
    assert_eq!(db.audit_count().await, 6 + 4 + 4 + 2);
    let mut stops = a.stops();
    stops.sort();
    assert_eq!(stops, (200..204).map(sid).collect::<Vec<_>>(), "each zombie was stopped once");
    let conflicts: usize = outs
        .iter()
        .map(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
            v["findings"].as_array().map_or(0, |f| f.iter().filter(|f| f["outcome"] == "conflict").count())
        })
        .sum();
    assert_eq!(conflicts, 16, "the loser of every race saw a conflict");
}

#[tokio::test]
async fn the_daemon_repairs_after_confirmations_keeps_running_on_a_bad_reload_and_exits_0_on_sigterm() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let good = TestConfig::new(&db)
        .controllers(&[&a])
        .reconcile_toml("grace = \"0s\"\nconfirmations = 2")
        .daemon("interval", "300ms")
        .daemon("listen", "127.0.0.1:0")
        .toml();
    let path = write(dir.path(), "s.toml", &good);
    let child = common::Guarded(Some(
        sessiond(&["run", "--config", path.to_str().expect("utf-8")])
            .env("SESSIOND_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the daemon"),
    ));

    let mut repaired = false;
    for _ in 0..100 {
        if db.state(&sid(1)).await.as_deref() == Some("stopped") {
            repaired = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(repaired, "the daemon repaired the orphan");

    // A broken config on SIGHUP is rejected; the daemon keeps working with the old one.
    std::fs::write(&path, "[daemon\nthis is not toml").expect("break the config");
    common::signal(child.child().id(), "HUP");
    db.insert(&sid(2), "u2", "ctrl-a", "active", ago(600)).await;
    let mut repaired_after_reload = false;
    for _ in 0..100 {
        if db.state(&sid(2)).await.as_deref() == Some("stopped") {
            repaired_after_reload = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(repaired_after_reload, "still reconciling after a rejected reload");

    common::signal(child.child().id(), "TERM");
    let out = common::wait_exit(child.take(), std::time::Duration::from_secs(10)).await;
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "exit 0 on SIGTERM:\n{log}");
    assert!(log.contains("config reload rejected"), "{log}");
    assert!(log.contains("pass complete"), "one summary line per pass:\n{log}");
    assert!(!log.contains(&sid(1)), "no per-session lines at info:\n{log}");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await; // an orphan
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "s.toml", &config_text(&db, &[&a], IMMEDIATE));
    let p = path.to_str().expect("utf-8").to_owned();
    let out = tokio::task::spawn_blocking(move || {
        sessiond(&["--log-format", "json", "once", "--config", &p]).env("SESSIOND_LOG", "info").output().expect("run")
    })
    .await
    .expect("join");
    let log = text(&out.stderr);
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let summary = lines.iter().find(|l| l["message"] == "pass complete").expect("a summary line");
    assert_eq!(summary["outcome"], "ok");
    assert!(summary["duration_ms"].is_u64());
    // Counts are numbers of their own, not a string to parse again.
    assert_eq!(summary["findings"], 1, "{summary}");
    assert_eq!(summary["orphaned"], 1, "{summary}");
    assert_eq!(summary["zombie"], 0, "{summary}");
    assert_eq!(summary["repaired"], 1, "{summary}");
}

#[tokio::test]
async fn logs_carry_no_colour_codes_off_a_terminal_and_json_fields_are_as_the_config_writes_them() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let b = SimController::start("ctrl-b").await.expect("controller");
    b.shutdown(); // a warning to log
    let dir = tempfile::tempdir().expect("tempdir");
    let text_cfg =
        TestConfig::new(&db).controllers(&[&a, &b]).reconcile_toml(IMMEDIATE).daemon("listen", "127.0.0.1:0").toml();
    let path = write(dir.path(), "s.toml", &text_cfg);
    let p = path.to_str().expect("utf-8");
    let out = common::run_async(&["once", "--config", p]).await;
    let err = text(&out.stderr);
    assert!(err.contains("controller unreachable"), "{err}");
    assert!(!err.contains('\u{1b}'), "ANSI escapes in a pipe: {err:?}");

    let mut child = sessiond(&["run", "--log-format", "json", "--config", p])
        .env("SESSIOND_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let first = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr).lines().map_while(Result::ok).find(|l| l.contains("\"mode\""))
    });
    let line = tokio::task::spawn_blocking(move || first.join().ok().flatten()).await.expect("join");
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("a start-up line with the mode");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["mode"], "repair", "{line}");
}
