//! Configuration in two phases: [`RawConfig`] is the TOML file exactly as written
//! (unknown keys rejected, no I/O), and [`Config`] is the validated result with
//! parsed durations, URLs, patterns and secrets read from their files.
//!
//! Every error names the file, the key and what is wrong with it, because an
//! operator reading a failed `systemctl start` has nothing else to go on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::model::RowState;

pub mod sessions;

pub use sessions::{Columns, Ident, TableName, Vocabulary};

/// A configuration error: the file, the key (dotted path, may be empty) and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{}: {}{problem}", file.display(), key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub problem: String,
}

impl ConfigError {
    fn at(file: &Path, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError { file: file.to_owned(), key: Some(key.into()), problem: problem.into() }
    }
}

/// A secret that never shows up in `Debug`, `Display` or serialized output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

// ---------------------------------------------------------------------------
// Phase one: the file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub daemon: RawDaemon,
    pub database: Option<RawDatabase>,
    #[serde(default)]
    pub controller: Vec<RawController>,
    #[serde(default)]
    pub reconcile: RawReconcile,
    #[serde(default)]
    pub sessions: RawSessions,
    #[serde(default)]
    pub ha: RawHa,
    #[serde(default)]
    pub audit: RawAudit,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub retain: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHa {
    pub enabled: Option<bool>,
    pub lease: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub interval: Option<String>,
    pub mode: Option<String>,
    pub listen: Option<String>,
    pub web_config_file: Option<PathBuf>,
    pub admin: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub statement_timeout: Option<String>,
    pub schema: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub read_connections: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawController {
    pub name: Option<String>,
    pub url: Option<String>,
    pub stop_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReconcile {
    pub grace: Option<String>,
    pub confirmations: Option<i64>,
    pub creating_timeout: Option<String>,
    pub instance_dead_after: Option<String>,
    pub rapid_create_window: Option<String>,
    pub max_repairs_per_pass: Option<i64>,
    pub max_orphan_fraction: Option<f64>,
    pub guard_min_orphans: Option<i64>,
    #[serde(default)]
    pub policy: RawPolicy,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub orphaned: Option<String>,
    pub zombie: Option<String>,
    pub unpersisted: Option<String>,
    pub duplicate: Option<String>,
    pub stuck_creating: Option<String>,
    pub drift: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    pub id_pattern: Option<String>,
    pub table: Option<String>,
    pub columns: Option<sessions::RawColumns>,
    pub states: Option<sessions::RawStates>,
}

// ---------------------------------------------------------------------------
// Phase two: the validated config.

/// `repair` changes things; `observe` only finds and exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Repair,
    Observe,
}

impl Mode {
    /// As the config writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Repair => "repair",
            Mode::Observe => "observe",
        }
    }
}

/// What to do with a finding of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    Repair,
    Report,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// The file this config came from, for error messages and reloads.
    pub source: PathBuf,
    pub daemon: DaemonConfig,
    pub database: DatabaseConfig,
    pub controllers: Vec<ControllerConfig>,
    pub reconcile: ReconcileConfig,
    pub sessions: SessionsConfig,
    pub ha: HaConfig,
    pub audit: AuditConfig,
}

/// The audit trail: `[audit]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AuditConfig {
    /// Audit rows older than this are pruned (hourly, by the leader); `None`:
    /// kept forever.
    #[serde(with = "humantime_serde_compat::option")]
    pub retain: Option<Duration>,
}

/// Several replicas, one leader: `[ha]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HaConfig {
    /// Replicas elect one leader through a lease in PostgreSQL; only the
    /// leader runs passes.
    pub enabled: bool,
    /// A leader that has not renewed for this long is replaced.
    #[serde(with = "humantime_serde_compat")]
    pub lease: Duration,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig { enabled: false, lease: Duration::from_secs(30) }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DaemonConfig {
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    pub mode: Mode,
    pub listen: std::net::SocketAddr,
    /// TLS and basic auth for the HTTP endpoints, in the Prometheus
    /// exporter-toolkit web config format (see `web.rs`).
    pub web_config_file: Option<PathBuf>,
    /// The POST endpoints (pass, pause, resume, guard release) are served.
    pub admin: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DatabaseConfig {
    /// The URL with any password removed; the password lives in `password`.
    pub url: String,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    #[serde(with = "humantime_serde_compat")]
    pub statement_timeout: Duration,
    /// Where sessiond's own tables live (and the reference `sessions` table).
    pub schema: Ident,
    /// TLS to the database, with libpq's meanings (`sslmode` in the URL).
    pub sslmode: SslMode,
    /// The CA certificates that verify the server (`verify-ca`, `verify-full`,
    /// or `require`, which then verifies the chain); the system's otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Connections a pass reads the live rows with: 2 streams a large table's
    /// two halves at once, on one snapshot (the second connection is opened
    /// when a table first needs it, and kept); 1 reads it on one.
    pub read_connections: u32,
}

/// TLS to PostgreSQL, as libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, unverified; plain otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS, unverified (or verified against `ca_file` when one is given).
    Require,
    /// TLS, the server's certificate verified against the CA.
    VerifyCa,
    /// TLS, the certificate verified and issued for the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

impl DatabaseConfig {
    /// A config for `url` with every default: for tools and tests.
    pub fn for_url(url: &str) -> DatabaseConfig {
        DatabaseConfig {
            url: url.to_owned(),
            password: None,
            password_file: None,
            statement_timeout: Duration::from_secs(10),
            schema: Ident::parse("public").unwrap_or_else(|_| unreachable!("a valid identifier")),
            sslmode: SslMode::Prefer,
            ca_file: None,
            read_connections: 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ControllerConfig {
    pub name: String,
    /// The list URL with any userinfo removed, so it can be shown and logged.
    pub url: String,
    /// The stop URL template (`{session_id}`), userinfo removed likewise.
    pub stop_url: Option<String>,
    /// Basic-auth credentials given as the URL's userinfo (`http://user:pass@…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<BasicCredentials>,
    /// The CA certificates that verify an `https` controller; the system's
    /// trust store when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    pub max_body_bytes: u64,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReconcileConfig {
    #[serde(with = "humantime_serde_compat")]
    pub grace: Duration,
    pub confirmations: u32,
    #[serde(with = "humantime_serde_compat")]
    pub creating_timeout: Duration,
    #[serde(with = "humantime_serde_compat::option")]
    pub instance_dead_after: Option<Duration>,
    /// Sessions of one owner created within this of each other are rapid
    /// creates (the duplicate-sessions race); `None`: not measured.
    #[serde(with = "humantime_serde_compat::option")]
    pub rapid_create_window: Option<Duration>,
    pub max_repairs_per_pass: usize,
    pub max_orphan_fraction: f64,
    pub guard_min_orphans: usize,
    pub policy: PolicyConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyConfig {
    pub orphaned: Policy,
    pub zombie: Policy,
    pub unpersisted: Policy,
    pub duplicate: Policy,
    pub stuck_creating: Policy,
    pub drift: Policy,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            orphaned: Policy::Repair,
            zombie: Policy::Repair,
            unpersisted: Policy::Repair,
            duplicate: Policy::Repair,
            stuck_creating: Policy::Repair,
            drift: Policy::Repair,
        }
    }
}

/// The shortest time a plan may live, whatever `grace` says.
pub const MIN_PLAN_AGE: Duration = Duration::from_secs(10);

impl ReconcileConfig {
    /// How long after its snapshots a pass's plan may still be applied: `grace`,
    /// the window in which evidence counts as unsettled, but at least 10 s. A
    /// pass that stalls longer than this between reading and writing defers
    /// what is left of its plan to a fresh pass.
    pub fn plan_max_age(&self) -> Duration {
        self.grace.max(MIN_PLAN_AGE)
    }
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            grace: Duration::from_secs(30),
            confirmations: 2,
            creating_timeout: Duration::from_secs(120),
            instance_dead_after: None,
            rapid_create_window: Some(Duration::from_secs(10)),
            max_repairs_per_pass: 1000,
            max_orphan_fraction: 0.5,
            guard_min_orphans: 5,
            policy: PolicyConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionsConfig {
    #[serde(serialize_with = "serialize_regex")]
    pub id_pattern: Regex,
    /// The table that holds the sessions.
    pub table: TableName,
    /// The reference table `migrate` creates (`table` was not set).
    pub reference: bool,
    pub columns: Columns,
    pub states: Vocabulary,
}

impl SessionsConfig {
    /// The reference table in `schema`, with the default id pattern.
    pub fn reference(schema: &Ident) -> SessionsConfig {
        SessionsConfig {
            id_pattern: Regex::new(DEFAULT_ID_PATTERN).unwrap_or_else(|_| unreachable!("the default pattern compiles")),
            table: TableName {
                schema: Some(schema.clone()),
                name: Ident::parse("sessions").unwrap_or_else(|_| unreachable!("a valid identifier")),
            },
            reference: true,
            columns: Columns::reference(),
            states: Vocabulary::reference(),
        }
    }
}

impl PartialEq for SessionsConfig {
    fn eq(&self, other: &Self) -> bool {
        self.id_pattern.as_str() == other.id_pattern.as_str()
            && self.table == other.table
            && self.reference == other.reference
            && self.columns == other.columns
            && self.states == other.states
    }
}

fn serialize_regex<S: serde::Serializer>(re: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(re.as_str())
}

/// The default id pattern: the `exec_YYYYMMDD_HHMMSS_xxxxxxxx` ids of the incident
/// write-ups, or a canonical lowercase UUID.
pub const DEFAULT_ID_PATTERN: &str =
    r"^(exec_[0-9]{8}_[0-9]{6}_[0-9a-f]{8}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$";

/// Environment overrides, passed in rather than read here so loading stays testable.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `DATABASE_URL`, which replaces `database.url`.
    pub database_url: Option<String>,
}

impl Overrides {
    pub fn from_env() -> Overrides {
        Overrides { database_url: std::env::var("DATABASE_URL").ok().filter(|v| !v.is_empty()) }
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: None,
            problem: format!("cannot read the config file: {e}"),
        })?;
        Config::from_toml(path, &text, overrides)
    }

    /// Parses and validates `text`; `path` is used for messages and to resolve
    /// nothing else (secret files are read from their own absolute or relative paths).
    pub fn from_toml(path: &Path, text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: path.to_owned(),
            key: None,
            problem: format!("invalid TOML: {}", e.to_string().trim_end()),
        })?;
        validate(path, raw, overrides)
    }

    /// The effective config as TOML, with secrets redacted, for `check-config`.
    pub fn to_redacted_toml(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            daemon: &'a DaemonConfig,
            database: &'a DatabaseConfig,
            controller: &'a [ControllerConfig],
            reconcile: &'a ReconcileConfig,
            ha: &'a HaConfig,
            sessions: &'a SessionsConfig,
            audit: &'a AuditConfig,
        }
        let out = Out {
            daemon: &self.daemon,
            database: &self.database,
            controller: &self.controllers,
            reconcile: &self.reconcile,
            ha: &self.ha,
            sessions: &self.sessions,
            audit: &self.audit,
        };
        toml::to_string_pretty(&out).unwrap_or_else(|e| format!("# cannot render the config: {e}\n"))
    }
}

fn duration(file: &Path, key: &str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v).map_err(|e| {
            ConfigError::at(file, key, format!("{v:?} is not a duration ({e}); write it like \"15s\" or \"2m\""))
        }),
    }
}

fn policy(file: &Path, key: &str, value: Option<&str>) -> Result<Policy, ConfigError> {
    match value {
        None | Some("repair") => Ok(Policy::Repair),
        Some("report") => Ok(Policy::Report),
        Some(other) => {
            Err(ConfigError::at(file, key, format!("{other:?} is not a policy; use \"repair\" or \"report\"")))
        }
    }
}

fn read_secret(file: &Path, key: &str, secret_path: &Path) -> Result<Secret, ConfigError> {
    let resolved = resolve_credential(secret_path);
    let text = std::fs::read_to_string(&resolved).map_err(|e| {
        let hint = if secret_path.is_relative() && std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
            " (a relative path is looked up in $CREDENTIALS_DIRECTORY, which systemd sets for the service; \
             outside systemd, set CREDENTIALS_DIRECTORY=/etc/sessiond/credentials or give an absolute path)"
        } else {
            ""
        };
        ConfigError::at(file, key, format!("cannot read {}: {e}{hint}", resolved.display()))
    })?;
    let value = text.trim_end_matches(['\n', '\r']).to_owned();
    if value.is_empty() {
        return Err(ConfigError::at(file, key, format!("{} is empty", resolved.display())));
    }
    Ok(Secret(value))
}

/// A relative secret path is looked up in `$CREDENTIALS_DIRECTORY` when systemd
/// provides one, so a unit can say `token_file = "ctrl-token"` with `LoadCredential=`.
fn resolve_credential(path: &Path) -> PathBuf {
    if path.is_relative() {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let candidate = Path::new(&dir).join(path);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    path.to_owned()
}

fn http_url(file: &Path, key: &str, value: &str) -> Result<reqwest::Url, ConfigError> {
    let url =
        reqwest::Url::parse(value).map_err(|e| ConfigError::at(file, key, format!("{value:?} is not a URL: {e}")))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(ConfigError::at(file, key, format!("scheme {other:?} is not supported; use http or https"))),
    }
}

/// The TLS settings a PostgreSQL URL carries: `sslmode` (libpq's values) and
/// `sslrootcert` (used as `ca_file` when that is not set).
fn url_tls(file: &Path, key: &str, url: &str) -> Result<(SslMode, Option<PathBuf>), ConfigError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| ConfigError::at(file, key, e.to_string()))?;
    let mut mode = SslMode::default();
    let mut root = None;
    for (k, v) in parsed.query_pairs() {
        match k.as_ref() {
            "sslmode" => {
                mode = SslMode::parse(&v).ok_or_else(|| {
                    ConfigError::at(
                        file,
                        key,
                        format!("sslmode={v} is not known; use disable, prefer, require, verify-ca or verify-full"),
                    )
                })?
            }
            "sslrootcert" => root = Some(PathBuf::from(v.as_ref())),
            "sslcert" | "sslkey" => {
                return Err(ConfigError::at(file, key, format!("{k} (client certificates) is not supported")))
            }
            _ => {}
        }
    }
    Ok((mode, root))
}

/// Splits a password out of a PostgreSQL URL so the URL itself can be logged.
fn split_database_url(file: &Path, key: &str, value: &str) -> Result<(String, Option<Secret>), ConfigError> {
    let mut url = reqwest::Url::parse(value)
        .map_err(|_| ConfigError::at(file, key, "is not a URL; write it like postgres://user@host:5432/dbname"))?;
    if url.scheme() != "postgres" && url.scheme() != "postgresql" {
        return Err(ConfigError::at(file, key, format!("scheme {:?} is not supported; use postgres://", url.scheme())));
    }
    if url.path().trim_start_matches('/').is_empty() {
        return Err(ConfigError::at(file, key, "names no database; add /dbname to the URL"));
    }
    let password = url.password().map(|p| Secret(percent_decode(p)));
    if password.is_some() {
        // Setting an empty password cannot fail on a URL that has a host.
        let _ = url.set_password(None);
    }
    Ok((url.to_string(), password))
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits the userinfo (`user:password@`) out of a URL given as text, so the URL
/// can be shown and logged. Works on templates (`{session_id}`), which a URL
/// parser would rewrite.
fn split_userinfo(url: &str) -> (String, Option<String>) {
    let Some(scheme_end) = url.find("://") else { return (url.to_owned(), None) };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = rest[..at].to_owned();
            (format!("{}{}", &url[..scheme_end + 3], &rest[at + 1..]), Some(userinfo))
        }
        None => (url.to_owned(), None),
    }
}

/// Credentials for HTTP basic auth, from a controller URL's userinfo.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    pub user: Secret,
    pub password: Secret,
}

impl fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for BasicCredentials {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

fn basic_credentials(userinfo: &str) -> BasicCredentials {
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    BasicCredentials { user: Secret(percent_decode(user)), password: Secret(percent_decode(password)) }
}

/// Checks that a duration lies in `[min, max]`. The bounds keep every later use
/// representable: PostgreSQL holds its timeouts as milliseconds in an int, and
/// times are computed with chrono and `Instant`, which panic past their range.
fn within(file: &Path, key: &str, d: Duration, min: Duration, max: Duration) -> Result<Duration, ConfigError> {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    if d < min {
        return Err(ConfigError::at(file, key, format!("{} is too short; use at least {}", show(d), show(min))));
    }
    if d > max {
        return Err(ConfigError::at(file, key, format!("{} is too long; use at most {}", show(d), show(max))));
    }
    Ok(d)
}

/// A duration key: parsed, defaulted and bounded.
fn duration_in(
    file: &Path,
    key: &str,
    value: Option<&str>,
    default: Duration,
    (min, max): (Duration, Duration),
) -> Result<Duration, ConfigError> {
    within(file, key, duration(file, key, value, default)?, min, max)
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Bounds per duration key: (shortest, longest).
const INTERVAL_BOUNDS: (Duration, Duration) = (Duration::from_millis(100), DAY);
const STATEMENT_TIMEOUT_BOUNDS: (Duration, Duration) = (Duration::from_millis(100), HOUR);
const CONTROLLER_TIMEOUT_BOUNDS: (Duration, Duration) = (Duration::from_millis(100), HOUR);
const GRACE_BOUNDS: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(7 * 86_400));
const CREATING_TIMEOUT_BOUNDS: (Duration, Duration) = (SECOND, Duration::from_secs(30 * 86_400));
const DEAD_AFTER_BOUNDS: (Duration, Duration) = (MINUTE, Duration::from_secs(365 * 86_400));
const LEASE_BOUNDS: (Duration, Duration) = (SECOND, Duration::from_secs(600));
const RETAIN_BOUNDS: (Duration, Duration) = (DAY, Duration::from_secs(100 * 365 * 86_400));
const RAPID_WINDOW_BOUNDS: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3600));

/// Checks that `^` and `$` bind the whole pattern. `^exec_.*|.*$` starts with
/// `^` and ends with `$`, yet its second branch matches anything: a top-level
/// alternation escapes the anchors, so it is refused with the fix spelled out.
fn check_anchored(pattern: &str) -> Result<(), String> {
    use regex_syntax::ast::{AssertionKind, Ast};
    let ast = regex_syntax::ast::parse::Parser::new()
        .parse(pattern)
        .map_err(|e| format!("is not a valid regular expression: {e}"))?;
    let items: Vec<&Ast> = match &ast {
        Ast::Concat(c) => c.asts.iter().collect(),
        Ast::Alternation(_) => {
            return Err("has a top-level | that escapes the anchors (each branch is anchored on one side only); \
                        group the alternatives: ^(a|b)$"
                .into())
        }
        other => vec![other],
    };
    let starts = matches!(items.first(), Some(Ast::Assertion(a)) if matches!(a.kind, AssertionKind::StartLine | AssertionKind::StartText));
    let ends = matches!(items.last(), Some(Ast::Assertion(a)) if matches!(a.kind, AssertionKind::EndLine | AssertionKind::EndText));
    if !starts || !ends || items.len() < 2 {
        return Err(
            "must be anchored with ^ and $ around the whole pattern, or ids with anything around a match would pass"
                .into(),
        );
    }
    Ok(())
}

fn validate(file: &Path, raw: RawConfig, overrides: &Overrides) -> Result<Config, ConfigError> {
    let daemon = DaemonConfig {
        interval: duration_in(
            file,
            "daemon.interval",
            raw.daemon.interval.as_deref(),
            Duration::from_secs(15),
            INTERVAL_BOUNDS,
        )?,
        mode: match raw.daemon.mode.as_deref() {
            None | Some("repair") => Mode::Repair,
            Some("observe") => Mode::Observe,
            Some(other) => {
                return Err(ConfigError::at(
                    file,
                    "daemon.mode",
                    format!("{other:?} is not a mode; use \"repair\" or \"observe\""),
                ))
            }
        },
        listen: {
            let v = raw.daemon.listen.as_deref().unwrap_or("127.0.0.1:9817");
            v.parse().map_err(|_| {
                ConfigError::at(file, "daemon.listen", format!("{v:?} is not an address like 127.0.0.1:9817"))
            })?
        },
        web_config_file: match raw.daemon.web_config_file {
            Some(p) => {
                crate::web::WebConfig::load(&p)
                    .map_err(|e| ConfigError::at(file, "daemon.web_config_file", e.to_string()))?;
                Some(p)
            }
            None => None,
        },
        admin: raw.daemon.admin.unwrap_or(false),
    };
    if daemon.admin && !daemon.listen.ip().is_loopback() {
        let authenticated = match &daemon.web_config_file {
            Some(p) => crate::web::WebConfig::load(p).is_ok_and(|w| w.requires_auth()),
            None => false,
        };
        if !authenticated {
            return Err(ConfigError::at(
                file,
                "daemon.admin",
                format!(
                    "the admin endpoints would be open to anyone who reaches {}: configure basic auth in \
                     daemon.web_config_file, or listen on a loopback address",
                    daemon.listen
                ),
            ));
        }
    }

    let raw_db =
        raw.database.ok_or_else(|| ConfigError::at(file, "database", "is missing; add a [database] table with url"))?;
    let url_text = match (&overrides.database_url, &raw_db.url) {
        (Some(env), _) => env.clone(),
        (None, Some(url)) => url.clone(),
        (None, None) => return Err(ConfigError::at(file, "database.url", "is missing (and DATABASE_URL is not set)")),
    };
    let url_key = if overrides.database_url.is_some() { "DATABASE_URL" } else { "database.url" };
    let (url, url_password) = split_database_url(file, url_key, &url_text)?;
    // DATABASE_URL is a whole identity (e.g. the schema owner's, for
    // `migrate`): it brings its own password, if any, and password_file,
    // which belongs to database.url's role, is not read.
    let password = match (&raw_db.password_file, &overrides.database_url) {
        (Some(p), None) => Some(read_secret(file, "database.password_file", p)?),
        _ => url_password,
    };
    let (sslmode, url_ca) = url_tls(file, url_key, &url)?;
    let ca_file = raw_db.ca_file.map(|p| resolve_credential(&p)).or(url_ca);
    if let Some(p) = &ca_file {
        crate::tls::roots_from_file(p).map_err(|problem| ConfigError::at(file, "database.ca_file", problem))?;
    } else if matches!(sslmode, SslMode::VerifyCa | SslMode::VerifyFull) {
        crate::tls::system_roots().map_err(|problem| ConfigError::at(file, "database.ca_file", problem))?;
    }
    let schema = Ident::parse(raw_db.schema.as_deref().unwrap_or("public"))
        .map_err(|p| ConfigError::at(file, "database.schema", p))?;
    let database = DatabaseConfig {
        url,
        password,
        password_file: raw_db.password_file.filter(|_| overrides.database_url.is_none()),
        statement_timeout: duration_in(
            file,
            "database.statement_timeout",
            raw_db.statement_timeout.as_deref(),
            Duration::from_secs(10),
            STATEMENT_TIMEOUT_BOUNDS,
        )?,
        schema,
        sslmode,
        ca_file,
        read_connections: match raw_db.read_connections.unwrap_or(2) {
            n @ (1 | 2) => n,
            n => {
                return Err(ConfigError::at(
                    file,
                    "database.read_connections",
                    format!("is {n}; it must be 1 (one connection) or 2 (a large table's halves read at once)"),
                ))
            }
        },
    };

    if raw.controller.is_empty() {
        return Err(ConfigError::at(file, "controller", "no [[controller]] is configured; add at least one"));
    }
    let mut controllers: Vec<ControllerConfig> = Vec::with_capacity(raw.controller.len());
    for (i, c) in raw.controller.into_iter().enumerate() {
        let k = |field: &str| format!("controller[{i}].{field}");
        let name =
            c.name.filter(|n| !n.trim().is_empty()).ok_or_else(|| ConfigError::at(file, k("name"), "is missing"))?;
        if controllers.iter().any(|other| other.name == name) {
            return Err(ConfigError::at(file, k("name"), format!("{name:?} is used by two controllers")));
        }
        let (url, userinfo) = split_userinfo(&c.url.ok_or_else(|| ConfigError::at(file, k("url"), "is missing"))?);
        http_url(file, &k("url"), &url)?;
        let stop_url = match c.stop_url {
            None => None,
            Some(stop) => {
                let (stop, stop_userinfo) = split_userinfo(&stop);
                if stop_userinfo.is_some() && stop_userinfo != userinfo {
                    return Err(ConfigError::at(
                        file,
                        k("stop_url"),
                        "has credentials that differ from url's; put them in url only, they are used for both",
                    ));
                }
                if !stop.contains("{session_id}") {
                    return Err(ConfigError::at(file, k("stop_url"), "must contain {session_id}"));
                }
                http_url(file, &k("stop_url"), &stop.replace("{session_id}", "x"))?;
                Some(stop)
            }
        };
        let timeout =
            duration_in(file, &k("timeout"), c.timeout.as_deref(), Duration::from_secs(5), CONTROLLER_TIMEOUT_BOUNDS)?;
        let max_body_bytes = c.max_body_bytes.unwrap_or(64 * 1024 * 1024);
        if max_body_bytes == 0 {
            return Err(ConfigError::at(file, k("max_body_bytes"), "must be greater than zero"));
        }
        let token = match &c.token_file {
            Some(p) => Some(read_secret(file, &k("token_file"), p)?),
            None => None,
        };
        if token.is_some() && userinfo.is_some() {
            return Err(ConfigError::at(
                file,
                k("url"),
                "has credentials in the URL and a token_file; use one way to authenticate",
            ));
        }
        let https = url.starts_with("https:") || stop_url.as_deref().is_some_and(|u| u.starts_with("https:"));
        let ca_file = c.ca_file.map(|p| resolve_credential(&p));
        match &ca_file {
            Some(p) => {
                crate::tls::roots_from_file(p).map_err(|problem| ConfigError::at(file, k("ca_file"), problem))?;
            }
            None if https => {
                crate::tls::system_roots().map_err(|problem| ConfigError::at(file, k("url"), problem))?;
            }
            None => {}
        }
        controllers.push(ControllerConfig {
            name,
            url,
            stop_url,
            credentials: userinfo.as_deref().map(basic_credentials),
            ca_file,
            timeout,
            max_body_bytes,
            token,
            token_file: c.token_file,
        });
    }

    let r = raw.reconcile;
    let defaults = ReconcileConfig::default();
    let instance_dead_after = match r.instance_dead_after.as_deref() {
        None | Some("off") => None,
        Some(v) => {
            Some(duration_in(file, "reconcile.instance_dead_after", Some(v), Duration::ZERO, DEAD_AFTER_BOUNDS)?)
        }
    };
    let rapid_create_window = match r.rapid_create_window.as_deref() {
        Some("off") => None,
        None => defaults.rapid_create_window,
        Some(v) => {
            Some(duration_in(file, "reconcile.rapid_create_window", Some(v), Duration::ZERO, RAPID_WINDOW_BOUNDS)?)
        }
    };
    let confirmations = match r.confirmations {
        None => defaults.confirmations,
        Some(n) if (1..=100).contains(&n) => n as u32,
        Some(n) => {
            return Err(ConfigError::at(file, "reconcile.confirmations", format!("{n} is out of range; use 1 to 100")))
        }
    };
    let max_repairs_per_pass = match r.max_repairs_per_pass {
        None => defaults.max_repairs_per_pass,
        Some(n) if n >= 1 => n as usize,
        Some(n) => {
            return Err(ConfigError::at(file, "reconcile.max_repairs_per_pass", format!("{n} must be at least 1")))
        }
    };
    let max_orphan_fraction = match r.max_orphan_fraction {
        None => defaults.max_orphan_fraction,
        Some(f) if f > 0.0 && f <= 1.0 => f,
        Some(f) => {
            return Err(ConfigError::at(
                file,
                "reconcile.max_orphan_fraction",
                format!("{f} is out of range; use a fraction greater than 0 and at most 1"),
            ))
        }
    };
    let guard_min_orphans = match r.guard_min_orphans {
        None => defaults.guard_min_orphans,
        Some(n) if n >= 0 => n as usize,
        Some(n) => {
            return Err(ConfigError::at(file, "reconcile.guard_min_orphans", format!("{n} must not be negative")))
        }
    };
    let p = r.policy;
    let reconcile = ReconcileConfig {
        grace: duration_in(file, "reconcile.grace", r.grace.as_deref(), defaults.grace, GRACE_BOUNDS)?,
        confirmations,
        creating_timeout: duration_in(
            file,
            "reconcile.creating_timeout",
            r.creating_timeout.as_deref(),
            defaults.creating_timeout,
            CREATING_TIMEOUT_BOUNDS,
        )?,
        instance_dead_after,
        rapid_create_window,
        max_repairs_per_pass,
        max_orphan_fraction,
        guard_min_orphans,
        policy: PolicyConfig {
            orphaned: policy(file, "reconcile.policy.orphaned", p.orphaned.as_deref())?,
            zombie: policy(file, "reconcile.policy.zombie", p.zombie.as_deref())?,
            unpersisted: policy(file, "reconcile.policy.unpersisted", p.unpersisted.as_deref())?,
            duplicate: policy(file, "reconcile.policy.duplicate", p.duplicate.as_deref())?,
            stuck_creating: policy(file, "reconcile.policy.stuck_creating", p.stuck_creating.as_deref())?,
            drift: policy(file, "reconcile.policy.drift", p.drift.as_deref())?,
        },
    };

    let pattern_text = raw.sessions.id_pattern.unwrap_or_else(|| DEFAULT_ID_PATTERN.to_owned());
    check_anchored(&pattern_text).map_err(|problem| ConfigError::at(file, "sessions.id_pattern", problem))?;
    let id_pattern = Regex::new(&pattern_text)
        .map_err(|e| ConfigError::at(file, "sessions.id_pattern", format!("is not a valid regular expression: {e}")))?;
    let at = |(key, problem): (String, String)| ConfigError::at(file, key, problem);
    let sessions = match raw.sessions.table {
        None => {
            if raw.sessions.columns.is_some() || raw.sessions.states.is_some() {
                return Err(ConfigError::at(
                    file,
                    "sessions.table",
                    "is not set, so sessiond uses its reference table, whose columns and states are fixed; set \
                     table to map [sessions.columns] and [sessions.states] onto your own",
                ));
            }
            SessionsConfig { id_pattern, ..SessionsConfig::reference(&database.schema) }
        }
        Some(table) => SessionsConfig {
            id_pattern,
            table: TableName::parse(&table).map_err(|p| ConfigError::at(file, "sessions.table", p))?,
            reference: false,
            columns: sessions::columns(raw.sessions.columns.unwrap_or_default()).map_err(at)?,
            states: sessions::states(raw.sessions.states.unwrap_or_default()).map_err(at)?,
        },
    };
    refuse_impossible_repairs(file, &sessions, &reconcile.policy)?;
    let ha = HaConfig {
        enabled: raw.ha.enabled.unwrap_or(false),
        lease: duration_in(file, "ha.lease", raw.ha.lease.as_deref(), HaConfig::default().lease, LEASE_BOUNDS)?,
    };

    let audit = AuditConfig {
        retain: match raw.audit.retain.as_deref() {
            None | Some("off") => None,
            Some(v) => Some(duration_in(file, "audit.retain", Some(v), DAY, RETAIN_BOUNDS)?),
        },
    };
    Ok(Config { source: file.to_owned(), daemon, database, controllers, reconcile, sessions, ha, audit })
}

/// Each kind of repair writes some canonical state; one whose state has no
/// value in the table cannot work, and is refused now, naming the kind and the
/// state, rather than failing at every pass. A kind reported only needs nothing.
fn refuse_impossible_repairs(file: &Path, s: &SessionsConfig, p: &PolicyConfig) -> Result<(), ConfigError> {
    let needs: [(&str, Policy, RowState, &str); 4] = [
        ("orphaned", p.orphaned, RowState::Stopped, "ending an orphan's row writes"),
        ("duplicate", p.duplicate, RowState::Stopped, "ending a duplicate's row writes"),
        ("unpersisted", p.unpersisted, RowState::Active, "inserting a live session's row writes"),
        ("drift", p.drift, RowState::Active, "a row following its controller writes"),
    ];
    let stuck = ("stuck_creating", p.stuck_creating, RowState::Failed, "failing a stuck row writes");
    let creating_exists = !s.states.values(RowState::Creating).is_empty();
    for (kind, policy, state, why) in needs.into_iter().chain(creating_exists.then_some(stuck)) {
        if policy == Policy::Repair && s.states.written(state).is_none() {
            return Err(ConfigError::at(
                file,
                format!("reconcile.policy.{kind}"),
                format!(
                    "{why} state {st}, and sessions.states.{st} has no value: add the table's value for it, or set \
                     reconcile.policy.{kind} = \"report\"",
                    st = state.as_str()
                ),
            ));
        }
    }
    Ok(())
}

/// Serializes durations the way they are written in the file ("15s").
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub mod option {
        use std::time::Duration;

        pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
                None => s.serialize_str("off"),
            }
        }
    }
}
