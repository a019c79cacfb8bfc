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

pub mod scan;
mod wire;

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use regex::Regex;

use crate::config::ControllerConfig;
use crate::model::{ControllerList, InstanceSnapshot, SessionId};

pub use wire::{parse_list_for_test, parse_list_with_serde_for_test, MAX_BOOT_ID_BYTES, MAX_ID_BYTES, MAX_OWNER_BYTES};

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
    #[error("verification fetch {n}: {source}")]
    Verification { n: usize, source: Box<ControllerError> },
    #[error("POST {url}: {problem}")]
    Stop {
        url: String,
        problem: String,
        /// The request may have reached the controller (a timeout, an answer
        /// lost on the way back): whether it took effect is unknown.
        uncertain: bool,
    },
}

/// The HTTP clients of one controller instance.
#[derive(Clone)]
struct Clients {
    /// For the list: a fresh connection per request, so that several processes
    /// answering at one URL show themselves (a pooled connection would keep
    /// talking to one of them).
    list: reqwest::Client,
    /// For stop requests: pooled.
    stop: reqwest::Client,
}

/// Who sends a stop request.
#[derive(Clone, Copy, Debug)]
pub struct StopFrom<'a> {
    /// Who sends it: visible ASCII only (see [`header_safe`]).
    pub actor: &'a str,
    /// The leader's term, with several replicas.
    pub term: Option<i64>,
}

/// `s` with everything a header value cannot carry replaced by `_`.
pub fn header_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '_' }).collect()
}

/// A client for all configured controller instances.
#[derive(Clone)]
pub struct ControllerClient {
    clients: HashMap<String, Clients>,
}

fn builder(c: &ControllerConfig) -> Result<reqwest::ClientBuilder, ControllerError> {
    let setup = |problem: String| ControllerError::Request { url: c.url.clone(), problem };
    let roots = if c.url.starts_with("https:") || c.stop_url.as_deref().is_some_and(|u| u.starts_with("https:")) {
        crate::tls::roots(c.ca_file.as_deref()).map_err(setup)?
    } else {
        rustls::RootCertStore::empty()
    };
    let tls = crate::tls::client_config(roots).map_err(setup)?;
    Ok(reqwest::Client::builder()
        // A redirect could send the bearer token, or our trust, somewhere else.
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .tls_backend_preconfigured(tls)
        .connect_timeout(c.timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("sessiond/", env!("CARGO_PKG_VERSION"))))
}

impl ControllerClient {
    /// Clients for these controllers (TLS set up from each one's `ca_file`).
    pub fn new(controllers: &[ControllerConfig]) -> Result<ControllerClient, ControllerError> {
        let mut clients = HashMap::new();
        for c in controllers {
            let build = |b: reqwest::ClientBuilder| {
                b.build().map_err(|e| ControllerError::Request { url: c.url.clone(), problem: describe(e) })
            };
            let list = build(builder(c)?.pool_max_idle_per_host(0))?;
            let stop = build(builder(c)?.pool_idle_timeout(Duration::from_secs(30)))?;
            clients.insert(c.name.clone(), Clients { list, stop });
        }
        Ok(ControllerClient { clients })
    }

    fn clients(&self, c: &ControllerConfig) -> Result<&Clients, ControllerError> {
        self.clients.get(&c.name).ok_or_else(|| ControllerError::Request {
            url: c.url.clone(),
            problem: "no client for this controller (the configuration changed)".into(),
        })
    }

    /// Fetches every instance concurrently: its list, then
    /// `verifications(name, boot id of the list)` more fetches that read only the
    /// boot id, each over a new connection. The result has one snapshot per
    /// configured instance, in configuration order.
    pub async fn fetch_all(
        &self,
        controllers: &[ControllerConfig],
        id_pattern: &Regex,
        verifications: &(dyn Fn(&str, &str) -> usize + Sync),
    ) -> Vec<InstanceSnapshot> {
        let fetches = controllers.iter().map(|c| async move {
            let fetched_at = Utc::now();
            let mut boot_ids = Vec::new();
            let mut result = self.fetch(c, id_pattern).await;
            if let Ok(list) = &result {
                boot_ids.push(list.boot_id.clone());
                for n in 1..=verifications(&c.name, &list.boot_id) {
                    match self.boot_id(c).await {
                        Ok(id) => boot_ids.push(id),
                        Err(e) => {
                            result = Err(ControllerError::Verification { n, source: Box::new(e) });
                            break;
                        }
                    }
                }
            }
            let result = result.map_err(|e| {
                tracing::warn!(controller = %c.name, error = %e, "controller unreachable for this pass");
                e.to_string()
            });
            InstanceSnapshot { name: c.name.clone(), fetched_at, result, boot_ids }
        });
        futures_util::future::join_all(fetches).await
    }

    /// Sends the list request and checks the status and the announced size.
    async fn get(&self, c: &ControllerConfig) -> Result<reqwest::Response, ControllerError> {
        let url = &c.url;
        let req = authorize(self.clients(c)?.list.get(url).header("accept", "application/json"), c);
        let resp = req.send().await.map_err(|e| ControllerError::Request { url: url.clone(), problem: describe(e) })?;
        if resp.status().as_u16() != 200 {
            return Err(ControllerError::Status { url: url.clone(), status: resp.status().as_u16() });
        }
        if resp.content_length().is_some_and(|len| len > c.max_body_bytes) {
            return Err(ControllerError::TooLarge { url: url.clone(), limit: c.max_body_bytes });
        }
        Ok(resp)
    }

    /// Reads a body chunk by chunk, bounded by `max_body_bytes`.
    async fn chunk(
        c: &ControllerConfig,
        resp: &mut reqwest::Response,
        read: &mut u64,
    ) -> Result<Option<bytes::Bytes>, ControllerError> {
        let chunk =
            resp.chunk().await.map_err(|e| ControllerError::Request { url: c.url.clone(), problem: describe(e) })?;
        if let Some(chunk) = &chunk {
            *read += chunk.len() as u64;
            if *read > c.max_body_bytes {
                return Err(ControllerError::TooLarge { url: c.url.clone(), limit: c.max_body_bytes });
            }
        }
        Ok(chunk)
    }

    /// Fetches one instance's list.
    pub async fn fetch(&self, c: &ControllerConfig, id_pattern: &Regex) -> Result<ControllerList, ControllerError> {
        let body = self.fetch_body(c).await?;
        // Parsing a large list is CPU work: keep it off the async workers.
        let (config, pattern) = (c.clone(), id_pattern.clone());
        crate::on_blocking_pool(move || parse(&body, &config, &pattern)).await
    }

    /// Fetches one instance's document, whole, within its timeout and size bound.
    pub async fn fetch_body(&self, c: &ControllerConfig) -> Result<Vec<u8>, ControllerError> {
        let work = async {
            let mut resp = self.get(c).await?;
            // Sized once from the announced length (already bounded by
            // max_body_bytes), so a large list is not copied as the vector grows.
            const MAX_PRESIZE: u64 = 1 << 30;
            let announced = resp.content_length().unwrap_or(0).min(c.max_body_bytes).min(MAX_PRESIZE);
            let mut body = Vec::with_capacity(usize::try_from(announced).unwrap_or(0));
            let mut read = 0;
            while let Some(chunk) = Self::chunk(c, &mut resp, &mut read).await? {
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        tokio::time::timeout(c.timeout, work)
            .await
            .map_err(|_| ControllerError::Timeout { url: c.url.clone(), timeout: c.timeout })?
    }

    /// Fetches the list again, over a new connection, and reads only as far as
    /// its top-level `boot_id`.
    pub async fn boot_id(&self, c: &ControllerConfig) -> Result<String, ControllerError> {
        let url = c.url.clone();
        let work = async {
            let mut resp = self.get(c).await?;
            let mut scanner = scan::BootIdScanner::new();
            let mut read = 0;
            while let Some(chunk) = Self::chunk(c, &mut resp, &mut read).await? {
                match scanner.feed(&chunk) {
                    scan::Scan::More => {}
                    scan::Scan::Found(id) => return Ok(id),
                    scan::Scan::Invalid(problem) => return Err(ControllerError::Invalid { url: url.clone(), problem }),
                }
            }
            match scanner.finish() {
                scan::Scan::Found(id) => Ok(id),
                scan::Scan::Invalid(problem) => Err(ControllerError::Invalid { url: url.clone(), problem }),
                scan::Scan::More => Err(ControllerError::Invalid { url: url.clone(), problem: "no boot_id".into() }),
            }
        };
        tokio::time::timeout(c.timeout, work)
            .await
            .map_err(|_| ControllerError::Timeout { url: url.clone(), timeout: c.timeout })?
    }

    /// Asks the controller to stop one session. 2xx or 404 means it is gone.
    /// Asks the controller to stop one session. The request names its sender
    /// (`Sessiond-Actor`) and, with several replicas, the leader's term
    /// (`Sessiond-Term`), so a controller's request log says who sent each
    /// stop, and a controller may refuse a term older than one it has seen.
    pub async fn stop(
        &self,
        c: &ControllerConfig,
        id: &SessionId,
        from: &StopFrom<'_>,
    ) -> Result<u16, ControllerError> {
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
        let client = &self.clients(c)?.stop;
        let mut req = client.post(&url).header("content-length", "0").header("sessiond-actor", from.actor);
        if let Some(term) = from.term {
            req = req.header("sessiond-term", term.to_string());
        }
        let req = authorize(req, c);
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
    if let Some(hint) = crate::tls::hint(&s) {
        s.push_str(" (");
        s.push_str(hint);
        s.push(')');
    }
    s
}

/// Converts a controller's document into domain types.
pub fn parse(body: &[u8], c: &ControllerConfig, id_pattern: &Regex) -> Result<ControllerList, ControllerError> {
    wire::parse_list(body, &c.name, id_pattern).map_err(|problem| match problem {
        wire::ParseProblem::Invalid(problem) => ControllerError::Invalid { url: c.url.clone(), problem },
        wire::ParseProblem::WrongInstance(found) => {
            ControllerError::WrongInstance { url: c.url.clone(), expected: c.name.clone(), found }
        }
    })
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
