//! `sessiond check`: is this deployment ready to be trusted? It checks the
//! config, the database and every controller the way a pass would use them,
//! and prints one line per check, `ok`, `warn` or `fail`. It changes nothing
//! anywhere: it never calls a `stop_url`, and never writes to the database.
//!
//! Each side has its own file, producing lines of one [`CheckLine`] type.

pub mod controller;
pub mod database;

use std::fmt;

use serde::Serialize;

use crate::config::Config;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Works, but not as well as it could, or not for every kind of repair.
    Warn,
    /// Does not work, or breaks the contract.
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckLine {
    pub status: Status,
    /// What was checked: `database`, `controller ctrl-a`, …
    pub subject: String,
    pub check: &'static str,
    pub detail: String,
}

impl CheckLine {
    pub fn new(status: Status, subject: &str, check: &'static str, detail: impl Into<String>) -> CheckLine {
        CheckLine { status, subject: subject.to_owned(), check, detail: detail.into() }
    }
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<4}  {:<22} {:<20} {}", self.status.as_str(), self.subject, self.check, self.detail)
    }
}

/// Every check, database first, then each controller in configuration order.
pub async fn run(cfg: &Config) -> Vec<CheckLine> {
    let mut lines = database::check(cfg).await;
    for c in &cfg.controllers {
        lines.extend(controller::check(cfg, c).await);
    }
    lines
}

/// The worst status of the report.
pub fn worst(lines: &[CheckLine]) -> Status {
    lines.iter().map(|l| l.status).max().unwrap_or(Status::Ok)
}
