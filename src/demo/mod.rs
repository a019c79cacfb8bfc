//! `sessiond demo`: the whole system on one machine, with no set-up.
//!
//! It starts a private PostgreSQL from the installed binaries (or uses
//! `DATABASE_URL`), applies the schema, and starts two simulated controllers
//! with a simulated application ([`app`]) that creates, reuses, looks up and
//! stops a few hundred sessions and injects the incidents' faults. It then runs
//! the real daemon loop against all of it, with the real endpoints, printing one
//! line per pass. On Ctrl-C (or after `--duration`) it stops, prints a verdict
//! comparing the audit trail with the faults it injected, and removes the
//! private cluster.

pub mod app;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::daemon::{PassObserver, ReloadSource};
use crate::pgcluster::PrivateCluster;
use crate::progress::Progress;
use crate::reconcile::{PassReport, Reconciler};
use crate::simctl::SimController;
use app::{App, Verdict};

/// How often the simulated application acts.
const STEP: Duration = Duration::from_millis(20);
/// The first controller restart, and the time between restarts.
const FIRST_RESTART: Duration = Duration::from_secs(8);
/// With `--unhealthy-app`: often enough for SessiondControllerRestartingOften.
const RESTART_EVERY_UNHEALTHY: Duration = Duration::from_secs(40);
/// A healthy controller restarts now and then (a deploy), well under the
/// alert's three an hour.
const RESTART_EVERY: Duration = Duration::from_secs(30 * 60);
/// No faults in the last stretch of a `--duration` run, so the last ones can be
/// repaired before the verdict: creating_timeout plus a few passes.
pub const SETTLE: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub sessions: usize,
    pub fault_rate: f64,
    pub seed: u64,
    pub duration: Option<Duration>,
    pub listen: SocketAddr,
    /// The simulated application breaches its own SLOs too (see `App::new`).
    pub unhealthy_app: bool,
}

/// The shipped alerts a Prometheus scraping the demo should show, and why.
pub fn expected_alerts(unhealthy_app: bool) -> Vec<(&'static str, &'static str)> {
    let mut alerts =
        vec![("SessiondAppBugRepaired", "info: sessiond repaired the injected faults, each an application bug")];
    if unhealthy_app {
        alerts.extend([
            ("SessiondAppReuseRatioLow", "warning: the application reuses about 85% of sessions"),
            ("SessiondAppReuseRatioCritical", "critical: the same, below 90%"),
            ("SessiondAppLookupSuccessLow", "warning: users of broken sessions keep retrying"),
            ("SessiondControllerRestartingOften", "warning: a controller restarts every 40 seconds"),
            ("SessiondRapidCreates", "warning: users get new sessions in quick succession"),
        ]);
    }
    alerts
}

/// The private cluster, stopped and removed on drop.
struct Cluster {
    cluster: PrivateCluster,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.cluster.stop() {
            eprintln!("sessiond demo: stopping the private PostgreSQL failed: {e}");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("sessiond demo: removing {} failed: {e}", self.dir.display());
        }
    }
}

async fn start_cluster() -> anyhow::Result<(Cluster, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context("find a free port for PostgreSQL")?;
    let dir = std::env::temp_dir().join(format!("sessiond-demo-{}", uuid::Uuid::new_v4().simple()));
    let cluster = PrivateCluster::new(&dir, port)?;
    let guard = tokio::task::spawn_blocking(move || {
        let guard = Cluster { cluster, dir };
        guard.cluster.start().map(|()| guard)
    })
    .await
    .context("start PostgreSQL")??;
    let admin = guard.cluster.url("postgres");
    let (client, conn) =
        tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.context("connect to the private PostgreSQL")?;
    tokio::spawn(conn);
    client.batch_execute("CREATE DATABASE sessiond_demo").await.context("create the demo database")?;
    let url = guard.cluster.url("sessiond_demo");
    Ok((guard, url))
}

fn demo_config(db_url: &str, controllers: &[SimController], listen: SocketAddr) -> anyhow::Result<Config> {
    let mut text = format!(
        "[daemon]\ninterval = \"1s\"\nlisten = \"{listen}\"\n\n\
         [database]\nurl = \"{db_url}\"\nstatement_timeout = \"5s\"\n\n\
         [reconcile]\ngrace = \"3s\"\nconfirmations = 2\ncreating_timeout = \"10s\"\n\n"
    );
    for c in controllers {
        text.push_str(&c.controller_toml("2s"));
    }
    Config::from_toml(std::path::Path::new("<demo>"), &text, &Overrides::default()).map_err(anyhow::Error::from)
}

/// Prints a line per pass and feeds the endpoints.
struct Printer {
    shared: Arc<crate::http::Shared>,
    started: Instant,
}

impl PassObserver for Printer {
    fn pass_finished(&mut self, r: &PassReport) {
        self.shared.record(r);
        let live: usize = r.instances.iter().map(|i| i.sessions).sum();
        let rows: u64 = r.rows_by_state.values().sum();
        let findings: Vec<String> = r.findings_by_kind().iter().map(|(k, n)| format!("{}={n}", k.as_str())).collect();
        let repaired: Vec<String> = r
            .outcomes_by_kind()
            .iter()
            .filter(|((_, o), _)| *o != crate::model::RepairResult::Reported)
            .map(|((k, o), n)| format!("{}.{o}={n}", k.as_str()))
            .collect();
        let (mut created, mut reused) = (0u64, 0u64);
        for c in r.instances.iter().filter_map(|i| i.counters.as_ref()) {
            created += c.sessions_created;
            reused += c.sessions_reused;
        }
        let p = &r.probes.all;
        let probes = p.found + p.never_existed + p.deleted + p.invalid_format;
        let pct = |n: u64, d: u64| if d == 0 { "-".to_owned() } else { format!("{:.1}%", 100.0 * n as f64 / d as f64) };
        let restarted: Vec<&str> = r.instances.iter().filter(|i| i.restarted).map(|i| i.name.as_str()).collect();
        println!(
            "[{:>6.1}s] pass {:<7} {:>4.0}ms | live {live:>4} rows {rows:>4} | findings {} | repairs {} | reuse {} | lookups found {}{}{}",
            self.started.elapsed().as_secs_f64(),
            r.outcome.as_str(),
            r.duration_seconds * 1000.0,
            if findings.is_empty() { "none".into() } else { findings.join(" ") },
            if repaired.is_empty() { "none".into() } else { repaired.join(" ") },
            pct(reused, reused + created),
            pct(p.found, probes),
            if restarted.is_empty() { String::new() } else { format!(" | {} restarted", restarted.join(",")) },
            if r.guard_tripped.is_empty() { "" } else { " | GUARD" },
        );
    }
}

/// Runs the demo until `shutdown` fires or `duration` passes. Returns the verdict.
pub async fn run(opts: DemoOptions, shutdown: CancellationToken) -> anyhow::Result<Verdict> {
    if !(0.0..=1.0).contains(&opts.fault_rate) {
        bail!("--fault-rate must be between 0 and 1 (a probability per create or stop)");
    }
    if opts.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    if let Some(d) = opts.duration {
        if d < SETTLE + Duration::from_secs(5) {
            bail!(
                "--duration must be at least {}s: the last {}s inject no faults so they can be repaired",
                (SETTLE + Duration::from_secs(5)).as_secs(),
                SETTLE.as_secs()
            );
        }
    }
    let since = chrono::Utc::now();

    // The database: DATABASE_URL, or a private cluster that is removed on exit.
    let (cluster, db_url) = match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        Some(url) => (None, url),
        None => {
            println!("starting a private PostgreSQL from the installed binaries…");
            let (c, url) = start_cluster().await?;
            (Some(c), url)
        }
    };

    let controllers = vec![
        SimController::start("ctrl-a").await.context("start simulated controller ctrl-a")?,
        SimController::start("ctrl-b").await.context("start simulated controller ctrl-b")?,
    ];
    let cfg = demo_config(&db_url, &controllers, opts.listen)?;
    crate::store::Store::connect(&cfg.database).await?.migrate(&cfg.sessions).await?;

    let (client, conn) =
        tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await.context("connect the simulated application")?;
    tokio::spawn(conn);
    let mut app = App::new(client, controllers.clone(), opts.sessions, opts.fault_rate, opts.seed, opts.unhealthy_app);
    let restart_every = if opts.unhealthy_app { RESTART_EVERY_UNHEALTHY } else { RESTART_EVERY };
    app.populate().await.context("create the starting sessions")?;

    let listener = crate::http::bind(cfg.daemon.listen).await.context("pass another address with --listen")?;
    let addr = listener.local_addr()?;
    let shared = crate::http::Shared::new(&cfg, crate::web::WebConfig::plain())?;
    let server = tokio::spawn(crate::http::serve(listener, Arc::clone(&shared), shutdown.clone()));

    println!(
        "\nsessiond demo (seed {}): {} sessions, fault rate {}, {} application",
        opts.seed,
        opts.sessions,
        opts.fault_rate,
        if opts.unhealthy_app { "an unhealthy" } else { "a healthy" }
    );
    println!(
        "  database     {}{}",
        cfg.database.url,
        if cluster.is_some() { "  (private; removed on exit)" } else { "" }
    );
    for c in &controllers {
        println!("  controller   {}  {}", c.instance(), c.url());
    }
    println!("  metrics      http://{addr}/metrics");
    println!("  status       http://{addr}/status");
    println!("  Prometheus   scrape {addr} as job \"sessiond\" and load alerts/sessiond.rules.yml, e.g.:");
    println!("               scrape_configs: [{{job_name: sessiond, static_configs: [{{targets: ['{addr}']}}]}}]");
    println!("  Grafana      import dashboards/sessiond.json and pick that Prometheus as its data source");
    println!("  alerts       with those rules, expect only:");
    for (name, why) in expected_alerts(opts.unhealthy_app) {
        println!("                 {name} ({why})");
    }
    if !opts.unhealthy_app {
        println!("               nothing pages; --unhealthy-app makes the application breach its own SLOs too");
    }
    match opts.duration {
        Some(d) => println!("running for {}; Ctrl-C stops early\n", humantime::format_duration(d)),
        None => println!("Ctrl-C stops it\n"),
    }

    let started = Instant::now();
    let inject_until = opts.duration.map(|d| d - SETTLE);
    if let Some(d) = opts.duration {
        let token = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            token.cancel();
        });
    }

    // The application runs beside the daemon until shutdown.
    let app_stop = shutdown.clone();
    let app_task = tokio::spawn(async move {
        let mut step = tokio::time::interval(STEP);
        let mut check = tokio::time::interval(Duration::from_millis(500));
        let mut next_restart = FIRST_RESTART;
        loop {
            let inject = inject_until.is_none_or(|u| started.elapsed() < u);
            tokio::select! {
                _ = app_stop.cancelled() => break,
                _ = step.tick() => {
                    if let Err(e) = app.step(inject).await {
                        eprintln!("simulated application: {e}");
                    }
                    if inject && started.elapsed() >= next_restart {
                        let which = (app.restarts as usize) % 2;
                        println!("[{:>6.1}s] simulated controller ctrl-{} restarts and forgets its sessions",
                            started.elapsed().as_secs_f64(), if which == 0 { 'a' } else { 'b' });
                        if let Err(e) = app.restart(which).await {
                            eprintln!("simulated application: {e}");
                        }
                        next_restart += restart_every;
                    }
                }
                _ = check.tick() => {
                    if let Err(e) = app.check_repairs().await {
                        eprintln!("simulated application: {e}");
                    }
                }
            }
        }
        app
    });

    let reconciler = Reconciler::new(Arc::new(cfg))?;
    let (_reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let source = ReloadSource { path: PathBuf::from("<demo>"), overrides: Overrides::default() };
    let mut printer = Printer { shared, started };
    let _ = crate::daemon::run(reconciler, shutdown.clone(), reload_rx, source, &mut printer, Progress::new()).await;

    let mut app = app_task.await.context("the simulated application")?;
    let verdict = app.verdict(since, SETTLE).await.context("read the audit trail")?;
    println!("\n{}", verdict.line());
    for o in verdict.outstanding.iter().take(10) {
        println!("  not repaired: {o}");
    }
    for w in verdict.wrong.iter().take(10) {
        println!("  repaired but not injected: {w}");
    }
    for c in &controllers {
        c.shutdown();
    }
    let _ = server.await;
    if let Some(c) = cluster {
        println!("stopping and removing the private PostgreSQL");
        tokio::task::spawn_blocking(move || drop(c)).await.context("stop PostgreSQL")?;
    }
    Ok(verdict)
}
