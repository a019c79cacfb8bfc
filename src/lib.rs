//! sessiond reconciles the sessions a controller holds in memory with the rows
//! that describe them in PostgreSQL, repairs the differences safely, and exports
//! the health of the session lifecycle to Prometheus.
//!
//! See `ARCHITECTURE.md` for the code map and the invariants.

#![forbid(unsafe_code)]

pub mod api;
pub mod check;
pub mod cli;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod demo;
pub mod explain;
pub mod http;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod mixin;
pub mod model;
pub mod pgcluster;
pub mod progress;
pub mod reconcile;
pub mod simctl;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod web;

/// Runs CPU-heavy work (parsing a list, sorting the rows, classifying) on the
/// blocking pool, so the runtime's workers go on answering the endpoints. A
/// panic there is a bug, not an input problem: it is raised again here, as if
/// `work` had run inline.
pub(crate) async fn on_blocking_pool<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}
