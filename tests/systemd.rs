//! The systemd integration, against a real notify socket (a Unix datagram socket
//! set as `NOTIFY_SOCKET`), and the shipped unit checked by `systemd-analyze`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ago, sid, tool, Guarded, TestDb};
use sessiond::simctl::{Fault, SimController};

/// Datagrams received on a notify socket, with when they arrived.
struct NotifySocket {
    path: std::path::PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => sink
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned())),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        if Arc::strong_count(&sink) == 1 {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        NotifySocket { path, got, _dir: dir }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for a datagram after `since` containing every one of `parts`.
    async fn wait_for(&self, since: Instant, parts: &[&str]) -> Instant {
        for _ in 0..200 {
            if let Some((at, _)) =
                self.all().into_iter().find(|(at, m)| *at >= since && parts.iter().all(|p| m.contains(p)))
            {
                return at;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no notification with {parts:?}; got {:?}", self.all().iter().map(|(_, m)| m).collect::<Vec<_>>());
    }

    fn watchdog_pings(&self, from: Instant, to: Instant) -> Vec<Instant> {
        self.all()
            .into_iter()
            .filter(|(at, m)| *at >= from && *at <= to && m.contains("WATCHDOG=1"))
            .map(|(at, _)| at)
            .collect()
    }
}

fn spawn(config: &Path, notify: &NotifySocket, watchdog_usec: u64) -> Guarded {
    Guarded(Some(
        Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .args(["run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", watchdog_usec.to_string())
            // Warnings, and the start-up line that says where it listens.
            .env("SESSIOND_LOG", "warn,sessiond::cli=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(config.with_extension("log")).expect("a log file"))
            .spawn()
            .expect("spawn sessiond run"),
    ))
}

fn daemon_config(db: &TestDb, a: &SimController) -> String {
    common::TestConfig::new(db)
        .controllers(&[a])
        .reconcile_toml("grace = \"0s\"\nconfirmations = 1")
        .daemon("interval", "300ms")
        .daemon("listen", "127.0.0.1:0")
        .controller("timeout", "3s")
        .toml()
}

#[tokio::test]
async fn the_daemon_speaks_the_notify_protocol_through_its_whole_life() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sessiond.toml");
    let good = daemon_config(&db, &a);
    std::fs::write(&path, &good).expect("write config");
    let notify = NotifySocket::bind();
    let t0 = Instant::now();
    let child = spawn(&path, &notify, 1_000_000);

    // READY, then a STATUS line per pass, and the watchdog fed at half its interval.
    notify.wait_for(t0, &["READY=1"]).await;
    notify.wait_for(t0, &["STATUS=last pass ok", "1/1 controllers up"]).await;
    let t1 = Instant::now();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let pings = notify.watchdog_pings(t1, Instant::now()).len();
    assert!((3..=6).contains(&pings), "about one WATCHDOG=1 per 500 ms, got {pings} in 2.1 s");

    // A valid reload: RELOADING=1 with the monotonic time, then READY=1.
    std::fs::write(&path, good.replace("interval = \"300ms\"", "interval = \"400ms\"")).expect("rewrite");
    let t2 = Instant::now();
    common::signal(child.child().id(), "HUP");
    let reloading = notify.wait_for(t2, &["RELOADING=1", "MONOTONIC_USEC="]).await;
    notify.wait_for(reloading, &["READY=1"]).await;

    // An invalid reload: rejected, READY again, the old config keeps running.
    std::fs::write(&path, "[daemon\nbroken").expect("break the config");
    let t3 = Instant::now();
    common::signal(child.child().id(), "HUP");
    let reloading = notify.wait_for(t3, &["RELOADING=1"]).await;
    notify.wait_for(reloading, &["READY=1"]).await;
    notify.wait_for(reloading, &["STATUS=config reload rejected"]).await;
    let t4 = Instant::now();
    notify.wait_for(t4, &["STATUS=last pass ok"]).await;

    // A pass that hangs (the controller never answers, within its 3 s timeout)
    // stops the pings; when it ends, they resume.
    a.set_fault(Fault::Hang);
    let t5 = Instant::now();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let pings: Vec<Instant> = notify.watchdog_pings(t5, Instant::now());
    let mut longest_gap = Duration::ZERO;
    let mut prev = t5;
    for p in pings.iter().copied().chain(std::iter::once(Instant::now())) {
        longest_gap = longest_gap.max(p.duration_since(prev));
        prev = p;
    }
    assert!(
        longest_gap >= Duration::from_millis(1400),
        "a wedged pass must starve the watchdog; longest gap {longest_gap:?}"
    );
    a.set_fault(Fault::None);
    let t6 = Instant::now();
    notify.wait_for(t6, &["WATCHDOG=1"]).await;

    // SIGTERM: STOPPING=1 at once, then a clean exit.
    let t7 = Instant::now();
    common::signal(child.child().id(), "TERM");
    notify.wait_for(t7, &["STOPPING=1"]).await;
    let out = common::wait_exit(child.take(), Duration::from_secs(10)).await;
    assert_eq!(out.status.code(), Some(0), "exit 0 after SIGTERM");
}

#[tokio::test]
async fn the_daemon_is_ready_without_its_database_and_says_it_is_not() {
    let a = SimController::start("ctrl-a").await.expect("controller");
    let text = format!(
        "[daemon]\ninterval = \"300ms\"\nlisten = \"127.0.0.1:0\"\n\n\
         [database]\nurl = \"postgres://postgres@127.0.0.1:9/nowhere\"\nstatement_timeout = \"1s\"\n\n\
         [[controller]]\nname = \"ctrl-a\"\nurl = \"{}\"\n",
        a.url()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sessiond.toml");
    std::fs::write(&path, text).expect("write config");
    let notify = NotifySocket::bind();
    let t0 = Instant::now();
    let child = spawn(&path, &notify, 0);
    notify.wait_for(t0, &["READY=1"]).await;
    notify.wait_for(t0, &["STATUS=last pass failed", "database DOWN"]).await;
    let port = common::listen_port_from_log(&path.with_extension("log")).await;
    let resp = common::http().get(format!("http://127.0.0.1:{port}/readyz")).send().await.expect("readyz");
    assert_eq!(resp.status().as_u16(), 503);
    assert!(notify.all().iter().all(|(_, m)| !m.contains("WATCHDOG=1")), "WATCHDOG_USEC=0 means no watchdog");
    drop(child);
}

/// A root for `systemd-analyze verify --root`: the host's own units, the built
/// binary where the unit expects it, and the shipped unit file unchanged.
fn unit_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    for d in ["usr/local/bin", "etc/systemd/system", "usr/lib/systemd", "bin"] {
        std::fs::create_dir_all(r.join(d)).expect("mkdir");
    }
    let ok = Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .expect("cp");
    assert!(ok.success());
    std::fs::copy(env!("CARGO_BIN_EXE_sessiond"), r.join("usr/local/bin/sessiond")).expect("install the binary");
    std::fs::copy("/bin/kill", r.join("bin/kill")).expect("install kill");
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/sessiond.service");
    std::fs::copy(unit, r.join("etc/systemd/system/sessiond.service")).expect("install the unit");
    root
}

#[test]
fn the_unit_passes_systemd_analyze_verify_with_no_output() {
    let root = unit_root();
    let unit = root.path().join("etc/systemd/system/sessiond.service");
    let out = Command::new(tool("systemd-analyze", "systemd"))
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg(&unit)
        .output()
        .expect("run systemd-analyze verify");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
}

#[test]
fn the_unit_is_hardened_to_an_exposure_of_1_5_or_lower() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/sessiond.service");
    let out = Command::new(tool("systemd-analyze", "systemd"))
        .args(["security", "--offline=true", "--threshold=15", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let level = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for sessiond.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(out.status.success(), "--threshold=15 failed (exposure {level})");
    assert!(level <= 1.5, "exposure {level}");
}

#[test]
fn the_tmpfiles_entry_creates_a_root_only_credentials_directory() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().expect("tempdir");
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/sessiond.tmpfiles");
    let out = Command::new(tool("systemd-tmpfiles", "systemd"))
        .arg("--create")
        .arg(format!("--root={}", root.path().display()))
        .arg(&conf)
        .output()
        .expect("run systemd-tmpfiles");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta = std::fs::metadata(root.path().join("etc/sessiond/credentials")).expect("the directory exists");
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
}

#[tokio::test]
async fn a_long_batch_of_slow_stops_keeps_feeding_the_watchdog() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    // 40 zombies whose stops take half a second each: five waves of eight, a
    // batch of 2.5 s against a watchdog of 1 s.
    for i in 0..40 {
        db.insert(&sid(i), &format!("u{i}"), "ctrl-a", "stopped", ago(600)).await;
        a.add(&sid(i), &format!("u{i}"), "running", Some(ago(700)));
    }
    a.set_stop_delay(Duration::from_millis(500));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sessiond.toml");
    std::fs::write(&path, daemon_config(&db, &a)).expect("write config");
    let notify = NotifySocket::bind();
    let t0 = Instant::now();
    let child = spawn(&path, &notify, 1_000_000);
    notify.wait_for(t0, &["READY=1"]).await;
    for _ in 0..100 {
        if !a.stops().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let from = Instant::now();
    for _ in 0..100 {
        if a.stops().len() >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let to = Instant::now();
    assert_eq!(a.stops().len(), 40, "every stop was sent");
    assert!(to - from >= Duration::from_secs(1), "the stops took a while: {:?}", to - from);
    let mut longest_gap = Duration::ZERO;
    let mut prev = from;
    for p in notify.watchdog_pings(from, to).into_iter().chain(std::iter::once(to)) {
        longest_gap = longest_gap.max(p.duration_since(prev));
        prev = p;
    }
    assert!(longest_gap < Duration::from_millis(1200), "the watchdog went unfed for {longest_gap:?}");
    drop(child);
}
