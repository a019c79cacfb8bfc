//! Optional TLS and basic auth for the HTTP endpoints, configured in the file
//! format of the Prometheus exporter-toolkit's `web.config.file`, so operators
//! can reuse the file they already have for other exporters:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/sessiond/tls.crt
//!   key_file: /etc/sessiond/tls.key
//!   # client_auth_type: RequireAndVerifyClientCert
//!   # client_ca_file: /etc/sessiond/clients-ca.crt
//!   # min_version: TLS12
//! basic_auth_users:
//!   prometheus: $2y$10$...   # bcrypt hash
//! ```
//!
//! Keys the toolkit knows but sessiond does not implement (cipher suites, curve
//! preferences, custom headers, HTTP/2) are rejected with a clear error rather
//! than silently ignored. Basic auth protects `/metrics` and `/status`; the
//! liveness and readiness probes stay open.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", file.display())]
pub struct WebConfigError {
    pub file: PathBuf,
    pub problem: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebConfig {
    tls_server_config: Option<RawTls>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
    http_server_config: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<serde_yaml_ng::Value>,
    curve_preferences: Option<serde_yaml_ng::Value>,
    prefer_server_cipher_suites: Option<bool>,
}

/// The validated web config: a TLS acceptor and/or the basic-auth users.
#[derive(Clone)]
pub struct WebConfig {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    auth: Option<Arc<BasicAuth>>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("basic_auth_users", &self.auth.as_ref().map(|a| a.hashes.len()))
            .finish()
    }
}

struct BasicAuth {
    hashes: BTreeMap<String, String>,
    /// A hash of the same cost as the users' hashes, verified for unknown user
    /// names so that a wrong user name takes as long as a wrong password: the
    /// answer's timing does not tell which user names exist.
    dummy: String,
    /// Credentials that verified recently, so a scrape every few seconds does
    /// not pay for a bcrypt hash each time. Holds a salted SHA-256 of the
    /// password, never the password; bounded in size and age.
    verified: Mutex<HashMap<String, (ring::digest::Digest, std::time::Instant)>>,
    salt: [u8; 16],
    /// bcrypt runs on the blocking pool, at most this many at once: a flood of
    /// wrong passwords queues here, and never occupies the async workers that
    /// answer the probes.
    hashing: tokio::sync::Semaphore,
}

/// How many verified credentials are remembered, and for how long.
const VERIFIED_CACHE_SIZE: usize = 64;
const VERIFIED_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(600);
/// bcrypt verifications at once.
const HASHING_AT_ONCE: usize = 2;

impl BasicAuth {
    fn fingerprint(&self, password: &str) -> ring::digest::Digest {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.salt);
        ctx.update(password.as_bytes());
        ctx.finish()
    }

    fn remembered(&self, user: &str, password: &str) -> bool {
        let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(user).is_some_and(|(digest, at)| {
            at.elapsed() < VERIFIED_CACHE_TTL && constant_time_eq(digest.as_ref(), self.fingerprint(password).as_ref())
        })
    }

    fn remember(&self, user: String, password: &str) {
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= VERIFIED_CACHE_SIZE && !cache.contains_key(&user) {
            let oldest = cache.iter().min_by_key(|(_, (_, at))| *at).map(|(u, _)| u.clone());
            if let Some(oldest) = oldest {
                cache.remove(&oldest);
            }
        }
        cache.insert(user, (self.fingerprint(password), std::time::Instant::now()));
    }
}

/// The cost of a bcrypt hash (`$2y$10$...` → 10).
fn bcrypt_cost(hash: &str) -> Option<u32> {
    hash.split('$').nth(2)?.parse().ok()
}

impl WebConfig {
    /// Reads and validates the file; certificates and keys are loaded now, so a
    /// bad file fails at start-up (or reload), not at the first scrape.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let err = |problem: String| WebConfigError { file: path.to_owned(), problem };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read the web config: {e}")))?;
        let raw: RawWebConfig = serde_yaml_ng::from_str(&text).map_err(|e| err(format!("invalid web config: {e}")))?;
        if raw.http_server_config.is_some() {
            return Err(err("http_server_config is not supported by sessiond; remove it".into()));
        }
        let mut cost = None;
        for (user, hash) in &raw.basic_auth_users {
            if !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$")) {
                return Err(err(format!("basic_auth_users.{user}: the password must be a bcrypt hash ($2y$...)")));
            }
            let c = bcrypt_cost(hash)
                .ok_or_else(|| err(format!("basic_auth_users.{user}: the bcrypt hash has no valid cost")))?;
            cost = cost.max(Some(c));
        }
        let tls = match raw.tls_server_config {
            None => None,
            Some(t) => Some(tls_acceptor(t).map_err(|p| err(format!("tls_server_config: {p}")))?),
        };
        let auth = match cost {
            None => None,
            Some(cost) => {
                let dummy = bcrypt::hash("sessiond: no such user", cost)
                    .map_err(|e| err(format!("basic_auth_users: cannot make a comparison hash: {e}")))?;
                let mut salt = [0u8; 16];
                salt.iter_mut().for_each(|b| *b = fastrand::u8(..));
                Some(Arc::new(BasicAuth {
                    hashes: raw.basic_auth_users,
                    dummy,
                    verified: Mutex::new(HashMap::new()),
                    salt,
                    hashing: tokio::sync::Semaphore::new(HASHING_AT_ONCE),
                }))
            }
        };
        Ok(WebConfig { tls, auth })
    }

    /// No TLS, no auth.
    pub fn plain() -> WebConfig {
        WebConfig { tls: None, auth: None }
    }

    /// Whether the `Authorization` header value admits the request. bcrypt runs
    /// on the blocking pool, a bounded number at once, and an unknown user is
    /// checked against a hash of the same cost, so it answers no sooner.
    /// Basic auth is configured: every protected endpoint needs a user.
    pub fn requires_auth(&self) -> bool {
        self.auth.is_some()
    }

    pub async fn authorized(&self, header: Option<&str>) -> bool {
        self.user(header).await.is_some()
    }

    /// Who the request authenticates as: `None` if it does not; `Some(None)`
    /// when no basic auth is configured (anyone who reaches the listener).
    pub async fn user(&self, header: Option<&str>) -> Option<Option<String>> {
        let Some(auth) = &self.auth else { return Some(None) };
        let (user, password) = header.and_then(parse_basic)?;
        if auth.remembered(&user, &password) {
            return Some(Some(user));
        }
        let known = auth.hashes.contains_key(&user);
        let hash = auth.hashes.get(&user).unwrap_or(&auth.dummy).clone();
        let _permit = auth.hashing.acquire().await.ok()?;
        let candidate = password.clone();
        let matches = tokio::task::spawn_blocking(move || bcrypt::verify(&candidate, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        if matches && known {
            auth.remember(user.clone(), &password);
            return Some(Some(user));
        }
        None
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_basic(header: &str) -> Option<(String, String)> {
    let encoded = header.strip_prefix("Basic ").or_else(|| header.strip_prefix("basic "))?;
    let decoded = base64_decode(encoded.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut buf = 0u32;
    let mut bits = 0u32;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        buf = (buf << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn tls_acceptor(t: RawTls) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    if t.cipher_suites.is_some() || t.curve_preferences.is_some() || t.prefer_server_cipher_suites.is_some() {
        return Err("cipher_suites, curve_preferences and prefer_server_cipher_suites are not supported; \
                    sessiond uses rustls's safe defaults"
            .into());
    }
    if t.max_version.is_some() {
        return Err("max_version is not supported".into());
    }
    let cert_file = t.cert_file.ok_or("cert_file is missing")?;
    let key_file = t.key_file.ok_or("key_file is missing")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_file)
        .map_err(|e| format!("cert_file {}: {e}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("cert_file {} holds no certificate", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| format!("key_file {}: {e}", key_file.display()))?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match t.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(v) => return Err(format!("min_version {v:?} is not supported; use TLS12 or TLS13")),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let builder = match t.client_auth_type.as_deref() {
        None | Some("NoClientCert") => builder.with_no_client_auth(),
        Some("RequireAndVerifyClientCert") => {
            let ca = t.client_ca_file.ok_or("client_ca_file is required with RequireAndVerifyClientCert")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(&ca).map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?
            {
                roots
                    .add(cert.map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?)
                    .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        }
        Some(other) => {
            return Err(format!(
                "client_auth_type {other:?} is not supported; use NoClientCert or RequireAndVerifyClientCert"
            ))
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
