//! The command line: argument definitions and the dispatch from a parsed command
//! to the library, mapped to the exit codes the README documents.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::logging::LogFormat;
use crate::reconcile::{report, PassOutcome, PassRequest, Reconciler};
use crate::store::Store;
use crate::systemd::Notifier;

/// Exit code: the pass failed or was partial.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad command line (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: bad config (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(name = "sessiond", version, about = "Reconciles live controller sessions with their PostgreSQL rows")]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text", env = "SESSIOND_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: a pass every interval until SIGTERM.
    Run(ConfigArg),
    /// Run exactly one pass and print what it found and did.
    Once {
        #[command(flatten)]
        config: ConfigArg,
        /// Find and report, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Override the mass-repair guard for this pass.
        #[arg(long)]
        force: bool,
    },
    /// Create or upgrade sessiond's schema (idempotent). Needs a direct
    /// connection to PostgreSQL, not one through a pooler.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
        /// Migrate even though the URL seems to reach the server through a
        /// pooler or proxy: for a port forward or a session-pooling proxy
        /// that keeps one server connection per client.
        #[arg(long)]
        allow_proxy: bool,
    },
    /// Validate the config and print it, secrets redacted.
    CheckConfig(ConfigArg),
    /// Print SQL made from the config, for review (changes nothing).
    Sql {
        #[command(subcommand)]
        what: SqlCommand,
    },
    /// Check the database and every controller before trusting them: one line
    /// per check, ok/warn/fail. Changes nothing, calls no stop_url.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the lines as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain one session: its row, what every controller lists for it, what
    /// a pass would decide about it and why, and its audit history. Runs one
    /// read-only pass; changes nothing.
    Explain {
        /// The session id.
        session_id: String,
        #[command(flatten)]
        config: ConfigArg,
        /// Print it as JSON (the document GET /sessions/{id} answers).
        #[arg(long)]
        json: bool,
    },
    /// Everything on one machine: a private PostgreSQL, simulated controllers
    /// and application with faults, the daemon and its endpoints.
    Demo(DemoArgs),
    /// Write the Prometheus rules and the Grafana dashboard for your scrape
    /// job and runbook location (the files in alerts/ and dashboards/ are
    /// this with the defaults).
    Mixin(MixinArgs),
}

#[derive(Debug, Args)]
pub struct MixinArgs {
    /// PromQL label matchers, without braces, that select sessiond's scrape
    /// targets.
    #[arg(long, default_value = crate::mixin::DEFAULT_SELECTOR)]
    pub selector: String,
    /// The URL of the runbooks page (docs/runbooks.md wherever you publish
    /// it); each alert links to its section. Relative by default.
    #[arg(long, default_value = crate::mixin::DEFAULT_RUNBOOK_URL)]
    pub runbook_url: String,
    /// Where to write the rules file ("-": standard output).
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Where to write the dashboard ("-": standard output).
    #[arg(long)]
    pub dashboard: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SqlCommand {
    /// The audit triggers for a table of your own (sessions.table): every
    /// state change audited, hard deletes refused. The reference table has
    /// them already.
    AuditTriggers(ConfigArg),
    /// The sessiond_lookup function `migrate` makes for this config.
    Lookup(ConfigArg),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Users of the simulated application (one session each at most).
    #[arg(long, default_value_t = 300)]
    pub sessions: usize,
    /// Probability that a create or a stop goes wrong the way the incidents did.
    #[arg(long, default_value_t = 0.03)]
    pub fault_rate: f64,
    /// Seed of the simulation, for a reproducible run (random by default).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this long (e.g. "2m") and exit 1 unless every injected fault
    /// was repaired and nothing else was; by default run until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Where to serve /metrics and /status.
    #[arg(long, default_value = "127.0.0.1:9817")]
    pub listen: std::net::SocketAddr,
    /// Make the simulated application unhealthy as well: a low reuse ratio,
    /// failing lookups, a controller that restarts every 40 s. By default its
    /// only faults are the ones sessiond repairs, and no alert pages.
    #[arg(long)]
    pub unhealthy_app: bool,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The config file (TOML).
    #[arg(long, short = 'c', env = "SESSIOND_CONFIG")]
    pub config: PathBuf,
}

/// `sessiond mixin`: renders and writes the requested files.
fn mixin(args: &MixinArgs) -> ExitCode {
    if args.rules.is_none() && args.dashboard.is_none() {
        eprintln!(
            "sessiond mixin: nothing to write; pass --rules FILE and/or --dashboard FILE (\"-\" for standard output)"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let opts = crate::mixin::MixinOptions { selector: args.selector.clone(), runbook_url: args.runbook_url.clone() };
    let outputs = [(&args.rules, opts.rules()), (&args.dashboard, opts.dashboard())];
    for (path, text) in outputs {
        let Some(path) = path else { continue };
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                eprintln!("sessiond mixin: {e:#}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        let written = if path.as_os_str() == "-" {
            use std::io::Write;
            std::io::stdout().write_all(text.as_bytes())
        } else {
            std::fs::write(path, text)
        };
        if let Err(e) = written {
            eprintln!("sessiond mixin: cannot write {}: {e}", path.display());
            return ExitCode::from(EXIT_FAILED);
        }
    }
    ExitCode::SUCCESS
}

/// Loads the config or prints why not.
fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path, &Overrides::from_env()).map_err(|e| {
        eprintln!("sessiond: bad config: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Runs a parsed command to completion.
pub async fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::CheckConfig(c) => match load(&c.config) {
            Ok(cfg) => {
                print!("{}", cfg.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Migrate { config, allow_proxy } => {
            let cfg = match load(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match migrate(&cfg, allow_proxy).await {
                Ok((applied, lookup)) => {
                    if applied.is_empty() {
                        println!("schema is up to date (version {})", crate::store::SCHEMA_VERSION);
                    } else {
                        println!(
                            "applied migrations {applied:?}; schema is at version {}",
                            crate::store::SCHEMA_VERSION
                        );
                    }
                    match lookup {
                        Ok(()) => println!("sessiond_lookup made for {}", cfg.sessions.table),
                        Err(e) => eprintln!(
                            "sessiond: warning: sessiond_lookup was not made: {e}. Fix the table or the mapping \
                             (sessiond check says what), then run sessiond migrate again"
                        ),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sessiond: migrate failed: {e}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Command::Once { config, dry_run, json, force } => {
            let cfg = match load(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let ha = (cfg.ha.enabled && !dry_run).then(|| (cfg.ha.lease, cfg.database.clone()));
            let mut reconciler = match Reconciler::new(Arc::new(cfg)) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("sessiond: {e}");
                    return ExitCode::from(EXIT_FAILED);
                }
            };
            // With [ha], a repairing `once` runs only as the leader: it takes the
            // lease for its one pass (a dry run needs none).
            let lease = match ha {
                Some((duration, database)) => match lease_for_once(duration, &database).await {
                    Ok(lease) => Some(lease),
                    Err(message) => {
                        eprintln!("sessiond: {message}");
                        return ExitCode::from(EXIT_FAILED);
                    }
                },
                None => None,
            };
            let lease_stop = CancellationToken::new();
            let lease_task = lease.map(|(lease, store)| {
                reconciler.set_lease(lease.clone());
                tokio::spawn(lease.hold(store, lease_stop.clone()))
            });
            let rep = reconciler.pass(PassRequest::once().dry_run(dry_run).force(force)).await;
            lease_stop.cancel();
            if let Some(task) = lease_task {
                let _ = task.await;
            }
            if json {
                println!("{}", report::to_json(&rep));
            } else {
                print!("{}", report::to_table(&rep));
            }
            if let Some(e) = &rep.config_error {
                eprintln!("sessiond: bad config: {e}");
                ExitCode::from(EXIT_CONFIG)
            } else if rep.outcome == PassOutcome::Ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
        Command::Check { config, json } => {
            let cfg = match load(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let lines = crate::check::run(&cfg).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&lines).unwrap_or_else(|e| format!("\"{e}\"")));
            } else {
                for l in &lines {
                    println!("{l}");
                }
            }
            if crate::check::worst(&lines) == crate::check::Status::Fail {
                ExitCode::from(EXIT_FAILED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Demo(args) => demo(args).await,
        Command::Mixin(args) => mixin(&args),
        Command::Sql { what } => sql(what).await,
        Command::Explain { session_id, config, json } => {
            let cfg = match load(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            explain(Arc::new(cfg), &session_id, json).await
        }
        Command::Run(c) => {
            let cfg = match load(&c.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_daemon(c.config, cfg).await
        }
    }
}

async fn demo(args: DemoArgs) -> ExitCode {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        token.cancel();
    });
    let opts = crate::demo::DemoOptions {
        sessions: args.sessions,
        fault_rate: args.fault_rate,
        seed: args.seed.unwrap_or_else(|| fastrand::u64(..)),
        duration: args.duration,
        listen: args.listen,
        unhealthy_app: args.unhealthy_app,
    };
    let timed = opts.duration.is_some();
    match crate::demo::run(opts, shutdown).await {
        Ok(verdict) if timed && !verdict.ok() => ExitCode::from(EXIT_FAILED),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessiond demo: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Takes the lease for `once`, or says who holds it.
async fn lease_for_once(
    duration: std::time::Duration,
    database: &crate::config::DatabaseConfig,
) -> Result<(crate::lease::Lease, Store), String> {
    let lease = crate::lease::Lease::new(duration);
    lease.set_database(database);
    let mut store = Store::connect(database).await.map_err(|e| format!("cannot take the lease: {e}"))?;
    match lease.renew(&mut store).await {
        Ok(true) => Ok((lease, store)),
        Ok(false) => {
            let view = lease.view();
            Err(format!(
                "[ha] is enabled and another replica leads ({}, term {}): `once` repairs only as the leader. Use \
                 --dry-run to look without repairing, or stop the replicas first",
                view.holder.as_deref().unwrap_or("unknown"),
                view.term.map_or_else(|| "?".to_owned(), |t| t.to_string())
            ))
        }
        Err(e) => Err(format!("cannot take the lease: {e}")),
    }
}

/// Migrates sessiond's schema, then makes `sessiond_lookup` (an error of the
/// latter alone is the second value: the schema is still migrated).
async fn migrate(cfg: &Config, allow_proxy: bool) -> Result<(Vec<i32>, Result<(), String>), String> {
    let mut store = Store::connect(&cfg.database).await.map_err(|e| e.to_string())?;
    if let Some(why) = store.intermediary(&cfg.database).await.map_err(|e| e.to_string())? {
        if !allow_proxy {
            return Err(format!(
                "the database URL seems to go through a pooler or proxy ({why}). migrate needs a direct \
                 connection to PostgreSQL: its DDL and its lock must stay on one server session, which a \
                 transaction-pooling PgBouncer does not keep. Run it with a URL that reaches PostgreSQL itself \
                 (DATABASE_URL=… sessiond migrate), or pass --allow-proxy if this is a port forward"
            ));
        }
        tracing::warn!(%why, "migrating through what seems to be a proxy (--allow-proxy)");
    }
    let applied = store.migrate(&cfg.sessions).await.map_err(|e| e.to_string())?;
    // The lookup function is made from the config (the id pattern and the
    // mapping), so every migrate makes it anew. It only reads the table: what
    // the repairs need of it is for `check`, `once` and `run` to say.
    let reads_only = crate::config::PolicyConfig {
        orphaned: crate::config::Policy::Report,
        zombie: crate::config::Policy::Report,
        unpersisted: crate::config::Policy::Report,
        duplicate: crate::config::Policy::Report,
        stuck_creating: crate::config::Policy::Report,
        drift: crate::config::Policy::Report,
    };
    let lookup = match store.bind_table(&cfg.sessions, &reads_only).await {
        Ok(_) => store.install_lookup(&cfg.sessions).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    Ok((applied, lookup))
}

/// `sessiond explain ID`: one read-only pass, then the session's row and trail.
async fn explain(cfg: Arc<Config>, id: &str, json: bool) -> ExitCode {
    if !crate::explain::valid_id(id, &cfg.sessions.id_pattern) {
        eprintln!(
            "sessiond: {id:?} is not a session id: it does not match sessions.id_pattern {:?} (or is over 255 bytes, \
             or has a control character)",
            cfg.sessions.id_pattern.as_str()
        );
        return ExitCode::from(EXIT_FAILED);
    }
    let mut reconciler = match Reconciler::new(Arc::clone(&cfg)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sessiond: bad config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    reconciler.watch(id);
    let report = reconciler.pass(PassRequest::daemon().dry_run(true)).await;
    let read = async {
        let round_trips = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let store = crate::reconcile::connect(&cfg, &round_trips).await?;
        store.explain(id, crate::explain::AUDIT_ROWS).await
    };
    let (row, audit) = match read.await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sessiond: cannot read the session's row: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let last = crate::api::LastFindings::of(&report);
    let mut e = crate::api::explanation(id, Some(&last), row, audit);
    e.controllers = report.entries.get(id).cloned().unwrap_or_default();
    e.controllers_source = "fetched now".into();
    e.pass.description = format!(
        "one read-only pass now, by the daemon's rules: a fresh process has seen each finding once, where the \
         daemon repairs after {} pass(es) in a row; the daemon's GET /sessions/{{id}} shows its own streak",
        cfg.reconcile.confirmations
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&e).unwrap_or_default());
    } else {
        print!("{}", crate::explain::render(&e));
    }
    if report.outcome == PassOutcome::Failed {
        eprintln!("sessiond: the pass failed: {}", report.error.as_deref().unwrap_or("unknown error"));
        return ExitCode::from(EXIT_FAILED);
    }
    ExitCode::SUCCESS
}

/// `sessiond sql …`: SQL made from the config and the table's catalog.
async fn sql(what: SqlCommand) -> ExitCode {
    let (SqlCommand::AuditTriggers(c) | SqlCommand::Lookup(c)) = &what;
    let cfg = match load(&c.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if matches!(what, SqlCommand::AuditTriggers(_)) && cfg.sessions.reference {
        println!(
            "-- sessions.table is unset: sessiond's reference table already has these triggers (`sessiond migrate` \
             installs them). Map a table of your own to get its triggers here."
        );
        return ExitCode::SUCCESS;
    }
    let mut store = match Store::connect(&cfg.database).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sessiond: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let table = match store.bind_table(&cfg.sessions, &cfg.reconcile.policy).await {
        Ok(t) => t,
        Err(e) if e.is_fatal() => {
            eprintln!("sessiond: bad config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("sessiond: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match what {
        SqlCommand::AuditTriggers(_) => print!("{}", table.audit_triggers_sql(&cfg.database.schema)),
        SqlCommand::Lookup(_) => {
            println!("{};", table.lookup_sql(&cfg.database.schema, cfg.sessions.id_pattern.as_str()))
        }
    }
    ExitCode::SUCCESS
}

/// What the daemon loop reports to: the exporter's state and systemd.
struct Hooks {
    shared: Arc<crate::http::Shared>,
    notifier: Notifier,
}

impl crate::daemon::PassObserver for Hooks {
    fn pass_finished(&mut self, report: &crate::reconcile::PassReport) {
        self.shared.record(report);
        self.notifier.status(&report::status_line(report));
    }
    fn reloading(&mut self) {
        self.notifier.reloading();
    }
    fn config_reloaded(&mut self, config: &Arc<Config>) {
        self.shared.set_config(config);
        self.shared.metrics.observe_reload(true);
        self.notifier.ready();
        self.notifier.status("config reloaded; takes effect at the next pass");
    }
    fn reload_rejected(&mut self, error: &str) {
        self.shared.metrics.observe_reload(false);
        self.notifier.ready();
        self.notifier.status(&format!("config reload rejected, running config kept: {error}"));
    }
    fn wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(Arc::clone(&self.shared.pass_now))
    }
    fn before_pass(&mut self, release_guard: &mut dyn FnMut(&str)) {
        for controller in self.shared.take_releases() {
            release_guard(&controller);
        }
    }
}

async fn run_daemon(path: PathBuf, cfg: Config) -> ExitCode {
    let notifier = Notifier::from_env();
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    if let Err(e) = spawn_signal_handlers(shutdown.clone(), reload_tx, notifier) {
        eprintln!("sessiond: cannot install signal handlers: {e}");
        return ExitCode::from(EXIT_FAILED);
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %path.display(),
        mode = cfg.daemon.mode.as_str(),
        interval = %humantime::format_duration(cfg.daemon.interval),
        controllers = cfg.controllers.len(),
        database = %cfg.database.url,
        "sessiond starting"
    );
    let listener = match crate::http::bind(cfg.daemon.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sessiond: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let web = match &cfg.daemon.web_config_file {
        Some(p) => match crate::web::WebConfig::load(p) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("sessiond: bad config: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => crate::web::WebConfig::plain(),
    };
    let shared = match crate::http::Shared::new(&cfg, web) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sessiond: cannot set up metrics: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let ha = cfg.ha.clone();
    let database = cfg.database.clone();
    let mut reconciler = match Reconciler::new(Arc::new(cfg)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sessiond: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    // With [ha], the lease is renewed on a task and a connection of its own,
    // so a long pass never delays it; it is released after the last pass.
    let lease_stop = CancellationToken::new();
    let lease_task = ha.enabled.then(|| {
        let lease = crate::lease::Lease::new(ha.lease);
        lease.set_database(&database);
        tracing::info!(holder = lease.holder(), lease = %humantime::format_duration(ha.lease), "[ha] enabled: passes run only while this replica holds the lease");
        reconciler.set_lease(lease.clone());
        shared.set_lease(lease.clone());
        tokio::spawn(lease.run(lease_stop.clone()))
    });
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics /healthz /readyz /status");
    let server = tokio::spawn(crate::http::serve(listener, Arc::clone(&shared), shutdown.clone()));

    // Ready: the config is loaded and the endpoints listen. The database may
    // still be down; /readyz says so until a pass can read it.
    notifier.ready();
    notifier.status("started; first pass running");
    let progress = crate::progress::Progress::new();
    progress.tick();
    let watchdog = crate::systemd::spawn_watchdog(notifier, progress.clone(), shutdown.clone());

    let source = crate::daemon::ReloadSource { path, overrides: Overrides::from_env() };
    let mut hooks = Hooks { shared, notifier };
    let end = crate::daemon::run(reconciler, shutdown.clone(), reload_rx, source, &mut hooks, progress).await;
    shutdown.cancel();
    lease_stop.cancel();
    if let Some(task) = lease_task {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "lease task failed");
        }
    }
    if let Err(e) = server.await {
        tracing::error!(error = %e, "http server task failed");
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    match end {
        crate::daemon::RunEnd::Shutdown => ExitCode::SUCCESS,
        crate::daemon::RunEnd::BadConfig(e) => {
            eprintln!("sessiond: bad config: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// SIGTERM and SIGINT tell systemd we are stopping and cancel `shutdown` (the
/// current pass finishes first); SIGHUP sends a reload request.
fn spawn_signal_handlers(
    shutdown: CancellationToken,
    reload: tokio::sync::mpsc::Sender<()>,
    notifier: Notifier,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    let _ = reload.try_send(());
                    continue;
                }
            };
            tracing::info!(signal = name, "finishing the current pass, then exiting");
            notifier.stopping();
            notifier.status("stopping");
            shutdown.cancel();
        }
    });
    Ok(())
}
