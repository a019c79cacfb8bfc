//! Faults: controllers that answer badly, an application write racing a repair,
//! and a database connection killed in the middle of a repair batch.

mod common;

use std::sync::Arc;

use common::{ago, config, outcomes, sid, TestDb, IMMEDIATE};
use sessiond::config::{Config, Overrides};
use sessiond::reconcile::{PassOutcome, PassRequest, Reconciler};
use sessiond::simctl::{Fault, SimController};

fn cfg_with(db: &TestDb, a: &SimController, timeout: &str, max_body_bytes: i64) -> Arc<Config> {
    let text = common::TestConfig::new(db)
        .controllers(&[a])
        .reconcile_toml(IMMEDIATE)
        .controller("timeout", timeout)
        .controller("max_body_bytes", max_body_bytes)
        .toml();
    Arc::new(Config::from_toml(std::path::Path::new("t.toml"), &text, &Overrides::default()).expect("valid config"))
}

async fn wait_for_blocked_sessiond(db: &TestDb, n: i64) {
    assert!(common::wait_for_blocked_sessiond(db, n).await, "sessiond never blocked on the row lock");
}

#[tokio::test]
async fn a_controller_that_answers_badly_is_unreachable_never_empty() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    // Were the bad answer read as "no sessions", all of these would be orphans.
    for i in 0..3 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
    }
    let cfg = cfg_with(&db, &a, "500ms", 1048576);
    let cases = [
        (Fault::Status(500), "HTTP 500"),
        (Fault::Hang, "timed out"),
        (Fault::Garbage, "invalid JSON"),
        (Fault::Endless, "larger than max_body_bytes"),
        (Fault::NoSessions, "no \"sessions\" array"),
        (Fault::Redirect, "HTTP 302"),
        (Fault::Raw("{\"instance\": \"ctrl-b\", \"boot_id\": \"x\", \"sessions\": []}".into()), "names instance"),
        (Fault::Raw("{\"boot_id\": \"x\", \"sessions\": {}}".into()), "invalid JSON"),
    ];
    for (fault, message) in cases {
        a.set_fault(fault.clone());
        let mut r = Reconciler::new(cfg.clone()).expect("a reconciler");
        let rep = r.pass(PassRequest::once()).await;
        let err = rep.instances[0].error.clone().unwrap_or_default();
        assert!(!rep.instances[0].reachable, "{fault:?} left the instance reachable");
        assert!(err.contains(message), "{fault:?}: error {err:?} does not say {message:?}");
        assert_eq!(rep.outcome, PassOutcome::Partial, "{fault:?}");
        assert!(outcomes(&rep).is_empty(), "{fault:?} led to repairs: {:?}", rep.findings);
        assert_eq!(rep.findings.iter().filter(|f| f.finding.kind.as_str() == "unverifiable").count(), 3);
    }
    for i in 0..3 {
        assert_eq!(db.state(&sid(i)).await.as_deref(), Some("active"));
    }
    assert_eq!(db.audit_count().await, 0);
}

#[tokio::test]
async fn one_bad_entry_is_a_finding_about_that_entry_and_the_rest_of_the_list_is_used() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    db.insert(&sid(2), "u2", "ctrl-a", "active", ago(600)).await;
    db.insert(&sid(3), "u3", "ctrl-a", "active", ago(600)).await; // an orphan
    let doc = serde_json::json!({
        "instance": "ctrl-a", "boot_id": "b1", "generated_at": "2026-11-21T10:00:00Z",
        "sessions": [
            {"session_id": sid(1), "owner_id": "u1", "state": "running", "started_at": "2026-11-21T09:59:58Z"},
            {"session_id": sid(2), "owner_id": "u2", "state": "exploding"},
            {"session_id": "../../etc/passwd", "owner_id": "u9", "state": "running"},
            {"owner_id": "u8", "state": "running"},
            42
        ]
    });
    a.set_fault(Fault::Raw(doc.to_string()));
    let rep = Reconciler::new(config(&db, &[&a], IMMEDIATE)).expect("reconciler").pass(PassRequest::once()).await;

    assert_eq!(rep.outcome, PassOutcome::Ok);
    let kinds: Vec<(&str, &str)> =
        rep.findings.iter().map(|f| (f.finding.kind.as_str(), f.finding.subject.as_str())).collect();
    assert!(kinds.contains(&("invalid_entry", sid(2).as_str())), "{kinds:?}");
    assert!(kinds.contains(&("invalid_id", "../../etc/passwd")), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|(k, _)| *k == "invalid_id").count(), 3, "{kinds:?}");
    assert_eq!(outcomes(&rep), ["orphaned.repaired=1"]);
    assert_eq!(db.state(&sid(2)).await.as_deref(), Some("active"), "an unusable entry still holds its row");
    assert_eq!(db.state(&sid(3)).await.as_deref(), Some("stopped"));
}

#[tokio::test]
async fn a_row_the_application_holds_locked_is_a_conflict_at_once_and_its_write_survives() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    db.insert(&sid(2), "u2", "ctrl-a", "active", ago(600)).await;
    let cfg = config(&db, &[&a], IMMEDIATE);

    // The application touches one orphan's row (a heartbeat that leaves the
    // state alone) and holds its row lock while the pass runs.
    let mut app = db.client().await;
    let tx = app.transaction().await.expect("begin");
    tx.execute("UPDATE sessions SET end_reason = 'app-was-here', updated_at = now() WHERE session_id = $1", &[&sid(1)])
        .await
        .expect("the application's write");
    let started = std::time::Instant::now();
    let rep = Reconciler::new(cfg).expect("reconciler").pass(PassRequest::once()).await;
    let took = started.elapsed();
    tx.commit().await.expect("commit the application's write");

    assert_eq!(outcomes(&rep), ["orphaned.conflict=1", "orphaned.repaired=1"]);
    assert!(took < std::time::Duration::from_secs(3), "the pass waited on the row lock: {took:?}");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"), "the repair did not apply");
    assert_eq!(db.state(&sid(2)).await.as_deref(), Some("stopped"), "the other repair did");
    let reason: Option<String> = db
        .client()
        .await
        .query_one("SELECT end_reason FROM sessions WHERE session_id = $1", &[&sid(1)])
        .await
        .expect("read")
        .get(0);
    assert_eq!(reason.as_deref(), Some("app-was-here"), "the application's write survives");
    assert_eq!(db.audit_count().await, 1);
}

#[tokio::test]
async fn a_connection_killed_mid_batch_repairs_nothing_and_the_next_pass_converges() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    for i in 0..3 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
    }
    for i in 3..10 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(600)));
    }
    let cfg = config(&db, &[&a], IMMEDIATE);
    let mut r = Reconciler::new(cfg).expect("reconciler");

    // Hold the audit table so the batch is mid-flight (waiting to write its
    // audit rows) when we kill it.
    let mut gate = db.client().await;
    let tx = gate.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE session_audit IN ACCESS EXCLUSIVE MODE").await.expect("lock");
    let killer = {
        let db_url = db.url.clone();
        let db_name = db.name.clone();
        tokio::spawn(async move {
            let probe = TestDb { name: db_name, url: db_url };
            wait_for_blocked_sessiond(&probe, 1).await;
            let c = probe.client().await;
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = current_database() AND application_name LIKE 'sessiond/%'",
                &[],
            )
            .await
            .expect("terminate sessiond's backend");
            std::mem::forget(probe); // the test's own TestDb drops the database
        })
    };
    let rep = r.pass(PassRequest::once()).await;
    killer.await.expect("killer");
    tx.rollback().await.expect("release the gate");

    assert_eq!(rep.outcome, PassOutcome::Partial);
    assert_eq!(outcomes(&rep), ["orphaned.failed=3"]);
    for i in 0..3 {
        assert_eq!(db.state(&sid(i)).await.as_deref(), Some("active"), "no partial repair");
    }
    assert_eq!(db.audit_count().await, 0);

    // Same reconciler: it reconnects and converges.
    let rep = r.pass(PassRequest::once()).await;
    assert_eq!(rep.outcome, PassOutcome::Ok, "{:?}", rep.error);
    assert_eq!(outcomes(&rep), ["orphaned.repaired=3"]);
    assert_eq!(db.audit_count().await, 3);
}

#[tokio::test]
async fn an_unreachable_database_fails_the_pass_and_changes_nothing_at_the_controller() {
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    let text = format!(
        "[database]\nurl = \"postgres://postgres@127.0.0.1:9/nowhere\"\nstatement_timeout = \"2s\"\n\n\
         [[controller]]\nname = \"ctrl-a\"\nurl = \"{}\"\nstop_url = \"{}\"\n",
        a.url(),
        a.stop_url()
    );
    let cfg = Config::from_toml(std::path::Path::new("t.toml"), &text, &Overrides::default()).expect("valid config");
    let rep = Reconciler::new(Arc::new(cfg)).expect("reconciler").pass(PassRequest::once()).await;
    assert_eq!(rep.outcome, PassOutcome::Failed);
    assert!(!rep.database_up);
    assert!(rep.error.as_deref().unwrap_or("").contains("127.0.0.1:9"), "{:?}", rep.error);
    assert!(rep.findings.is_empty());
    assert!(a.stops().is_empty());
}

#[tokio::test]
async fn a_database_without_the_schema_fails_the_pass_with_what_to_run() {
    let db = TestDb::empty().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let rep = Reconciler::new(config(&db, &[&a], IMMEDIATE)).expect("reconciler").pass(PassRequest::once()).await;
    assert_eq!(rep.outcome, PassOutcome::Failed);
    assert!(rep.error.as_deref().unwrap_or("").contains("sessiond migrate"), "{:?}", rep.error);
}

/// Another sessiond stops a zombie and settles it between this pass's fetch
/// and its read, but could not touch the row (the application held it just
/// then), so the row is as it was. The read sees that row and the list as it
/// was before the stop: a zombie still, of an unchanged row. The stop would
/// be the session's second; the stop settled since the pass began
/// gathering its evidence makes it a conflict instead.
#[tokio::test]
async fn a_zombie_another_sessiond_stopped_after_this_pass_fetched_is_not_stopped_again() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "stopped", ago(600)).await;
    a.add(&sid(1), "u1", "running", Some(ago(700)));
    let cfg = config(&db, &[&a], IMMEDIATE);

    // Hold the pass after it fetched the list and before its read begins
    // (where it looks whether an operator paused sessiond).
    let mut gate = db.client().await;
    let gate = gate.transaction().await.expect("begin");
    gate.batch_execute("LOCK TABLE sessiond_pause IN ACCESS EXCLUSIVE MODE").await.expect("lock");
    let pass = tokio::spawn(async move { Reconciler::new(cfg).expect("reconciler").pass(PassRequest::once()).await });
    assert!(common::wait_for_blocked_sessiond(&db, 1).await, "the pass reached its read");
    // Longer after the fetch than the pass's margin for clock error.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // The other sessiond: stops the session, then settles its intent and
    // audits the stop.
    assert!(a.remove(&sid(1)), "the controller held the session");
    db.client()
        .await
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO sessiond_stop_intents (session_id, controller, kind, row_version, row_state, end_row,
                                                pass_id, actor, expires_at, settled_at, outcome)
             VALUES ('{id}', 'ctrl-a', 'zombie', '1', 'stopped', false, 'other', 'the-other-sessiond',
                     now(), now(), 'stopped');
             INSERT INTO session_audit (session_id, old_state, new_state, trigger, actor, reason)
             VALUES ('{id}', 'stopped', 'stopped', 'reconciler', 'the-other-sessiond', 'zombie');
             COMMIT;",
            id = sid(1)
        ))
        .await
        .expect("the other sessiond's settle");
    // And the read comes later still than that margin after the stop.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    gate.rollback().await.expect("release the pass");
    let rep = pass.await.expect("join");

    assert_eq!(outcomes(&rep), ["zombie.conflict=1"]);
    assert_eq!(a.stops(), Vec::<String>::new(), "no second stop was sent");
    assert_eq!(db.audit(&sid(1)).await.len(), 1, "the other sessiond's audit row only");
}
