//! The controller contract as a team implementing it meets it: https with the
//! team's own CA, the JSON Schema shipped beside the contract, and what sessiond
//! makes of each bad answer (see `docs/controller-contract.md`).

mod common;

use common::{ago, config_text, sid, TestCa, TestConfig, TestDb, IMMEDIATE};
use sessiond::reconcile::{PassOutcome, PassRequest, Reconciler};
use sessiond::simctl::SimController;

async fn once(text: &str) -> sessiond::reconcile::PassReport {
    let cfg = sessiond::config::Config::from_toml(std::path::Path::new("t.toml"), text, &Default::default())
        .unwrap_or_else(|e| panic!("config: {e}\n{text}"));
    Reconciler::new(std::sync::Arc::new(cfg)).expect("reconciler").pass(PassRequest::once()).await
}

#[tokio::test]
async fn an_https_controller_is_read_with_its_own_ca_and_a_certificate_that_does_not_verify_says_so() {
    let db = TestDb::migrated().await;
    let ca = TestCa::new("sessiond test controllers CA");
    let (cert, key) = ca.issue("ctrl-a", "IP:127.0.0.1,DNS:localhost");
    let a = SimController::start_tls("ctrl-a", &cert, &key).await.expect("an https controller");
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    db.insert(&sid(2), "u2", "ctrl-a", "active", ago(600)).await; // an orphan
    assert!(a.url().starts_with("https://"));
    let with_ca = |ca_file: &std::path::Path| {
        TestConfig::new(&db)
            .controllers(&[&a])
            .reconcile_toml(IMMEDIATE)
            .controller("ca_file", ca_file.display().to_string())
            .toml()
    };

    let rep = once(&with_ca(&ca.cert)).await;
    assert_eq!(rep.outcome, PassOutcome::Ok, "{:?}", rep.instances);
    assert_eq!(common::outcomes(&rep), ["orphaned.repaired=1"]);

    // A CA that did not sign the controller's certificate.
    let other = TestCa::new("someone else's CA");
    let rep = once(&with_ca(&other.cert)).await;
    assert!(!rep.instances[0].reachable);
    let err = rep.instances[0].error.clone().unwrap_or_default();
    assert!(err.contains("does not verify"), "{err}");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"), "an unverified controller is unreachable");

    // The right CA, the wrong host name.
    let (elsewhere, elsewhere_key) = ca.issue("elsewhere", "DNS:elsewhere.example");
    let b = SimController::start_tls("ctrl-a", &elsewhere, &elsewhere_key).await.expect("an https controller");
    let text = with_ca(&ca.cert).replace(&a.url(), &b.url()).replace(&a.stop_url(), &b.stop_url());
    let rep = once(&text).await;
    let err = rep.instances[0].error.clone().unwrap_or_default();
    assert!(!rep.instances[0].reachable && err.contains("not valid for"), "{err}");
}

/// `sessiond check` on `config`: (exit code, the lines).
async fn check(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::write(dir.path(), "sessiond.toml", config);
    let p = path.to_str().expect("utf-8").to_owned();
    let out = tokio::task::spawn_blocking(move || common::run(&["check", "--config", &p])).await.expect("join");
    (out.status.code(), format!("{}{}", common::text(&out.stdout), common::text(&out.stderr)))
}

fn line_of<'a>(out: &'a str, check: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().skip(2).take(2).any(|w| w == check))
        .unwrap_or_else(|| panic!("no {check} line:\n{out}"))
}

#[tokio::test]
async fn check_passes_for_a_controller_that_keeps_the_contract_and_calls_no_stop() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    a.add(&sid(2), "u2", "paused", Some(ago(60)));

    let (code, out) = check(&config_text(&db, &[&a], IMMEDIATE)).await;

    assert_eq!(code, Some(0), "{out}");
    assert!(out.lines().all(|l| l.starts_with("ok ")), "{out}");
    assert!(line_of(&out, "boot").contains("in all 17 answers"), "two lists and fifteen boot ids: {out}");
    assert!(line_of(&out, "sessions").contains("2 listed (active=1 paused=1)"), "{out}");
    assert!(line_of(&out, "schema").contains("version"), "{out}");
    assert!(a.stops().is_empty(), "check never calls stop_url");
}

#[tokio::test]
async fn check_fails_on_each_breach_of_the_contract_and_names_it() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    a.add(&sid(2), "u2", "exploding", Some(ago(600)));
    a.add("not-an-id", "u3", "running", Some(ago(600)));
    a.set_fault(sessiond::simctl::Fault::Workers(vec!["worker-1".into(), "worker-2".into()]));
    let text = config_text(&db, &[&a], IMMEDIATE);
    let stop_line = format!("stop_url = \"{}\"\n", a.stop_url());

    let (code, out) = check(&text.replace(&stop_line, "")).await;

    assert_eq!(code, Some(1), "{out}");
    assert!(line_of(&out, "boot").starts_with("fail") && line_of(&out, "boot").contains("several processes"), "{out}");
    assert!(
        line_of(&out, "entries").starts_with("fail") && line_of(&out, "entries").contains("unknown state"),
        "{out}"
    );
    assert!(line_of(&out, "session").starts_with("fail") && line_of(&out, "session").contains("not-an-id"), "{out}");
    assert!(line_of(&out, "stop_url").starts_with("warn"), "{out}");

    // A malformed counters block, and a document that is no list at all.
    a.set_fault(sessiond::simctl::Fault::Raw(
        r#"{"boot_id": "b", "sessions": [], "counters": {"sessions_created": -1}}"#.into(),
    ));
    let (code, out) = check(&text).await;
    assert_eq!(code, Some(1));
    assert!(line_of(&out, "counters").starts_with("fail"), "{out}");
    a.set_fault(sessiond::simctl::Fault::Raw("{\"boot_id\": \"b\"}".into()));
    let (_, out) = check(&text).await;
    assert!(line_of(&out, "document").contains("no \"sessions\" array"), "{out}");
}

#[tokio::test]
async fn the_simulated_controller_and_the_documented_example_match_the_json_schema() {
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    a.add(&sid(2), "u2", "paused", None);
    a.count(3, 7);
    let body = common::http().get(a.url()).send().await.expect("GET").text().await.expect("body");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(common::schema_errors(&doc), Vec::<String>::new(), "{doc}");

    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/controller-contract.md"))
        .expect("the contract page");
    let example = page.split("```json\n").nth(1).and_then(|s| s.split("```").next()).expect("an example");
    let example: serde_json::Value = serde_json::from_str(example).expect("the example is JSON");
    assert_eq!(common::schema_errors(&example), Vec::<String>::new());
}

#[test]
fn the_schema_refuses_what_sessiond_refuses() {
    let ok = serde_json::json!({"boot_id": "b", "sessions": [
        {"session_id": "exec_20261121_095958_1a2b3c4d", "owner_id": "u", "state": "running"}]});
    assert!(common::schema_errors(&ok).is_empty());
    let bad = [
        serde_json::json!({"sessions": []}),
        serde_json::json!({"boot_id": "", "sessions": []}),
        serde_json::json!({"boot_id": "b", "sessions": {}}),
        serde_json::json!({"boot_id": "b", "generated_at": "yesterday", "sessions": []}),
        serde_json::json!({"boot_id": "b", "sessions": [{"session_id": "x", "owner_id": "u", "state": "exploding"}]}),
        serde_json::json!({"boot_id": "b", "sessions": [{"session_id": "x", "state": "active"}]}),
        serde_json::json!({"boot_id": "b", "sessions": [{"session_id": "x\u{0}y", "owner_id": "u", "state": "active"}]}),
        serde_json::json!({"boot_id": "b", "sessions": [], "counters": {"sessions_created": -1}}),
    ];
    for doc in bad {
        assert!(!common::schema_errors(&doc).is_empty(), "the schema accepts {doc}");
    }
}
