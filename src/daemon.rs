//! The daemon loop: a pass every `interval` until the shutdown token fires.
//!
//! A pass is never cut short: shutdown is only observed between passes, so a
//! batch in flight commits or rolls back on its own. A failed pass never ends
//! the loop; repeated failures back off (doubling, capped) so a database outage
//! is not hammered. SIGHUP re-reads the config: a valid one takes effect at the
//! next pass, an invalid one is logged and the running config stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::reconcile::{PassOutcome, PassReport, Reconciler};

/// The longest a run of failures stretches the time between passes.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The delay before the next pass after `failures` consecutive failed passes.
pub fn next_delay(interval: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return interval;
    }
    let factor = 1u32 << failures.min(10);
    interval.saturating_mul(factor).min(MAX_BACKOFF.max(interval))
}

/// Hooks the loop calls, so the exporter and systemd integration can observe
/// passes without the loop knowing about them.
pub trait PassObserver: Send {
    fn pass_finished(&mut self, _report: &PassReport) {}
    fn config_reloaded(&mut self, _config: &Arc<Config>) {}
}

impl PassObserver for () {}

/// Where reloads come from: the config file path and the environment overrides.
pub struct ReloadSource {
    pub path: PathBuf,
    pub overrides: Overrides,
}

/// Runs passes until `shutdown` is cancelled. `reload` fires on SIGHUP.
pub async fn run(
    mut reconciler: Reconciler,
    shutdown: CancellationToken,
    mut reload: tokio::sync::mpsc::Receiver<()>,
    source: ReloadSource,
    observer: &mut dyn PassObserver,
) {
    let mut failures: u32 = 0;
    loop {
        let started = Instant::now();
        let report = reconciler.pass(false, false, true).await;
        failures = if report.outcome == PassOutcome::Failed { failures.saturating_add(1) } else { 0 };
        observer.pass_finished(&report);

        let delay = next_delay(reconciler.config().daemon.interval, failures);
        if failures > 0 {
            tracing::warn!(consecutive_failures = failures, next_pass_in = %humantime::format_duration(delay), "backing off");
        }
        let next = started + delay;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    tracing::info!("shutting down");
                    return;
                }
                _ = tokio::time::sleep_until(next) => break,
                Some(()) = reload.recv() => {
                    match Config::load(&source.path, &source.overrides) {
                        Ok(cfg) => {
                            let cfg = Arc::new(cfg);
                            reconciler.set_config(Arc::clone(&cfg));
                            observer.config_reloaded(&cfg);
                            tracing::info!(config = %source.path.display(), "config reloaded; takes effect at the next pass");
                        }
                        Err(e) => tracing::error!(error = %e, "config reload rejected; the running config stays"),
                    }
                }
            }
        }
    }
}
