//! End to end through a real Prometheus: it scrapes a real `sessiond run`,
//! evaluates the shipped rule files, and an orphan injected through a test
//! controller shows up in the recording rules and as an alert, read back through
//! Prometheus's HTTP API.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{ago, config_text, free_port, sid, tool, Daemon, TestDb, IMMEDIATE};
use sessiond::simctl::SimController;

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(target_port: u16) -> Prometheus {
        Prometheus::start_with(&format!("127.0.0.1:{target_port}"), "1s", "1s")
    }

    /// Scrapes `target` as job "sessiond" every `scrape`, evaluating the
    /// shipped rules every `eval`.
    fn start_with(target: &str, scrape: &str, eval: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("alerts/sessiond.rules.yml");
        let config = format!(
            "global:\n  scrape_interval: {scrape}\n  evaluation_interval: {eval}\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: sessiond\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config).expect("write prometheus.yml");
        let port = free_port();
        let child = Command::new(tool("prometheus", "prometheus"))
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus { child, port, _dir: dir }
    }

    /// The result vector of an instant query.
    async fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let base = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let Ok(url) = reqwest::Url::parse_with_params(&base, &[("query", q)]) else { return vec![] };
        let Ok(resp) = common::http().get(url).send().await else { return vec![] };
        let Ok(body) = resp.text().await else { return vec![] };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else { return vec![] };
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The whole answer to an instant query: its status and result, or the error.
    async fn query_answer(&self, q: &str) -> serde_json::Value {
        let base = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        let url = reqwest::Url::parse_with_params(&base, &[("query", q)]).expect("a query URL");
        let body = common::http().get(url).send().await.expect("ask Prometheus").text().await.expect("its answer");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("Prometheus answered no JSON ({e}): {body}"))
    }

    /// Every alert Prometheus holds now: (alertname, alertstate, labels).
    async fn alerts(&self) -> Vec<(String, String, serde_json::Value)> {
        self.query("ALERTS")
            .await
            .into_iter()
            .map(|a| {
                let m = a["metric"].clone();
                let s = |k: &str| m[k].as_str().unwrap_or("").to_owned();
                (s("alertname"), s("alertstate"), m)
            })
            .collect()
    }

    /// Polls until `q` returns something that satisfies `ok`, for up to 3
    /// minutes: with a one-minute scrape, the first one comes at an offset of
    /// up to a minute, and a change shows at the next.
    async fn wait_for(&self, q: &str, ok: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
        let mut last = vec![];
        for _ in 0..720 {
            last = self.query(q).await;
            if ok(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("Prometheus never answered {q} as expected; last answer: {last:?}");
    }
}

fn value(sample: &serde_json::Value) -> f64 {
    sample["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

#[tokio::test]
async fn an_injected_orphan_reaches_prometheus_recording_rules_and_alerts() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    // Observe mode: the orphan stays, as it would while repairs are not keeping up.
    let d =
        Daemon::start_with(&config_text(&db, &[&a], "grace = \"0s\"\nconfirmations = 1"), "mode = \"observe\"").await;
    d.wait_ready().await;
    let prom = Prometheus::start(d.port);

    // The application reuses 9 sessions for every one it creates.
    let traffic = {
        let a = a.clone();
        tokio::spawn(async move {
            loop {
                a.count(1, 9);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    prom.wait_for("up{job=\"sessiond\"}", |r| r.first().is_some_and(|s| value(s) == 1.0)).await;
    let probes = prom
        .wait_for("job:sessiond_lookup_probe_success:ratio_rate5m", |r| r.first().is_some_and(|s| value(s).is_finite()))
        .await;
    assert_eq!(value(&probes[0]), 1.0, "the one live session has its row");

    // Inject the orphan: the application's cleanup cleared memory, not the row.
    db.insert(&sid(2), "u2", "ctrl-a", "active", ago(600)).await;

    prom.wait_for("sessiond_discrepancies{kind=\"orphaned\",controller=\"ctrl-a\"}", |r| {
        r.first().is_some_and(|s| value(s) == 1.0)
    })
    .await;
    let alerts = prom.wait_for("ALERTS{alertname=\"SessiondOrphansOrZombiesPersisting\"}", |r| !r.is_empty()).await;
    assert_eq!(alerts[0]["metric"]["kind"], "orphaned");
    assert_eq!(alerts[0]["metric"]["severity"], "warning");
    assert_eq!(alerts[0]["metric"]["alertstate"], "pending", "pending until its 15 minutes are up");
    let reported = prom
        .wait_for("sessiond_repairs_total{kind=\"orphaned\",outcome=\"reported\",controller=\"ctrl-a\"}", |r| {
            r.first().is_some_and(|s| value(s) >= 1.0)
        })
        .await;
    assert_eq!(reported[0]["metric"]["job"], "sessiond");

    let reuse = prom
        .wait_for("controller:sessiond_app_session_reuse:ratio_rate5m", |r| {
            r.first().is_some_and(|s| value(s).is_finite())
        })
        .await;
    assert_eq!(reuse[0]["metric"]["controller"], "ctrl-a");
    assert!((value(&reuse[0]) - 0.9).abs() < 0.05, "reuse ratio {}", value(&reuse[0]));
    traffic.abort();
    assert_eq!(db.state(&sid(2)).await.as_deref(), Some("active"), "observe mode changed nothing");
}

// The alerting end to end: the shipped rules in a real Prometheus that
// scrapes once a minute (at its own offset within the minute, as a default
// Prometheus does), first against the healthy demo, then against real
// outages. The three run at once, so the binary takes as long as the longest.

/// Scrape and rule evaluation intervals of these tests.
const SCRAPE: &str = "1m";
const EVAL: &str = "15s";

/// Fails on any firing alert outside `allowed`. A pending alert is a
/// condition that has not lasted its `for:` yet: an orphan between two
/// passes, or a ratio over a few minutes of traffic; it pages nobody.
fn only(alerts: &[(String, String, serde_json::Value)], allowed: &[&str], when: &str) {
    for (name, state, labels) in alerts {
        let ok = state == "pending" || allowed.contains(&name.as_str());
        assert!(ok, "{when}: unexpected {state} alert {name} {labels}");
    }
}

/// Polls the alerts every 5 s until `done` holds for them, failing on any
/// firing alert outside `allowed` meanwhile, or after `limit`. Returns those
/// alerts, and how long it took.
async fn watch_until(
    prom: &Prometheus,
    allowed: &[&str],
    when: &str,
    limit: Duration,
    done: impl Fn(&[(String, String, serde_json::Value)]) -> bool,
) -> (Vec<(String, String, serde_json::Value)>, Duration) {
    let started = std::time::Instant::now();
    loop {
        let alerts = prom.alerts().await;
        only(&alerts, allowed, when);
        if done(&alerts) {
            return (alerts, started.elapsed());
        }
        assert!(started.elapsed() < limit, "{when}: not fired within {limit:?}: {alerts:?}");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn firing<'a>(alerts: &'a [(String, String, serde_json::Value)], name: &str) -> Vec<&'a serde_json::Value> {
    alerts.iter().filter(|(n, s, _)| n == name && s == "firing").map(|(_, _, l)| l).collect()
}

/// The three take minutes of `for:` each, so they run at once: the test
/// takes as long as the longest (the controller outage, about 7 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shipped_alerts_at_a_one_minute_scrape_stay_quiet_on_the_healthy_demo_and_fire_on_real_outages() {
    tokio::join!(
        the_healthy_demo_raises_only_the_alerts_its_banner_announces(),
        a_controller_outage_and_a_guard_trip_fire_their_alerts_and_nothing_else(),
        a_database_outage_fires_database_unreachable(),
    );
}

async fn the_healthy_demo_raises_only_the_alerts_its_banner_announces() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        // Long enough that the reuse ratio's 5-minute window, read at the end,
        // starts after the demo's first minute: every user creates a session
        // at the start, and the users of the controller that restarts at 8 s
        // create again. With those in the window the healthy ratio read
        // 0.9486 in one run and above 0.95 in others.
        .args(["demo", "--duration", "400s", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sessiond demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The banner: where to scrape, and which alerts to expect.
    let (mut target, mut expected, mut in_alerts) = (None, Vec::<String>::new(), false);
    while let Some(line) = rx.recv().await {
        let t = line.trim();
        if let Some(url) = t.strip_prefix("metrics") {
            target = url.trim().strip_prefix("http://").and_then(|u| u.strip_suffix("/metrics")).map(str::to_owned);
        }
        if t.starts_with("alerts") && t.contains("expect only") {
            in_alerts = true;
        } else if in_alerts && t.starts_with("Sessiond") {
            expected.push(t.split_whitespace().next().unwrap_or("").to_owned());
        } else if in_alerts {
            break;
        }
    }
    let target = target.expect("the banner names the metrics address");
    assert_eq!(expected, ["SessiondAppBugRepaired"], "the healthy demo announces one ticket, no page");
    let allowed: Vec<&str> = expected.iter().map(String::as_str).collect();

    let prom = Prometheus::start_with(&target, SCRAPE, EVAL);
    let drain = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(l) = rx.recv().await {
            lines.push(l);
        }
        lines
    });
    let started = std::time::Instant::now();
    let mut announced_fired = false;
    // Watch until shortly before the demo ends (its target then goes away).
    while started.elapsed() < Duration::from_secs(380) {
        let alerts = prom.alerts().await;
        only(&alerts, &allowed, &format!("{:?} into the healthy demo", started.elapsed()));
        announced_fired |= !firing(&alerts, "SessiondAppBugRepaired").is_empty();
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let scrapes = prom.query("count_over_time(up{job=\"sessiond\"}[10m])").await;
    assert!(scrapes.first().is_some_and(|s| value(s) >= 4.0), "several scrapes happened: {scrapes:?}");
    let reuse = prom.query("controller:sessiond_app_session_reuse:ratio_rate5m").await;
    assert_eq!(reuse.len(), 2, "a reuse ratio per controller: {reuse:?}");
    for r in &reuse {
        assert!(value(r) >= 0.95, "the healthy application reuses at least 95%: {r}");
    }
    let lookups = prom.query("controller:sessiond_app_lookup_success:ratio_rate5m").await;
    assert!(!lookups.is_empty() && lookups.iter().all(|l| value(l) >= 0.99), "{lookups:?}");
    assert!(announced_fired, "the banner's SessiondAppBugRepaired fired: the demo's faults were repaired");

    // Every panel of the dashboard has a query Prometheus runs.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/sessiond.json"))
            .expect("read the dashboard"),
    )
    .expect("JSON");
    let mut with_data = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let expr = t["expr"].as_str().unwrap_or("");
            let q = expr.replace("$job", "sessiond").replace("$controller", ".+").replace("$__rate_interval", "5m");
            let answer = prom.query_answer(&q).await;
            assert_eq!(answer["status"], "success", "{}: {q}: {answer}", panel["title"]);
            with_data += usize::from(answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty()));
        }
    }
    assert!(with_data >= 20, "most of the dashboard's queries have data from the demo: {with_data}");

    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait for the demo");
    let lines = drain.await.expect("join");
    assert!(status.success(), "the demo's verdict:\n{}", lines.join("\n"));
}

async fn a_controller_outage_and_a_guard_trip_fire_their_alerts_and_nothing_else() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let b = SimController::start("ctrl-b").await.expect("controller");
    for n in 0..10 {
        a.add(&sid(n), &format!("ua{n}"), "running", Some(ago(600)));
        db.insert(&sid(n), &format!("ua{n}"), "ctrl-a", "active", ago(600)).await;
    }
    b.add(&sid(100), "ub", "running", Some(ago(600)));
    db.insert(&sid(100), "ub", "ctrl-b", "active", ago(600)).await;
    let reconcile = "grace = \"0s\"\nconfirmations = 1\nguard_min_orphans = 3\nmax_orphan_fraction = 0.5";
    let d = Daemon::start(&config_text(&db, &[&a, &b], reconcile)).await;
    d.wait_ready().await;
    let prom = Prometheus::start_with(&format!("127.0.0.1:{}", d.port), SCRAPE, EVAL);
    prom.wait_for("up{job=\"sessiond\"}", |r| r.first().is_some_and(|s| value(s) == 1.0)).await;
    only(&prom.alerts().await, &[], "before the outage");

    // ctrl-b goes down; ctrl-a loses every session without restarting.
    b.shutdown();
    for n in 0..10 {
        a.remove(&sid(n));
    }
    let expected = ["SessiondControllerUnreachable", "SessiondRepairGuardTripped"];
    // Up to a minute to the next scrape, 5 minutes of for:, an evaluation.
    let (alerts, took) = watch_until(
        &prom,
        &expected,
        "during the controller outage and the guard trip",
        Duration::from_secs(720),
        |a| expected.iter().all(|name| !firing(a, name).is_empty()),
    )
    .await;
    let down = firing(&alerts, "SessiondControllerUnreachable");
    let guard = firing(&alerts, "SessiondRepairGuardTripped");
    assert_eq!(down.len(), 1);
    assert_eq!(down[0]["controller"], "ctrl-b");
    assert_eq!(down[0]["severity"], "warning");
    assert_eq!(guard.len(), 1);
    assert_eq!(guard[0]["controller"], "ctrl-a");
    assert_eq!(guard[0]["severity"], "critical");
    eprintln!("the controller outage and the guard trip fired {took:?} after they began");
    assert_eq!(db.state(&sid(0)).await.as_deref(), Some("active"), "the guard held the mass repair back");
}

async fn a_database_outage_fires_database_unreachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = sessiond::pgcluster::PrivateCluster::new(&dir.path().join("pg"), free_port())
        .unwrap_or_else(|e| panic!("PostgreSQL server binaries are needed for this test: {e}"));
    let cluster = tokio::task::spawn_blocking(move || cluster.start().map(|()| cluster))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("start a private PostgreSQL: {e}"));
    let a = SimController::start("ctrl-a").await.expect("controller");
    let config = common::TestConfig::for_url(&cluster.url("postgres"))
        .controllers(&[&a])
        .reconcile_toml(IMMEDIATE)
        .database("statement_timeout", "2s")
        .toml();
    let path = dir.path().join("migrate.toml");
    std::fs::write(&path, &config).expect("write the config");
    let out = common::run(&["migrate", "--config", path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    let d = Daemon::start(&config).await;
    d.wait_ready().await;
    let prom = Prometheus::start_with(&format!("127.0.0.1:{}", d.port), SCRAPE, EVAL);
    prom.wait_for("sessiond_database_up{job=\"sessiond\"}", |r| r.first().is_some_and(|s| value(s) == 1.0)).await;
    only(&prom.alerts().await, &[], "before the outage");

    let cluster = tokio::task::spawn_blocking(move || cluster.stop().map(|()| cluster))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("stop the private PostgreSQL: {e}"));
    // Without the database no pass succeeds either; Alertmanager inhibits
    // that page while the database one fires (alerts/alertmanager.example.yml).
    let expected = ["SessiondDatabaseUnreachable", "SessiondNoSuccessfulPass"];
    let (alerts, took) = watch_until(&prom, &expected, "during the database outage", Duration::from_secs(480), |a| {
        !firing(a, "SessiondDatabaseUnreachable").is_empty()
    })
    .await;
    let down = firing(&alerts, "SessiondDatabaseUnreachable");
    assert_eq!(down[0]["severity"], "critical");
    assert_eq!(down[0]["job"], "sessiond");
    eprintln!("the database outage fired {took:?} after it began");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_application_counters_stay_true_across_a_sessiond_restart() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.count(0, 200); // what the application counted before anyone looked
    let text = config_text(&db, &[&a], IMMEDIATE);
    let port = free_port();
    let d = Daemon::start_on(&text, "", port).await;
    let prom = Prometheus::start(port);
    let q = "sessiond_app_sessions_reused_total{job=\"sessiond\",controller=\"ctrl-a\"}";
    let at = |v: f64| move |r: &[serde_json::Value]| r.first().is_some_and(|s| value(s) == v);
    prom.wait_for(q, at(200.0)).await;

    // The controller restarts: its counters start over, a real reset.
    a.restart();
    a.count(0, 20);
    prom.wait_for(q, at(20.0)).await;
    // sessiond restarts at the same address, as a deploy does: not a reset.
    drop(d);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _d = Daemon::start_on(&text, "", port).await;
    prom.wait_for(q, at(20.0)).await;
    a.count(0, 20);
    prom.wait_for(q, at(40.0)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The application reused 40 sessions while watched: increase() says so,
    // give or take its extrapolation to the window's edges. (Re-exporting
    // increments per boot id made it 60: the restart re-added the boot's 20.)
    let inc = prom.query(&format!("increase({q}[5m])")).await;
    let got = inc.first().map_or(f64::NAN, value);
    assert!((38.0..=48.0).contains(&got), "increase() across the restarts is {got}, not about 40");
    let resets = prom.query(&format!("resets({q}[5m])")).await;
    assert_eq!(resets.first().map(value), Some(1.0), "only the controller's restart is a reset");
}
