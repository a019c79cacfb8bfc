//! The session lifecycle the seeds asked for, on a real PostgreSQL: every
//! transition audited (the application's as `app`, sessiond's as
//! `reconciler`, never both), no hard deletes, no resurrection of a deleted
//! session, `sessiond_lookup` with a reason, and the lifecycle metrics.

mod common;

use std::time::Duration;

use common::{ago, config, config_text, sid, Daemon, TestDb, IMMEDIATE};
use sessiond::reconcile::{PassRequest, Reconciler};
use sessiond::simctl::SimController;

/// Every audit row of `id`: (trigger, old_state, new_state, reason).
async fn trail(db: &TestDb, id: &str) -> Vec<(String, Option<String>, Option<String>, Option<String>)> {
    db.client()
        .await
        .query(
            "SELECT trigger, old_state, new_state, reason FROM session_audit WHERE session_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .expect("read the trail")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn row(
    trigger: &str,
    old: Option<&str>,
    new: Option<&str>,
    reason: Option<&str>,
) -> (String, Option<String>, Option<String>, Option<String>) {
    (trigger.to_owned(), old.map(str::to_owned), new.map(str::to_owned), reason.map(str::to_owned))
}

#[tokio::test]
async fn the_application_s_transitions_are_audited_as_app_and_sessiond_s_repairs_once_as_reconciler() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let app = db.client().await;
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    app.execute("UPDATE sessions SET state = 'paused' WHERE session_id = $1", &[&sid(1)]).await.expect("pause");
    // A write that does not change the state is not a transition.
    app.execute("UPDATE sessions SET updated_at = now() WHERE session_id = $1", &[&sid(1)]).await.expect("touch");
    assert_eq!(
        trail(&db, &sid(1)).await,
        [row("app", None, Some("active"), Some("created")), row("app", Some("active"), Some("paused"), None)]
    );

    // sessiond ends it (an orphan: the controller holds nothing).
    let rep = Reconciler::new(config(&db, &[&a], IMMEDIATE)).expect("reconciler").pass(PassRequest::once()).await;
    assert_eq!(common::outcomes(&rep), ["orphaned.repaired=1"]);
    let t = trail(&db, &sid(1)).await;
    assert_eq!(t.len(), 3, "one more row, not two: {t:?}");
    assert_eq!(t[2], row("reconciler", Some("paused"), Some("stopped"), Some("orphaned")));

    // The application's own ending is audited as such.
    db.insert(&sid(2), "u2", "ctrl-a", "active", ago(600)).await;
    app.execute(
        "UPDATE sessions SET state = 'stopped', ended_at = now(), end_reason = 'user_closed' WHERE session_id = $1",
        &[&sid(2)],
    )
    .await
    .expect("stop");
    assert_eq!(trail(&db, &sid(2)).await[1], row("app", Some("active"), Some("stopped"), Some("user_closed")));
}

#[tokio::test]
async fn a_delete_is_refused_with_what_to_do_instead_and_the_row_stays() {
    let db = TestDb::migrated().await;
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    let app = db.client().await;
    let err = app.execute("DELETE FROM sessions WHERE session_id = $1", &[&sid(1)]).await.expect_err("refused");
    let text = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(text.contains("never deleted") && text.contains("state = 'deleted'"), "{text}");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::RESTRICT_VIOLATION));
    assert!(app.batch_execute("TRUNCATE sessions").await.is_err(), "TRUNCATE too");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"), "the row is unchanged");
    // The soft delete the message asks for works.
    app.execute("UPDATE sessions SET state = 'deleted', deleted_at = now() WHERE session_id = $1", &[&sid(1)])
        .await
        .expect("soft delete");
    assert_eq!(trail(&db, &sid(1)).await.last().map(|r| r.2.clone()), Some(Some("deleted".into())));
}

#[tokio::test]
async fn a_live_session_whose_row_was_deleted_is_stopped_and_never_re_inserted() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    // The application created the row (audited), then someone bypassed the
    // triggers and deleted it; the controller still runs the session.
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    db.client()
        .await
        .batch_execute(&format!(
            "SET session_replication_role = replica; DELETE FROM sessions WHERE session_id = '{}'",
            sid(1)
        ))
        .await
        .expect("a delete behind the triggers' back");
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    // And a session that never had a row is still inserted.
    a.add(&sid(2), "u2", "running", Some(ago(600)));

    let rep = Reconciler::new(config(&db, &[&a], IMMEDIATE)).expect("reconciler").pass(PassRequest::once()).await;

    assert_eq!(common::outcomes(&rep), ["unpersisted.repaired=1", "zombie.repaired=1"]);
    let zombie = rep.findings.iter().find(|f| f.finding.subject == sid(1)).expect("a finding");
    assert!(zombie.finding.detail.contains("row is gone"), "{}", zombie.finding.detail);
    assert_eq!(a.stops(), [sid(1)], "the deleted session is stopped");
    assert_eq!(db.state(&sid(1)).await, None, "and not resurrected");
    assert_eq!(db.state(&sid(2)).await.as_deref(), Some("active"));
    assert_eq!(rep.probes.all.deleted, 1, "the lookup would say deleted");
    let t = trail(&db, &sid(1)).await;
    assert_eq!(t.last(), Some(&row("reconciler", Some("deleted"), Some("deleted"), Some("zombie"))), "{t:?}");
}

#[tokio::test]
async fn a_session_deleted_from_a_mapped_table_is_known_by_sessiond_s_own_trail() {
    // No triggers on a table of one's own: sessiond's own audit row (it inserted
    // the row for an unpersisted session) is the evidence.
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let app = db.client().await;
    app.batch_execute(
        "CREATE TABLE app_sessions (id text PRIMARY KEY, who text NOT NULL, ctrl text NOT NULL, status text NOT NULL,
                                    started timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .expect("the application's table");
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    let mapped = format!(
        "{}\n[sessions]\ntable = \"app_sessions\"\n\n[sessions.columns]\nid = \"id\"\nowner = \"who\"\ninstance = \"ctrl\"\n\
         state = \"status\"\ncreated_at = \"started\"\n",
        config_text(&db, &[&a], IMMEDIATE)
    );
    let cfg = std::sync::Arc::new(
        sessiond::config::Config::from_toml(std::path::Path::new("t.toml"), &mapped, &Default::default())
            .expect("config"),
    );
    let mut r = Reconciler::new(std::sync::Arc::clone(&cfg)).expect("reconciler");
    assert_eq!(common::outcomes(&r.pass(PassRequest::once()).await), ["unpersisted.repaired=1"]);
    app.execute("DELETE FROM app_sessions WHERE id = $1", &[&sid(1)]).await.expect("a hard delete");

    let rep = r.pass(PassRequest::once()).await;
    assert_eq!(common::outcomes(&rep), ["zombie.repaired=1"], "{:?}", rep.findings);
    assert_eq!(a.stops(), [sid(1)]);
    let left: i64 = app.query_one("SELECT count(*) FROM app_sessions", &[]).await.expect("count").get(0);
    assert_eq!(left, 0, "nothing re-inserted");
}

async fn lookup(db: &TestDb, id: &str, include_deleted: bool) -> (bool, String, Option<String>) {
    let r = db
        .client()
        .await
        .query_one("SELECT found, reason, state FROM sessiond_lookup($1, $2)", &[&id, &include_deleted])
        .await
        .expect("one statement");
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test]
async fn sessiond_lookup_gives_every_reason_in_one_statement_through_the_id_index() {
    let db = TestDb::migrated().await;
    let app = db.client().await;
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    db.insert(&sid(2), "u2", "ctrl-a", "stopped", ago(600)).await;
    db.insert(&sid(3), "u3", "ctrl-a", "failed", ago(600)).await;
    db.insert(&sid(4), "u4", "ctrl-a", "deleted", ago(600)).await;
    db.insert(&sid(5), "u5", "ctrl-a", "active", ago(600)).await;
    app.batch_execute(&format!(
        "SET session_replication_role = replica; DELETE FROM sessions WHERE session_id = '{}'; \
         SET session_replication_role = origin",
        sid(5)
    ))
    .await
    .expect("a hard delete behind the triggers' back");

    let s = |v: &str| Some(v.to_owned());
    assert_eq!(lookup(&db, &sid(1), false).await, (true, "ok".into(), s("active")));
    assert_eq!(lookup(&db, &sid(2), false).await, (true, "ended".into(), s("stopped")));
    assert_eq!(lookup(&db, &sid(3), false).await, (true, "ended".into(), s("failed")));
    assert_eq!(lookup(&db, &sid(4), false).await, (false, "deleted".into(), s("deleted")));
    assert_eq!(lookup(&db, &sid(4), true).await, (true, "deleted".into(), s("deleted")), "include_deleted");
    assert_eq!(lookup(&db, &sid(5), true).await, (false, "deleted".into(), None), "gone, but the trail knows it");
    assert_eq!(lookup(&db, &sid(6), true).await, (false, "never_existed".into(), None));
    assert_eq!(lookup(&db, "exec_bogus", false).await, (false, "invalid_format".into(), None));
    assert_eq!(lookup(&db, "'; DROP TABLE sessions; --", false).await.1, "invalid_format");
    let one: (bool, String, Option<String>) = {
        let r = app.query_one("SELECT * FROM sessiond_lookup($1)", &[&sid(1)]).await.expect("default argument");
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(one.1, "ok");

    // With enough rows for the planner to care, the lookup is an index scan.
    app.batch_execute(
        "INSERT INTO sessions (session_id, owner_id, controller_instance, state, created_at)
         SELECT 'exec_20260101_000000_' || lpad(to_hex(n), 8, '0'), 'bulk-' || n, 'ctrl-a', 'stopped', now()
           FROM generate_series(1, 20000) n;
         ANALYZE sessions; ANALYZE session_audit;",
    )
    .await
    .expect("bulk rows");
    let plan: Vec<String> = app
        .query(&format!("EXPLAIN SELECT * FROM sessiond_lookup('{}')", sid(1)), &[])
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    eprintln!("EXPLAIN SELECT * FROM sessiond_lookup(…):\n{plan}");
    assert!(plan.contains("Index Scan using sessions_pkey"), "the id index serves the lookup:\n{plan}");
    assert!(!plan.contains("Seq Scan on sessions"), "no scan of the table:\n{plan}");
}

#[tokio::test]
async fn rapid_creates_are_counted_once_each_and_exported() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.observe_create(0.03);
    a.observe_create(0.2);
    a.observe_create(3.0);
    let daemon = Daemon::start(&config_text(&db, &[&a], "grace = \"30s\"\nrapid_create_window = \"10s\"")).await;
    daemon.wait_ready().await;
    // Three sessions of one owner within a second (the seed's incident), two of
    // them already ended by the application; and one owner's two sessions a
    // minute apart (not rapid).
    let app = db.client().await;
    app.batch_execute(&format!(
        "INSERT INTO sessions (session_id, owner_id, controller_instance, state, created_at) VALUES
            ('{}', 'u1', 'ctrl-a', 'stopped', now()),
            ('{}', 'u1', 'ctrl-a', 'stopped', now() + interval '300 ms'),
            ('{}', 'u1', 'ctrl-a', 'stopped', now() + interval '900 ms'),
            ('{}', 'u2', 'ctrl-a', 'stopped', now() - interval '60 s'),
            ('{}', 'u2', 'ctrl-a', 'stopped', now())",
        sid(1),
        sid(2),
        sid(3),
        sid(4),
        sid(5)
    ))
    .await
    .expect("rows");
    let metric = |body: &str, name: &str| -> Option<f64> {
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    let mut body = String::new();
    for _ in 0..100 {
        body = daemon.get("/metrics").await.map(|r| r.2).unwrap_or_default();
        if metric(&body, "sessiond_rapid_creates_total") == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&body, "sessiond_rapid_creates_total"), Some(2.0), "two rapid creates:\n{body}");
    // Later passes do not count them again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let body = daemon.get("/metrics").await.map(|r| r.2).unwrap_or_default();
    assert_eq!(metric(&body, "sessiond_rapid_creates_total"), Some(2.0));

    // The controller's creation times, re-exported as a histogram.
    let b =
        |le: &str| format!("sessiond_app_session_create_duration_seconds_bucket{{controller=\"ctrl-a\",le=\"{le}\"}}");
    assert_eq!(metric(&body, &b("0.05")), Some(1.0), "{body}");
    assert_eq!(metric(&body, &b("0.25")), Some(2.0));
    assert_eq!(metric(&body, &b("5")), Some(3.0));
    assert_eq!(metric(&body, &b("+Inf")), Some(3.0));
    assert_eq!(metric(&body, "sessiond_app_session_create_duration_seconds_count{controller=\"ctrl-a\"}"), Some(3.0));
    let sum = metric(&body, "sessiond_app_session_create_duration_seconds_sum{controller=\"ctrl-a\"}");
    assert!(sum.is_some_and(|s| (s - 3.23).abs() < 1e-9), "{sum:?}");
}

#[tokio::test]
async fn lookup_probes_tell_the_creation_race_from_lost_rows() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    // Two sessions with no row: one started a second ago (the creation race),
    // one ten minutes ago (a row that was never written).
    a.add(&sid(1), "u1", "running", Some(ago(1)));
    a.add(&sid(2), "u2", "running", Some(ago(600)));
    let daemon = Daemon::start(&config_text(&db, &[&a], "grace = \"5m\"\nconfirmations = 100")).await;
    daemon.wait_ready().await;
    let body = daemon.get("/metrics").await.map(|r| r.2).unwrap_or_default();
    let probe = |age: &str| -> f64 {
        let name =
            format!("sessiond_lookup_probes_total{{age=\"{age}\",reason=\"never_existed\",result=\"not_found\"}}");
        body.lines().find_map(|l| l.strip_prefix(&name)?.trim().parse().ok()).unwrap_or(-1.0)
    };
    let passes: f64 = body
        .lines()
        .filter(|l| l.starts_with("sessiond_reconcile_passes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(passes >= 1.0);
    assert_eq!(probe("young"), passes, "one young miss per pass:\n{body}");
    assert_eq!(probe("old"), passes, "one old miss per pass");
}

/// A table of the team's own, with uuid ids, two values for one state and a
/// soft-delete flag: the SQL `sessiond sql` prints for it, applied as printed.
const CONVERSATIONS: &str = "
CREATE TABLE conversation_sessions (
    id               uuid PRIMARY KEY,
    subcontractor_id uuid NOT NULL,
    worker           text NOT NULL,
    status           text NOT NULL,
    created_at       timestamptz NOT NULL,
    is_deleted       boolean
)";

const CONVERSATIONS_TOML: &str = r#"
[sessions]
table = "conversation_sessions"

[sessions.columns]
id = "id"
owner = "subcontractor_id"
instance = "worker"
state = "status"
created_at = "created_at"
deleted = "is_deleted"

[sessions.states]
creating = []
active = ["active", "running"]
paused = []
stopped = ["ended", "completed"]
failed = []
deleted = []
"#;

fn uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

#[tokio::test]
async fn the_sql_printed_for_a_mapped_table_audits_its_transitions_refuses_deletes_and_looks_up_uuids() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let app = db.client().await;
    app.batch_execute(CONVERSATIONS).await.expect("the application's table");
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!("{}\n{CONVERSATIONS_TOML}", config_text(&db, &[&a], IMMEDIATE));
    let path = common::write(dir.path(), "sessiond.toml", &text);
    let p = path.to_str().expect("utf-8 path");

    let before = common::table_definition(&db.url, "conversation_sessions");
    let triggers = common::run_async(&["sql", "audit-triggers", "--config", p]).await;
    assert!(triggers.status.success(), "{}", common::text(&triggers.stderr));
    let triggers = common::text(&triggers.stdout);
    assert_eq!(common::table_definition(&db.url, "conversation_sessions"), before, "printing alters nothing");
    assert!(triggers.contains("review, then apply"), "{triggers}");
    app.batch_execute(&triggers).await.expect("the printed SQL applies as printed");
    app.batch_execute(&triggers).await.expect("and applies again (idempotent)");

    let insert = "INSERT INTO conversation_sessions VALUES ($1::text::uuid, $2::text::uuid, 'ctrl-a', $3, now() - interval '10 minutes')";
    app.execute(insert, &[&uuid(1), &uuid(101), &"running"]).await.expect("insert");
    // Another value of the same canonical state is not a transition.
    app.execute("UPDATE conversation_sessions SET status = 'active' WHERE id = $1::text::uuid", &[&uuid(1)])
        .await
        .expect("relabel");
    app.execute("UPDATE conversation_sessions SET status = 'completed' WHERE id = $1::text::uuid", &[&uuid(1)])
        .await
        .expect("end");
    app.execute("UPDATE conversation_sessions SET is_deleted = true WHERE id = $1::text::uuid", &[&uuid(1)])
        .await
        .expect("soft delete");
    assert_eq!(
        trail(&db, &uuid(1)).await,
        [
            row("app", None, Some("active"), Some("created")),
            row("app", Some("active"), Some("stopped"), None),
            row("app", Some("stopped"), Some("deleted"), None),
        ]
    );

    let refused = app
        .execute("DELETE FROM conversation_sessions WHERE id = $1::text::uuid", &[&uuid(1)])
        .await
        .expect_err("a hard delete is refused");
    let message = refused.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("set \"is_deleted\" = true instead"), "{message}");
    app.batch_execute("TRUNCATE conversation_sessions").await.expect_err("so is TRUNCATE");
    let left: i64 = app.query_one("SELECT count(*) FROM conversation_sessions", &[]).await.expect("count").get(0);
    assert_eq!(left, 1);

    // sessiond's repair audits itself once, as the reconciler.
    app.execute(insert, &[&uuid(2), &uuid(102), &"running"]).await.expect("insert");
    let cfg =
        std::sync::Arc::new(sessiond::config::Config::from_toml(&path, &text, &Default::default()).expect("config"));
    let rep = Reconciler::new(cfg).expect("reconciler").pass(PassRequest::once()).await;
    assert_eq!(common::outcomes(&rep), ["orphaned.repaired=1"], "{:?}", rep.findings);
    assert_eq!(
        trail(&db, &uuid(2)).await,
        [
            row("app", None, Some("active"), Some("created")),
            row("reconciler", Some("active"), Some("stopped"), Some("orphaned"))
        ]
    );

    // Rapid creates read rows by created_at every pass: check asks for an index.
    let check = common::run_async(&["check", "--config", p]).await;
    let out = common::text(&check.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("warn")
                && l.contains("no index of public.conversation_sessions leads with created_at")),
        "{out}"
    );
    app.batch_execute("CREATE INDEX ON conversation_sessions (created_at)").await.expect("index");
    let out = common::text(&common::run_async(&["check", "--config", p]).await.stdout);
    assert!(out.lines().any(|l| l.starts_with("ok") && l.contains("read through an index on created_at")), "{out}");

    // The lookup, as `sessiond sql lookup` prints it, reads the uuid column
    // and the flag; an id that is no uuid is invalid, never a failed cast.
    let lookup_sql = common::run_async(&["sql", "lookup", "--config", p]).await;
    assert!(lookup_sql.status.success(), "{}", common::text(&lookup_sql.stderr));
    app.batch_execute(&common::text(&lookup_sql.stdout)).await.expect("the printed lookup applies");
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(lookup(&db, &uuid(1), false).await, (false, "deleted".into(), s("deleted")));
    assert_eq!(lookup(&db, &uuid(2), false).await, (true, "ended".into(), s("stopped")));
    assert_eq!(lookup(&db, &uuid(3), false).await, (false, "never_existed".into(), None));
    assert_eq!(lookup(&db, "00000000-0000-4000-8000-00000000000g", false).await.1, "invalid_format");
    assert_eq!(
        lookup(&db, "exec_20260101_000000_0000000a", false).await.1,
        "invalid_format",
        "the pattern's other shape"
    );
}

#[tokio::test]
async fn the_python_example_looks_a_session_up_with_its_reason() {
    let db = TestDb::migrated().await;
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    db.insert(&sid(2), "u2", "ctrl-a", "stopped", ago(600)).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/lookup.py");
    let python = common::python();
    let ask = |id: String| {
        let out = std::process::Command::new(&python)
            .arg(&script)
            .args(["--dsn", &db.url, "--schema", "public", &id])
            .output()
            .expect("run examples/python/lookup.py");
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", common::text(&out.stdout), common::text(&out.stderr)));
        (out.status.code(), answer)
    };
    let (code, live) = ask(sid(1));
    assert_eq!((code, live), (Some(0), serde_json::json!({"found": true, "reason": "ok", "state": "active"})));
    let (code, ended) = ask(sid(2));
    assert_eq!((code, ended), (Some(0), serde_json::json!({"found": true, "reason": "ended", "state": "stopped"})));
    let (code, missing) = ask(sid(3));
    assert_eq!(
        (code, missing),
        (Some(1), serde_json::json!({"found": false, "reason": "never_existed", "state": null}))
    );
    let (_, bad) = ask("../etc/passwd".into());
    assert_eq!(bad["reason"], "invalid_format");
}
