//! The Python reference controller (`examples/python`), run for real in a
//! virtual environment: `sessiond check` passes against it, its orphan and its
//! zombie are repaired, and several worker processes behind one port, each
//! with its own sessions, never have a session ended or stopped.

mod common;

use std::time::Duration;

use common::{ago, Daemon, PythonController, TestDb};

fn config(db: &TestDb, c: &PythonController, reconcile: &str) -> String {
    format!(
        "[daemon]\ninterval = \"1s\"\n\n[database]\nurl = \"{}\"\nstatement_timeout = \"5s\"\n\n{}[reconcile]\n{reconcile}\n",
        db.url,
        c.controller_toml("ctrl-a")
    )
}

async fn run(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        common::run(&a)
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn the_reference_controller_passes_check_and_has_its_orphan_and_zombie_repaired() {
    let db = TestDb::migrated().await;
    let c = PythonController::start("ctrl-a", 1).await;
    let mut healthy = Vec::new();
    for i in 0..6 {
        let (id, _) = c.create(&format!("u{i}")).await;
        db.insert(&id, &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
        healthy.push(id);
    }
    // An orphan: the application's cleanup cleared its memory, not its row.
    let (orphan, _) = c.create("u-orphan").await;
    db.insert(&orphan, "u-orphan", "ctrl-a", "active", ago(600)).await;
    c.forget(&orphan).await;
    // A zombie: the row says stopped, the process still runs it.
    let (zombie, _) = c.create("u-zombie").await;
    db.insert(&zombie, "u-zombie", "ctrl-a", "stopped", ago(600)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::write(dir.path(), "s.toml", &config(&db, &c, "grace = \"0s\"\nconfirmations = 1"));
    let p = path.to_str().expect("utf-8");

    let checked = run(&["check", "--config", p]).await;
    let text = common::text(&checked.stdout);
    assert_eq!(checked.status.code(), Some(0), "{text}{}", common::text(&checked.stderr));
    assert!(!text.contains("fail"), "{text}");

    let once = run(&["once", "--config", p]).await;
    assert_eq!(once.status.code(), Some(0), "{}", common::text(&once.stdout));
    assert_eq!(db.state(&orphan).await.as_deref(), Some("stopped"), "the orphan's row is ended");
    assert_eq!(db.audit(&zombie).await.len(), 1, "the zombie's stop is audited");
    let list = common::http().get(c.url()).send().await.expect("GET").text().await.expect("body");
    assert!(!list.contains(&zombie), "the zombie was stopped in the controller");
    for id in &healthy {
        assert_eq!(db.state(id).await.as_deref(), Some("active"));
    }
}

#[tokio::test]
async fn several_worker_processes_behind_one_port_never_have_a_session_ended_or_stopped() {
    let db = TestDb::migrated().await;
    let c = PythonController::start("ctrl-a", 3).await;
    // Sessions until every process holds some: each request lands on a process
    // the kernel picks at random.
    let mut by_boot: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut all = Vec::new();
    for i in 0..200 {
        let (id, boot) = c.create(&format!("u{i}")).await;
        db.insert(&id, &format!("u{i}"), "ctrl-a", "active", ago(600)).await;
        by_boot.entry(boot).or_default().push(id.clone());
        all.push(id);
        if by_boot.len() == 3 && by_boot.values().all(|v| v.len() >= 3) {
            break;
        }
    }
    assert_eq!(by_boot.len(), 3, "three processes took sessions");

    let d = Daemon::start(&config(&db, &c, "grace = \"0s\"\nconfirmations = 2")).await;
    tokio::time::sleep(Duration::from_secs(12)).await; // about 24 passes
    let metrics = d.get("/metrics").await.map(|(_, _, body)| body).unwrap_or_default();
    drop(d);

    for id in &all {
        assert_eq!(db.state(id).await.as_deref(), Some("active"), "a live session's row was ended");
    }
    assert_eq!(db.audit_count().await, 0, "nothing was repaired");
    let list = common::http().get(c.url()).send().await.expect("GET").text().await.expect("body");
    let doc: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let boot = doc["boot_id"].as_str().expect("a boot id");
    let held = doc["sessions"].as_array().map_or(0, Vec::len);
    assert_eq!(held, by_boot[boot].len(), "no session was stopped in the process that answered");
    assert!(
        metrics.contains("sessiond_controller_inconsistent{controller=\"ctrl-a\"} 1"),
        "the inconsistency is exported:\n{}",
        metrics.lines().filter(|l| l.contains("inconsistent")).collect::<Vec<_>>().join("\n")
    );
}

#[tokio::test]
async fn the_reference_controllers_document_matches_the_json_schema() {
    let c = PythonController::start("ctrl-a", 1).await;
    c.create("u1").await;
    let body = common::http().get(c.url()).send().await.expect("GET").text().await.expect("body");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(common::schema_errors(&doc), Vec::<String>::new(), "{doc}");
}

#[tokio::test]
async fn the_reference_controller_refuses_a_stop_from_a_leader_term_older_than_one_it_has_seen() {
    let pc = PythonController::start("ctrl-py", 1).await;
    let (first, _) = pc.create("u1").await;
    let (second, _) = pc.create("u2").await;
    let stop = |id: &str, term: &str| {
        common::http()
            .post(pc.stop_url().replace("{session_id}", id))
            .header("sessiond-actor", "sessiond@test/1/abcd")
            .header("sessiond-term", term)
            .send()
    };
    let newer = stop(&first, "7").await.expect("stop");
    assert_eq!(newer.status().as_u16(), 200, "a stop from term 7 is carried out");
    let stale = stop(&second, "6").await.expect("stop");
    assert_eq!(stale.status().as_u16(), 409, "term 6 is older than one seen");
    let body = common::http().get(pc.url()).send().await.expect("list").text().await.expect("a body");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let held: Vec<&str> =
        doc["sessions"].as_array().expect("sessions").iter().filter_map(|s| s["session_id"].as_str()).collect();
    assert_eq!(held, [second.as_str()], "the stale stop stopped nothing");
    assert_eq!(stop(&second, "7").await.expect("stop").status().as_u16(), 200, "the same term is accepted");
}
