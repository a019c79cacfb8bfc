//! `sessiond demo` as a newcomer runs it: it starts its own PostgreSQL, injects
//! the incidents' faults, and every fault the simulator injected is repaired,
//! and nothing it did not inject is — the simulator knows the truth.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn demo_dirs() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("sessiond-demo-")).count()
        })
        .unwrap_or(0)
}

#[test]
fn a_short_demo_repairs_every_injected_fault_and_nothing_else_and_leaves_nothing_behind() {
    let before = demo_dirs();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        // --unhealthy-app: users churn fast enough for every kind of fault to
        // be injected within the 15 s this run injects for.
        .args([
            "demo",
            "--duration",
            "30s",
            "--seed",
            "5",
            "--fault-rate",
            "0.3",
            "--sessions",
            "60",
            "--unhealthy-app",
        ])
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sessiond demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = Vec::new();
    let mut scraped = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("a line of output");
        if scraped.is_none() && line.trim_start().starts_with("metrics") {
            let url = line.split_whitespace().nth(1).expect("the metrics URL").to_owned();
            scraped = Some(url);
        }
        if line.contains("] pass ") && lines.iter().all(|l: &String| !l.contains("] pass ")) {
            // The daemon is running: its endpoints answer.
            let url = scraped.clone().expect("the metrics URL was printed first");
            let body = reqwest::blocking_get(&url);
            assert!(body.contains("sessiond_build_info"), "{body}");
        }
        lines.push(line);
    }
    let out = child.wait_with_output().expect("wait for the demo");
    let text = lines.join("\n");
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&out.stderr));

    let verdict = lines.iter().find(|l| l.starts_with("demo verdict:")).expect("a verdict line");
    assert!(verdict.contains("verdict: OK"), "{verdict}");
    assert!(verdict.contains("outstanding=0") && verdict.contains("wrong=0"), "{verdict}");
    for kind in ["orphaned=", "zombie=", "unpersisted=", "stuck_creating="] {
        assert!(verdict.contains(kind), "no {kind} fault was injected: {verdict}");
    }
    assert!(text.contains("restarts and forgets its sessions"), "a controller restart happened");
    let first_repair = lines
        .iter()
        .find(|l| l.contains(".repaired="))
        .and_then(|l| l.trim_start_matches('[').split('s').next())
        .and_then(|t| t.trim().parse::<f64>().ok())
        .expect("a pass line with a repair");
    assert!(first_repair < 60.0, "repairs within the first minute (first at {first_repair}s)");
    assert!(text.contains("removing the private PostgreSQL"));
    assert_eq!(demo_dirs(), before, "the private cluster's directory was removed");
}

mod reqwest {
    /// A GET from a plain thread (the test is not async).
    pub fn blocking_get(url: &str) -> String {
        let url = url.to_owned();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            sessiond::tls::install_default_provider();
            rt.block_on(async { ::reqwest::get(&url).await.expect("GET").text().await.expect("body") })
        })
        .join()
        .expect("join")
    }
}
