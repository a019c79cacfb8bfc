//! The controller document's conversion at the boundary: what is a finding
//! about one entry, and what makes the whole instance unreachable.

use regex::Regex;
use sessiond::config::DEFAULT_ID_PATTERN;
use sessiond::controller::parse_list_for_test;
use sessiond::model::{InvalidEntryKind, LiveState};

fn parse(doc: &str) -> Result<sessiond::model::ControllerList, String> {
    let re = Regex::new(DEFAULT_ID_PATTERN).expect("the default pattern");
    parse_list_for_test(doc.as_bytes(), "ctrl-a", &re)
}

#[test]
fn escaped_strings_are_unescaped_and_nulls_are_absent_values() {
    let doc = r#"{"instance": "ctrl\u002da", "boot_id": "b\"1", "sessions": [
        {"session_id": "exec_20261121_095958_1a2b3c4d", "owner_id": "us\u00e9r", "state": "running", "started_at": null},
        {"session_id": "exec_20261121_095958_1a2b3c4e", "owner_id": "u2", "state": "paused", "started_at": "2026-11-21T09:59:58.250+01:00"}
    ], "counters": null, "extra": {"ignored": true}}"#;
    let list = parse(doc).expect("a valid document");
    assert_eq!(list.boot_id, "b\"1");
    assert_eq!(list.sessions.len(), 2);
    assert_eq!(list.sessions[0].owner_id, "usér");
    assert_eq!(list.sessions[0].started_at, None);
    assert_eq!(list.sessions[1].state, LiveState::Paused);
    assert_eq!(list.sessions[1].started_at.map(|t| t.to_rfc3339()), Some("2026-11-21T08:59:58.250+00:00".into()));
    assert!(list.counters.is_none());
}

#[test]
fn entries_of_the_wrong_shape_are_findings_not_failures() {
    let doc = r#"{"boot_id": "b", "sessions": [
        42, null, {"session_id": 7}, {"session_id": "nope"},
        {"session_id": "exec_20261121_095958_1a2b3c4d", "owner_id": 5, "state": "running"},
        {"session_id": "exec_20261121_095958_1a2b3c4e", "owner_id": "u", "state": "running", "started_at": 12},
        {"session_id": "exec_20261121_095958_1a2b3c4f", "owner_id": "u", "state": "running", "started_at": "yesterday"},
        {"session_id": "exec_20261121_095958_1a2b3c50", "owner_id": "u", "state": "active"}
    ]}"#;
    let list = parse(doc).expect("the list itself is fine");
    assert_eq!(list.sessions.len(), 1);
    let kinds: Vec<InvalidEntryKind> = list.invalid.iter().map(|e| e.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == InvalidEntryKind::InvalidId).count(), 4, "{:?}", list.invalid);
    assert_eq!(kinds.iter().filter(|k| **k == InvalidEntryKind::InvalidEntry).count(), 3, "{:?}", list.invalid);
    assert_eq!(list.invalid[3].raw_id.as_deref(), Some("nope"));
}

#[test]
fn a_document_that_is_not_a_session_list_is_rejected_whole() {
    for (doc, needle) in [
        ("[]", "invalid JSON"),
        ("{\"boot_id\": \"b\"}", "no \"sessions\" array"),
        ("{\"boot_id\": \"b\", \"sessions\": null}", "no \"sessions\" array"),
        ("{\"sessions\": []}", "boot_id"),
        ("{\"boot_id\": 3, \"sessions\": []}", "boot_id"),
        ("{\"boot_id\": \"b\", \"sessions\": [], \"instance\": \"ctrl-b\"}", "wrong instance"),
        ("{\"boot_id\": \"b\", \"sessions\": [] trailing", "invalid JSON"),
    ] {
        let err = parse(doc).expect_err(doc);
        assert!(err.contains(needle), "{doc}: {err}");
    }
}
