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

/// The list parser's fast path (plain entries read without serde) against
/// serde reading the whole document: the same list, the same findings, the
/// same error, on generated documents of every shape the contract allows and
/// many it does not.
mod fast_path {
    use proptest::prelude::*;
    use regex::Regex;
    use sessiond::config::DEFAULT_ID_PATTERN;
    use sessiond::controller::{parse_list_for_test, parse_list_with_serde_for_test};

    /// JSON with duplicate keys allowed, numbers as written.
    #[derive(Clone, Debug)]
    enum J {
        Null,
        Bool(bool),
        Num(String),
        Str(String),
        Arr(Vec<J>),
        Obj(Vec<(String, J)>),
    }

    /// Renders `j`, `style` choosing the whitespace after each token and
    /// which characters of strings are written as `\uXXXX` escapes.
    fn render(j: &J, style: &mut u64, out: &mut String) {
        fn next(style: &mut u64) -> u64 {
            *style ^= *style << 13;
            *style ^= *style >> 7;
            *style ^= *style << 17;
            *style
        }
        let ws = |r: u64, out: &mut String| {
            out.push_str(match r % 16 {
                0 => " ",
                1 => "\n  ",
                2 => "\t",
                3 => "\r\n",
                _ => "",
            })
        };
        let string = |s: &str, r: u64, out: &mut String| {
            if r.is_multiple_of(7) {
                // Every character escaped (keys included): the same string.
                out.push('"');
                for u in s.encode_utf16() {
                    out.push_str(&format!("\\u{u:04x}"));
                }
                out.push('"');
            } else {
                out.push_str(&serde_json::Value::from(s).to_string());
            }
        };
        match j {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => out.push_str(n),
            J::Str(s) => string(s, next(style), out),
            J::Arr(items) => {
                out.push('[');
                ws(next(style), out);
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        ws(next(style), out);
                    }
                    render(item, style, out);
                    ws(*style, out);
                }
                out.push(']');
            }
            J::Obj(fields) => {
                out.push('{');
                ws(next(style), out);
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        ws(next(style), out);
                    }
                    string(k, next(style), out);
                    ws(next(style), out);
                    out.push(':');
                    ws(next(style), out);
                    render(v, style, out);
                    ws(*style >> 8, out);
                }
                out.push('}');
            }
        }
    }

    fn scalar() -> impl Strategy<Value = J> {
        prop_oneof![
            3 => "exec_20261121_0959[0-9]{2}_[0-9a-f]{8}".prop_map(J::Str),
            2 => prop_oneof![Just("running"), Just("paused"), Just("stopping"), Just("gone")].prop_map(|s| J::Str(s.into())),
            2 => prop_oneof![Just("2026-11-21T09:59:58Z"), Just("2026-11-21T09:59:58.250+01:00"), Just("yesterday")]
                .prop_map(|s| J::Str(s.into())),
            2 => "[a-zé\"\\\\/\u{1}\u{7f}\u{85} ]{0,8}".prop_map(J::Str),
            1 => Just(J::Null),
            1 => any::<bool>().prop_map(J::Bool),
            1 => prop_oneof![Just("12"), Just("-0.5e3"), Just("1e400"), Just("18446744073709551616")]
                .prop_map(|n| J::Num(n.into())),
        ]
    }

    fn value() -> impl Strategy<Value = J> {
        scalar().prop_recursive(3, 16, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(J::Arr),
                proptest::collection::vec(("[a-z_]{1,6}", inner), 0..3).prop_map(J::Obj),
            ]
        })
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop_oneof![Just("session_id"), Just("owner_id"), Just("state"), Just("started_at")],
            1 => prop_oneof![Just("extra"), Just("session_idx"), Just("State"), Just("")],
        ]
        .prop_map(str::to_owned)
    }

    fn entry() -> impl Strategy<Value = J> {
        prop_oneof![
            // The common shape: the four fields, each a plain string.
            6 => ("exec_20261121_0959[0-9]{2}_[0-9a-f]{8}", "u[0-9]{1,3}", prop_oneof![Just("running"), Just("paused")])
                .prop_map(|(id, owner, state)| J::Obj(vec![
                    ("session_id".into(), J::Str(id)),
                    ("owner_id".into(), J::Str(owner)),
                    ("state".into(), J::Str(state.into())),
                    ("started_at".into(), J::Str("2026-11-21T09:59:58Z".into())),
                ])),
            // The four fields in any order, each sometimes null or another value.
            4 => (
                "exec_20261121_0959[0-9]{2}_[0-9a-f]{8}",
                "u[0-9]{1,3}",
                prop_oneof![Just("running"), Just("paused")],
                prop_oneof![3 => Just(J::Str("2026-11-21T09:59:58Z".into())), 1 => Just(J::Null), 1 => scalar()],
                proptest::collection::vec(prop_oneof![4 => Just(None), 1 => Just(Some(J::Null)), 1 => scalar().prop_map(Some)], 3),
            )
                .prop_map(|(id, owner, state, started, other)| {
                    let mut fields = vec![
                        ("session_id".to_owned(), J::Str(id)),
                        ("owner_id".to_owned(), J::Str(owner)),
                        ("state".to_owned(), J::Str(state.into())),
                        ("started_at".to_owned(), started),
                    ];
                    for (field, other) in fields.iter_mut().zip(other) {
                        if let Some(other) = other {
                            field.1 = other;
                        }
                    }
                    fields
                })
                .prop_shuffle()
                .prop_map(J::Obj),
            4 => proptest::collection::vec((key(), prop_oneof![4 => scalar(), 1 => value()]), 0..6).prop_map(J::Obj),
            1 => value(),
        ]
    }

    fn document() -> impl Strategy<Value = J> {
        let top_key = prop_oneof![
            Just("instance"),
            Just("boot_id"),
            Just("generated_at"),
            Just("counters"),
            Just("other"),
            Just("sessions")
        ];
        (
            proptest::collection::vec(entry(), 0..8),
            proptest::collection::vec((top_key, value()), 0..4),
            0usize..4,
            any::<bool>(),
        )
            .prop_map(|(entries, others, at, null_sessions)| {
                let mut fields: Vec<(String, J)> =
                    vec![("instance".into(), J::Str("ctrl-a".into())), ("boot_id".into(), J::Str("b1".into()))];
                for (k, v) in others {
                    // A second instance, boot_id or sessions sometimes: serde refuses those.
                    fields.push((k.to_owned(), v));
                }
                let sessions = if null_sessions && entries.is_empty() { J::Null } else { J::Arr(entries) };
                fields.insert(at.min(fields.len()), ("sessions".into(), sessions));
                J::Obj(fields)
            })
    }

    /// How a rendered document is damaged, if at all.
    #[derive(Clone, Debug)]
    enum Damage {
        None,
        Cut(usize),
        Insert(usize, char),
        Replace(usize, char),
        /// The n-th structural character (of those there are) replaced.
        Structural(usize, char),
        /// The n-th closing bracket (of those there are) left out.
        Unclosed(usize),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        let c = prop_oneof![
            Just(','),
            Just(']'),
            Just('}'),
            Just('"'),
            Just('\\'),
            Just('\u{1}'),
            Just(' '),
            Just('x'),
            Just('{')
        ];
        prop_oneof![
            6 => Just(Damage::None),
            1 => any::<usize>().prop_map(Damage::Cut),
            1 => (any::<usize>(), c.clone()).prop_map(|(at, c)| Damage::Insert(at, c)),
            1 => (any::<usize>(), c.clone()).prop_map(|(at, c)| Damage::Replace(at, c)),
            2 => (any::<usize>(), c).prop_map(|(n, c)| Damage::Structural(n, c)),
            2 => any::<usize>().prop_map(Damage::Unclosed),
        ]
    }

    /// Where the n-th (modulo their number) of these ASCII characters is.
    fn nth_of(text: &str, chars: &str, n: usize) -> Option<usize> {
        let places: Vec<usize> = text.char_indices().filter(|(_, c)| chars.contains(*c)).map(|(i, _)| i).collect();
        places.get(n % places.len().max(1)).copied()
    }

    fn damaged(mut text: String, damage: &Damage) -> String {
        let boundary = |text: &str, at: usize| {
            let mut at = at % (text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            at
        };
        match *damage {
            Damage::None => {}
            Damage::Cut(at) => text.truncate(boundary(&text, at)),
            Damage::Insert(at, c) => text.insert(boundary(&text, at), c),
            Damage::Structural(n, c) => {
                if let Some(at) = nth_of(&text, "[]{},:", n) {
                    text.replace_range(at..at + 1, &c.to_string());
                }
            }
            Damage::Unclosed(n) => {
                if let Some(at) = nth_of(&text, "]}", n) {
                    text.remove(at);
                }
            }
            Damage::Replace(at, c) => {
                let at = boundary(&text, at);
                if let Some(old) = text[at..].chars().next() {
                    text.replace_range(at..at + old.len_utf8(), &c.to_string());
                }
            }
        }
        text
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]
        #[test]
        fn reads_every_document_as_serde_does(doc in document(), style in 1u64.., damage in damage()) {
            let mut text = String::new();
            let mut s = style;
            render(&doc, &mut s, &mut text);
            let text = damaged(text, &damage);
            let re = Regex::new(DEFAULT_ID_PATTERN).expect("the default pattern");
            let fast = parse_list_for_test(text.as_bytes(), "ctrl-a", &re);
            let serde = parse_list_with_serde_for_test(text.as_bytes(), "ctrl-a", &re);
            prop_assert_eq!(fast, serde, "{}", text);
        }
    }

    /// Nested deep inside an entry and at the top level: serde_json skips
    /// what nothing keeps without a depth limit, so an entry serde reads on
    /// its own reads as it does inside the document.
    #[test]
    fn deep_nesting_reads_the_same_either_way() {
        let re = Regex::new(DEFAULT_ID_PATTERN).expect("the default pattern");
        for depth in [3, 126, 127, 128, 129, 1000] {
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let text = format!(
                r#"{{"boot_id": "b", "x": {nested}, "sessions": [{{"session_id": "x", "extra": {nested}}}, {nested}]}}"#
            );
            let fast = parse_list_for_test(text.as_bytes(), "ctrl-a", &re);
            let serde = parse_list_with_serde_for_test(text.as_bytes(), "ctrl-a", &re);
            assert!(fast.is_ok(), "depth {depth}: {fast:?}");
            assert_eq!(fast, serde, "depth {depth}");
        }
    }
}
