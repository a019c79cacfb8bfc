//! TLS to PostgreSQL, against a private server started with `ssl = on` and a
//! certificate made by the test: libpq's `sslmode` meanings, a CA file, and
//! messages that say what is wrong.

mod common;

use common::TestCa;
use sessiond::config::{DatabaseConfig, SslMode};
use sessiond::store::Store;

/// A private PostgreSQL serving TLS with a certificate for `localhost` only.
struct TlsServer {
    cluster: sessiond::pgcluster::PrivateCluster,
    ca: TestCa,
    _dir: tempfile::TempDir,
}

async fn server() -> TlsServer {
    let ca = TestCa::new("sessiond test database CA");
    let (cert, key) = ca.issue("db", "DNS:localhost");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let mut cluster = sessiond::pgcluster::PrivateCluster::new(&dir.path().join("pg"), port)
        .expect("PostgreSQL's server binaries")
        .with_tls(&cert, &key)
        .expect("install the certificate");
    cluster.stop_on_drop = true;
    let cluster = tokio::task::spawn_blocking(move || cluster.start().map(|()| cluster))
        .await
        .expect("join")
        .expect("start a private PostgreSQL with TLS");
    TlsServer { cluster, ca, _dir: dir }
}

impl TlsServer {
    fn config(&self, host: &str, sslmode: SslMode, ca_file: Option<&std::path::Path>) -> DatabaseConfig {
        let url = self.cluster.url("postgres").replace("127.0.0.1", host);
        DatabaseConfig { sslmode, ca_file: ca_file.map(Into::into), ..DatabaseConfig::for_url(&url) }
    }
}

async fn connect(cfg: &DatabaseConfig) -> Result<Option<String>, String> {
    let store = Store::connect(cfg).await.map_err(|e| e.to_string())?;
    store.tls().await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn sslmodes_connect_verify_and_refuse_as_libpq_does() {
    let s = server().await;
    let ca = s.ca.cert.clone();
    let other = TestCa::new("someone else's CA");

    // verify-full: the right CA and the name on the certificate.
    let tls = connect(&s.config("localhost", SslMode::VerifyFull, Some(&ca))).await.expect("verify-full connects");
    assert!(tls.is_some_and(|v| v.starts_with("TLS")), "the connection is encrypted");

    // A CA that did not sign the server's certificate.
    let err = connect(&s.config("localhost", SslMode::VerifyFull, Some(&other.cert))).await.expect_err("refused");
    assert!(err.contains("does not verify"), "{err}");

    // The right CA, but not the host the certificate names.
    let err = connect(&s.config("127.0.0.1", SslMode::VerifyFull, Some(&ca))).await.expect_err("refused");
    assert!(err.contains("not valid for this host name"), "{err}");
    // verify-ca checks the chain only: the same connection is fine.
    assert!(connect(&s.config("127.0.0.1", SslMode::VerifyCa, Some(&ca))).await.expect("verify-ca").is_some());
    // ... and refuses the wrong CA.
    assert!(connect(&s.config("127.0.0.1", SslMode::VerifyCa, Some(&other.cert))).await.is_err());

    // require encrypts without verifying; prefer encrypts when offered.
    assert!(connect(&s.config("127.0.0.1", SslMode::Require, None)).await.expect("require").is_some());
    assert!(connect(&s.config("127.0.0.1", SslMode::Prefer, None)).await.expect("prefer").is_some());
    // disable still works, in clear.
    assert_eq!(connect(&s.config("127.0.0.1", SslMode::Disable, None)).await.expect("disable"), None);
}

#[tokio::test]
async fn sslmode_in_the_url_and_ca_file_reach_the_connection_through_the_config() {
    let s = server().await;
    let a = sessiond::simctl::SimController::start("ctrl-a").await.expect("controller");
    let url = s.cluster.url("postgres").replace("127.0.0.1", "localhost");
    let text = format!(
        "[database]\nurl = \"{url}?sslmode=verify-full\"\nca_file = \"{}\"\n\n{}",
        s.ca.cert.display(),
        a.controller_toml("2s")
    );
    let cfg = sessiond::config::Config::from_toml(std::path::Path::new("t.toml"), &text, &Default::default())
        .expect("a valid config");
    assert_eq!(cfg.database.sslmode, SslMode::VerifyFull);
    assert!(connect(&cfg.database).await.expect("connects").is_some());
    let bad = text.replace("verify-full", "verify-fully");
    let err = sessiond::config::Config::from_toml(std::path::Path::new("t.toml"), &bad, &Default::default())
        .expect_err("an unknown sslmode");
    assert!(err.to_string().contains("sslmode=verify-fully is not known"), "{err}");
}
