//! End to end through a real Prometheus: it scrapes a real `sessiond run`,
//! evaluates the shipped rule files, and an orphan injected through a test
//! controller shows up in the recording rules and as an alert, read back through
//! Prometheus's HTTP API.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{ago, config_text, free_port, sid, tool, Daemon, TestDb};
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
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("alerts/sessiond.rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: sessiond\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n",
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

    /// Polls until `q` returns something that satisfies `ok`, for up to 60 s.
    async fn wait_for(&self, q: &str, ok: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
        let mut last = vec![];
        for _ in 0..240 {
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
