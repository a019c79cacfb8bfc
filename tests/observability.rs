//! The exporter, the rules and the dashboard, checked with Prometheus's own tools
//! (promtool, amtool) against a real scrape of a running `sessiond run`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ago, config_text, sid, tool, Daemon, TestDb, IMMEDIATE};
use sessiond::simctl::SimController;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn promtool() -> std::path::PathBuf {
    tool("promtool", "prometheus")
}

fn run_tool(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run the tool");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn rules() -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join("alerts/sessiond.rules.yml")).expect("read the rules");
    serde_yaml_ng::from_str(&text).expect("the rules are YAML")
}

/// (record-or-alert name, expr) of every rule.
fn rule_list() -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for g in rules()["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let expr = r["expr"].as_str().expect("expr").to_owned();
            if let Some(name) = r["record"].as_str() {
                out.push((name.to_owned(), expr, true));
            } else {
                out.push((r["alert"].as_str().expect("alert name").to_owned(), expr, false));
            }
        }
    }
    out
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join("dashboards/sessiond.json")).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every non-row panel of the dashboard.
fn panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    d["panels"].as_array().expect("panels").iter().filter(|p| p["type"] != "row").collect()
}

fn dashboard_exprs(d: &serde_json::Value) -> Vec<String> {
    panels(d)
        .iter()
        .flat_map(|p| {
            p["targets"].as_array().expect("targets").iter().map(|t| t["expr"].as_str().expect("expr").to_owned())
        })
        .collect()
}

/// Metric names a PromQL expression refers to (ours, `up`, and recorded series).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < bytes.len()
                && ((bytes[i] as char).is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':')
            {
                i += 1;
            }
            let word = &expr[start..i];
            let quoted = start > 0 && bytes[start - 1] == b'"';
            if !quoted && (word.starts_with("sessiond_") || word.contains(":sessiond_") || word == "up") {
                names.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// A daemon with a reachable controller reporting counters, after its first pass.
async fn scrape() -> (String, String) {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.add(&sid(1), "owner-secret-1", "running", Some(ago(600)));
    db.insert(&sid(1), "owner-secret-1", "ctrl-a", "active", ago(600)).await;
    db.insert(&sid(2), "owner-secret-2", "ctrl-a", "active", ago(600)).await; // an orphan
    a.reuse();
    a.observe_create(0.2);
    let d = Daemon::start(&config_text(&db, &[&a], IMMEDIATE)).await;
    d.wait_ready().await;
    let (status, ct, body) = d.get("/metrics").await.expect("a scrape");
    assert_eq!(status, 200);
    (ct, body)
}

#[test]
fn the_rule_files_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = run_tool(
        Command::new(promtool()).args(["check", "rules"]).arg(Path::new(ROOT).join("alerts/sessiond.rules.yml")),
    );
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    let (ok, out) = run_tool(
        Command::new(promtool()).args(["test", "rules"]).arg(Path::new(ROOT).join("alerts/sessiond.rules.test.yml")),
    );
    assert!(ok, "promtool test rules:\n{out}");
}

#[test]
fn every_alert_has_a_unit_test_severity_annotations_and_a_runbook_section() {
    let tests = std::fs::read_to_string(Path::new(ROOT).join("alerts/sessiond.rules.test.yml")).expect("read tests");
    let runbooks = std::fs::read_to_string(Path::new(ROOT).join("docs/runbooks.md")).expect("read runbooks");
    let anchors: BTreeSet<String> =
        runbooks.lines().filter_map(|l| l.strip_prefix("## ")).map(|h| h.trim().to_lowercase()).collect();
    for g in rules()["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let Some(name) = r["alert"].as_str() else { continue };
            assert!(tests.contains(&format!("alertname: {name}\n")), "{name} has no promtool unit test");
            assert!(name.starts_with("Sessiond"), "{name}: one prefix for every alert");
            let sev = r["labels"]["severity"].as_str().unwrap_or("");
            assert!(["critical", "warning", "info"].contains(&sev), "{name} severity {sev:?}");
            if sev == "critical" {
                assert!(r["for"].as_str().is_some_and(|f| f != "0s"), "{name} pages without a for: clause");
            }
            for key in ["summary", "description", "runbook_url"] {
                assert!(r["annotations"][key].as_str().is_some_and(|v| !v.is_empty()), "{name} lacks {key}");
            }
            let summary = r["annotations"]["summary"].as_str().unwrap_or("");
            let first = summary.chars().next().unwrap_or(' ');
            assert!(
                summary.ends_with('.') && (first.is_uppercase() || summary.starts_with("sessiond") || first == '{'),
                "{name}: the summary is not a sentence: {summary:?}"
            );
            let description = r["annotations"]["description"].as_str().unwrap_or("");
            assert!(description.contains("$value"), "{name}: the description does not say the value");
            let url = r["annotations"]["runbook_url"].as_str().unwrap_or("");
            let anchor = url.strip_prefix("docs/runbooks.md#").unwrap_or_else(|| panic!("{name}: runbook_url {url}"));
            assert!(anchors.contains(anchor), "{name}: docs/runbooks.md has no section #{anchor}");
        }
    }
}

#[test]
fn the_example_alertmanager_config_passes_amtool() {
    let (ok, out) = run_tool(
        Command::new(tool("amtool", "prometheus-alertmanager"))
            .arg("check-config")
            .arg(Path::new(ROOT).join("alerts/alertmanager.example.yml")),
    );
    assert!(ok, "amtool check-config:\n{out}");
}

#[tokio::test]
async fn a_scrape_of_a_running_daemon_passes_promtool_check_metrics() {
    let (ct, body) = scrape().await;
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    {
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("feed the scrape");
    }
    let out = child.wait_with_output().expect("promtool");
    let findings = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && findings.trim().is_empty(), "promtool check metrics findings:\n{findings}");

    let build_info = format!("\",version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    let revision = body
        .lines()
        .find_map(|l| l.strip_prefix("sessiond_build_info{revision=\""))
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no build_info with a revision:\n{body}"));
    assert!(
        revision == "unknown" || (revision.len() == 12 && revision.chars().all(|c| c.is_ascii_hexdigit())),
        "{revision}"
    );
    for needle in [
        build_info.as_str(),
        "sessiond_controller_up{controller=\"ctrl-a\"} 1",
        "sessiond_database_up 1",
        "sessiond_discrepancies{controller=\"ctrl-a\",kind=\"orphaned\"} 1",
        "sessiond_discrepancies{controller=\"none\",kind=\"orphaned\"} 0",
        "sessiond_repair_latency_seconds_count{kind=\"orphaned\"} 1",
        "process_resident_memory_bytes ",
        "process_start_time_seconds ",
        "sessiond_sessions{source=\"controller\",state=\"active\"} 1",
        "sessiond_sessions{source=\"database\",state=\"active\"} 2",
        "sessiond_app_sessions_reused_total{controller=\"ctrl-a\"} 1",
        "sessiond_lookup_probes_total{age=\"old\",reason=\"exists\",result=\"found\"} 1",
        "sessiond_reconcile_interval_seconds 0.5",
        "sessiond_app_session_create_duration_seconds_bucket{controller=\"ctrl-a\",le=\"0.25\"} 1",
        "sessiond_app_session_create_duration_seconds_count{controller=\"ctrl-a\"} 1",
        "sessiond_rapid_creates_total 0",
        "sessiond_mode{mode=\"repair\"} 1",
        "sessiond_mode{mode=\"observe\"} 0",
        "sessiond_config_last_reload_successful 1",
        "sessiond_controller_restarts_total{controller=\"ctrl-a\"} 0",
        "sessiond_paused 0",
    ] {
        assert!(body.contains(needle), "the scrape lacks {needle}:\n{body}");
    }
    assert!(
        body.contains("sessiond_repairs_total{controller=\"ctrl-a\",kind=\"orphaned\",outcome=\"repaired\"} 1"),
        "{body}"
    );
    for secret in [sid(1), sid(2), "owner-secret".into()] {
        assert!(!body.contains(&secret), "a label carries a session or owner id: {secret}");
    }
    assert!(!body.contains("instance=") && !body.contains("job="), "the controller label is never instance or job");
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_rules_use_exists_or_is_recorded() {
    let (_, body) = scrape().await;
    let mut known: BTreeSet<String> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    known.insert("up".into()); // Prometheus's own, per scrape target
    let rules = rule_list();
    known.extend(rules.iter().filter(|(_, _, rec)| *rec).map(|(n, _, _)| n.clone()));
    let mut used = BTreeSet::new();
    for (_, expr, _) in &rules {
        used.extend(metric_names(expr));
    }
    for expr in dashboard_exprs(&dashboard()) {
        used.extend(metric_names(&expr));
    }
    assert!(used.len() > 15, "the name extraction works: {used:?}");
    let missing: Vec<&String> = used.difference(&known).collect();
    assert!(missing.is_empty(), "used but neither exported nor recorded: {missing:?}");
}

#[test]
fn every_dashboard_expression_parses() {
    let d = dashboard();
    let mut text = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs(&d).iter().enumerate() {
        let concrete = expr.replace("$__rate_interval", "5m").replace("$job", ".+").replace("$controller", ".+");
        text.push_str(&format!(
            "      - record: dashboard:expr_{i}:check\n        expr: {}\n",
            serde_json::to_string(&concrete).expect("quote")
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dashboard.rules.yml");
    std::fs::write(&path, &text).expect("write");
    let (ok, out) = run_tool(Command::new(promtool()).args(["check", "rules"]).arg(&path));
    assert!(ok, "a dashboard expression does not parse:\n{out}\n{text}");
}

#[test]
fn the_dashboard_satisfies_the_dashboard_linter_rules() {
    let d = dashboard();
    assert_eq!(d["uid"], "sessiond-overview", "a fixed uid");
    assert!(d.get("__inputs").is_none(), "no __inputs: import works without a mapping step");
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name} variable"));
    // template-datasource-rule
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    // template-job-rule
    assert_eq!(var("job")["datasource"]["uid"], "${datasource}");
    assert!(var("job")["multi"].as_bool().unwrap_or(false) && var("job")["includeAll"].as_bool().unwrap_or(false));
    var("controller");
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        // panel-datasource-rule
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: panel datasource");
        // panel-title-description-rule
        assert!(p["description"].as_str().is_some_and(|s| !s.is_empty()), "{title}: no description");
        // panel-units-rule
        assert!(p["fieldConfig"]["defaults"]["unit"].as_str().is_some_and(|s| !s.is_empty()), "{title}: no unit");
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().unwrap_or("");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}: target datasource");
            // target-job-rule: every selector of ours is narrowed by $job
            for name in metric_names(expr) {
                let at = expr.find(&name).unwrap_or(0) + name.len();
                let rest = &expr[at..];
                assert!(rest.starts_with("{job=~\"$job\""), "{title}: {name} lacks job=~\"$job\" in {expr}");
            }
            // target-rate-interval-rule
            for (i, _) in expr.match_indices("rate(") {
                let window = expr[i..].split('[').nth(1).and_then(|s| s.split(']').next()).unwrap_or("");
                assert_eq!(window, "$__rate_interval", "{title}: rate window in {expr}");
            }
        }
    }
}

#[tokio::test]
async fn readyz_explains_why_it_is_not_ready_while_healthz_and_status_answer() {
    let a = SimController::start("ctrl-a").await.expect("controller");
    let text = format!(
        "[database]\nurl = \"postgres://postgres@127.0.0.1:9/nowhere\"\nstatement_timeout = \"1s\"\n\n\
         [[controller]]\nname = \"ctrl-a\"\nurl = \"{}\"\n",
        a.url()
    );
    let d = Daemon::start(&text).await;
    let mut last = None;
    for _ in 0..100 {
        last = d.get("/readyz").await;
        if last.as_ref().is_some_and(|(_, _, b)| b.contains("database")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (status, _, body) = last.expect("an answer");
    assert_eq!(status, 503);
    assert!(body.contains("could not read the database"), "{body}");
    assert_eq!(d.get("/healthz").await.map(|r| r.0), Some(200));
    let (_, ct, status_body) = d.get("/status").await.expect("status");
    assert_eq!(ct, "application/json");
    let v: serde_json::Value = serde_json::from_str(&status_body).expect("JSON");
    assert_eq!(v["ready"], false);
    assert_eq!(v["last_pass"]["outcome"], "failed");
    assert_eq!(v["last_pass"]["controllers"][0]["up"], true);
    let (_, _, m) = d.get("/metrics").await.expect("metrics");
    assert!(m.contains("sessiond_database_up 0"), "{m}");
    assert!(m.contains("sessiond_reconcile_passes_total{outcome=\"failed\"}"));
    assert_eq!(d.get("/nope").await.map(|r| r.0), Some(404));
    let post = common::http().post(d.url("/metrics")).send().await.expect("post");
    assert_eq!(post.status().as_u16(), 405);
}

#[tokio::test]
async fn a_rejected_reload_shows_in_a_metric_until_one_is_applied() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let d = Daemon::start(&config_text(&db, &[&a], IMMEDIATE)).await;
    d.wait_ready().await;
    let path = d.dir.path().join("sessiond.toml");
    let good = std::fs::read_to_string(&path).expect("the config");
    let metric = |body: &str, name: &str| {
        body.lines().find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_owned)).unwrap_or_default()
    };
    // The scrape once `name` reads `value`, or the last one after 5 s.
    let scrape_until = async |name: &str, value: &str| {
        let mut seen = String::new();
        for _ in 0..50 {
            seen = d.get("/metrics").await.map(|r| r.2).unwrap_or_default();
            if metric(&seen, name) == value {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen
    };
    let (_, _, before) = d.get("/metrics").await.expect("scrape");
    let applied_at: f64 =
        metric(&before, "sessiond_config_last_reload_success_timestamp_seconds").parse().expect("a time");

    std::fs::write(&path, good.replace("[reconcile]", "[reconcile]\nbogus = 1")).expect("a bad config");
    common::signal(d.child.id(), "HUP");
    let seen = scrape_until("sessiond_config_last_reload_successful", "0").await;
    assert_eq!(metric(&seen, "sessiond_config_last_reload_successful"), "0", "{seen}");

    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&path, &good).expect("the good config again");
    common::signal(d.child.id(), "HUP");
    let seen = scrape_until("sessiond_config_last_reload_successful", "1").await;
    assert_eq!(metric(&seen, "sessiond_config_last_reload_successful"), "1", "{seen}");
    let reloaded_at: f64 =
        metric(&seen, "sessiond_config_last_reload_success_timestamp_seconds").parse().expect("a time");
    assert!(reloaded_at > applied_at, "{reloaded_at} > {applied_at}");
}

#[test]
fn the_checked_in_rules_and_dashboard_are_what_the_mixin_generates() {
    let opts = sessiond::mixin::MixinOptions::default();
    let regenerate =
        "regenerate them: cargo run -- mixin --rules alerts/sessiond.rules.yml --dashboard dashboards/sessiond.json";
    let rules = std::fs::read_to_string(Path::new(ROOT).join("alerts/sessiond.rules.yml")).expect("read the rules");
    assert!(rules == opts.rules().expect("render the rules"), "alerts/sessiond.rules.yml is stale; {regenerate}");
    let dash = std::fs::read_to_string(Path::new(ROOT).join("dashboards/sessiond.json")).expect("read the dashboard");
    assert!(dash == opts.dashboard().expect("render the dashboard"), "dashboards/sessiond.json is stale; {regenerate}");
}

#[test]
fn the_mixin_writes_rules_for_another_job_with_absolute_runbook_links() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rules, dash) = (dir.path().join("rules.yml"), dir.path().join("dashboard.json"));
    let base = "https://wiki.example.com/ops/sessiond/runbooks.md";
    let (ok, out) = run_tool(
        Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .args(["mixin", "--selector", r#"job="sessions-prod",env="prod""#, "--runbook-url", base])
            .arg("--rules")
            .arg(&rules)
            .arg("--dashboard")
            .arg(&dash),
    );
    assert!(ok, "sessiond mixin:\n{out}");
    let (ok, out) = run_tool(Command::new(promtool()).args(["check", "rules"]).arg(&rules));
    assert!(ok, "promtool check rules on the generated file:\n{out}");
    let text = std::fs::read_to_string(&rules).expect("read the generated rules");
    assert!(!text.contains(r#"job="sessiond""#), "the default job is gone");
    assert!(text.contains(r#"absent(up{job="sessions-prod",env="prod"})"#), "{text}");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    let mut alerts = 0;
    for g in doc["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            if let Some(url) = r["annotations"]["runbook_url"].as_str() {
                alerts += 1;
                assert!(url.starts_with(&format!("{base}#sessiond")), "{url}");
            }
        }
    }
    assert!(alerts > 20, "{alerts} alerts");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dash).expect("read")).expect("JSON");
    assert_eq!(d["links"][0]["url"], base);
    assert_eq!(d["editable"], false);
    let job = d["templating"]["list"].as_array().expect("vars").iter().find(|v| v["name"] == "job").expect("job");
    assert_eq!(job["definition"], r#"label_values(sessiond_build_info{job="sessions-prod",env="prod"}, job)"#);

    let (ok, out) = run_tool(Command::new(env!("CARGO_BIN_EXE_sessiond")).args([
        "mixin",
        "--selector",
        "{job=\"x\"}",
        "--rules",
        "-",
    ]));
    assert!(!ok && out.contains("--selector"), "a selector with braces is refused clearly:\n{out}");
}
