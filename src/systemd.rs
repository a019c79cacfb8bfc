//! systemd integration: the notify protocol (`READY=1`, `STATUS=`, `RELOADING=1`,
//! `STOPPING=1`) and the watchdog.
//!
//! The watchdog is fed only while the pass loop makes progress. The loop ticks a
//! [`Progress`] at every stage of a pass and while it waits between passes; a
//! task pets systemd at half the watchdog interval, but only if the last tick is
//! younger than the interval. A wedged loop therefore stops the pings, and
//! systemd restarts the service, which is what the watchdog is for.
//!
//! Everything here is a no-op when `NOTIFY_SOCKET` is not set.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::progress::Progress;

/// Sends notify messages when running under systemd.
#[derive(Clone, Copy, Debug)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier { enabled: std::env::var_os("NOTIFY_SOCKET").is_some() }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }

    /// Start-up is done: the config is loaded and the HTTP server listens.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// A one-line summary for `systemctl status`.
    pub fn status(&self, line: &str) {
        // One line: systemd shows the first.
        let line: String = line.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
        self.send(&[NotifyState::Status(&line)]);
    }

    /// A reload begins. systemd ≥ 253 requires the monotonic timestamp with it.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the monotonic clock");
                self.send(&[NotifyState::Reloading]);
            }
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this process).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Pets the watchdog every `interval / 2` while `progress` is younger than
/// `interval`. Returns `None` when systemd asked for no watchdog.
pub fn spawn_watchdog(
    notifier: Notifier,
    progress: Progress,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval()?;
    tracing::info!(interval = %humantime::format_duration(interval), "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval / 2);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stalled = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let quiet = progress.since_last();
            if quiet < interval {
                notifier.watchdog();
                stalled = false;
            } else if !stalled {
                tracing::error!(
                    quiet_for = %humantime::format_duration(Duration::from_secs(quiet.as_secs())),
                    "the pass loop has made no progress; no longer petting the systemd watchdog"
                );
                stalled = true;
            }
        }
    }))
}
