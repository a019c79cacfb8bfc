//! Finds the top-level `boot_id` of a controller document while its body is
//! still streaming in, so a verification fetch can stop reading as soon as it
//! has it. A controller that puts `boot_id` before `sessions` (as the contract
//! recommends) costs a few hundred bytes per verification, whatever the size
//! of its list; one that puts it after is scanned to the end, without building
//! anything.
//!
//! The scanner is a byte-level state machine over the JSON grammar's
//! structure: strings (with escapes), nesting, and the keys of the top-level
//! object. It does not validate numbers or literals: the full parse of the
//! same document, on the pass's first fetch, does that.

/// Longest top-level key kept (longer keys cannot be `boot_id`).
const MAX_KEY: usize = 16;
/// Longest boot id accepted, escapes included.
const MAX_VALUE: usize = 1024;

/// What the bytes seen so far say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scan {
    /// Read on.
    More,
    /// The top-level `boot_id`, unescaped.
    Found(String),
    /// The document is not an object with a `boot_id` string.
    Invalid(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Before the top-level `{`.
    Start,
    /// After `{` or `,`: a key or `}`.
    Key,
    /// Inside a top-level key string.
    InKey,
    /// After a key: `:`.
    Colon,
    /// After `:`: a value.
    Value,
    /// Inside the `boot_id` string value.
    InBootId,
    /// Skipping a value that is not the one looked for.
    Skip,
    /// After a value: `,` or `}`.
    After,
    Done,
}

/// The scanner's state, carried from one chunk to the next.
#[derive(Debug)]
pub struct BootIdScanner {
    phase: Phase,
    key: Vec<u8>,
    key_too_long: bool,
    value: Vec<u8>,
    /// Nesting inside a skipped value (0: a scalar at the top level).
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl Default for BootIdScanner {
    fn default() -> Self {
        BootIdScanner::new()
    }
}

impl BootIdScanner {
    pub fn new() -> BootIdScanner {
        BootIdScanner {
            phase: Phase::Start,
            key: Vec::new(),
            key_too_long: false,
            value: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
        }
    }

    /// Feeds the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            i += 1;
            match self.phase {
                Phase::Done => return Scan::Invalid("the document ended".into()),
                Phase::Start => match b {
                    b'{' => self.phase = Phase::Key,
                    _ if b.is_ascii_whitespace() => {}
                    _ => return self.fail("the document is not a JSON object"),
                },
                Phase::Key => match b {
                    b'"' => {
                        self.key.clear();
                        self.key_too_long = false;
                        self.escaped = false;
                        self.phase = Phase::InKey;
                    }
                    b'}' => return self.fail("the document has no \"boot_id\" string"),
                    _ if b.is_ascii_whitespace() => {}
                    _ => return self.fail("a key was expected"),
                },
                Phase::InKey => {
                    if self.escaped {
                        self.escaped = false;
                        self.push_key(b);
                    } else if b == b'\\' {
                        self.escaped = true;
                        self.push_key(b);
                    } else if b == b'"' {
                        self.unescape_key();
                        self.phase = Phase::Colon;
                    } else {
                        self.push_key(b);
                    }
                }
                Phase::Colon => match b {
                    b':' => self.phase = Phase::Value,
                    _ if b.is_ascii_whitespace() => {}
                    _ => return self.fail("':' was expected after a key"),
                },
                Phase::Value => {
                    if b.is_ascii_whitespace() {
                        continue;
                    }
                    if !self.key_too_long && self.key == b"boot_id" {
                        if b != b'"' {
                            return self.fail("\"boot_id\" is not a string");
                        }
                        self.value.clear();
                        self.value.push(b);
                        self.escaped = false;
                        self.phase = Phase::InBootId;
                    } else {
                        self.start_skip(b);
                    }
                }
                Phase::InBootId => {
                    if self.value.len() >= MAX_VALUE {
                        return self.fail("\"boot_id\" is too long");
                    }
                    self.value.push(b);
                    if self.escaped {
                        self.escaped = false;
                    } else if b == b'\\' {
                        self.escaped = true;
                    } else if b == b'"' {
                        self.phase = Phase::Done;
                        return match serde_json::from_slice::<String>(&self.value) {
                            Ok(id) if !id.is_empty() => Scan::Found(id),
                            Ok(_) => Scan::Invalid("\"boot_id\" is empty".into()),
                            Err(e) => Scan::Invalid(format!("\"boot_id\" is not a valid string: {e}")),
                        };
                    }
                }
                Phase::Skip => {
                    if self.in_string {
                        if self.escaped {
                            self.escaped = false;
                        } else if b == b'\\' {
                            self.escaped = true;
                        } else if b == b'"' {
                            self.in_string = false;
                            if self.depth == 0 {
                                self.phase = Phase::After;
                            }
                        }
                        continue;
                    }
                    match b {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => self.depth += 1,
                        b'}' | b']' if self.depth > 0 => {
                            self.depth -= 1;
                            if self.depth == 0 {
                                self.phase = Phase::After;
                            }
                        }
                        // The end of a scalar at the top level.
                        b',' if self.depth == 0 => self.phase = Phase::Key,
                        b'}' if self.depth == 0 => return self.fail("the document has no \"boot_id\" string"),
                        _ => {}
                    }
                }
                Phase::After => match b {
                    b',' => self.phase = Phase::Key,
                    b'}' => return self.fail("the document has no \"boot_id\" string"),
                    _ if b.is_ascii_whitespace() => {}
                    _ => return self.fail("',' or '}' was expected after a value"),
                },
            }
        }
        Scan::More
    }

    /// The body ended: what the scan says then.
    pub fn finish(&self) -> Scan {
        Scan::Invalid(match self.phase {
            Phase::Start => "the body is empty".into(),
            _ => "the document ended before a \"boot_id\" string".into(),
        })
    }

    fn push_key(&mut self, b: u8) {
        if self.key.len() < MAX_KEY {
            self.key.push(b);
        } else {
            self.key_too_long = true;
        }
    }

    /// A key written with escapes (`"boot\u005fid"`) is the key it spells.
    fn unescape_key(&mut self) {
        if self.key_too_long || !self.key.contains(&b'\\') {
            return;
        }
        let mut quoted = Vec::with_capacity(self.key.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(&self.key);
        quoted.push(b'"');
        if let Ok(k) = serde_json::from_slice::<String>(&quoted) {
            self.key = k.into_bytes();
        }
    }

    fn start_skip(&mut self, first: u8) {
        self.phase = Phase::Skip;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        match first {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth = 1,
            _ => {} // a scalar: skipped up to the next ',' or '}'
        }
    }

    fn fail(&mut self, why: &str) -> Scan {
        self.phase = Phase::Done;
        Scan::Invalid(why.into())
    }
}

/// Scans a whole body at once (tests, and bodies already in memory).
pub fn boot_id_of(body: &[u8]) -> Scan {
    let mut s = BootIdScanner::new();
    match s.feed(body) {
        Scan::More => s.finish(),
        other => other,
    }
}
