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
