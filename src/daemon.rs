//! The daemon loop: a pass every `interval` until the shutdown token fires.
//!
//! A pass is never cut short: shutdown is only observed between passes, so a
//! batch in flight commits or rolls back on its own. A failed pass never ends
//! the loop; repeated failures back off (doubling, capped) so a database outage
//! is not hammered. A reload request re-reads the config: a valid one takes
//! effect at the next pass, an invalid one is logged and the running config stays.
//!
//! The loop ticks a [`Progress`] while it waits and (through the reconciler) at
//! every stage of a pass; the systemd watchdog is fed from it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::progress::Progress;
use crate::reconcile::{PassOutcome, PassReport, PassRequest, Reconciler};

/// A run of failures stretches the time between passes to at most two
/// intervals, or this if that is longer: a database that comes back is seen
/// within that time, while an outage is still not hammered.
const BACKOFF_FLOOR: Duration = Duration::from_secs(15);
/// How often the idle loop reports that it is alive.
const HEARTBEAT: Duration = Duration::from_millis(250);

/// The delay before the next pass after `failures` consecutive failed passes:
/// doubling, capped at two intervals or 15 s, whichever is longer, so the first
/// pass after a recovery comes that soon.
pub fn next_delay(interval: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return interval;
    }
    let factor = 1u32 << failures.min(10);
    let cap = interval.saturating_mul(2).max(BACKOFF_FLOOR);
    interval.saturating_mul(factor).min(cap).max(interval)
}

/// Hooks the loop calls, so the exporter and the systemd integration can follow
/// the daemon without the loop knowing about them.
pub trait PassObserver: Send {
    fn pass_finished(&mut self, _report: &PassReport) {}
    /// A reload request is being handled.
    fn reloading(&mut self) {}
    fn config_reloaded(&mut self, _config: &Arc<Config>) {}
    fn reload_rejected(&mut self, _error: &str) {}
    /// Fires when an operator asks for a pass now (`POST /pass`).
    fn wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
    /// Just before each pass: hands over what operators asked of it, e.g.
    /// `release_guard(controller)`.
    fn before_pass(&mut self, _release_guard: &mut dyn FnMut(&str)) {}
}

/// What the loop runs: a [`Reconciler`], or in tests a stand-in, so the
/// loop's own rules (backoff, reload, shutdown) can be tested on paused time.
pub trait Passes: Send {
    fn pass(&mut self, req: PassRequest) -> impl std::future::Future<Output = PassReport> + Send;
    fn config(&self) -> &Arc<Config>;
    /// A reloaded config, from the next pass on.
    fn set_config(&mut self, config: Arc<Config>);
    fn lease(&self) -> Option<&crate::lease::Lease>;
    fn set_progress(&mut self, progress: Progress);
    fn release_guard(&mut self, controller: &str);
}

impl Passes for Reconciler {
    fn pass(&mut self, req: PassRequest) -> impl std::future::Future<Output = PassReport> + Send {
        Reconciler::pass(self, req)
    }
    fn config(&self) -> &Arc<Config> {
        Reconciler::config(self)
    }
    fn set_config(&mut self, config: Arc<Config>) {
        Reconciler::set_config(self, config)
    }
    fn lease(&self) -> Option<&crate::lease::Lease> {
        Reconciler::lease(self)
    }
    fn set_progress(&mut self, progress: Progress) {
        Reconciler::set_progress(self, progress)
    }
    fn release_guard(&mut self, controller: &str) {
        Reconciler::release_guard(self, controller)
    }
}

/// Where reloads come from: the config file path and the environment overrides.
pub struct ReloadSource {
    pub path: PathBuf,
    pub overrides: Overrides,
}

/// Why the loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// `shutdown` was cancelled.
    Shutdown,
    /// The config cannot work against the database (the sessions table does
    /// not fit its mapping): no pass can be right, so the daemon stops.
    BadConfig(String),
}

/// Runs passes until `shutdown` is cancelled. `reload` fires on SIGHUP.
pub async fn run<P: Passes>(
    mut reconciler: P,
    shutdown: CancellationToken,
    mut reload: tokio::sync::mpsc::Receiver<()>,
    source: ReloadSource,
    observer: &mut dyn PassObserver,
    progress: Progress,
) -> RunEnd {
    reconciler.set_progress(progress.clone());
    let mut failures: u32 = 0;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let started = Instant::now();
        progress.tick();
        observer.before_pass(&mut |c: &str| reconciler.release_guard(c));
        let report = reconciler.pass(PassRequest::daemon()).await;
        progress.tick();
        failures = if report.outcome == PassOutcome::Failed { failures.saturating_add(1) } else { 0 };
        observer.pass_finished(&report);
        if let Some(e) = report.config_error {
            return RunEnd::BadConfig(e);
        }

        let delay = next_delay(reconciler.config().daemon.interval, failures);
        if failures > 0 {
            tracing::warn!(consecutive_failures = failures, next_pass_in = %humantime::format_duration(delay), "backing off");
        }
        let next = started + delay;
        let lease = reconciler.lease().cloned();
        let gained = async {
            match &lease {
                Some(l) if report.role.is_follower() => l.gained().await,
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(gained);
        let wake = observer.wake();
        let asked = async {
            match &wake {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(asked);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    tracing::info!("shutting down");
                    return RunEnd::Shutdown;
                }
                _ = tokio::time::sleep_until(next) => break,
                // A follower that takes over starts its first pass at once.
                _ = &mut gained => break,
                // An operator asked for a pass now.
                _ = &mut asked => break,
                _ = heartbeat.tick() => progress.tick(),
                Some(()) = reload.recv() => {
                    observer.reloading();
                    match Config::load(&source.path, &source.overrides) {
                        Ok(cfg) if cfg.ha != reconciler.config().ha => {
                            let e = "[ha] cannot change on reload; restart the service to change it";
                            tracing::error!("config reload rejected: {e}; the running config stays");
                            observer.reload_rejected(e);
                        }
                        Ok(cfg) => {
                            let cfg = Arc::new(cfg);
                            if let Some(l) = reconciler.lease() {
                                l.set_database(&cfg.database);
                            }
                            reconciler.set_config(Arc::clone(&cfg));
                            observer.config_reloaded(&cfg);
                            tracing::info!(config = %source.path.display(), "config reloaded; takes effect at the next pass");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "config reload rejected; the running config stays");
                            observer.reload_rejected(&e.to_string());
                        }
                    }
                }
            }
        }
    }
}
