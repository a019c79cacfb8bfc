//! TLS and basic auth for the endpoints, configured in the Prometheus
//! exporter-toolkit web config format (validated by `promtool check web-config`),
//! exercised with curl against a running `sessiond run`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{config_text, tool, Daemon, TestDb, IMMEDIATE};
use sessiond::simctl::SimController;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

/// (HTTP status, body) of a curl request; status 0 if the connection failed.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new(tool("curl", "curl"))
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ok = Command::new(tool("openssl", "openssl"))
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    (cert, key)
}

#[tokio::test]
async fn tls_and_basic_auth_protect_metrics_and_status_but_not_the_probes() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path());
    let hash = bcrypt::hash("scrape-secret", 4).expect("bcrypt");
    let web = write(
        dir.path(),
        "web.yml",
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  prometheus: '{hash}'\n",
            cert.display(),
            key.display()
        ),
    );
    let check = Command::new(tool("promtool", "prometheus"))
        .args(["check", "web-config"])
        .arg(&web)
        .output()
        .expect("promtool");
    assert!(check.status.success(), "promtool rejects our example: {}", String::from_utf8_lossy(&check.stderr));

    let d =
        Daemon::start_with(&config_text(&db, &[&a], IMMEDIATE), &format!("web_config_file = \"{}\"", web.display()))
            .await;
    let base = format!("https://127.0.0.1:{}", d.port);
    let ca = cert.to_str().expect("utf-8").to_owned();
    let mut up = false;
    for _ in 0..100 {
        if curl(&["--cacert", &ca, &format!("{base}/healthz")]).0 == 200 {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(up, "the daemon answers /healthz over TLS without credentials");
    let metrics = format!("{base}/metrics");
    assert_eq!(curl(&["--cacert", &ca, &metrics]).0, 401, "no credentials");
    assert_eq!(curl(&["--cacert", &ca, "-u", "prometheus:wrong", &metrics]).0, 401, "wrong password");
    assert_eq!(curl(&["--cacert", &ca, "-u", "mallory:scrape-secret", &metrics]).0, 401, "unknown user");
    for _ in 0..2 {
        // Twice: the second answer comes from the verified-credentials cache.
        let (code, body) = curl(&["--cacert", &ca, "-u", "prometheus:scrape-secret", &metrics]);
        assert_eq!(code, 200);
        assert!(body.contains("sessiond_build_info"), "{body}");
    }
    assert_eq!(curl(&["--cacert", &ca, &format!("{base}/status")]).0, 401);
    let ready = curl(&["--cacert", &ca, &format!("{base}/readyz")]).0;
    assert!(ready == 200 || ready == 503, "the readiness probe needs no credentials: {ready}");
    assert_eq!(curl(&[&format!("http://127.0.0.1:{}/metrics", d.port)]).0, 0, "no plain HTTP on a TLS port");
}

#[test]
fn a_bad_web_config_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("plain.yml", "basic_auth_users:\n  prometheus: hunter2\n", "bcrypt hash"),
        ("unknown.yml", "tls_server_config:\n  cert_file: a\n  key_file: b\n  colour: blue\n", "unknown field"),
        (
            "missing.yml",
            "tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n",
            "/nonexistent.crt",
        ),
        (
            "ciphers.yml",
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
            "not supported",
        ),
    ];
    for (name, body, needle) in cases {
        let web = write(dir.path(), name, body);
        let cfg = write(
            dir.path(),
            "s.toml",
            &format!(
                "[daemon]\nweb_config_file = \"{}\"\n\n[database]\nurl = \"postgres://a@h/db\"\n\n\
                 [[controller]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/\"\n",
                web.display()
            ),
        );
        let out = Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .args(["check-config", "--config"])
            .arg(&cfg)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{name}: {err}");
        assert!(err.contains("daemon.web_config_file") && err.contains(needle), "{name}: {err}");
    }
}
