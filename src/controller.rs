//! The controller client: the only code that knows the controller's JSON.
//!
//! A pass fetches every instance concurrently. Any failure — a refused
//! connection, a non-200 answer, a timeout, a body over `max_body_bytes` (checked
//! while streaming, so an endless body costs at most that much memory), invalid
//! JSON, a document with no `sessions` array — makes that instance unreachable for
//! the pass. It is never taken to mean "the controller has no sessions", because
//! that reading would turn every row of the instance into an orphan.
//!
//! One bad entry in an otherwise good list is a finding about that entry only.

use std::time::Duration;

use chrono::{DateTime, Utc};
use regex::Regex;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::ControllerConfig;
use crate::model::{
    AppCounters, ControllerList, InstanceSnapshot, InvalidEntry, InvalidEntryKind, LiveSession, LiveState, SessionId,
};

/// Why an instance could not be read, or a stop request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("GET {url}: {problem}")]
    Request { url: String, problem: String },
    #[error("GET {url}: timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: answered HTTP {status}, expected 200")]
    Status { url: String, status: u16 },
    #[error("GET {url}: body is larger than max_body_bytes ({limit} bytes)")]
    TooLarge { url: String, limit: u64 },
    #[error("GET {url}: body is not a session list: {problem}")]
    Invalid { url: String, problem: String },
    #[error("GET {url}: document names instance {found:?}, configured as {expected:?}")]
    WrongInstance { url: String, expected: String, found: String },
    #[error("POST {url}: {problem}")]
    Stop {
        url: String,
        problem: String,
        /// The request may have reached the controller (a timeout, an answer
        /// lost on the way back): whether it took effect is unknown.
        uncertain: bool,
    },
}

/// A client for all configured controller instances.
#[derive(Clone)]
pub struct ControllerClient {
    http: reqwest::Client,
}

impl ControllerClient {
    pub fn new() -> Result<ControllerClient, ControllerError> {
        let http = reqwest::Client::builder()
            // A redirect could send the bearer token, or our trust, somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("sessiond/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ControllerError::Request { url: String::new(), problem: describe(e) })?;
        Ok(ControllerClient { http })
    }

    /// Fetches every instance concurrently. The result has one snapshot per
    /// configured instance, in configuration order.
    pub async fn fetch_all(&self, controllers: &[ControllerConfig], id_pattern: &Regex) -> Vec<InstanceSnapshot> {
        let fetches = controllers.iter().map(|c| async move {
            let fetched_at = Utc::now();
            let result = self.fetch(c, id_pattern).await.map_err(|e| {
                tracing::warn!(controller = %c.name, error = %e, "controller unreachable for this pass");
                e.to_string()
            });
            InstanceSnapshot { name: c.name.clone(), fetched_at, result }
        });
        futures_util::future::join_all(fetches).await
    }

    /// Fetches one instance's list.
    pub async fn fetch(&self, c: &ControllerConfig, id_pattern: &Regex) -> Result<ControllerList, ControllerError> {
        let url = c.url.clone();
        let work = async {
            let req = authorize(self.http.get(&c.url).header("accept", "application/json"), c);
            let mut resp =
                req.send().await.map_err(|e| ControllerError::Request { url: url.clone(), problem: describe(e) })?;
            if resp.status().as_u16() != 200 {
                return Err(ControllerError::Status { url: url.clone(), status: resp.status().as_u16() });
            }
            if resp.content_length().is_some_and(|len| len > c.max_body_bytes) {
                return Err(ControllerError::TooLarge { url: url.clone(), limit: c.max_body_bytes });
            }
            let mut body = Vec::new();
            while let Some(chunk) =
                resp.chunk().await.map_err(|e| ControllerError::Request { url: url.clone(), problem: describe(e) })?
            {
                if body.len() as u64 + chunk.len() as u64 > c.max_body_bytes {
                    return Err(ControllerError::TooLarge { url: url.clone(), limit: c.max_body_bytes });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        let body = tokio::time::timeout(c.timeout, work)
            .await
            .map_err(|_| ControllerError::Timeout { url: url.clone(), timeout: c.timeout })??;
        // Parsing a large list is CPU work: keep it off the async workers.
        let (name, pattern) = (c.name.clone(), id_pattern.clone());
        let parsed = tokio::task::spawn_blocking(move || parse_list(&body, &name, &pattern))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        parsed.map_err(|problem| match problem {
            ParseProblem::Invalid(problem) => ControllerError::Invalid { url, problem },
            ParseProblem::WrongInstance(found) => {
                ControllerError::WrongInstance { url, expected: c.name.clone(), found }
            }
        })
    }

    /// Asks the controller to stop one session. 2xx or 404 means it is gone.
    pub async fn stop(&self, c: &ControllerConfig, id: &SessionId) -> Result<u16, ControllerError> {
        let Some(template) = &c.stop_url else {
            return Err(ControllerError::Stop {
                url: String::new(),
                problem: "no stop_url is configured".into(),
                uncertain: false,
            });
        };
        // Ids matched the configured pattern; escaping keeps a permissive pattern
        // from turning an id into a different path.
        let url = template.replace("{session_id}", &path_escape(id.as_str()));
        let req = authorize(self.http.post(&url).header("content-length", "0"), c);
        let resp = tokio::time::timeout(c.timeout, req.send())
            .await
            .map_err(|_| ControllerError::Stop {
                url: url.clone(),
                problem: format!("timed out after {:?}", c.timeout),
                uncertain: true,
            })?
            .map_err(|e| ControllerError::Stop {
                url: url.clone(),
                // A connection that was never made carried nothing.
                uncertain: !e.is_connect(),
                problem: describe(e),
            })?;
        let status = resp.status().as_u16();
        if resp.status().is_success() || status == 404 {
            Ok(status)
        } else {
            Err(ControllerError::Stop { url, problem: format!("answered HTTP {status}"), uncertain: false })
        }
    }
}

impl ControllerError {
    /// Whether a failed stop may nevertheless have taken effect.
    pub fn uncertain(&self) -> bool {
        matches!(self, ControllerError::Stop { uncertain: true, .. })
    }
}

/// A request error with its cause: reqwest's own text is "error sending
/// request for url (…)", which says nothing of why. The causes underneath
/// say: connection refused, a DNS failure, a certificate that does not verify.
pub fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// Adds the controller's credentials: a bearer token, or basic auth from the URL.
fn authorize(req: reqwest::RequestBuilder, c: &ControllerConfig) -> reqwest::RequestBuilder {
    match (&c.token, &c.credentials) {
        (Some(token), _) => req.bearer_auth(token.expose()),
        (None, Some(cred)) => req.basic_auth(cred.user.expose(), Some(cred.password.expose())),
        (None, None) => req,
    }
}

fn path_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The wire format. Kept private: nothing outside this module sees it.
//
// Entries are kept as raw JSON slices of the body until each is converted on
// its own: one malformed entry then costs only itself, and a large list is never
// held twice as a tree of generic JSON values.

#[derive(Deserialize)]
struct WireList<'a> {
    #[serde(borrow)]
    instance: Option<&'a RawValue>,
    #[serde(borrow)]
    boot_id: Option<&'a RawValue>,
    #[serde(borrow)]
    sessions: Option<Vec<&'a RawValue>>,
    #[serde(borrow)]
    counters: Option<&'a RawValue>,
    #[serde(borrow)]
    generated_at: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireSession<'a> {
    #[serde(borrow)]
    session_id: Option<&'a RawValue>,
    #[serde(borrow)]
    owner_id: Option<&'a RawValue>,
    #[serde(borrow)]
    state: Option<&'a RawValue>,
    #[serde(borrow)]
    started_at: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct WireCounters {
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

enum ParseProblem {
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
    parse_list(body, instance, id_pattern).map_err(|p| match p {
        ParseProblem::Invalid(s) => s,
        ParseProblem::WrongInstance(found) => format!("wrong instance {found:?}"),
    })
}

fn parse_list(body: &[u8], instance: &str, id_pattern: &Regex) -> Result<ControllerList, ParseProblem> {
    let wire: WireList<'_> =
        serde_json::from_slice(body).map_err(|e| ParseProblem::Invalid(format!("invalid JSON: {e}")))?;
    let sessions =
        wire.sessions.ok_or_else(|| ParseProblem::Invalid("the document has no \"sessions\" array".into()))?;
    let boot_id = string(wire.boot_id)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| ParseProblem::Invalid("the document has no \"boot_id\" string".into()))?;
    if let Some(found) = wire.instance {
        match string(Some(found)) {
            Some(name) if name == instance => {}
            Some(name) => return Err(ParseProblem::WrongInstance(name)),
            None => return Err(ParseProblem::Invalid("\"instance\" is not a string".into())),
        }
    }
    let counters = match wire.counters {
        None => None,
        // Counters are optional extras: a malformed block is dropped, not fatal.
        Some(v) => serde_json::from_str::<Option<WireCounters>>(v.get()).ok().flatten().map(|c| AppCounters {
            sessions_created: c.sessions_created.unwrap_or(0),
            sessions_reused: c.sessions_reused.unwrap_or(0),
            lookups_found: c.lookups.found.unwrap_or(0),
            lookups_invalid_format: c.lookups.invalid_format.unwrap_or(0),
            lookups_never_existed: c.lookups.never_existed.unwrap_or(0),
            lookups_deleted: c.lookups.deleted.unwrap_or(0),
            cleanups_succeeded: c.cleanups.succeeded.unwrap_or(0),
            cleanups_failed: c.cleanups.failed.unwrap_or(0),
        }),
    };

    // The controller's own clock, read with started_at: the age of a session is
    // the difference of the two, so the clocks of other hosts never enter it.
    let generated_at =
        string(wire.generated_at).and_then(|s| DateTime::parse_from_rfc3339(&s).ok()).map(|t| t.with_timezone(&Utc));
    let mut list = ControllerList {
        boot_id,
        generated_at,
        sessions: Vec::with_capacity(sessions.len()),
        invalid: Vec::new(),
        counters,
    };
    for value in sessions {
        match convert_session(value, id_pattern) {
            Ok(s) => list.sessions.push(s),
            Err(e) => list.invalid.push(e),
        }
    }
    Ok(list)
}

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

fn convert_session(value: &RawValue, id_pattern: &Regex) -> Result<LiveSession, InvalidEntry> {
    let wire: WireSession<'_> = serde_json::from_str(value.get()).map_err(|e| InvalidEntry {
        raw_id: None,
        kind: InvalidEntryKind::InvalidId,
        problem: format!("entry is not an object: {e}"),
    })?;
    let Some(raw_id) = string(wire.session_id) else {
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
    let Some(id) = SessionId::parse(&raw_id, id_pattern) else {
        return Err(InvalidEntry {
            // Exact, so a row with this id is still protected as held.
            raw_id: Some(raw_id),
            kind: InvalidEntryKind::InvalidId,
            problem: "session_id does not match sessions.id_pattern".into(),
        });
    };
    let bad =
        |problem: String| InvalidEntry { raw_id: Some(raw_id.clone()), kind: InvalidEntryKind::InvalidEntry, problem };
    let owner_id = match string(wire.owner_id) {
        Some(s) if !s.is_empty() => match unstorable(&s, MAX_OWNER_BYTES) {
            Some(problem) => return Err(bad(format!("owner_id {problem}"))),
            None => s,
        },
        _ => return Err(bad("entry has no owner_id".into())),
    };
    let state = match string(wire.state) {
        Some(s) => LiveState::parse(&s).ok_or_else(|| bad(format!("unknown state {s:?}")))?,
        None => return Err(bad("entry has no state".into())),
    };
    let started_at = match wire.started_at {
        None => None,
        Some(v) if v.get() == "null" => None,
        Some(v) => {
            let s = string(Some(v)).ok_or_else(|| bad("started_at is not a string".into()))?;
            Some(
                DateTime::parse_from_rfc3339(&s)
                    .map_err(|_| bad(format!("started_at {s:?} is not an RFC 3339 time")))?
                    .with_timezone(&Utc),
            )
        }
    };
    Ok(LiveSession { id, owner_id, state, started_at })
}
