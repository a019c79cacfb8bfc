//! The daemon under exactly the least-privileged role of `docs/sessiond-role.sql`:
//! every kind of repair works, and without a privilege it needs the pass says
//! clearly which one is missing.

mod common;

use std::sync::Arc;

use common::{ago, config_text, outcomes, sid, Role, TestDb, IMMEDIATE};
use sessiond::config::{Config, Overrides};
use sessiond::reconcile::{PassOutcome, PassRequest, Reconciler};
use sessiond::simctl::SimController;

fn as_role(db: &TestDb, role: &Role, a: &SimController) -> Arc<Config> {
    let mut url = reqwest::Url::parse(&db.url).expect("url");
    let _ = url.set_username(&role.name);
    let text = config_text(db, &[a], IMMEDIATE).replace(&db.url, url.as_str());
    Arc::new(Config::from_toml(std::path::Path::new("t.toml"), &text, &Overrides::default()).expect("config"))
}

#[tokio::test]
async fn the_least_privileged_role_repairs_every_kind() {
    // Declared first so it is dropped after the database that refers to it.
    let role;
    let db = TestDb::migrated().await;
    role = Role::create(&db, "docs/sessiond-role.sql");
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await; // orphaned
    db.insert(&sid(2), "u2", "ctrl-a", "stopped", ago(600)).await; // zombie
    a.add(&sid(2), "u2", "running", Some(ago(700)));
    a.add(&sid(3), "u3", "running", Some(ago(600))); // unpersisted
    db.insert(&sid(4), "u4", "ctrl-a", "creating", ago(600)).await; // stuck
    db.insert(&sid(5), "u5", "ctrl-a", "active", ago(600)).await; // drift
    a.add(&sid(5), "u5", "paused", Some(ago(600)));

    let rep = Reconciler::new(as_role(&db, &role, &a)).expect("reconciler").pass(PassRequest::once()).await;

    assert_eq!(rep.outcome, PassOutcome::Ok, "{:?} {:?}", rep.error, rep.findings);
    assert_eq!(
        outcomes(&rep),
        [
            "drift.repaired=1",
            "orphaned.repaired=1",
            "stuck_creating.repaired=1",
            "unpersisted.repaired=1",
            "zombie.repaired=1"
        ]
    );
    assert_eq!(db.audit_count().await, 5);
    let saved: i64 =
        db.client().await.query_one("SELECT count(*) FROM sessiond_instance_state", &[]).await.expect("count").get(0);
    assert_eq!(saved, 1, "the boot id was remembered");
}

#[tokio::test]
async fn a_missing_privilege_fails_clearly_naming_the_table() {
    let role;
    let db = TestDb::migrated().await;
    role = Role::create(&db, "docs/sessiond-role.sql");
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    let admin = db.client().await;

    admin.batch_execute(&format!("REVOKE UPDATE ON sessions FROM {}", role.name)).await.expect("revoke");
    let rep = Reconciler::new(as_role(&db, &role, &a)).expect("reconciler").pass(PassRequest::once()).await;
    assert_eq!(rep.outcome, PassOutcome::Partial);
    let err = rep.findings.iter().find_map(|f| f.error.clone()).unwrap_or_default();
    assert!(err.contains("permission denied for table sessions"), "{err}");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"));

    admin.batch_execute(&format!("REVOKE SELECT ON sessions FROM {}", role.name)).await.expect("revoke");
    let rep = Reconciler::new(as_role(&db, &role, &a)).expect("reconciler").pass(PassRequest::once()).await;
    assert_eq!(rep.outcome, PassOutcome::Failed);
    assert!(rep.error.as_deref().unwrap_or("").contains("permission denied for table sessions"), "{:?}", rep.error);
}

#[tokio::test]
async fn the_least_privileged_role_leads_with_ha_and_repairs_under_its_term() {
    let role;
    let db = TestDb::migrated().await;
    role = Role::create(&db, "docs/sessiond-role.sql");
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await; // orphaned
    db.insert(&sid(2), "u2", "ctrl-a", "stopped", ago(600)).await; // zombie
    a.add(&sid(2), "u2", "running", Some(ago(700)));
    let mut url = reqwest::Url::parse(&db.url).expect("url");
    let _ = url.set_username(&role.name);
    let text = format!(
        "{}\n[ha]\nenabled = true\nlease = \"10s\"\n",
        config_text(&db, &[&a], IMMEDIATE).replace(&db.url, url.as_str())
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::write(dir.path(), "sessiond.toml", &text);
    let p = path.to_str().expect("utf-8").to_owned();
    let out = tokio::task::spawn_blocking(move || common::run(&["once", "--config", &p])).await.expect("join");

    assert_eq!(out.status.code(), Some(0), "{}\n{}", common::text(&out.stdout), common::text(&out.stderr));
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("stopped"));
    assert_eq!(a.stops(), [sid(2)]);
    let terms: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM session_audit WHERE details->>'term' = '1'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(terms, 2, "both repairs were made, and audited, under term 1");
    let stops = a.stop_requests();
    assert_eq!(stops[0].term, Some(1));
    assert!(stops[0].actor.as_deref().is_some_and(|x| x.starts_with("sessiond@")), "{:?}", stops[0].actor);
}
