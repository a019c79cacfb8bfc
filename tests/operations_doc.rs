//! `docs/operations.md`'s install steps, run as written, in order, in one
//! shell, in a scratch root: everything but `systemctl`, whose one job here
//! (starting the service) the test does the way the unit would. The only
//! changes to the text are where it names things of a real deployment: the
//! root of the file system, the database and its host, the controller's
//! host, the role's name (unique per test), and the listen port.

mod common;

use std::path::Path;
use std::process::Command;

use common::{free_port, tool, Role, TestDb};
use sessiond::simctl::SimController;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The shell blocks of the "## Install" section, their list indent removed.
fn install_blocks() -> Vec<String> {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/operations.md")).expect("read docs/operations.md");
    let start = doc.find("\n## Install\n").expect("an Install section");
    let rest = &doc[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    let section = &rest[..end];
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in section.lines() {
        let trimmed = line.trim_start();
        match (&mut current, trimmed) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(lines), "```") => {
                blocks.push(lines.join("\n"));
                current = None;
            }
            (Some(lines), _) => lines.push(line.strip_prefix("   ").unwrap_or(line).to_owned()),
            (None, _) => {}
        }
    }
    blocks
}

#[tokio::test]
async fn the_install_steps_work_as_written_in_a_scratch_root() {
    let blocks = install_blocks();
    assert_eq!(blocks.len(), 6, "one shell block per install step: {blocks:#?}");

    let role = Role { name: format!("sessiond_ops_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]) };
    let db = TestDb::empty().await;
    let ctrl = SimController::start("ctrl-a").await.expect("controller");
    let scratch = tempfile::tempdir().expect("scratch root");
    let root = scratch.path().display().to_string();
    let port = free_port();
    let psql_dir = tool("psql", "postgresql-client").parent().expect("psql's directory").display().to_string();
    let tmpfiles = tool("systemd-tmpfiles", "systemd").display().to_string();

    let mut script = String::from("set -euo pipefail\n");
    for block in &blocks {
        for line in block.lines() {
            if line.starts_with("systemctl enable --now sessiond") {
                // What the unit does: run the daemon with the credentials.
                script.push_str(&format!(
                    "sessiond run --config /etc/sessiond/sessiond.toml >{root}/daemon.log 2>&1 & echo $! > {root}/daemon.pid\n\
                     for i in $(seq 120); do curl -sf http://127.0.0.1:9817/readyz >/dev/null && break; sleep 0.5; done\n"
                ));
                continue;
            }
            if line.starts_with("systemctl ") || line.starts_with("cargo build ") {
                continue; // systemd's part; the binary is built already
            }
            script.push_str(line);
            script.push('\n');
        }
    }
    let script = script
        .replace("target/release/sessiond", env!("CARGO_BIN_EXE_sessiond"))
        .replace("systemd-tmpfiles --create ", &format!("{tmpfiles} --root={root} --create "))
        .replace(" /etc/", &format!(" {root}/etc/"))
        .replace("=/etc/", &format!("={root}/etc/"))
        .replace(" /usr/", &format!(" {root}/usr/"))
        .replace("postgres://sessiond@db.internal:5432/app", &role.url(&db.url))
        .replace("postgres://app_owner@db.internal/app", &db.url)
        .replace("role=sessiond ", &format!("role={} ", role.name))
        .replace("ALTER ROLE sessiond ", &format!("ALTER ROLE {} ", role.name))
        .replace("ctrl-a.internal:8080", &ctrl.addr().to_string())
        .replace("127.0.0.1:9817", &format!("127.0.0.1:{port}"));
    for dir in ["etc/systemd/system", "usr/lib/tmpfiles.d", "usr/local/bin"] {
        std::fs::create_dir_all(scratch.path().join(dir)).expect("the scratch root's directories");
    }

    let path = format!("{root}/usr/local/bin:{psql_dir}:{}", std::env::var("PATH").unwrap_or_default());
    let script_for_shell = script.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash").arg("-c").arg(&script_for_shell).current_dir(ROOT).env("PATH", path).output()
    })
    .await
    .expect("join")
    .expect("run bash");
    if let Ok(pid) = std::fs::read_to_string(scratch.path().join("daemon.pid")) {
        common::signal(pid.trim().parse().unwrap_or(0), "TERM");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the install steps failed:\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );

    // Each step did what it says.
    let installed = scratch.path().join("usr/local/bin/sessiond");
    assert!(installed.exists(), "step 1 installed the binary");
    assert!(scratch.path().join("etc/systemd/system/sessiond.service").exists(), "step 2 installed the unit");
    let creds = scratch.path().join("etc/sessiond/credentials");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&creds).expect("credentials dir").permissions());
    assert_eq!(mode & 0o777, 0o700, "step 2's tmpfiles entry made the credentials directory root-only");
    let password = std::fs::read_to_string(creds.join("db-password")).expect("step 3 stored the password");
    assert_eq!(password.trim_end(), "the password");
    assert!(stdout.contains("<redacted>"), "step 4's check-config printed the config, secrets redacted:\n{stdout}");
    assert!(!stdout.contains("the password"), "no secret is printed:\n{stdout}");
    let client = db.client().await;
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('sessions', 'session_audit')",
            &[],
        )
        .await
        .expect("count tables")
        .get(0);
    assert_eq!(tables, 2, "step 5's migrate made the schema");
    let can_update: bool = client
        .query_one("SELECT has_table_privilege($1, 'sessions', 'UPDATE')", &[&role.name])
        .await
        .expect("privilege")
        .get(0);
    assert!(can_update, "step 5's role script granted what the daemon needs");
    assert!(stdout.trim_end().ends_with("ready"), "step 6's readyz answered ready:\n{stdout}");
}
