//! The operator's view: draining a backlog at a bounded rate, explaining one
//! session, the findings of the last pass, and the admin endpoints.

mod common;

use std::time::Duration;

use common::{ago, config, config_text, eventually, sid, Daemon, TestDb, IMMEDIATE};
use sessiond::reconcile::{PassRequest, Reconciler};
use sessiond::simctl::SimController;

/// (stopped rows, the youngest stopped row's age, the oldest live row's age), in seconds.
async fn drained(db: &TestDb) -> (i64, Option<f64>, Option<f64>) {
    let r = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'stopped'),
                    min(extract(epoch FROM now() - created_at)::float8) FILTER (WHERE state = 'stopped'),
                    max(extract(epoch FROM now() - created_at)::float8) FILTER (WHERE state = 'active')
               FROM sessions",
            &[],
        )
        .await
        .expect("count");
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test]
async fn a_backlog_three_times_the_limit_drains_in_three_daemon_passes_oldest_first() {
    const N: u32 = 3000;
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO sessions (session_id, owner_id, controller_instance, state, created_at, updated_at)
             SELECT 'exec_20260101_000000_' || lpad(to_hex(n), 8, '0'), 'u' || n, 'ctrl-a', 'active',
                    now() - make_interval(secs => 600 + n), now() - make_interval(secs => 600 + n)
               FROM generate_series(1, {N}) n"
        ))
        .await
        .expect("rows");
    for n in 1..=N {
        a.add(&format!("exec_20260101_000000_{n:08x}"), &format!("u{n}"), "running", Some(ago(600 + i64::from(n))));
    }
    let cfg = config(&db, &[&a], "grace = \"0s\"\nconfirmations = 1\nmax_repairs_per_pass = 1000");
    let mut r = Reconciler::new(cfg).expect("reconciler");
    assert!(r.pass(PassRequest::daemon()).await.findings.is_empty(), "the first pass records the boot id");
    a.restart(); // memory lost: 3,000 orphans, explained by the restart

    let mut youngest_repaired = f64::MAX;
    for pass in 1..=3_i64 {
        let rep = r.pass(PassRequest::daemon()).await;
        let outcomes = common::outcomes(&rep);
        let deferred = 3000 - pass * 1000;
        let want: Vec<String> = if deferred > 0 {
            vec![format!("orphaned.deferred={deferred}"), "orphaned.repaired=1000".into()]
        } else {
            vec!["orphaned.repaired=1000".into()]
        };
        assert_eq!(outcomes, want, "pass {pass}");
        assert!(rep.guard_tripped.is_empty(), "a backlog is not a mass disappearance");
        let (stopped, youngest_stopped, oldest_live) = drained(&db).await;
        assert_eq!(stopped, pass * 1000, "pass {pass}");
        let youngest_stopped = youngest_stopped.expect("some stopped");
        if let Some(oldest_live) = oldest_live {
            assert!(oldest_live < youngest_stopped, "pass {pass} repaired the oldest first");
        }
        assert!(youngest_stopped < youngest_repaired, "each pass takes the next oldest");
        youngest_repaired = youngest_stopped;
    }
    assert!(r.pass(PassRequest::daemon()).await.findings.is_empty(), "drained");
    assert_eq!(db.audit_count().await, i64::from(N), "one audit row per repair");
}

async fn explain(cfg_path: &str, id: &str) -> (Option<i32>, String, serde_json::Value) {
    let text_out = common::run_async(&["explain", id, "--config", cfg_path]).await;
    let json_out = common::run_async(&["explain", id, "--json", "--config", cfg_path]).await;
    let doc = serde_json::from_slice(&json_out.stdout).unwrap_or(serde_json::Value::Null);
    (text_out.status.code(), format!("{}{}", common::text(&text_out.stdout), common::text(&text_out.stderr)), doc)
}

#[tokio::test]
async fn explain_says_why_for_a_waiting_orphan_a_repaired_zombie_an_unverifiable_row_and_an_unknown_id() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let b = SimController::start("ctrl-b").await.expect("controller");
    // A zombie, repaired by a pass: its trail says who ended it and why.
    a.add(&sid(3), "u3", "running", Some(ago(600)));
    db.insert(&sid(3), "u3", "ctrl-a", "stopped", ago(600)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let once_cfg = common::write(dir.path(), "once.toml", &config_text(&db, &[&a, &b], IMMEDIATE));
    let once = common::run_async(&["once", "--config", once_cfg.to_str().expect("utf-8")]).await;
    assert_eq!(once.status.code(), Some(0), "{}", common::text(&once.stderr));
    assert_eq!(a.stops(), [sid(3)]);

    // Then: an orphan on ctrl-a, a row on ctrl-b, and ctrl-b goes away.
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    db.insert(&sid(4), "u4", "ctrl-b", "active", ago(600)).await;
    b.shutdown();
    let cfg = common::write(dir.path(), "s.toml", &config_text(&db, &[&a, &b], "grace = \"0s\"\nconfirmations = 2"));
    let p = cfg.to_str().expect("utf-8");

    let (code, out, doc) = explain(p, &sid(1)).await;
    assert_eq!(code, Some(0), "a controller down does not stop an explanation: {out}");
    assert_eq!(doc["row"]["state"], "active", "{doc}");
    assert_eq!(doc["findings"][0]["kind"], "orphaned", "{doc}");
    assert_eq!(doc["findings"][0]["decision"], "wait", "{doc}");
    assert_eq!(doc["findings"][0]["reason"], "seen in 1 of 2 passes", "{doc}");
    assert!(out.contains("decision     wait: seen in 1 of 2 passes"), "{out}");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"), "explain changes nothing");

    let (_, out, doc) = explain(p, &sid(3)).await;
    assert_eq!(doc["row"]["state"], "stopped");
    assert_eq!(doc["findings"], serde_json::json!([]), "{doc}");
    assert_eq!(doc["audit"][0]["trigger"], "reconciler", "{doc}");
    assert_eq!(doc["audit"][0]["reason"], "zombie", "{doc}");
    assert!(out.contains("reconciler") && out.contains("zombie"), "{out}");

    let (_, out, doc) = explain(p, &sid(4)).await;
    assert_eq!(doc["findings"][0]["kind"], "unverifiable", "{doc}");
    assert!(doc["findings"][0]["reason"].as_str().unwrap_or("").contains("ctrl-b"), "{doc}");
    assert!(doc["pass"]["unreachable"]["ctrl-b"].is_string(), "the unreachable controller is named: {doc}");
    assert!(out.contains("ctrl-b") && out.contains("unreachable"), "{out}");

    // A session held by the controller: its entry is shown.
    a.add(&sid(5), "u5", "running", Some(ago(60)));
    db.insert(&sid(5), "u5", "ctrl-a", "active", ago(60)).await;
    let (_, _, doc) = explain(p, &sid(5)).await;
    assert_eq!(doc["controllers"][0]["controller"], "ctrl-a", "{doc}");
    assert_eq!(doc["controllers"][0]["owner_id"], "u5", "{doc}");

    let (_, out, doc) = explain(p, &sid(9)).await;
    assert_eq!(doc["row"], serde_json::Value::Null);
    assert_eq!(doc["findings"], serde_json::json!([]));
    assert_eq!(doc["audit"], serde_json::json!([]));
    assert!(out.contains("no row in the table") && out.contains("listed by none"), "{out}");

    let (code, out, _) = explain(p, "'; DROP TABLE sessions; --").await;
    assert_eq!(code, Some(1));
    assert!(out.contains("is not a session id"), "{out}");
}

async fn post(d: &Daemon, path: &str, auth: Option<(&str, &str)>) -> (u16, serde_json::Value) {
    let mut req = common::http().post(d.url(path));
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

async fn get_json(d: &Daemon, path: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = d.get(path).await.expect("an answer");
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

/// The admin audit rows: (reason, actor).
async fn admin_trail(db: &TestDb) -> Vec<(String, String)> {
    db.client()
        .await
        .query("SELECT reason, actor FROM session_audit WHERE trigger = 'admin' ORDER BY id", &[])
        .await
        .expect("trail")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn findings_and_sessions_answer_from_the_last_pass_filtered_and_bounded() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    for i in 1..=3 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
        // orphans
    }
    a.add(&sid(7), "u7", "running", Some(ago(600))); // unpersisted
    let d = Daemon::start(&config_text(&db, &[&a], "grace = \"0s\"\nconfirmations = 100")).await;
    d.wait_ready().await;

    let (status, all) = get_json(&d, "/findings").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!((all["total"].as_u64(), all["matched"].as_u64()), (Some(4), Some(4)), "{all}");
    let (_, orphans) = get_json(&d, "/findings?kind=orphaned&limit=2").await;
    assert_eq!(orphans["matched"], 3, "{orphans}");
    assert_eq!(orphans["returned"], 2);
    assert_eq!(orphans["left_out"], 1);
    assert_eq!(orphans["findings"][0]["decision"], "wait");
    assert!(orphans["findings"][0]["streak"].as_u64().is_some_and(|n| n >= 1), "{orphans}");
    assert!(orphans["findings"][0]["first_seen"].is_string(), "{orphans}");
    let (_, other) = get_json(&d, "/findings?controller=ctrl-b").await;
    assert_eq!(other["matched"], 0);
    let (status, bad) = get_json(&d, "/findings?kind=bogus").await;
    assert_eq!(status, 400, "{bad}");

    let (status, one) = get_json(&d, &format!("/sessions/{}", sid(7))).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["row"], serde_json::Value::Null);
    assert_eq!(one["findings"][0]["kind"], "unpersisted", "{one}");
    assert_eq!(one["controllers"][0]["controller"], "ctrl-a", "{one}");
    let (_, row) = get_json(&d, &format!("/sessions/{}", sid(1))).await;
    assert_eq!(row["row"]["state"], "active", "{row}");
    let (status, _) = get_json(&d, "/sessions/not%20an%20id").await;
    assert_eq!(status, 400);

    // The answers come from memory: fast while passes run.
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = std::time::Instant::now();
        assert_eq!(d.get("/findings?limit=10").await.map(|r| r.0), Some(200));
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!("GET /findings: median {:?}, max {:?}", times[25], times[49]);
}

#[tokio::test]
async fn admin_endpoints_are_off_by_default_and_need_credentials_when_on() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let off = Daemon::start(&config_text(&db, &[&a], IMMEDIATE)).await;
    let (status, body) = post(&off, "/pause", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap_or("").contains("admin = true"), "{body}");
    drop(off);

    let dir = tempfile::tempdir().expect("tempdir");
    let hash = bcrypt::hash("night-shift", 4).expect("bcrypt");
    let web = common::write(dir.path(), "web.yml", &format!("basic_auth_users:\n  alice: '{hash}'\n"));
    let d = Daemon::start_with(
        &config_text(&db, &[&a], IMMEDIATE),
        &format!("admin = true\nweb_config_file = \"{}\"", web.display()),
    )
    .await;
    eventually("the daemon answers", async || d.get("/healthz").await.is_some()).await;
    assert_eq!(post(&d, "/pause", None).await.0, 401);
    assert_eq!(post(&d, "/pause", Some(("alice", "wrong"))).await.0, 401);
    let (status, body) = post(&d, "/pause?reason=incident%2042", Some(("alice", "night-shift"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changed"], true);
    let (status, body) = post(&d, "/guard/release?controller=nope", Some(("alice", "night-shift"))).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&d, "/guard/release?controller=ctrl-a", Some(("alice", "night-shift"))).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(post(&d, "/pass", Some(("alice", "night-shift"))).await.0, 202);
    assert_eq!(post(&d, "/resume", Some(("alice", "night-shift"))).await.0, 200);
    assert_eq!(
        admin_trail(&db).await,
        [
            ("pause", "admin:alice"),
            ("guard_release", "admin:alice"),
            ("pass", "admin:alice"),
            ("resume", "admin:alice")
        ]
        .map(|(r, a)| (r.to_owned(), a.to_owned()))
    );
    let reason: String = db
        .client()
        .await
        .query_one("SELECT details->>'reason' FROM session_audit WHERE reason = 'pause'", &[])
        .await
        .expect("pause row")
        .get(0);
    assert_eq!(reason, "incident 42");

    // Open to the network without credentials: refused at start.
    let open = common::write(
        dir.path(),
        "open.toml",
        &common::TestConfig::new(&db)
            .controllers(&[&a])
            .reconcile_toml(IMMEDIATE)
            .unset_daemon("interval")
            .daemon("listen", "0.0.0.0:9999")
            .daemon("admin", true)
            .toml(),
    );
    let out = common::run_async(&["check-config", "--config", open.to_str().expect("utf-8")]).await;
    assert_eq!(out.status.code(), Some(78), "{}", common::text(&out.stderr));
    assert!(common::text(&out.stderr).contains("daemon.admin"), "{}", common::text(&out.stderr));
}

#[tokio::test]
async fn a_pause_survives_a_restart_is_honoured_by_a_second_replica_and_resume_lets_repairs_through() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let cfg = config_text(&db, &[&a], IMMEDIATE);
    let d = Daemon::start_with(&cfg, "admin = true").await;
    d.wait_ready().await;
    let (status, body) = post(&d, "/pause", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(admin_trail(&db).await[0].1.starts_with("admin:anonymous@127.0.0.1"), "loopback, no auth");

    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await; // an orphan, repairable at once
                                                                  // A restart of this one, and a second replica: both look, neither repairs.
    drop(d);
    let d = Daemon::start_with(&cfg, "admin = true").await;
    let second = Daemon::start(&cfg).await;
    eventually("both paused passes ran", async || {
        let paused = |body: String| body.lines().any(|l| l == "sessiond_paused 1");
        let one = d.get("/metrics").await.is_some_and(|(_, _, b)| paused(b));
        let two = second.get("/metrics").await.is_some_and(|(_, _, b)| paused(b));
        one && two
    })
    .await;
    let (_, findings) = get_json(&second, "/findings").await;
    assert_eq!(findings["findings"][0]["decision"], "report", "paused: reported only: {findings}");
    tokio::time::sleep(Duration::from_secs(2)).await; // several passes of each
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"), "nothing repaired while paused");
    assert_eq!(db.audit(&sid(1)).await.len(), 0);

    assert_eq!(post(&d, "/resume", None).await.0, 200);
    eventually("the orphan is repaired", async || db.state(&sid(1)).await.as_deref() == Some("stopped")).await;
    eventually("the gauge follows", async || {
        second.get("/metrics").await.is_some_and(|(_, _, b)| b.lines().any(|l| l == "sessiond_paused 0"))
    })
    .await;
}

#[tokio::test]
async fn a_pause_stops_every_write_of_a_pass_already_under_way_and_settling_goes_on() {
    use sessiond::store::{AuditContext, Store, StoreError};
    let db = TestDb::migrated().await;
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    let update = db.orphan_update(&sid(1)).await;
    let cfg = sessiond::config::DatabaseConfig::for_url(&db.url);
    let connect = || async {
        let mut s = Store::connect(&cfg).await.expect("connect");
        s.bind_table(&sessiond::config::SessionsConfig::reference(&cfg.schema), &Default::default())
            .await
            .expect("bind");
        s
    };
    // A pass that read the pause as off, and an operator who pauses before
    // its batch: the batch writes nothing.
    let mut pass = connect().await;
    let mut operator = connect().await;
    assert!(operator.set_pause(true, "admin:test", Some("investigating")).await.expect("pause"));
    assert!(!operator.set_pause(true, "admin:test", None).await.expect("again"), "a pause is set once");
    let audit = AuditContext { actor: "sessiond@test".into(), pass_id: "p".into(), term: None };
    let paused = pass.update_rows(std::slice::from_ref(&update), &audit).await;
    assert!(matches!(&paused, Err(StoreError::Paused { by }) if by == "admin:test"), "{paused:?}");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"));
    assert_eq!(db.audit(&sid(1)).await.len(), 0);
    assert_eq!(pass.pause_state().await.expect("read").map(|p| p.by).as_deref(), Some("admin:test"));
    // A whole pass while paused looks, repairs nothing, and says so.
    let a = SimController::start("ctrl-a").await.expect("controller");
    let rep = Reconciler::new(config(&db, &[&a], IMMEDIATE)).expect("reconciler").pass(PassRequest::once()).await;
    assert_eq!(common::outcomes(&rep), ["orphaned.reported=1"]);
    let table = sessiond::reconcile::report::to_table(&rep);
    assert!(table.contains("PAUSED by admin:test") && table.contains("(investigating)"), "{table}");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"));

    assert!(operator.set_pause(false, "admin:test", None).await.expect("resume"));
    pass.update_rows(&[update], &audit).await.expect("resumed: the write goes through");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("stopped"));
}

#[tokio::test]
async fn audit_retention_prunes_old_rows_through_its_function_and_recent_rows_stay_undeletable() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO session_audit (session_id, at, trigger, actor, reason)
         SELECT 'exec_20250101_000000_' || lpad(to_hex(n), 8, '0'), now() - make_interval(days => 91 + n % 30),
                'reconciler', 'old', 'orphaned'
           FROM generate_series(1, 25000) n;
         INSERT INTO session_audit (session_id, at, trigger, actor, reason)
         SELECT 'exec_20260101_000000_' || lpad(to_hex(n), 8, '0'), now() - make_interval(days => 89),
                'reconciler', 'kept', 'orphaned'
           FROM generate_series(1, 10) n;
         INSERT INTO session_audit (session_id, trigger, actor, reason)
         VALUES ('exec_20261201_000000_00000001', 'reconciler', 'fresh', 'orphaned');",
    )
    .await
    .expect("an old trail");
    let count = |actor: &'static str| {
        let c = &c;
        async move {
            c.query_one("SELECT count(*) FROM session_audit WHERE actor = $1", &[&actor])
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
    };

    // Nobody deletes from the trail directly, not even its owner, and the
    // function keeps at least a day whatever it is asked.
    let refused = c.batch_execute("DELETE FROM session_audit WHERE actor = 'old'").await.expect_err("append-only");
    assert!(format!("{refused:?}").contains("append-only"), "{refused:?}");
    let short = c.query_one("SELECT sessiond_audit_prune(interval '1 hour')", &[]).await.expect_err("a day at least");
    assert!(format!("{short:?}").contains("at least a day"), "{short:?}");
    let sneaky = c
        .batch_execute(
            "BEGIN; SET LOCAL sessiond.pruning = 'on';
             DELETE FROM session_audit WHERE actor = 'fresh'; COMMIT;",
        )
        .await;
    assert!(sneaky.is_err(), "setting the flag by hand deletes nothing younger than a day");
    c.batch_execute("ROLLBACK").await.ok();
    assert_eq!(count("fresh").await, 1);

    let text = format!("{}\n[audit]\nretain = \"90d\"\n", config_text(&db, &[&a], IMMEDIATE));
    let cfg = std::sync::Arc::new(
        sessiond::config::Config::from_toml(std::path::Path::new("t.toml"), &text, &Default::default())
            .expect("config"),
    );
    let mut r = Reconciler::new(cfg).expect("reconciler");
    let rep = r.pass(PassRequest::daemon()).await;
    assert_eq!(rep.audit_pruned, 25_000, "{:?}", rep.error);
    assert_eq!(count("old").await, 0);
    assert_eq!(count("kept").await, 10, "younger than retain");
    let rep = r.pass(PassRequest::daemon()).await;
    assert_eq!(rep.audit_pruned, 0, "at most hourly once caught up");

    let bad = sessiond::config::Config::from_toml(
        std::path::Path::new("t.toml"),
        &text.replace("\"90d\"", "\"1h\""),
        &Default::default(),
    )
    .expect_err("a day at least");
    assert!(bad.to_string().contains("audit.retain"), "{bad}");
}
