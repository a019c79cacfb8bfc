//! The database side of `sessiond check`: the connection (and its TLS), and
//! sessiond's schema.

use super::{CheckLine, Status};
use crate::config::Config;
use crate::store::{Store, StoreError, SCHEMA_VERSION};

/// Checks the database.
pub async fn check(cfg: &Config) -> Vec<CheckLine> {
    let line = |status, check, detail: String| CheckLine::new(status, "database", check, detail);
    let mut out = Vec::new();
    let store = match Store::connect(&cfg.database).await {
        Ok(s) => {
            out.push(line(Status::Ok, "connection", cfg.database.url.clone()));
            s
        }
        Err(e) => {
            out.push(line(Status::Fail, "connection", e.to_string()));
            return out;
        }
    };
    out.push(match store.check_schema().await {
        Ok(()) => line(Status::Ok, "schema", format!("sessiond's schema is at version {SCHEMA_VERSION}")),
        Err(e @ StoreError::SchemaOutdated { .. }) | Err(e @ StoreError::SchemaTooNew { .. }) => {
            line(Status::Fail, "schema", e.to_string())
        }
        Err(e) => line(Status::Fail, "schema", e.to_string()),
    });
    out
}
