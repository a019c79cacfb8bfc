//! A simulated controller: a real HTTP server that speaks the controller contract
//! of `docs/controller-contract.md` exactly, so it doubles as an executable example of it.
//!
//! ```text
//! GET  /internal/sessions                     the live list
//! POST /internal/sessions/{session_id}/stop   stop one (200, or 404 if unknown)
//! ```
//!
//! Tests (and the demo) drive it: add and remove sessions, restart it (a new
//! `boot_id` and an empty memory), or make it misbehave in the ways real
//! controllers do — an error status, a hang, garbage, an endless body.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::model::LookupResult;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How the simulated controller misbehaves on `GET`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Answer with this status and an empty list.
    Status(u16),
    /// Never answer.
    Hang,
    /// Answer 200 with a body that is not JSON.
    Garbage,
    /// Answer 200 with an endless body.
    Endless,
    /// Answer 200 with valid JSON but no `sessions` array.
    NoSessions,
    /// Answer 302 to another URL.
    Redirect,
    /// Answer 200 with exactly this body.
    Raw(String),
    /// Answer as if several processes shared the URL: each answer carries the
    /// next of these boot ids in turn.
    Workers(Vec<String>),
    /// Answer the next list request this much later, with the list as it is
    /// then; the requests after it are answered at once.
    SlowOnce(std::time::Duration),
}

/// A stop request as received, for the request log.
#[derive(Clone, Debug)]
pub struct StopRequest {
    pub session_id: String,
    pub received_at: DateTime<Utc>,
    /// The `Sessiond-Actor` header.
    pub actor: Option<String>,
    /// The `Sessiond-Term` header.
    pub term: Option<i64>,
}

#[derive(Clone, Debug)]
pub struct SimSession {
    pub owner_id: String,
    pub state: String,
    pub started_at: Option<DateTime<Utc>>,
}

#[derive(Debug)]
struct State {
    instance: String,
    boot_id: String,
    sessions: BTreeMap<String, SimSession>,
    fault: Fault,
    stop_status: Option<u16>,
    stops: Vec<String>,
    /// Every stop request, as received.
    requests: Vec<StopRequest>,
    /// The exact `Authorization` header every request must carry.
    authorization: Option<String>,
    counters: crate::model::AppCounters,
    /// How long a stop request takes to answer.
    stop_delay: std::time::Duration,
    /// Answers given to GET, for [`Fault::Workers`].
    answers: usize,
    /// Added to every time the controller reports: its clock's error.
    clock_offset: chrono::Duration,
}

/// A running simulated controller.
#[derive(Clone)]
pub struct SimController {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<Mutex<State>>,
    shutdown: CancellationToken,
}

/// The simulated controller's creation-time buckets, in seconds.
pub const CREATE_BUCKETS: [f64; 7] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

fn new_boot_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl SimController {
    /// Starts a controller for `instance` on a free loopback port.
    pub async fn start(instance: &str) -> std::io::Result<SimController> {
        Self::start_on(instance, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(instance: &str, addr: SocketAddr) -> std::io::Result<SimController> {
        Self::serve(instance, addr, None).await
    }

    /// Starts a controller that serves https with this certificate and key
    /// (PEM files), on a free loopback port.
    pub async fn start_tls(instance: &str, cert: &Path, key: &Path) -> std::io::Result<SimController> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let certs = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad(e.to_string()))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::serve(instance, SocketAddr::from(([127, 0, 0, 1], 0)), Some(acceptor)).await
    }

    async fn serve(
        instance: &str,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<SimController> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            instance: instance.to_owned(),
            boot_id: new_boot_id(),
            sessions: BTreeMap::new(),
            fault: Fault::None,
            stop_status: None,
            stops: Vec::new(),
            requests: Vec::new(),
            authorization: None,
            counters: crate::model::AppCounters::default(),
            stop_delay: std::time::Duration::ZERO,
            answers: 0,
            clock_offset: chrono::Duration::zero(),
        }));
        let shutdown = CancellationToken::new();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let sim = SimController { addr, scheme, state, shutdown: shutdown.clone() };
        let served = sim.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => { tracing::debug!(error = %e, "simctl accept failed"); continue; }
                    },
                };
                let sim = served.clone();
                let conn_shutdown = shutdown.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let sim = sim.clone();
                        async move { Ok::<_, Infallible>(sim.handle(req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = conn_shutdown.cancelled() => {}
                            }
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else { return };
                            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = conn_shutdown.cancelled() => {}
                            }
                        }
                    }
                });
            }
        });
        Ok(sim)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock can only come from a test assertion;
        // the state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn url(&self) -> String {
        format!("{}://{}/internal/sessions", self.scheme, self.addr)
    }
    pub fn stop_url(&self) -> String {
        format!("{}://{}/internal/sessions/{{session_id}}/stop", self.scheme, self.addr)
    }
    /// This controller as a `[[controller]]` table of a sessiond config.
    pub fn controller_toml(&self, timeout: &str) -> String {
        format!(
            "[[controller]]\nname = \"{}\"\nurl = \"{}\"\nstop_url = \"{}\"\ntimeout = \"{timeout}\"\n\n",
            self.instance(),
            self.url(),
            self.stop_url()
        )
    }
    pub fn instance(&self) -> String {
        self.lock().instance.clone()
    }
    pub fn boot_id(&self) -> String {
        self.lock().boot_id.clone()
    }

    /// Adds (or replaces) a live session.
    pub fn add(&self, id: &str, owner: &str, state: &str, started_at: Option<DateTime<Utc>>) {
        let mut s = self.lock();
        s.counters.sessions_created += 1;
        s.sessions
            .insert(id.to_owned(), SimSession { owner_id: owner.to_owned(), state: state.to_owned(), started_at });
    }
    /// Counts a reuse of an existing session (for the application counters).
    pub fn reuse(&self) {
        self.lock().counters.sessions_reused += 1;
    }
    /// Counts a lookup the application answered, as the contract's counters do.
    pub fn count_lookup(&self, outcome: LookupResult) {
        let mut s = self.lock();
        let c = &mut s.counters;
        match outcome {
            LookupResult::Found => c.lookups_found += 1,
            LookupResult::InvalidFormat => c.lookups_invalid_format += 1,
            LookupResult::NeverExisted => c.lookups_never_existed += 1,
            LookupResult::Deleted => c.lookups_deleted += 1,
        }
    }
    /// Counts a cleanup the application ran.
    pub fn count_cleanup(&self, succeeded: bool) {
        let mut s = self.lock();
        if succeeded {
            s.counters.cleanups_succeeded += 1;
        } else {
            s.counters.cleanups_failed += 1;
        }
    }
    /// Records how long the application took to create a session, in the
    /// `counters.create_seconds` histogram.
    pub fn observe_create(&self, seconds: f64) {
        let mut s = self.lock();
        let h = s.counters.create_seconds.get_or_insert_with(|| crate::model::CreateHistogram {
            bounds: CREATE_BUCKETS.to_vec(),
            cumulative: vec![0; CREATE_BUCKETS.len()],
            count: 0,
            sum: 0.0,
        });
        for (bound, n) in h.bounds.iter().zip(h.cumulative.iter_mut()) {
            if seconds <= *bound {
                *n += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }
    /// Advances the application counters without touching the session list.
    pub fn count(&self, created: u64, reused: u64) {
        let mut s = self.lock();
        s.counters.sessions_created += created;
        s.counters.sessions_reused += reused;
    }
    /// Forgets a session (as a cleanup that cleared memory would).
    pub fn remove(&self, id: &str) -> bool {
        self.lock().sessions.remove(id).is_some()
    }
    pub fn holds(&self, id: &str) -> bool {
        self.lock().sessions.contains_key(id)
    }
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Simulates a process restart: a new boot id and an empty memory.
    pub fn restart(&self) {
        let mut s = self.lock();
        s.boot_id = new_boot_id();
        s.sessions.clear();
        s.counters = crate::model::AppCounters::default();
    }
    pub fn set_fault(&self, fault: Fault) {
        self.lock().fault = fault;
    }
    /// Makes stop requests answer this status instead of stopping.
    pub fn set_stop_status(&self, status: Option<u16>) {
        self.lock().stop_status = status;
    }
    /// Requires `Authorization: Bearer <token>` on every request.
    pub fn require_token(&self, token: Option<&str>) {
        self.lock().authorization = token.map(|t| format!("Bearer {t}"));
    }
    /// Requires this exact `Authorization` header on every request.
    pub fn require_authorization(&self, header: Option<&str>) {
        self.lock().authorization = header.map(str::to_owned);
    }
    /// Makes every stop request take this long to answer.
    pub fn set_stop_delay(&self, delay: std::time::Duration) {
        self.lock().stop_delay = delay;
    }
    /// Makes the controller's clock read `offset` off the true time: every time
    /// it reports (started_at, generated_at) is shifted by it.
    pub fn set_clock_offset(&self, offset: chrono::Duration) {
        self.lock().clock_offset = offset;
    }
    /// The ids stop requests were received for, in order.
    pub fn stops(&self) -> Vec<String> {
        self.lock().stops.clone()
    }

    /// Every stop request received, in order, with who sent it and when.
    pub fn stop_requests(&self) -> Vec<StopRequest> {
        self.lock().requests.clone()
    }
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    fn document(&self) -> serde_json::Value {
        let s = self.lock();
        let sessions: Vec<serde_json::Value> = s
            .sessions
            .iter()
            .map(|(id, sess)| {
                let mut v = serde_json::json!({"session_id": id, "owner_id": sess.owner_id, "state": sess.state});
                if let Some(t) = sess.started_at {
                    let t = t + s.clock_offset;
                    v["started_at"] = serde_json::json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                }
                v
            })
            .collect();
        serde_json::json!({
            "instance": s.instance,
            "boot_id": s.boot_id,
            "generated_at": (Utc::now() + s.clock_offset).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "sessions": sessions,
            "counters": {
                "sessions_created": s.counters.sessions_created,
                "sessions_reused": s.counters.sessions_reused,
                "lookups": {
                    "found": s.counters.lookups_found,
                    "invalid_format": s.counters.lookups_invalid_format,
                    "never_existed": s.counters.lookups_never_existed,
                    "deleted": s.counters.lookups_deleted
                },
                "cleanups": {"succeeded": s.counters.cleanups_succeeded, "failed": s.counters.cleanups_failed},
                "create_seconds": s.counters.create_seconds.as_ref().map(|h| {
                    let mut buckets = serde_json::Map::new();
                    for (b, n) in h.bounds.iter().zip(&h.cumulative) {
                        buckets.insert(b.to_string(), serde_json::json!(n));
                    }
                    buckets.insert("+Inf".into(), serde_json::json!(h.count));
                    serde_json::json!({"buckets": buckets, "sum": h.sum, "count": h.count})
                })
            }
        })
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        let (authorization, fault, stop_delay) = {
            let s = self.lock();
            (s.authorization.clone(), s.fault.clone(), s.stop_delay)
        };
        if let Some(want) = authorization {
            let ok = req.headers().get("authorization").and_then(|v| v.to_str().ok()).is_some_and(|v| v == want);
            if !ok {
                return reply(StatusCode::UNAUTHORIZED, "missing or wrong credentials");
            }
        }
        let path = req.uri().path().to_owned();
        if req.method() == hyper::Method::GET && path == "/internal/sessions" {
            return match fault {
                Fault::None => json(self.document().to_string()),
                Fault::SlowOnce(delay) => {
                    self.lock().fault = Fault::None;
                    tokio::time::sleep(delay).await;
                    json(self.document().to_string())
                }
                Fault::Workers(boots) => {
                    let mut doc = self.document();
                    let n = {
                        let mut s = self.lock();
                        s.answers += 1;
                        s.answers
                    };
                    if let Some(boot) = boots.get(n % boots.len().max(1)) {
                        doc["boot_id"] = serde_json::json!(boot);
                    }
                    json(doc.to_string())
                }
                Fault::Status(code) => {
                    reply(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), "{\"sessions\": []}")
                }
                Fault::Hang => {
                    self.shutdown.cancelled().await;
                    reply(StatusCode::SERVICE_UNAVAILABLE, "")
                }
                Fault::Garbage => json("<html>not json</html>".to_owned()),
                Fault::NoSessions => {
                    json(serde_json::json!({"instance": self.instance(), "boot_id": self.boot_id()}).to_string())
                }
                Fault::Redirect => Response::builder()
                    .status(StatusCode::FOUND)
                    .header("location", "http://127.0.0.1:1/elsewhere")
                    .body(Full::new(Bytes::new()).boxed())
                    .unwrap_or_else(|_| reply(StatusCode::INTERNAL_SERVER_ERROR, "")),
                Fault::Endless => {
                    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
                    let head = futures_util::stream::once(async {
                        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"{\"sessions\": [")))
                    });
                    let tail = futures_util::stream::repeat_with(move || Ok(Frame::data(chunk.clone())));
                    use futures_util::StreamExt;
                    Response::builder()
                        .status(StatusCode::OK)
                        .header("content-type", "application/json")
                        .body(BodyExt::boxed(StreamBody::new(head.chain(tail))))
                        .unwrap_or_else(|_| reply(StatusCode::INTERNAL_SERVER_ERROR, ""))
                }
                Fault::Raw(body) => json(body),
            };
        }
        if req.method() == hyper::Method::POST {
            if let Some(id) = path.strip_prefix("/internal/sessions/").and_then(|r| r.strip_suffix("/stop")) {
                // A received stop is carried out even if the caller goes away
                // while it runs, as a real controller's would be.
                let id = id.to_owned();
                let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let request = StopRequest {
                    session_id: id.clone(),
                    received_at: Utc::now(),
                    actor: header("sessiond-actor"),
                    term: header("sessiond-term").and_then(|t| t.parse().ok()),
                };
                self.lock().requests.push(request);
                let sim = self.clone();
                let work = tokio::spawn(async move {
                    if !stop_delay.is_zero() {
                        tokio::time::sleep(stop_delay).await;
                    }
                    let mut s = sim.lock();
                    s.stops.push(id.clone());
                    if let Some(code) = s.stop_status {
                        return StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    }
                    if s.sessions.remove(&id).is_some() {
                        StatusCode::OK
                    } else {
                        StatusCode::NOT_FOUND
                    }
                });
                return match work.await.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR) {
                    StatusCode::OK => reply(StatusCode::OK, "{\"stopped\": true}"),
                    StatusCode::NOT_FOUND => reply(StatusCode::NOT_FOUND, "{\"error\": \"session not found\"}"),
                    other => reply(other, "stop refused"),
                };
            }
        }
        reply(StatusCode::NOT_FOUND, "no such endpoint")
    }
}

fn json(body: String) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| reply(StatusCode::INTERNAL_SERVER_ERROR, ""))
}

fn reply(status: StatusCode, body: &'static str) -> Response<BoxBody<Bytes, Infallible>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *r.status_mut() = status;
    r
}
