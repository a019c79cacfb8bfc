//! The common shape of a controller document, read without serde: entries
//! whose fields are plain strings (no escapes) or `null`. A list of a
//! million sessions is nearly all such entries; read this way, the whole
//! parse of one (with its checks, conversion and sort) takes 280 ns instead
//! of 325 (docs/performance.md, ninth run).
//!
//! It is a fast path, never a second parser with its own rules. Whatever it
//! does not recognise it hands to serde_json: an entry of any other shape
//! (escapes, numbers, nested values, not an object) is parsed by serde on
//! its own and converted as before, and every top-level value but the
//! `sessions` array is read by serde as a raw value. Anything that is not
//! well-formed JSON, and a top-level key written with escapes or given
//! twice, make it give up, and the caller parses the whole document with
//! serde, which decides. So a document reads the same either way, which
//! `tests/controller.rs` checks on generated documents. (A value serde reads
//! alone reads as it would inside the document: serde_json skips the values
//! nothing keeps without a depth limit, and what it builds here nests at
//! most four deep, far from its limit of 128.)

use std::borrow::Cow;

use serde_json::value::RawValue;

use super::{convert_session, Entry, Field, IdCheck, WireList, WireSession};
use crate::model::{InvalidEntry, LiveSessions};

/// Reads `text` into `sessions` and `invalid`, and returns the rest of its
/// top level; `None` if serde must read it instead (what was pushed is then
/// to be dropped).
pub(super) fn scan<'a>(
    text: &'a str,
    ids: IdCheck<'_>,
    sessions: &mut LiveSessions,
    invalid: &mut Vec<InvalidEntry>,
) -> Option<WireList<'a>> {
    let mut c = Cursor { text, at: 0 };
    let mut list = WireList::default();
    let mut seen = [false; 5];
    c.ws();
    c.expect(b'{')?;
    c.ws();
    if c.eat(b'}') {
        return c.end().then_some(list);
    }
    loop {
        let key = c.key()?;
        let place = match key {
            "instance" => Some(0),
            "boot_id" => Some(1),
            "sessions" => Some(2),
            "counters" => Some(3),
            "generated_at" => Some(4),
            _ => None,
        };
        if let Some(i) = place {
            // A key given twice is an error serde reports.
            if std::mem::replace(&mut seen[i], true) {
                return None;
            }
        }
        match place {
            Some(2) => {
                if c.peek() == Some(b'[') {
                    c.entries(ids, sessions, invalid)?;
                    list.has_sessions = true;
                } else if c.rest().starts_with("null") {
                    c.at += 4;
                } else {
                    return None;
                }
            }
            Some(0) => list.instance = Some(c.raw_value()?),
            Some(1) => list.boot_id = Some(c.raw_value()?),
            Some(3) => list.counters = Some(c.raw_value()?),
            Some(4) => list.generated_at = Some(c.raw_value()?),
            _ => {
                c.raw_value()?;
            }
        }
        if !c.more(b'}')? {
            break;
        }
    }
    c.ws();
    c.end().then_some(list)
}

struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn rest(&self) -> &'a str {
        self.text.get(self.at..).unwrap_or_default()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn end(&self) -> bool {
        self.at == self.text.len()
    }

    /// JSON's whitespace, as serde_json skips it.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        let here = self.peek() == Some(b);
        if here {
            self.at += 1;
        }
        here
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        self.eat(b).then_some(())
    }

    /// A string with no escapes, borrowed; `None` (the cursor moved) for one
    /// with escapes or with a raw control character, which JSON forbids.
    fn plain_string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        let bytes = self.bytes();
        loop {
            match *bytes.get(self.at)? {
                b'"' => break,
                b'\\' => return None,
                b if b < 0x20 => return None,
                _ => self.at += 1,
            }
        }
        let s = self.text.get(start..self.at)?;
        self.at += 1;
        Some(s)
    }

    /// A member's key (a plain string) and its colon, the cursor then at
    /// the value.
    fn key(&mut self) -> Option<&'a str> {
        self.ws();
        let key = self.plain_string()?;
        self.ws();
        self.expect(b':')?;
        self.ws();
        Some(key)
    }

    /// After a member or an element: `Some(true)` past a comma, `Some(false)`
    /// past `close`, `None` for anything else.
    fn more(&mut self, close: u8) -> Option<bool> {
        self.ws();
        if self.eat(b',') {
            return Some(true);
        }
        self.expect(close)?;
        Some(false)
    }

    /// One value of any kind, read by serde_json, which checks it.
    fn raw_value(&mut self) -> Option<&'a RawValue> {
        let rest = self.rest();
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<&RawValue>();
        let value = values.next()?.ok()?;
        self.at += values.byte_offset();
        Some(value)
    }

    /// The `sessions` array, the cursor at its `[`.
    fn entries(
        &mut self,
        ids: IdCheck<'_>,
        sessions: &mut LiveSessions,
        invalid: &mut Vec<InvalidEntry>,
    ) -> Option<()> {
        self.expect(b'[')?;
        self.ws();
        if self.eat(b']') {
            return Some(());
        }
        loop {
            self.ws();
            let start = self.at;
            let entry = match self.plain_entry() {
                Some(wire) => Entry::Session(wire),
                None => {
                    self.at = start;
                    self.any_entry()?
                }
            };
            if let Err(e) = convert_session(entry, ids, sessions) {
                invalid.push(e);
            }
            if !self.more(b']')? {
                return Some(());
            }
        }
    }

    /// An entry that is an object of plain strings and nulls, read as serde
    /// would read it; `None` for any other (the cursor moved).
    fn plain_entry(&mut self) -> Option<WireSession<'a>> {
        self.expect(b'{')?;
        let mut w = WireSession::default();
        let mut seen = [false; 4];
        loop {
            let key = self.key()?;
            let value = match self.peek()? {
                b'"' => Some(Field::Str(Cow::Borrowed(self.plain_string()?))),
                b'n' if self.rest().starts_with("null") => {
                    self.at += 4;
                    None
                }
                _ => return None,
            };
            let (slot, i, name) = match key {
                "session_id" => (&mut w.session_id, 0, "session_id"),
                "owner_id" => (&mut w.owner_id, 1, "owner_id"),
                "state" => (&mut w.state, 2, "state"),
                "started_at" => (&mut w.started_at, 3, "started_at"),
                _ => {
                    if self.more(b'}')? {
                        continue;
                    }
                    return Some(w);
                }
            };
            // As serde's visitor: the last value counts, and a field given
            // twice is noted.
            *slot = value;
            if std::mem::replace(&mut seen[i], true) {
                w.twice.get_or_insert(name);
            }
            if !self.more(b'}')? {
                return Some(w);
            }
        }
    }

    /// An entry of any other shape, read by serde.
    fn any_entry(&mut self) -> Option<Entry<'a>> {
        let rest = self.rest();
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Entry<'a>>();
        let entry = values.next()?.ok()?;
        self.at += values.byte_offset();
        Some(entry)
    }
}
