//! What an operator asks of the database: the pause every replica honours,
//! actions on the audit trail, audit retention, and one session explained
//! (its row as mapped and its audit history).

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};

use super::{q, Store, StoreError};

/// The one row of `sessiond_pause`.
const PAUSE_NAME: &str = "default";

/// The audit trail's `session_id` for an action that concerns no session.
pub const NO_SESSION: &str = "*";

/// Who paused, when and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pause {
    pub by: String,
    pub at: DateTime<Utc>,
    pub reason: Option<String>,
}

/// One session's row, as the mapping reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RowView {
    /// The table's own value, and the canonical state (`None` for a value in
    /// no list of the mapping).
    pub value: Option<String>,
    pub state: Option<&'static str>,
    pub owner_id: Option<String>,
    pub controller_instance: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When it last changed, as far as the table says (updated or ended).
    pub changed_at: DateTime<Utc>,
    pub deleted_flag: bool,
}

/// One audit row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AuditView {
    pub at: DateTime<Utc>,
    pub trigger: String,
    pub actor: String,
    pub old_state: Option<String>,
    pub new_state: Option<String>,
    pub reason: Option<String>,
    pub details: serde_json::Value,
}

impl Store {
    /// The pause, if sessiond is paused.
    pub async fn pause_state(&self) -> Result<Option<Pause>, StoreError> {
        const WHAT: &str = "read the pause";
        let sql = format!(
            "SELECT changed_by, changed_at, reason FROM {} WHERE name = $1 AND paused",
            self.own("sessiond_pause")
        );
        let rows = self.bounded(WHAT, self.client.query_typed(&sql, &[(&PAUSE_NAME, Type::TEXT)])).await?;
        match rows.first() {
            None => Ok(None),
            Some(r) => Ok(Some(Pause {
                by: r.try_get(0).map_err(q(WHAT))?,
                at: r.try_get(1).map_err(q(WHAT))?,
                reason: r.try_get(2).map_err(q(WHAT))?,
            })),
        }
    }

    /// Pauses or resumes every replica, and audits it, in one transaction.
    /// Returns whether anything changed (pausing a paused sessiond does not).
    pub async fn set_pause(&mut self, paused: bool, actor: &str, reason: Option<&str>) -> Result<bool, StoreError> {
        const WHAT: &str = "pause or resume";
        let sql = format!(
            "WITH changed AS (
                    INSERT INTO {pause} (name, paused, changed_by, changed_at, reason)
                    VALUES ($1, $2, $3, now(), $4)
                    ON CONFLICT (name) DO UPDATE SET paused = $2, changed_by = $3, changed_at = now(), reason = $4
                    WHERE {pause}.paused IS DISTINCT FROM $2
                    RETURNING 1)
             INSERT INTO {audit} (session_id, trigger, actor, reason, details)
             SELECT $5, 'admin', $3, CASE WHEN $2 THEN 'pause' ELSE 'resume' END,
                    jsonb_build_object('reason', $4::text)
              WHERE EXISTS (SELECT 1 FROM changed)
             RETURNING 1",
            pause = self.own("sessiond_pause"),
            audit = self.own("session_audit"),
        );
        let reason = reason.map(str::to_owned);
        let params: [(&(dyn ToSql + Sync), Type); 5] = [
            (&PAUSE_NAME, Type::TEXT),
            (&paused, Type::BOOL),
            (&actor, Type::TEXT),
            (&reason, Type::TEXT),
            (&NO_SESSION, Type::TEXT),
        ];
        let rows = self.write_checked(WHAT, &sql, &params, false).await?;
        Ok(!rows.is_empty())
    }

    /// Writes one operator action (a pass asked for, a guard released) to the
    /// audit trail.
    pub async fn audit_action(
        &mut self,
        action: &str,
        actor: &str,
        details: &serde_json::Value,
    ) -> Result<(), StoreError> {
        const WHAT: &str = "audit an operator action";
        let sql = format!(
            "INSERT INTO {} (session_id, trigger, actor, reason, details) VALUES ($1, 'admin', $2, $3, $4::text::jsonb)",
            self.own("session_audit")
        );
        let details = details.to_string();
        let params: [(&(dyn ToSql + Sync), Type); 4] =
            [(&NO_SESSION, Type::TEXT), (&actor, Type::TEXT), (&action, Type::TEXT), (&details, Type::TEXT)];
        self.write_checked(WHAT, &sql, &params, false).await.map(|_| ())
    }

    /// Deletes up to `batch` audit rows older than `retain`, through the one
    /// function allowed to. Returns how many went.
    pub async fn prune_audit(&mut self, retain: std::time::Duration, batch: i32) -> Result<u64, StoreError> {
        const WHAT: &str = "prune the audit trail";
        let sql = format!("SELECT {}.sessiond_audit_prune(make_interval(secs => $1), $2)", self.schema.quoted());
        let secs = retain.as_secs_f64();
        let params: [(&(dyn ToSql + Sync), Type); 2] = [(&secs, Type::FLOAT8), (&batch, Type::INT4)];
        let rows = self.write(WHAT, &sql, &params).await?;
        let n: i64 = rows.first().map(|r| r.try_get(0)).transpose().map_err(q(WHAT))?.unwrap_or(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// One session's row (as mapped), and its newest `limit` audit rows,
    /// newest first, in one statement. `id` must already match the id pattern.
    pub async fn explain(&self, id: &str, limit: i64) -> Result<(Option<RowView>, Vec<AuditView>), StoreError> {
        const WHAT: &str = "read one session";
        let table = self.table()?;
        // One round trip: the row (if any) beside the trail as JSON. The trail
        // is read newest first by (session_id, at), its index: ordered by id
        // alone, the planner walks the whole trail backwards.
        let sql = format!(
            "WITH r AS ({row})
             SELECT r.*, (SELECT coalesce(json_agg(a ORDER BY a.at DESC, a.id DESC), '[]')::text FROM (
                        SELECT id, at, trigger, actor, old_state, new_state, reason, details
                          FROM {audit} WHERE session_id = $1 ORDER BY at DESC, id DESC LIMIT $2) a)
               FROM (SELECT 1) one LEFT JOIN r ON true",
            row = table.row_by_id_sql(),
            audit = table.audit
        );
        let rows =
            self.bounded(WHAT, self.client.query_typed(&sql, &[(&id, Type::TEXT), (&limit, Type::INT8)])).await?;
        let Some(r) = rows.first() else { return Ok((None, Vec::new())) };
        let trail: String = r.try_get(8).map_err(q(WHAT))?;
        let audit: Vec<AuditView> = serde_json::from_str(&trail)
            .map_err(|e| StoreError::Corrupt { what: WHAT, detail: format!("the audit trail as JSON: {e}") })?;
        let found: Option<String> = r.try_get(0).map_err(q(WHAT))?;
        if found.is_none() {
            return Ok((None, audit));
        }
        let value: Option<String> = r.try_get(1).map_err(q(WHAT))?;
        let deleted_flag: bool = r.try_get(7).map_err(q(WHAT))?;
        let state = if deleted_flag {
            Some(crate::model::RowState::Deleted)
        } else {
            value.as_deref().and_then(|v| table.vocabulary.read(v))
        };
        let created_at: DateTime<Utc> = r.try_get(2).map_err(q(WHAT))?;
        let changed_at: Option<DateTime<Utc>> = r.try_get(3).map_err(q(WHAT))?;
        let row = RowView {
            value,
            state: state.map(|s| s.as_str()),
            owner_id: r.try_get(5).map_err(q(WHAT))?,
            controller_instance: r.try_get(6).map_err(q(WHAT))?,
            created_at,
            changed_at: changed_at.unwrap_or(created_at),
            deleted_flag,
        };
        Ok((Some(row), audit))
    }
}

/// Checks, inside a write transaction, that sessiond is not paused, and holds
/// the pause row (FOR SHARE) until the transaction ends, so a pause waits for
/// a batch in flight and applies before the next.
pub(super) async fn check_not_paused(
    tx: &tokio_postgres::Transaction<'_>,
    pause: &str,
    timeout: std::time::Duration,
) -> Result<(), StoreError> {
    const WHAT: &str = "check the pause";
    let sql = format!("SELECT paused, changed_by FROM {pause} WHERE name = $1 FOR SHARE");
    let rows = tokio::time::timeout(timeout, tx.query_typed(&sql, &[(&PAUSE_NAME, Type::TEXT)]))
        .await
        .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
        .map_err(q(WHAT))?;
    match rows.first() {
        Some(r) if r.try_get::<_, bool>(0).map_err(q(WHAT))? => {
            Err(StoreError::Paused { by: r.try_get(1).map_err(q(WHAT))? })
        }
        _ => Ok(()),
    }
}
