//! The controller's JSON, converted into domain types by hand. Nothing outside
//! the controller module sees the wire format.
//!
//! The body is read once: each entry of `sessions` is parsed and converted as
//! the parser reaches it, straight into the list's columns. An entry of any
//! well-formed shape is never an error of the document, so one malformed
//! entry costs only itself, and a large list is never held twice, as a tree of
//! generic JSON values or as slices to parse again. The rest of the top level
//! is kept as raw slices of the body until read.

use std::borrow::Cow;

mod fast;

use chrono::{DateTime, Utc};
use regex::Regex;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::model::{
    AppCounters, ControllerList, CreateHistogram, InvalidEntry, InvalidEntryKind, LiveSessions, LiveState,
    PayloadProblem,
};

/// The document's top level. `sessions` is converted entry by entry as the
/// parser reaches it (see [`Entries`]); the rest is kept raw until read.
#[derive(Default)]
struct WireList<'a> {
    instance: Option<&'a RawValue>,
    boot_id: Option<&'a RawValue>,
    /// Whether the document has a `sessions` array (a null is none).
    has_sessions: bool,
    counters: Option<&'a RawValue>,
    generated_at: Option<&'a RawValue>,
}

/// The top level, read in one pass over the body: every entry is parsed once,
/// straight into the [`Entries`], never kept as a slice to parse again.
struct ListSeed<'p>(Entries<'p>);

impl<'de, 'p> serde::de::DeserializeSeed<'de> for ListSeed<'p> {
    type Value = WireList<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<WireList<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 'p> serde::de::Visitor<'de> for ListSeed<'p> {
    type Value = WireList<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a controller document (an object)")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<WireList<'de>, A::Error> {
        use serde::de::Error;
        let ListSeed(mut entries) = self;
        let mut list = WireList::default();
        let mut seen = [false; 5];
        let mut once = |i: usize, name: &'static str| {
            if std::mem::replace(&mut seen[i], true) {
                Err(A::Error::duplicate_field(name))
            } else {
                Ok(())
            }
        };
        while let Some(key) = map.next_key::<ListKey>()? {
            match key {
                ListKey::Instance => {
                    once(0, "instance")?;
                    list.instance = Some(map.next_value()?);
                }
                ListKey::BootId => {
                    once(1, "boot_id")?;
                    list.boot_id = Some(map.next_value()?);
                }
                ListKey::Sessions => {
                    once(2, "sessions")?;
                    list.has_sessions = map.next_value_seed(&mut entries)?;
                }
                ListKey::Counters => {
                    once(3, "counters")?;
                    list.counters = Some(map.next_value()?);
                }
                ListKey::GeneratedAt => {
                    once(4, "generated_at")?;
                    list.generated_at = Some(map.next_value()?);
                }
                ListKey::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(list)
    }
}

/// A top-level key; any other is skipped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum ListKey {
    Instance,
    BootId,
    Sessions,
    Counters,
    GeneratedAt,
    #[serde(other)]
    Other,
}

/// Where the `sessions` array goes, each entry converted as it is read. As a
/// seed it yields whether there was an array (`null` is none).
struct Entries<'p> {
    ids: IdCheck<'p>,
    sessions: &'p mut LiveSessions,
    invalid: &'p mut Vec<InvalidEntry>,
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut Entries<'_> {
    type Value = bool;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Entries<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of sessions")
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while let Some(entry) = seq.next_element::<Entry<'de>>()? {
            if let Err(e) = convert_session(entry, self.ids, &mut *self.sessions) {
                self.invalid.push(e);
            }
        }
        Ok(true)
    }
}

/// One entry of the list: its four fields, read in the one pass over it, or
/// why it is not a session object. Never an error: a well-formed JSON value
/// of any shape is an entry, so a bad one costs only itself.
enum Entry<'a> {
    Session(WireSession<'a>),
    Unusable(String),
}

#[derive(Default)]
struct WireSession<'a> {
    session_id: Option<Field<'a>>,
    owner_id: Option<Field<'a>>,
    state: Option<Field<'a>>,
    started_at: Option<Field<'a>>,
    /// The first field the entry has twice: which value is meant is unknown.
    twice: Option<&'static str>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Entry<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Entry<'a>, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Entry<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Entry<'a>, A::Error> {
                let mut w = WireSession::default();
                let mut seen = [false; 4];
                while let Some(key) = map.next_key::<SessionKey>()? {
                    let (slot, i, name) = match key {
                        SessionKey::SessionId => (&mut w.session_id, 0, "session_id"),
                        SessionKey::OwnerId => (&mut w.owner_id, 1, "owner_id"),
                        SessionKey::State => (&mut w.state, 2, "state"),
                        SessionKey::StartedAt => (&mut w.started_at, 3, "started_at"),
                        SessionKey::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = map.next_value()?;
                    if std::mem::replace(&mut seen[i], true) {
                        w.twice.get_or_insert(name);
                    }
                }
                Ok(Entry::Session(w))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Entry<'a>, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Entry::Unusable("entry is not an object: it is an array".into()))
            }
            fn visit_borrowed_str<E>(self, _: &'de str) -> Result<Entry<'a>, E> {
                Ok(Entry::Unusable("entry is not an object: it is a string".into()))
            }
            fn visit_str<E>(self, _: &str) -> Result<Entry<'a>, E> {
                Ok(Entry::Unusable("entry is not an object: it is a string".into()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Entry<'a>, E> {
                Ok(Entry::Unusable("entry is not an object: it is a boolean".into()))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Entry<'a>, E> {
                Ok(Entry::Unusable("entry is not an object: it is a number".into()))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Entry<'a>, E> {
                Ok(Entry::Unusable("entry is not an object: it is a number".into()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Entry<'a>, E> {
                Ok(Entry::Unusable("entry is not an object: it is a number".into()))
            }
            fn visit_unit<E>(self) -> Result<Entry<'a>, E> {
                Ok(Entry::Unusable("entry is not an object: it is null".into()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A key of an entry; any other is skipped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum SessionKey {
    SessionId,
    OwnerId,
    State,
    StartedAt,
    #[serde(other)]
    Other,
}

/// A field of an entry, read in the one pass over the entry: a string
/// (borrowed from the body unless it has escapes), or anything else. A null
/// field reads as absent (`None`).
enum Field<'a> {
    Str(Cow<'a, str>),
    Other,
}

impl<'a> Field<'a> {
    fn text(field: Option<Field<'a>>) -> Option<Cow<'a, str>> {
        match field {
            Some(Field::Str(s)) => Some(s),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Field<'a>, D::Error> {
        struct Any<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Any<'a> {
            type Value = Field<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'a>, E> {
                Ok(Field::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Field<'a>, E> {
                Ok(Field::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Field<'a>, E> {
                Ok(Field::Str(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_unit<E>(self) -> Result<Field<'a>, E> {
                Ok(Field::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Field<'a>, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Field<'a>, A::Error> {
                while a.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(Any(std::marker::PhantomData))
    }
}

#[derive(Deserialize, Default)]
struct WireCounters<'a> {
    #[serde(borrow)]
    create_seconds: Option<&'a RawValue>,
    sessions_created: Option<u64>,
    sessions_reused: Option<u64>,
    #[serde(default)]
    lookups: WireLookups,
    #[serde(default)]
    cleanups: WireCleanups,
}

#[derive(Deserialize, Default)]
struct WireLookups {
    found: Option<u64>,
    invalid_format: Option<u64>,
    never_existed: Option<u64>,
    deleted: Option<u64>,
}

#[derive(Deserialize, Default)]
struct WireCleanups {
    succeeded: Option<u64>,
    failed: Option<u64>,
}

/// The most buckets a creation-time histogram may have.
pub const MAX_CREATE_BUCKETS: usize = 40;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireHistogram {
    buckets: std::collections::BTreeMap<String, u64>,
    sum: f64,
    count: u64,
}

/// `counters.create_seconds`: cumulative buckets keyed by their upper bound in
/// seconds (`"0.1"`, …, `"+Inf"`), with `sum` and `count`, as a Prometheus
/// histogram has them. Refused unless it is one: finite bounds, counts that
/// never decrease with the bound, and a `+Inf` bucket equal to `count`.
fn create_histogram(raw: &str) -> Result<CreateHistogram, String> {
    let w: WireHistogram = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    if w.buckets.len() > MAX_CREATE_BUCKETS + 1 {
        return Err(format!("{} buckets; at most {MAX_CREATE_BUCKETS} and +Inf", w.buckets.len()));
    }
    if !w.sum.is_finite() || w.sum < 0.0 {
        return Err(format!("sum {} is not a non-negative number", w.sum));
    }
    let mut inf = None;
    let mut finite: Vec<(f64, u64)> = Vec::with_capacity(w.buckets.len());
    for (key, n) in &w.buckets {
        if key == "+Inf" {
            inf = Some(*n);
            continue;
        }
        match key.parse::<f64>() {
            Ok(b) if b.is_finite() && b >= 0.0 => finite.push((b, *n)),
            _ => return Err(format!("bucket {} is not a bound in seconds", printable(key))),
        }
    }
    finite.sort_by(|a, b| a.0.total_cmp(&b.0));
    if finite.windows(2).any(|p| p[0].0 == p[1].0) {
        return Err("two buckets have the same bound".into());
    }
    if finite.windows(2).any(|p| p[1].1 < p[0].1) {
        return Err("bucket counts decrease with the bound: they must be cumulative".into());
    }
    match inf {
        Some(n) if n == w.count && finite.last().is_none_or(|l| l.1 <= n) => {}
        Some(n) => return Err(format!("+Inf is {n}, but count is {} (or below a smaller bucket)", w.count)),
        None => return Err("no +Inf bucket".into()),
    }
    Ok(CreateHistogram {
        bounds: finite.iter().map(|b| b.0).collect(),
        cumulative: finite.iter().map(|b| b.1).collect(),
        count: w.count,
        sum: w.sum,
    })
}

pub(super) enum ParseProblem {
    Invalid(String),
    WrongInstance(String),
}

/// A JSON string value, unescaped; `None` for anything else (null included).
fn string(v: Option<&RawValue>) -> Option<String> {
    let raw = v?.get();
    if !raw.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(raw) {
        Ok(s) => Some(s.to_owned()),
        // Escapes need an owned string.
        Err(_) => serde_json::from_str::<String>(raw).ok(),
    }
}

/// Converts a controller document into domain types. Public for the fuzz-style
/// tests; the daemon only calls it through [`ControllerClient::fetch`].
pub fn parse_list_for_test(body: &[u8], instance: &str, id_pattern: &Regex) -> Result<ControllerList, String> {
    parse_list(body, instance, id_pattern).map_err(ParseProblem::for_test)
}

/// [`parse_list_for_test`] with serde reading the whole document, no fast
/// path: what the fast path must agree with (tests).
#[doc(hidden)]
pub fn parse_list_with_serde_for_test(
    body: &[u8],
    instance: &str,
    id_pattern: &Regex,
) -> Result<ControllerList, String> {
    parse_list_by(body, instance, id_pattern, Reader::Serde).map_err(ParseProblem::for_test)
}

impl ParseProblem {
    fn for_test(self) -> String {
        match self {
            ParseProblem::Invalid(s) => s,
            ParseProblem::WrongInstance(found) => format!("wrong instance {found:?}"),
        }
    }
}

/// What reads the document's entries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// The fast path, serde for what it does not recognise.
    Fast,
    /// Serde alone (tests).
    Serde,
}

pub(super) fn parse_list(body: &[u8], instance: &str, id_pattern: &Regex) -> Result<ControllerList, ParseProblem> {
    parse_list_by(body, instance, id_pattern, Reader::Fast)
}

fn parse_list_by(
    body: &[u8],
    instance: &str,
    id_pattern: &Regex,
    reader: Reader,
) -> Result<ControllerList, ParseProblem> {
    // Sized from the number of objects (each entry is one), so the columns
    // are not reallocated, and held twice, while they fill; and no more than
    // the shortest entry, `{"session_id":""}`, allows in this body. Counting
    // one byte is several times faster than searching for the key.
    let expected = memchr::memchr_iter(b'{', body).count().min(body.len() / 17);
    // Room for 48 bytes of id and owner a session; the arena grows past that.
    // Its strings come from the body, so it never needs more than the body.
    let mut sessions = LiveSessions::with_capacity(expected, (expected * 48).min(body.len()));
    let mut invalid = Vec::new();
    // JSON is UTF-8: checked once for the whole body, so the parser reads each
    // string without checking it again (docs/performance.md, fifth run).
    let text = std::str::from_utf8(body).map_err(|e| ParseProblem::Invalid(format!("invalid JSON: not UTF-8: {e}")))?;
    let fast = match reader {
        Reader::Fast => fast::scan(text, IdCheck::new(id_pattern), &mut sessions, &mut invalid),
        Reader::Serde => None,
    };
    let wire = match fast {
        Some(wire) => wire,
        // Not the common shape, or not JSON at all: serde decides.
        None => {
            sessions.clear();
            invalid.clear();
            parse_with_serde(text, IdCheck::new(id_pattern), &mut sessions, &mut invalid)?
        }
    };
    if !wire.has_sessions {
        return Err(ParseProblem::Invalid("the document has no \"sessions\" array".into()));
    }
    let boot_id = string(wire.boot_id)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| ParseProblem::Invalid("the document has no \"boot_id\" string".into()))?;
    if let Some(problem) = unstorable(&boot_id, MAX_BOOT_ID_BYTES) {
        return Err(ParseProblem::Invalid(format!("boot_id {problem}")));
    }
    if let Some(found) = wire.instance {
        match string(Some(found)) {
            Some(name) if name == instance => {}
            Some(name) => return Err(ParseProblem::WrongInstance(name)),
            None => return Err(ParseProblem::Invalid("\"instance\" is not a string".into())),
        }
    }
    let mut problems = Vec::new();
    // Counters are optional extras: a malformed block is not fatal to the list,
    // but it is reported (and counted), never dropped in silence.
    let counters = match wire.counters {
        None => None,
        Some(v) if v.get() == "null" => None,
        Some(v) => match serde_json::from_str::<WireCounters>(v.get()) {
            Ok(c) => Some(AppCounters {
                create_seconds: match c.create_seconds {
                    None => None,
                    Some(v) if v.get() == "null" => None,
                    Some(v) => match create_histogram(v.get()) {
                        Ok(h) => Some(h),
                        Err(detail) => {
                            problems.push(PayloadProblem { part: "create_seconds", detail });
                            None
                        }
                    },
                },
                sessions_created: c.sessions_created.unwrap_or(0),
                sessions_reused: c.sessions_reused.unwrap_or(0),
                lookups_found: c.lookups.found.unwrap_or(0),
                lookups_invalid_format: c.lookups.invalid_format.unwrap_or(0),
                lookups_never_existed: c.lookups.never_existed.unwrap_or(0),
                lookups_deleted: c.lookups.deleted.unwrap_or(0),
                cleanups_succeeded: c.cleanups.succeeded.unwrap_or(0),
                cleanups_failed: c.cleanups.failed.unwrap_or(0),
            }),
            Err(e) => {
                problems.push(PayloadProblem { part: "counters", detail: e.to_string() });
                None
            }
        },
    };

    // The controller's own clock, read with started_at: the age of a session is
    // the difference of the two, so the clocks of other hosts never enter it.
    let generated_at = match wire.generated_at {
        None => None,
        Some(v) if v.get() == "null" => None,
        Some(v) => match string(Some(v)).and_then(|s| DateTime::parse_from_rfc3339(&s).ok()) {
            Some(t) => Some(t.with_timezone(&Utc)),
            None => {
                problems.push(PayloadProblem {
                    part: "generated_at",
                    detail: format!("{} is not an RFC 3339 time", printable(v.get())),
                });
                None
            }
        },
    };
    let mut list = ControllerList { boot_id, generated_at, sessions, invalid, counters, problems };
    // Once, here, on the blocking pool the parse runs on: the read and the
    // classifier each walk the list in id order, and a controller lists in
    // creation order, which is id order at best second by second.
    list.sessions.sort_by_id();
    Ok(list)
}

/// The document's top level read by serde, each entry converted as the
/// parser reaches it: the reference the fast path is held to.
fn parse_with_serde<'a>(
    text: &'a str,
    ids: IdCheck<'_>,
    sessions: &mut LiveSessions,
    invalid: &mut Vec<InvalidEntry>,
) -> Result<WireList<'a>, ParseProblem> {
    let seed = ListSeed(Entries { ids, sessions, invalid });
    let mut de = serde_json::Deserializer::from_str(text);
    serde::de::DeserializeSeed::deserialize(seed, &mut de)
        .and_then(|w| de.end().map(|()| w))
        .map_err(|e| ParseProblem::Invalid(format!("invalid JSON: {e}")))
}

/// The longest boot id accepted.
pub const MAX_BOOT_ID_BYTES: usize = 255;
/// The longest session id accepted; longer ones are `invalid_id` whatever the pattern.
pub const MAX_ID_BYTES: usize = 255;
/// The longest owner id accepted; a longer one makes its entry `invalid_entry`.
pub const MAX_OWNER_BYTES: usize = 1024;
/// How much of an unusable raw id a report shows.
const SHOWN_ID_CHARS: usize = 80;

/// Why a string from a controller cannot be stored or bound, if it cannot:
/// PostgreSQL text holds no NUL byte, and an oversized value would fail (or
/// bloat) the batch it travels in. Control characters are refused too: no id
/// or owner legitimately contains them, and they would garble logs.
fn unstorable(s: &str, max_bytes: usize) -> Option<String> {
    if s.len() > max_bytes {
        return Some(format!("is {} bytes long, more than the {max_bytes} accepted", s.len()));
    }
    // Every id and owner of every list comes here: one pass over the bytes
    // says whether a control character may be there at all (a byte below
    // 0x20, 0x7F, or 0xC2, which leads U+0080-U+009F), before looking closer.
    let suspect = s.bytes().fold(false, |seen, b| seen | (b < 0x20) | (b == 0x7f) | (b == 0xc2));
    if !suspect {
        return None;
    }
    if s.contains('\0') {
        return Some("contains a NUL byte".into());
    }
    if s.chars().any(char::is_control) {
        return Some("contains a control character".into());
    }
    None
}

/// A raw value as it may be shown in a report or a log: control characters
/// escaped, and cut short.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(SHOWN_ID_CHARS).flat_map(char::escape_debug).collect();
    if s.chars().count() > SHOWN_ID_CHARS {
        out.push('…');
    }
    out
}

/// How listed ids are checked against `sessions.id_pattern`. The default
/// pattern, which every entry of every list is checked against unless
/// configured otherwise, is checked by hand, with the same answer for every
/// string (a unit test compares them): the regex took 50-60 ns an id, and by
/// hand the whole parse of an entry fell from 360 to 325 ns.
#[derive(Clone, Copy)]
enum IdCheck<'p> {
    Default,
    Pattern(&'p Regex),
}

impl<'p> IdCheck<'p> {
    fn new(id_pattern: &'p Regex) -> IdCheck<'p> {
        if id_pattern.as_str() == crate::config::DEFAULT_ID_PATTERN {
            IdCheck::Default
        } else {
            IdCheck::Pattern(id_pattern)
        }
    }

    fn matches(self, id: &str) -> bool {
        match self {
            IdCheck::Default => default_id(id),
            IdCheck::Pattern(p) => p.is_match(id),
        }
    }
}

/// `^(exec_[0-9]{8}_[0-9]{6}_[0-9a-f]{8}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$`:
/// an executor id or a lowercase hyphenated UUID, the whole string.
fn default_id(id: &str) -> bool {
    let b = id.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|r| r.iter().all(u8::is_ascii_digit));
    let hex = |r: std::ops::Range<usize>| {
        b.get(r).is_some_and(|r| r.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)))
    };
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    match b.len() {
        29 => b.starts_with(b"exec_") && digits(5..13) && at(13, b'_') && digits(14..20) && at(20, b'_') && hex(21..29),
        36 => {
            hex(0..8)
                && at(8, b'-')
                && hex(9..13)
                && at(13, b'-')
                && hex(14..18)
                && at(18, b'-')
                && hex(19..23)
                && at(23, b'-')
                && hex(24..36)
        }
        _ => false,
    }
}

/// One entry of the list, appended to `sessions` if it is usable.
fn convert_session(entry: Entry<'_>, ids: IdCheck<'_>, sessions: &mut LiveSessions) -> Result<(), InvalidEntry> {
    let wire = match entry {
        Entry::Session(w) => w,
        Entry::Unusable(problem) => {
            return Err(InvalidEntry { raw_id: None, kind: InvalidEntryKind::InvalidId, problem })
        }
    };
    if wire.twice == Some("session_id") {
        return Err(InvalidEntry {
            raw_id: None,
            kind: InvalidEntryKind::InvalidId,
            problem: "entry has session_id twice".into(),
        });
    }
    let Some(raw_id) = Field::text(wire.session_id) else {
        return Err(InvalidEntry {
            raw_id: None,
            kind: InvalidEntryKind::InvalidId,
            problem: "entry has no string session_id".into(),
        });
    };
    if let Some(problem) = unstorable(&raw_id, MAX_ID_BYTES) {
        return Err(InvalidEntry {
            raw_id: Some(printable(&raw_id)),
            kind: InvalidEntryKind::InvalidId,
            problem: format!("session_id {problem}"),
        });
    }
    if !ids.matches(&raw_id) {
        return Err(InvalidEntry {
            // Exact, so a row with this id is still protected as held.
            raw_id: Some(raw_id.into_owned()),
            kind: InvalidEntryKind::InvalidId,
            problem: "session_id does not match sessions.id_pattern".into(),
        });
    };
    let bad = |problem: String| InvalidEntry {
        raw_id: Some(raw_id.clone().into_owned()),
        kind: InvalidEntryKind::InvalidEntry,
        problem,
    };
    // Its id is known, so a row with it is still protected as held.
    if let Some(name) = wire.twice {
        return Err(bad(format!("entry has {name} twice")));
    }
    let owner_id = match Field::text(wire.owner_id) {
        Some(s) if !s.is_empty() => match unstorable(&s, MAX_OWNER_BYTES) {
            Some(problem) => return Err(bad(format!("owner_id {problem}"))),
            None => s,
        },
        _ => return Err(bad("entry has no owner_id".into())),
    };
    let state = match Field::text(wire.state) {
        Some(s) => LiveState::parse(&s).ok_or_else(|| bad(format!("unknown state {s:?}")))?,
        None => return Err(bad("entry has no state".into())),
    };
    let started_at = match wire.started_at {
        // Absent or null.
        None => None,
        Some(Field::Other) => return Err(bad("started_at is not a string".into())),
        Some(Field::Str(s)) => Some(
            DateTime::parse_from_rfc3339(&s)
                .map_err(|_| bad(format!("started_at {s:?} is not an RFC 3339 time")))?
                .with_timezone(&Utc),
        ),
    };
    sessions.push_checked(&raw_id, &owner_id, state, started_at).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::{default_id, unstorable};
    use proptest::prelude::*;

    fn pattern() -> regex::Regex {
        regex::Regex::new(crate::config::DEFAULT_ID_PATTERN).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Valid ids of both shapes, and each with one byte changed, cut short
    /// or lengthened: the strings where a hand check could go wrong.
    fn near_ids() -> impl Strategy<Value = String> {
        let valid = prop_oneof![
            "exec_[0-9]{8}_[0-9]{6}_[0-9a-f]{8}",
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        ];
        let noise = prop_oneof![
            Just('0'),
            Just('9'),
            Just('a'),
            Just('f'),
            Just('g'),
            Just('A'),
            Just('F'),
            Just('_'),
            Just('-'),
            Just('\n'),
            Just('/'),
            Just(':'),
            Just('`'),
            Just('é'),
            Just('٣')
        ];
        (valid, 0usize..40, noise, 0usize..4).prop_map(|(id, at, c, how)| {
            let mut chars: Vec<char> = id.chars().collect();
            let at = at.min(chars.len());
            match how {
                0 => return id,
                1 if at < chars.len() => chars[at] = c,
                1 | 2 => chars.insert(at, c),
                _ => chars.truncate(at),
            }
            chars.into_iter().collect()
        })
    }

    proptest! {
        #[test]
        fn the_default_pattern_checked_by_hand_agrees_with_the_regex(id in near_ids()) {
            prop_assert_eq!(default_id(&id), pattern().is_match(&id), "{:?}", id);
        }

        #[test]
        fn any_short_string_checked_by_hand_agrees_with_the_regex(id in "[ -~\n]{0,40}") {
            prop_assert_eq!(default_id(&id), pattern().is_match(&id), "{:?}", id);
        }
    }

    /// The byte prefilter lets every control character through to the
    /// check that names it, and nothing else is refused.
    #[test]
    fn every_control_character_and_only_those_is_refused() {
        let mut s = String::new();
        for c in (0..=0x10_ffff).filter_map(char::from_u32) {
            s.clear();
            s.push('a');
            s.push(c);
            s.push('b');
            let refused = unstorable(&s, 16);
            assert_eq!(refused.is_some(), c.is_control(), "{c:?}: {refused:?}");
            if c == '\0' {
                assert_eq!(refused.as_deref(), Some("contains a NUL byte"));
            }
        }
    }
}
