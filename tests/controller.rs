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
    assert_eq!(list.sessions.get(0).expect("a session").owner_id, "usér");
    assert_eq!(list.sessions.get(0).expect("a session").started_at, None);
    assert_eq!(list.sessions.get(1).expect("a session").state, LiveState::Paused);
    assert_eq!(
        list.sessions.get(1).expect("a session").started_at.map(|t| t.to_rfc3339()),
        Some("2026-11-21T08:59:58.250+00:00".into())
    );
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
fn an_entry_with_a_field_twice_or_of_any_other_shape_costs_only_itself() {
    let doc = r#"{"sessions": [
        {"session_id": "exec_20261121_095958_1a2b3c4d", "owner_id": "u", "state": "running", "state": "paused"},
        {"session_id": "exec_20261121_095958_1a2b3c4e", "owner_id": null, "owner_id": "u", "state": "running"},
        [1, {"session_id": "exec_20261121_095958_1a2b3c4f"}], "exec_20261121_095958_1a2b3c50", true, 1.5,
        {"session_id": "exec_20261121_095958_1a2b3c51", "owner_id": "u", "state": "running", "x": {"state": 1}},
        {"session_id": "exec_20261121_095958_1a2b3c52", "session_id": "exec_20261121_095958_1a2b3c53"}
    ], "boot_id": "b"}"#;
    let list = parse(doc).expect("the list itself is fine");
    assert_eq!(list.sessions.len(), 1, "{:?}", list.invalid);
    assert_eq!(list.sessions.get(0).expect("a session").id, "exec_20261121_095958_1a2b3c51");
    let problems: Vec<&str> = list.invalid.iter().map(|e| e.problem.as_str()).collect();
    assert_eq!(
        problems,
        [
            "entry has state twice",
            "entry has owner_id twice",
            "entry is not an object: it is an array",
            "entry is not an object: it is a string",
            "entry is not an object: it is a boolean",
            "entry is not an object: it is a number",
            "entry has session_id twice",
        ]
    );
    // An entry whose id is known still holds its row.
    let ids: Vec<Option<&str>> = list.invalid.iter().map(|e| e.raw_id.as_deref()).collect();
    assert_eq!(ids[..2], [Some("exec_20261121_095958_1a2b3c4d"), Some("exec_20261121_095958_1a2b3c4e")]);
    assert!(ids[2..].iter().all(Option::is_none));
    assert_eq!(list.invalid[0].kind, InvalidEntryKind::InvalidEntry);
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
        ("{\"boot_id\": \"b\", \"sessions\": 3}", "invalid JSON"),
        ("{\"boot_id\": \"b\", \"sessions\": [], \"sessions\": []}", "duplicate field"),
        ("{\"boot_id\": \"b\", \"sessions\": [{\"session_id\": \"x\"", "invalid JSON"),
    ] {
        let err = parse(doc).expect_err(doc);
        assert!(err.contains(needle), "{doc}: {err}");
    }
    let re = Regex::new(DEFAULT_ID_PATTERN).expect("the default pattern");
    let latin1 = b"{\"boot_id\": \"b\", \"sessions\": [{\"owner_id\": \"Jos\xe9\"}]}";
    let err = parse_list_for_test(latin1, "ctrl-a", &re).expect_err("not UTF-8");
    assert!(err.contains("invalid JSON: not UTF-8"), "{err}");
}

#[test]
fn a_malformed_counters_block_or_generated_at_is_reported_and_the_list_still_used() {
    let doc = r#"{"boot_id": "b1", "generated_at": "yesterday", "counters": {"sessions_created": "many"},
        "sessions": [{"session_id": "exec_20261121_095958_1a2b3c4d", "owner_id": "u1", "state": "running"}]}"#;
    let list = parse(doc).expect("the list is still usable");
    assert_eq!(list.sessions.len(), 1);
    assert!(list.counters.is_none());
    assert_eq!(list.generated_at, None);
    let parts: Vec<&str> = list.problems.iter().map(|p| p.part).collect();
    assert_eq!(parts, ["counters", "generated_at"]);
    assert!(list.problems[0].detail.contains("invalid type"), "{:?}", list.problems[0]);
}

#[test]
fn a_create_seconds_histogram_is_read_and_a_malformed_one_dropped_alone() {
    let doc = |h: &str| {
        format!(
            r#"{{"boot_id": "b1", "counters": {{"sessions_created": 7, "create_seconds": {h}}},
                "sessions": [{{"session_id": "exec_20261121_095958_1a2b3c4d", "owner_id": "u1", "state": "running"}}]}}"#
        )
    };
    let good = parse(&doc(r#"{"buckets": {"0.5": 6, "0.1": 2, "+Inf": 7}, "sum": 2.5, "count": 7}"#)).expect("valid");
    let h = good.counters.as_ref().and_then(|c| c.create_seconds.as_ref()).expect("the histogram");
    assert_eq!(
        (h.bounds.as_slice(), h.cumulative.as_slice(), h.count, h.sum),
        ([0.1, 0.5].as_slice(), [2, 6].as_slice(), 7, 2.5)
    );
    assert!(good.problems.is_empty());

    let too_many: String = (1..=41).map(|i| format!("\"{i}\": {i}, ")).collect();
    for (h, needle) in [
        (r#"{"buckets": {"0.1": 5, "0.5": 3, "+Inf": 7}, "sum": 1, "count": 7}"#.to_owned(), "cumulative"),
        (r#"{"buckets": {"0.1": 5}, "sum": 1, "count": 5}"#.to_owned(), "no +Inf"),
        (r#"{"buckets": {"0.1": 5, "+Inf": 6}, "sum": 1, "count": 7}"#.to_owned(), "+Inf is 6, but count is 7"),
        (r#"{"buckets": {"soon": 5, "+Inf": 5}, "sum": 1, "count": 5}"#.to_owned(), "not a bound in seconds"),
        (r#"{"buckets": {"0.1": 5, "+Inf": 5}, "sum": -1, "count": 5}"#.to_owned(), "non-negative"),
        (format!(r#"{{"buckets": {{{too_many}"+Inf": 41}}, "sum": 1, "count": 41}}"#), "at most 40"),
        (r#"[1, 2]"#.to_owned(), "invalid type"),
    ] {
        let list = parse(&doc(&h)).expect("the list is still usable");
        let counters = list.counters.as_ref().expect("the other counters are kept");
        assert_eq!(counters.sessions_created, 7);
        assert!(counters.create_seconds.is_none(), "{h}");
        assert_eq!(list.problems.len(), 1, "{h}");
        assert_eq!(list.problems[0].part, "create_seconds");
        assert!(list.problems[0].detail.contains(needle), "{h}: {}", list.problems[0].detail);
    }
}

mod boot_id_scanner {
    use proptest::prelude::*;
    use sessiond::controller::scan::{boot_id_of, BootIdScanner, Scan};

    #[test]
    fn finds_the_top_level_boot_id_wherever_it_is_and_nowhere_else() {
        let cases = [
            (r#"{"boot_id": "b1", "sessions": []}"#, Scan::Found("b1".into())),
            (r#"  {"instance":"a","sessions":[{"boot_id":"nested"}],"boot_id":"top"}"#, Scan::Found("top".into())),
            (r#"{"x": {"boot_id": "deep"}, "n": 12.5e3, "t": true, "boot_id": "b\"2"}"#, Scan::Found("b\"2".into())),
            (
                r#"{"s": "a \"boot_id\": \"fake\" string", "boot\u005fid": "escaped-key"}"#,
                Scan::Found("escaped-key".into()),
            ),
            (r#"{"sessions": [], "instance": "a"}"#, Scan::Invalid("the document has no \"boot_id\" string".into())),
            (r#"{"boot_id": 12}"#, Scan::Invalid("\"boot_id\" is not a string".into())),
            (r#"{"boot_id": ""}"#, Scan::Invalid("\"boot_id\" is empty".into())),
            (r#"[1, 2]"#, Scan::Invalid("the document is not a JSON object".into())),
            ("", Scan::Invalid("the body is empty".into())),
            (r#"{"sessions": [1, 2"#, Scan::Invalid("the document ended before a \"boot_id\" string".into())),
        ];
        for (doc, want) in cases {
            assert_eq!(boot_id_of(doc.as_bytes()), want, "{doc}");
        }
    }

    #[test]
    fn stops_reading_as_soon_as_it_has_the_boot_id() {
        let mut s = BootIdScanner::new();
        assert_eq!(s.feed(br#"{"instance": "a", "boot"#), Scan::More);
        assert_eq!(s.feed(br#"_id": "b"#), Scan::More);
        assert_eq!(s.feed(br#"1", "sessions": [ ...a megabyte that is never read"#), Scan::Found("b1".into()));
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[a-z\"\\\\{}\\[\\],: ]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the other keys and values, and however the body is cut into
        /// chunks, the scanner agrees with a full parse.
        #[test]
        fn agrees_with_a_full_parse_however_the_body_is_chunked(
            others in proptest::collection::btree_map("[a-z_]{1,9}", json_value(), 0..5),
            boot in "[ -~]{1,20}",
            position in 0usize..6,
            cuts in proptest::collection::vec(1usize..7, 0..40),
        ) {
            let mut fields: Vec<(String, serde_json::Value)> =
                others.into_iter().filter(|(k, _)| k != "boot_id").collect();
            let at = position.min(fields.len());
            fields.insert(at, ("boot_id".into(), serde_json::Value::from(boot.clone())));
            let body = format!(
                "{{{}}}",
                fields.iter().map(|(k, v)| format!("{}: {v}", serde_json::Value::from(k.as_str()))).collect::<Vec<_>>().join(", ")
            );
            let mut scanner = BootIdScanner::new();
            let mut rest = body.as_bytes();
            let mut found = Scan::More;
            for cut in cuts.iter().copied().chain(std::iter::repeat(usize::MAX)) {
                if rest.is_empty() {
                    break;
                }
                let n = cut.min(rest.len());
                found = scanner.feed(&rest[..n]);
                rest = &rest[n..];
                if found != Scan::More {
                    break;
                }
            }
            prop_assert_eq!(found, Scan::Found(boot), "{}", body);
        }
    }
}
