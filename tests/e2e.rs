//! End to end, per finding kind: the incidents of the seed write-ups replayed
//! against a real PostgreSQL database and a real HTTP controller, through the
//! same `Reconciler` the daemon and `once` use.

mod common;

use common::{ago, config, outcomes, sid, TestDb, IMMEDIATE};
use sessiond::reconcile::{PassOutcome, PassReport, PassRequest, Reconciler};
use sessiond::simctl::SimController;

async fn once(cfg: &std::sync::Arc<sessiond::config::Config>) -> PassReport {
    let mut r = Reconciler::new(cfg.clone()).expect("a reconciler");
    r.pass(PassRequest::once()).await
}

/// Ten consistent sessions on `a`, recorded by a first pass (which also records
/// the controller's boot id).
async fn fleet_of_ten(db: &TestDb, a: &SimController) -> std::sync::Arc<sessiond::config::Config> {
    for i in 0..10 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(600)));
    }
    let cfg = config(db, &[a], IMMEDIATE);
    assert!(once(&cfg).await.findings.is_empty(), "the first pass records the boot id");
    cfg
}

/// Every row's (id, state, xmin), to prove a pass left rows alone.
async fn fingerprint(db: &TestDb) -> Vec<(String, String, String)> {
    db.client()
        .await
        .query("SELECT session_id, state, xmin::text FROM sessions ORDER BY session_id", &[])
        .await
        .expect("read rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn cleanup_that_cleared_memory_but_not_the_row_leaves_an_orphan_that_is_stopped() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    db.insert(&sid(2), "u2", "ctrl-a", "active", ago(600)).await;
    a.add(&sid(2), "u2", "running", Some(ago(600)));
    let cfg = config(&db, &[&a], IMMEDIATE);

    let rep = once(&cfg).await;

    assert_eq!(rep.outcome, PassOutcome::Ok);
    assert_eq!(outcomes(&rep), ["orphaned.repaired=1"]);
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("stopped"));
    assert_eq!(db.state(&sid(2)).await.as_deref(), Some("active"), "a held session is untouched");
    assert_eq!(db.audit(&sid(1)).await, [(Some("active".into()), Some("stopped".into()), "orphaned".into())]);
    let row = db
        .client()
        .await
        .query_one(
            "SELECT s.end_reason, s.ended_at IS NOT NULL, a.trigger, a.actor, a.details->>'pass_id', a.details->>'sessiond_version'
               FROM sessions s JOIN session_audit a USING (session_id)
              WHERE s.session_id = $1 AND a.trigger = 'reconciler'",
            &[&sid(1)],
        )
        .await
        .expect("the repaired row and its audit row");
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("orphaned"));
    assert!(row.get::<_, bool>(1), "ended_at is set");
    assert_eq!(row.get::<_, String>(2), "reconciler");
    assert!(row.get::<_, String>(3).starts_with("sessiond@"));
    assert_eq!(row.get::<_, String>(4), rep.pass_id);
    assert_eq!(row.get::<_, String>(5), env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn the_creation_race_is_left_alone_and_a_really_unpersisted_session_is_inserted() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    // Live for 100 ms, row not written yet: the 50-200 ms window of the seeds.
    a.add(&sid(1), "u1", "running", Some(ago(0)));
    // Live for ten minutes, never persisted: the cause of "Session not found".
    a.add(&sid(2), "u2", "running", Some(ago(600)));
    let cfg = config(&db, &[&a], "grace = \"30s\"\nconfirmations = 1");

    let rep = once(&cfg).await;
    assert_eq!(outcomes(&rep), ["unpersisted.repaired=1"]);
    assert_eq!(db.state(&sid(1)).await, None, "a session inside grace is not inserted");
    assert_eq!(db.state(&sid(2)).await.as_deref(), Some("active"));
    assert_eq!(db.audit(&sid(2)).await, [(None, Some("active".into()), "unpersisted".into())]);

    // The application's own insert lands; the next pass finds nothing.
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(0)).await;
    let rep = once(&cfg).await;
    assert!(rep.findings.is_empty(), "{:?}", rep.findings);
    assert_eq!(rep.probes.all.found, 2);
}

#[tokio::test]
async fn a_stop_that_raced_cleanup_leaves_a_zombie_that_is_stopped_at_the_controller() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "stopped", ago(600)).await;
    a.add(&sid(1), "u1", "running", Some(ago(700)));
    let before = fingerprint(&db).await;
    let cfg = config(&db, &[&a], IMMEDIATE);

    let rep = once(&cfg).await;

    assert_eq!(outcomes(&rep), ["zombie.repaired=1"]);
    assert_eq!(a.stops(), [sid(1)]);
    assert!(!a.holds(&sid(1)), "the controller stopped it");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("stopped"));
    assert_ne!(fingerprint(&db).await, before, "the row is touched so a second sessiond sees it changed");
    assert_eq!(db.audit(&sid(1)).await, [(Some("stopped".into()), Some("stopped".into()), "zombie".into())]);
    assert!(once(&cfg).await.findings.is_empty());
}

#[tokio::test]
async fn a_failed_stop_request_is_a_failed_repair_and_writes_no_audit_row() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "failed", ago(600)).await;
    a.add(&sid(1), "u1", "running", Some(ago(700)));
    a.set_stop_status(Some(503));
    let cfg = config(&db, &[&a], IMMEDIATE);

    let rep = once(&cfg).await;

    assert_eq!(outcomes(&rep), ["zombie.failed=1"]);
    assert_eq!(rep.outcome, PassOutcome::Partial);
    assert!(db.audit(&sid(1)).await.is_empty());
}

#[tokio::test]
async fn a_controller_restart_explains_its_mass_orphans_even_across_a_sessiond_restart() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let cfg = fleet_of_ten(&db, &a).await;

    a.restart(); // new boot id, memory lost
                 // A new sessiond process: what it knows about boot ids comes from the database.
    let rep = once(&cfg).await;

    assert!(rep.guard_tripped.is_empty(), "{:?}", rep.guard_tripped);
    assert_eq!(outcomes(&rep), ["orphaned.repaired=10"]);
    assert!(rep.instances[0].restarted);
}

#[tokio::test]
async fn an_empty_list_with_an_unchanged_boot_id_trips_the_guard_until_forced() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let cfg = fleet_of_ten(&db, &a).await;
    for i in 0..10 {
        a.remove(&sid(i)); // the list comes back empty, same process
    }
    let before = fingerprint(&db).await;

    let rep = once(&cfg).await;
    assert_eq!(outcomes(&rep), ["orphaned.guarded=10"]);
    assert!(rep.guard_tripped.contains_key("ctrl-a"));
    assert_eq!(fingerprint(&db).await, before, "nothing changed");

    let mut r = Reconciler::new(cfg.clone()).expect("a reconciler");
    let forced = r.pass(PassRequest::once().force(true)).await;
    assert_eq!(outcomes(&forced), ["orphaned.repaired=10"]);
}

#[tokio::test]
async fn duplicate_creates_for_one_owner_keep_the_session_the_controller_holds() {
    let db = TestDb::migrated().await;
    // The incident's table had no constraint; neither does this one.
    db.client().await.batch_execute("DROP INDEX sessions_one_live_per_owner").await.expect("drop the index");
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u", "ctrl-a", "active", ago(600)).await;
    db.insert(&sid(2), "u", "ctrl-a", "active", ago(590)).await;
    db.insert(&sid(3), "u", "ctrl-a", "active", ago(580)).await;
    a.add(&sid(1), "u", "running", Some(ago(600)));
    a.add(&sid(2), "u", "running", Some(ago(590)));
    let cfg = config(&db, &[&a], IMMEDIATE);

    let rep = once(&cfg).await;

    assert_eq!(outcomes(&rep), ["duplicate.repaired=1", "orphaned.repaired=1"]);
    assert_eq!(db.state(&sid(2)).await.as_deref(), Some("active"), "the newest held session is kept");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("stopped"));
    assert_eq!(db.state(&sid(3)).await.as_deref(), Some("stopped"));
    assert_eq!(a.stops(), [sid(1)]);
    assert_eq!(db.audit(&sid(1)).await, [(Some("active".into()), Some("stopped".into()), "duplicate".into())]);
    assert!(once(&cfg).await.findings.is_empty(), "converged");
}

#[tokio::test]
async fn a_row_stuck_in_creating_fails_and_a_young_one_is_left_alone() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "creating", ago(180)).await;
    db.insert(&sid(2), "u2", "ctrl-a", "creating", ago(10)).await;
    let cfg = config(&db, &[&a], "grace = \"5s\"\nconfirmations = 1\ncreating_timeout = \"2m\"");

    let rep = once(&cfg).await;

    assert_eq!(outcomes(&rep), ["stuck_creating.repaired=1"]);
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("failed"));
    assert_eq!(db.state(&sid(2)).await.as_deref(), Some("creating"));
}

#[tokio::test]
async fn a_drifted_row_follows_the_controller_and_consistent_rows_are_untouched() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    a.add(&sid(1), "u1", "paused", Some(ago(600)));
    for i in 10..20 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
        a.add(&sid(i), &format!("u{i}"), "active", Some(ago(600)));
    }
    let before: Vec<_> = fingerprint(&db).await.into_iter().filter(|(id, _, _)| id != &sid(1)).collect();
    let cfg = config(&db, &[&a], IMMEDIATE);

    let rep = once(&cfg).await;

    assert_eq!(outcomes(&rep), ["drift.repaired=1"]);
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("paused"));
    let after: Vec<_> = fingerprint(&db).await.into_iter().filter(|(id, _, _)| id != &sid(1)).collect();
    assert_eq!(after, before, "no other row was written");
    assert_eq!(db.audit_count().await, 1);
}

#[tokio::test]
async fn observe_mode_and_dry_run_change_nothing_anywhere() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await; // orphan
    db.insert(&sid(2), "u2", "ctrl-a", "stopped", ago(600)).await; // zombie
    a.add(&sid(2), "u2", "running", Some(ago(600)));
    a.add(&sid(3), "u3", "running", Some(ago(600))); // unpersisted
    let state_rows = |db: &TestDb| {
        let db = db.url.clone();
        async move {
            let (c, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            c.query_one("SELECT count(*) FROM sessiond_instance_state", &[]).await.expect("count").get::<_, i64>(0)
        }
    };
    let before = fingerprint(&db).await;

    let observe = config(&db, &[&a], &format!("{IMMEDIATE}\n")).as_ref().clone();
    let mut observe = observe;
    observe.daemon.mode = sessiond::config::Mode::Observe;
    let rep = once(&std::sync::Arc::new(observe)).await;
    assert_eq!(outcomes(&rep), ["orphaned.reported=1", "unpersisted.reported=1", "zombie.reported=1"]);

    let cfg = config(&db, &[&a], IMMEDIATE);
    let mut r = Reconciler::new(cfg.clone()).expect("a reconciler");
    let dry = r.pass(PassRequest::once().dry_run(true)).await;
    assert_eq!(outcomes(&dry), ["orphaned.reported=1", "unpersisted.reported=1", "zombie.reported=1"]);

    assert_eq!(fingerprint(&db).await, before);
    assert_eq!(db.audit_count().await, 0);
    assert_eq!(state_rows(&db).await, 0, "not even sessiond's own state");
    assert!(a.stops().is_empty(), "no stop request");
}

#[tokio::test]
async fn the_daemon_needs_confirmations_consecutive_passes_before_repairing() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    let cfg = config(&db, &[&a], "grace = \"0s\"\nconfirmations = 2");
    let mut r = Reconciler::new(cfg).expect("a reconciler");

    let first = r.pass(PassRequest::daemon()).await;
    assert!(outcomes(&first).is_empty(), "waiting: {:?}", first.findings);
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"));
    let second = r.pass(PassRequest::daemon()).await;
    assert_eq!(outcomes(&second), ["orphaned.repaired=1"]);
}

#[tokio::test]
async fn a_bearer_token_from_token_file_is_sent_to_the_controller() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.require_token(Some("s3cret-token"));
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").expect("write the token");
    let text = common::TestConfig::new(&db)
        .controllers(&[&a])
        .reconcile_toml(IMMEDIATE)
        .controller("token_file", token.display().to_string())
        .toml();
    let cfg = sessiond::config::Config::from_toml(std::path::Path::new("t.toml"), &text, &Default::default())
        .expect("valid config");
    assert!(!format!("{cfg:?}").contains("s3cret"), "the token never shows in Debug output");
    let rep = once(&std::sync::Arc::new(cfg)).await;
    assert!(rep.instances[0].reachable, "{:?}", rep.instances[0].error);

    // Without the token the controller refuses, and that is an unreachable instance.
    let rep = once(&config(&db, &[&a], IMMEDIATE)).await;
    assert!(!rep.instances[0].reachable);
    assert!(rep.instances[0].error.as_deref().unwrap_or("").contains("401"));
}

#[tokio::test]
async fn the_database_is_read_after_the_slowest_controller_answered() {
    // The snapshot-skew rule rests on this order: a row written before the
    // last list arrived is in the pass's snapshot, which is therefore never
    // older than any list.
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let b = SimController::start("ctrl-b").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    b.set_fault(sessiond::simctl::Fault::SlowOnce(std::time::Duration::from_millis(1500)));
    let cfg = config(&db, &[&a, &b], IMMEDIATE);
    let pass = tokio::spawn(async move { once(&cfg).await });

    // Written while ctrl-b has not answered yet.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    db.insert(&sid(2), "u2", "ctrl-b", "active", ago(600)).await;
    let rep = pass.await.expect("the pass");

    assert_eq!(rep.outcome, PassOutcome::Ok, "{:?}", rep.error);
    assert_eq!(rep.rows_by_state.get("active"), Some(&2), "the read saw the row written before ctrl-b answered");
}
