//! One leader among several replicas (`[ha] enabled`): a lease in PostgreSQL,
//! renewed in the background on a connection of its own, so a long pass never
//! delays it.
//!
//! The database decides who holds the lease, by its own clock
//! (`store::lease`). Locally, a replica counts its lease as valid until the
//! moment it *sent* its last successful renewal plus the lease, less a margin:
//! the database's expiry can only be later than that, so a leader that cannot
//! renew (partitioned, paused) stops acting before its lease can have expired
//! anywhere. Every repair is also fenced in the database by the lease's term,
//! so a leader paused past its lease writes nothing when it wakes. What remains
//! is documented in `docs/operations.md` ("Several replicas").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;
use crate::store::{Fence, Store, StoreError};

/// The name of the one lease of a sessiond deployment (per `database.schema`).
pub const LEASE_NAME: &str = "reconciler";

/// What this replica knows of the lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseView {
    /// The last attempt to acquire or renew reached the database, at this instant.
    pub reached_database: Option<Instant>,
    /// This replica holds the lease until this instant (local, conservative).
    pub valid_until: Option<Instant>,
    /// Our term while we lead; the lease's term as last read otherwise.
    pub term: Option<i64>,
    /// Who holds it, as last read.
    pub holder: Option<String>,
    /// While another holds it: how long until it expires, as last read.
    pub expires_in: Option<Duration>,
    /// The term this replica last held, until it learns it lost it.
    pub leading: Option<i64>,
}

/// This replica's side of the lease. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct Lease {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    holder: String,
    duration: Duration,
    view: Mutex<LeaseView>,
    transitions: AtomicU64,
    /// Wakes the pass loop when this replica becomes the leader.
    gained: tokio::sync::Notify,
    /// The database the lease lives in; a reload may change it.
    database: Mutex<Option<DatabaseConfig>>,
}

impl Lease {
    /// A lease for this process, held for `duration` at a time.
    pub fn new(duration: Duration) -> Lease {
        let holder = format!(
            "{}/{}/{}",
            crate::reconcile::hostname(),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Lease {
            inner: Arc::new(Inner {
                holder,
                duration,
                view: Mutex::new(LeaseView::default()),
                transitions: AtomicU64::new(0),
                gained: tokio::sync::Notify::new(),
                database: Mutex::new(None),
            }),
        }
    }

    /// This replica's identity in the lease row and the audit trail.
    pub fn holder(&self) -> &str {
        &self.inner.holder
    }

    pub fn view(&self) -> LeaseView {
        self.lock_view().clone()
    }

    /// Whether this replica holds the lease at this instant.
    pub fn is_valid_now(&self) -> bool {
        self.view().valid_until.is_some_and(|until| Instant::now() < until)
    }

    /// The fence for this replica's writes, while it holds the lease.
    pub fn fence(&self) -> Option<Fence> {
        let view = self.view();
        let held = view.valid_until.is_some_and(|until| Instant::now() < until);
        match (held, view.term) {
            (true, Some(term)) => Some(Fence { name: LEASE_NAME.to_owned(), holder: self.inner.holder.clone(), term }),
            _ => None,
        }
    }

    /// The last attempt to acquire or renew the lease reached the database,
    /// within the last lease.
    pub fn reaches_database(&self) -> bool {
        self.view().reached_database.is_some_and(|at| at.elapsed() < self.inner.duration)
    }

    /// How long the lease is held for at a time.
    pub fn duration(&self) -> Duration {
        self.inner.duration
    }

    /// Times this replica became, or stopped being, the leader.
    pub fn transitions(&self) -> u64 {
        self.inner.transitions.load(Ordering::Relaxed)
    }

    /// How long local validity is cut short of the lease: room for the two
    /// clocks' rates to differ and for this process to be scheduled late.
    fn margin(&self) -> Duration {
        (self.inner.duration / 10).max(Duration::from_millis(100))
    }

    /// One attempt to acquire or renew the lease. Returns whether we hold it.
    pub async fn renew(&self, store: &mut Store) -> Result<bool, StoreError> {
        let sent = Instant::now();
        let result = store.acquire_lease(LEASE_NAME, &self.inner.holder, self.inner.duration).await;
        let held = self.settle(sent, result)?;
        if !held {
            let row = store.lease_holder(LEASE_NAME).await?;
            let mut view = self.lock_view();
            view.expires_in = row.as_ref().map(|r| r.remaining);
            view.holder = row.as_ref().map(|r| r.holder.clone());
            view.term = row.map(|r| r.term);
        }
        Ok(held)
    }

    /// Takes in the answer to an attempt sent at `sent`.
    fn settle(&self, sent: Instant, result: Result<Option<i64>, StoreError>) -> Result<bool, StoreError> {
        let mut view = self.lock_view();
        let was_valid = view.valid_until.is_some_and(|until| Instant::now() < until);
        match result {
            Ok(Some(term)) => {
                view.reached_database = Some(Instant::now());
                view.expires_in = None;
                if view.leading != Some(term) {
                    if let Some(old) = view.leading {
                        // Our own lease ran out before we renewed it: a new term.
                        self.inner.transitions.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(term = old, "this replica's lease ran out before it could renew it");
                    }
                    self.inner.transitions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(term, holder = %self.inner.holder, "this replica leads");
                    view.leading = Some(term);
                    self.inner.gained.notify_one();
                } else if !was_valid {
                    tracing::warn!(term, "renewed the lease after it had lapsed locally; passes resume");
                    self.inner.gained.notify_one();
                }
                view.valid_until = Some(sent + self.inner.duration.saturating_sub(self.margin()));
                view.term = Some(term);
                view.holder = Some(self.inner.holder.clone());
                Ok(true)
            }
            Ok(None) => {
                view.reached_database = Some(Instant::now());
                if let Some(term) = view.leading.take() {
                    self.inner.transitions.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(term, "this replica lost the lease; another leads");
                }
                view.valid_until = None;
                Ok(false)
            }
            // A lease held stays valid until it runs out on its own.
            Err(e) => {
                view.reached_database = None;
                Err(e)
            }
        }
    }

    fn lock_view(&self) -> std::sync::MutexGuard<'_, LeaseView> {
        self.inner.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the lease up, if held (shutdown, the end of `once`), so another
    /// replica takes over at once instead of after the lease.
    pub async fn release(&self, store: &mut Store) {
        let view = self.view();
        if let (Some(_), Some(term)) = (view.valid_until, view.term) {
            {
                let mut v = self.lock_view();
                v.valid_until = None;
                v.leading = None;
            }
            match store.release_lease(LEASE_NAME, &self.inner.holder, term).await {
                Ok(()) => tracing::info!(term, "lease released"),
                Err(e) => tracing::warn!(error = %e, "cannot release the lease; it expires on its own"),
            }
        }
    }

    /// The database the lease lives in, from the (re)loaded config.
    pub fn set_database(&self, database: &DatabaseConfig) {
        *self.inner.database.lock().unwrap_or_else(|p| p.into_inner()) = Some(database.clone());
    }

    fn database(&self) -> Option<DatabaseConfig> {
        self.inner.database.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Resolves when this replica next becomes the leader.
    pub async fn gained(&self) {
        self.inner.gained.notified().await;
    }

    /// Acquires and renews the lease, every third of its duration, until
    /// `shutdown`; then releases it. A follower also tries again the moment
    /// the leader's lease runs out, so a failover takes about `lease`.
    /// Failures are logged and retried within a second; a lease held runs
    /// out on its own meanwhile.
    pub async fn run(self, shutdown: CancellationToken) {
        self.keep(None, shutdown).await;
    }

    /// Keeps renewing a lease just acquired over `store` (see [`Lease::run`]),
    /// until `shutdown`; then releases it.
    pub async fn hold(self, store: Store, shutdown: CancellationToken) {
        let kept = self.database().map(|db| (db, store));
        self.keep(kept, shutdown).await;
    }

    async fn keep(self, store: Option<(DatabaseConfig, Store)>, shutdown: CancellationToken) {
        let every = (self.inner.duration / 3).max(Duration::from_millis(100));
        let retry = every.min(Duration::from_secs(1));
        let mut next = if store.is_some() { every } else { Duration::ZERO };
        let mut store = store;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(next) => {}
            }
            next = every;
            let Some(database) = self.database() else { continue };
            if store.as_ref().is_none_or(|(db, s)| *db != database || s.is_closed()) {
                store = None;
                match Store::connect(&database).await {
                    Ok(s) => store = Some((database, s)),
                    Err(e) => {
                        self.lock_view().reached_database = None;
                        tracing::warn!(error = %e, "lease: cannot connect to the database; a lease held runs out on its own");
                        next = retry;
                        continue;
                    }
                }
            }
            let Some((_, s)) = store.as_mut() else { continue };
            match self.renew(s).await {
                Ok(true) => {}
                Ok(false) => {
                    if let Some(remaining) = self.view().expires_in {
                        next = next.min(remaining + Duration::from_millis(20));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease: cannot renew; a lease held runs out on its own");
                    store = None;
                    next = retry;
                }
            }
        }
        if let Some((_, s)) = store.as_mut() {
            self.release(s).await;
        }
    }
}
