//! The HTTP endpoints: `/metrics`, `/healthz` (the process is alive), `/readyz` (a
//! pass completed recently and could read the database), and `/status` (the last
//! pass as JSON).
//!
//! Every answer comes from memory: what the last pass recorded. A scrape never
//! waits on the database or a controller. Connections get a header-read timeout,
//! a per-connection failure is logged and never stops the accept loop, and on
//! shutdown open connections are drained gracefully, with a bound on the wait.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{Metrics, CONTENT_TYPE};
use crate::reconcile::PassReport;
use crate::web::WebConfig;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole connection may stay open; scrapers reconnect.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// How long shutdown waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

struct LastPass {
    ended: Instant,
    database_up: bool,
    outcome: &'static str,
    status: serde_json::Value,
}

/// What the endpoints serve, shared between the pass loop and the server.
pub struct Shared {
    pub metrics: Metrics,
    web: RwLock<WebConfig>,
    interval: RwLock<Duration>,
    last: RwLock<Option<LastPass>>,
    started: Instant,
    /// With `[ha]`: the lease, read at every scrape.
    lease: RwLock<Option<crate::lease::Lease>>,
    /// The running config (the API reads the database with it).
    pub(crate) config: RwLock<Arc<Config>>,
    /// The last pass's findings, for `/findings` and `/sessions/{id}`.
    pub(crate) api: RwLock<Option<Arc<crate::api::LastFindings>>>,
    /// The API's own database connection, made on first use.
    pub(crate) db: tokio::sync::Mutex<Option<crate::store::Store>>,
    /// `POST /pass`: the daemon loop starts a pass now.
    pub pass_now: Arc<tokio::sync::Notify>,
    /// `POST /guard/release`: controllers whose guard the next pass releases.
    pub(crate) releases: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Shared {
    /// Metrics and endpoint state for `cfg`, serving with `web` (TLS, basic auth).
    pub fn new(cfg: &Config, web: WebConfig) -> Result<Arc<Shared>, prometheus::Error> {
        let metrics = Metrics::new()?;
        metrics.observe_config(cfg);
        Ok(Arc::new(Shared {
            metrics,
            web: RwLock::new(web),
            interval: RwLock::new(cfg.daemon.interval),
            last: RwLock::new(None),
            started: Instant::now(),
            lease: RwLock::new(None),
            config: RwLock::new(Arc::new(cfg.clone())),
            api: RwLock::new(None),
            db: tokio::sync::Mutex::new(None),
            pass_now: Arc::new(tokio::sync::Notify::new()),
            releases: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        }))
    }

    /// Records a finished pass for metrics, readiness and status.
    pub fn record(&self, report: &PassReport) {
        let ended_unix = report.started_at.timestamp_millis() as f64 / 1000.0 + report.duration_seconds;
        self.metrics.record_pass(report, ended_unix);
        let status = status_document(report);
        *self.api.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(crate::api::LastFindings::of(report)));
        *self.last.write().unwrap_or_else(|p| p.into_inner()) = Some(LastPass {
            ended: Instant::now(),
            database_up: report.database_up,
            outcome: report.outcome.as_str(),
            status,
        });
    }

    /// Applies a reloaded config. The web config file is read again, so new
    /// certificates and users take effect for new connections; if it no longer
    /// loads, the running one stays.
    pub fn set_config(&self, cfg: &Config) {
        self.metrics.observe_config(cfg);
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg.clone());
        // The API reconnects with the new settings on its next request.
        if let Ok(mut db) = self.db.try_lock() {
            *db = None;
        }
        *self.interval.write().unwrap_or_else(|p| p.into_inner()) = cfg.daemon.interval;
        let web = match &cfg.daemon.web_config_file {
            Some(path) => match WebConfig::load(path) {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(error = %e, "web config reload rejected; the running one stays");
                    return;
                }
            },
            None => WebConfig::plain(),
        };
        *self.web.write().unwrap_or_else(|p| p.into_inner()) = web;
    }

    /// Exports the lease's state (leader, term, transitions) at every scrape.
    pub fn set_lease(&self, lease: crate::lease::Lease) {
        *self.lease.write().unwrap_or_else(|p| p.into_inner()) = Some(lease);
    }

    /// The exposition text, with the lease as it is at this instant.
    pub fn render_metrics(&self) -> Vec<u8> {
        if let Some(lease) = &*self.lease.read().unwrap_or_else(|p| p.into_inner()) {
            self.metrics.observe_lease(lease);
        }
        self.metrics.render()
    }

    /// Controllers whose guard an operator released, taken for the next pass.
    pub fn take_releases(&self) -> std::collections::BTreeSet<String> {
        std::mem::take(&mut *self.releases.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn web(&self) -> WebConfig {
        self.web.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `Ok` when a pass ended recently and could read the database; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        let interval = *self.interval.read().unwrap_or_else(|p| p.into_inner());
        let stale_after = (interval * 3).max(Duration::from_secs(30));
        let last = self.last.read().unwrap_or_else(|p| p.into_inner());
        match &*last {
            None => Err(format!(
                "no pass has completed yet (running for {})",
                humantime::format_duration(Duration::from_secs(self.started.elapsed().as_secs()))
            )),
            Some(p) if !p.database_up => {
                Err(format!("the last pass could not read the database (outcome {})", p.outcome))
            }
            Some(p) if p.ended.elapsed() > stale_after => Err(format!(
                "the last pass ended {} ago, more than {} (3 intervals)",
                humantime::format_duration(Duration::from_secs(p.ended.elapsed().as_secs())),
                humantime::format_duration(stale_after)
            )),
            Some(_) => Ok(()),
        }
    }

    fn status(&self) -> serde_json::Value {
        let last = self.last.read().unwrap_or_else(|p| p.into_inner());
        let ready = self.readiness();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "ready": ready.is_ok(),
            "not_ready_reason": ready.err(),
            "last_pass": last.as_ref().map(|p| p.status.clone()),
        })
    }
}

/// The `/status` document for a pass: the summary, not every finding.
pub fn status_document(r: &PassReport) -> serde_json::Value {
    let findings: serde_json::Map<String, serde_json::Value> =
        r.findings_by_kind().into_iter().map(|(k, n)| (k.as_str().to_owned(), n.into())).collect();
    let mut repairs = serde_json::Map::new();
    for ((k, o), n) in r.outcomes_by_kind() {
        let entry = repairs.entry(k.as_str().to_owned()).or_insert_with(|| serde_json::json!({}));
        entry[o.as_str()] = n.into();
    }
    let guard: serde_json::Map<String, serde_json::Value> = r
        .guard_tripped
        .iter()
        .map(|(c, kinds)| (c.clone(), kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().into()))
        .collect();
    serde_json::json!({
        "pass_id": r.pass_id,
        "role": r.role,
        "started_at": r.started_at,
        "duration_seconds": r.duration_seconds,
        "outcome": r.outcome.as_str(),
        "error": r.error,
        "mode": r.mode,
        "database_up": r.database_up,
        "controllers": r.instances.iter().map(|i| serde_json::json!({
            "name": i.name,
            "up": i.reachable,
            "error": i.error,
            "sessions": i.sessions,
            "restarted": i.restarted,
        })).collect::<Vec<_>>(),
        "rows_by_state": r.rows_by_state,
        "findings_by_kind": findings,
        "repairs_by_kind": repairs,
        "guard_tripped": guard,
        "probes": r.probes,
    })
}

pub(crate) fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

const INDEX: &str = "sessiond\n\n/metrics          Prometheus metrics\n/healthz          liveness\n/readyz           readiness\n/status           the last pass, as JSON\n/findings         the last pass's findings (?kind=&controller=&limit=)\n/sessions/{id}    one session explained\nPOST /pass, /pause, /resume, /guard/release?controller=   with [daemon] admin = true\n";

pub(crate) fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::UNAUTHORIZED, "text/plain; charset=utf-8", "unauthorized\n");
    r.headers_mut()
        .insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Basic realm=\"sessiond\""));
    r
}

/// Answers one request.
pub async fn handle(shared: &Shared, req: &Request<impl hyper::body::Body>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let header = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let admin_path = crate::api::ADMIN_PATHS.contains(&path);
    if req.method() == Method::POST && admin_path {
        return crate::api::admin(shared, path, req.uri().query(), header).await;
    }
    if admin_path || (req.method() != Method::GET && req.method() != Method::HEAD) {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "method not allowed\n");
        let allow = if admin_path { "POST" } else { "GET, HEAD" };
        r.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static(allow));
        return r;
    }
    let protected = matches!(path, "/metrics" | "/status" | "/findings") || path.starts_with("/sessions/");
    if protected && !shared.web().authorized(header).await {
        return unauthorized();
    }
    if path == "/findings" {
        return crate::api::findings(shared, req.uri().query());
    }
    if let Some(id) = path.strip_prefix("/sessions/") {
        return crate::api::session(shared, id).await;
    }
    match path {
        "/metrics" => text(StatusCode::OK, CONTENT_TYPE, shared.render_metrics()),
        "/healthz" => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => match shared.readiness() {
            Ok(()) => text(StatusCode::OK, "text/plain; charset=utf-8", "ready\n"),
            Err(why) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", format!("not ready: {why}\n"))
            }
        },
        "/status" => text(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(&shared.status()).unwrap_or_else(|_| b"{}".to_vec()),
        ),
        "/" => text(StatusCode::OK, "text/plain; charset=utf-8", INDEX),
        _ => text(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found\n"),
    }
}

/// Binds the listen address, naming it in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// The endpoints as a hyper service: every answer is computed in memory.
#[derive(Clone)]
struct Endpoints(Arc<Shared>);

impl hyper::service::Service<Request<hyper::body::Incoming>> for Endpoints {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        let shared = Arc::clone(&self.0);
        Box::pin(async move { Ok(handle(&shared, &req).await) })
    }
}

fn connection<S>(io: S, shared: Arc<Shared>) -> hyper::server::conn::http1::Connection<TokioIo<S>, Endpoints>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), Endpoints(shared))
}

fn spawn_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) {
    let conn = graceful.watch(connection(stream, shared));
    tokio::spawn(finish(conn, peer));
}

async fn finish(conn: impl std::future::Future<Output = Result<(), hyper::Error>>, peer: SocketAddr) {
    match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "http connection ended with an error"),
        Err(_) => tracing::debug!(peer = %peer, "http connection closed after its lifetime"),
    }
}

/// Serves until `shutdown` fires, then drains open connections.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Small answers go out at once, not after the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        let tls = shared.web().tls;
        let shared = Arc::clone(&shared);
        match tls {
            None => spawn_connection(stream, peer, shared, &graceful),
            Some(acceptor) => {
                // The handshake runs in its own task, bounded, so a slow client
                // cannot stall the accept loop.
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let conn = connection(tls_stream, shared);
                            finish(watcher.watch(conn), peer).await;
                        }
                        Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("http connections did not drain in time; closing them");
    }
}
