//! [`Progress`]: when the pass loop last showed it was alive. A leaf: the
//! loop and the reconciler tick it, the systemd watchdog reads it, and it
//! depends on neither.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// When the pass loop last showed it was making progress.
#[derive(Clone, Debug)]
pub struct Progress {
    base: std::time::Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    pub fn new() -> Progress {
        Progress { base: std::time::Instant::now(), last_ms: Arc::new(AtomicU64::new(0)) }
    }

    /// Records progress now.
    pub fn tick(&self) {
        let ms = self.base.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the last tick.
    pub fn since_last(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}
