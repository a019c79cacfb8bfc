//! The benchmark still runs and still checks its own work: a tiny size, so the
//! suite stays fast (the figures themselves come from release runs; see
//! docs/performance.md).

mod common;

#[test]
fn the_bench_runs_end_to_end_and_prints_its_summary_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sessiond-bench"))
        .args(["--sessions", "1000,2000", "--naive-sample", "200", "--database-url"])
        .arg(common::server_url())
        .output()
        .expect("run sessiond-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary = text
        .lines()
        .find(|l| l.starts_with("N=2000 sessiond_s=") && l.contains(" floor_s="))
        .unwrap_or_else(|| panic!("no summary line in:\n{text}"));
    for field in ["ratio=", "naive_ratio=", "bytes_per_session=", "round_trips="] {
        assert!(summary.contains(field), "{field} missing from {summary}");
    }
    // 1% each of orphans, zombies and unpersisted sessions, all repaired.
    assert!(text.contains("repaired=60 stops_received=20"), "{text}");
    // Reads take the same number of round trips whatever the number of sessions.
    let reads = |n: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("N={n} sessiond_s=")) && l.contains(" floor_s="))
            .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("read_round_trips=")))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no read_round_trips for N={n} in:\n{text}"))
    };
    assert_eq!(reads("1000"), reads("2000"), "reads must not grow with the number of sessions");
}

#[test]
fn with_uuid_ids_in_no_order_every_planted_fault_is_still_repaired() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sessiond-bench"))
        .args(["--sessions", "1000", "--naive-sample", "100", "--rounds", "1", "--ids", "uuid", "--database-url"])
        .arg(common::server_url())
        .output()
        .expect("run sessiond-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("repaired=30 stops_received=10"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("N=1000 sessiond_s=") && l.ends_with(" ids=uuid")), "{text}");
}
