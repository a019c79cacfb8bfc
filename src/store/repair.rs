//! The repairs: row updates and inserts (each with its audit row, in one
//! statement per batch), and stop intents recorded before a stop is sent and
//! settled after it.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::types::{ToSql, Type};

use super::{
    is_row_error, outcomes, q, row_result_of, AuditContext, RowInsert, RowResult, RowUpdate, Settle, Settled,
    StopIntent, Store, StoreError, Tx,
};
use crate::model::RowState;

impl Store {
    /// Applies row updates in one transaction. Each applies only if the row still
    /// has the version it was classified with, and is not locked by anyone
    /// else; the others are conflicts. A batch that fails on a row's data is
    /// retried a row at a time, so only the offending row is lost.
    pub async fn update_rows(
        &mut self,
        batch: &[RowUpdate],
        audit: &AuditContext,
    ) -> Result<Vec<RowResult>, StoreError> {
        match self.update_rows_once(batch, audit).await {
            Err(e) if is_row_error(&e) && batch.len() > 1 => {
                let mut out = Vec::with_capacity(batch.len());
                for one in batch {
                    out.push(match self.update_rows_once(std::slice::from_ref(one), audit).await {
                        Ok(mut o) => o.pop().unwrap_or(RowResult::Conflict),
                        Err(e) if is_row_error(&e) => row_result_of(&e),
                        Err(e) => return Err(e),
                    });
                }
                Ok(out)
            }
            Err(e) if is_row_error(&e) => Ok(vec![row_result_of(&e)]),
            other => other,
        }
    }

    async fn update_rows_once(
        &mut self,
        batch: &[RowUpdate],
        audit: &AuditContext,
    ) -> Result<Vec<RowResult>, StoreError> {
        const WHAT: &str = "apply row repairs";
        let table = self.table()?;
        let sql = table.update_sql();
        let mut values = Vec::with_capacity(batch.len());
        for u in batch {
            values.push(written(table, u.to)?.to_owned());
        }
        let ids: Vec<&str> = batch.iter().map(|u| u.id.as_str()).collect();
        let versions: Vec<&str> = batch.iter().map(|u| u.version.as_str()).collect();
        let owners: Vec<Option<&str>> = batch.iter().map(|u| u.owner_id.as_deref()).collect();
        let instances: Vec<Option<&str>> = batch.iter().map(|u| u.controller_instance.as_deref()).collect();
        let end_reasons: Vec<Option<&str>> = batch.iter().map(|u| u.end_reason).collect();
        let ending: Vec<bool> = batch.iter().map(|u| matches!(u.to, RowState::Stopped | RowState::Failed)).collect();
        let from: Vec<&str> = batch.iter().map(|u| u.from.as_str()).collect();
        let to: Vec<&str> = batch.iter().map(|u| u.to.as_str()).collect();
        let reasons: Vec<&str> = batch.iter().map(|u| u.reason).collect();
        let details: Vec<String> = batch.iter().map(|u| u.details.to_string()).collect();
        let params: [(&(dyn ToSql + Sync), Type); 12] = [
            (&ids, Type::TEXT_ARRAY),
            (&versions, Type::TEXT_ARRAY),
            (&values, Type::TEXT_ARRAY),
            (&owners, Type::TEXT_ARRAY),
            (&instances, Type::TEXT_ARRAY),
            (&end_reasons, Type::TEXT_ARRAY),
            (&ending, Type::BOOL_ARRAY),
            (&from, Type::TEXT_ARRAY),
            (&to, Type::TEXT_ARRAY),
            (&reasons, Type::TEXT_ARRAY),
            (&details, Type::TEXT_ARRAY),
            (&audit.actor, Type::TEXT),
        ];
        let rows = self.write(WHAT, &sql, &params).await?;
        Ok(outcomes(ids.iter().copied(), rows.iter().filter_map(|r| r.try_get::<_, String>(0).ok())))
    }

    /// Inserts rows for live sessions that have none, each only if no row with its
    /// id exists and its owner has no live row; anything else is a conflict. A
    /// batch that fails on a row's data is retried a row at a time.
    pub async fn insert_rows(
        &mut self,
        batch: &[RowInsert],
        audit: &AuditContext,
    ) -> Result<Vec<RowResult>, StoreError> {
        match self.insert_rows_once(batch, audit).await {
            Err(e) if is_row_error(&e) && batch.len() > 1 => {
                let mut out = Vec::with_capacity(batch.len());
                for one in batch {
                    out.push(match self.insert_rows_once(std::slice::from_ref(one), audit).await {
                        Ok(mut o) => o.pop().unwrap_or(RowResult::Conflict),
                        Err(e) if is_row_error(&e) => row_result_of(&e),
                        Err(e) => return Err(e),
                    });
                }
                Ok(out)
            }
            Err(e) if is_row_error(&e) => Ok(vec![row_result_of(&e)]),
            other => other,
        }
    }

    async fn insert_rows_once(
        &mut self,
        batch: &[RowInsert],
        audit: &AuditContext,
    ) -> Result<Vec<RowResult>, StoreError> {
        const WHAT: &str = "insert unpersisted rows";
        let table = self.table()?;
        let sql = table.insert_sql();
        let mut values = Vec::with_capacity(batch.len());
        for u in batch {
            values.push(written(table, u.state)?.to_owned());
        }
        let ids: Vec<&str> = batch.iter().map(|u| u.id.as_str()).collect();
        let states: Vec<&str> = batch.iter().map(|u| u.state.as_str()).collect();
        let owners: Vec<&str> = batch.iter().map(|u| u.owner_id.as_str()).collect();
        let instances: Vec<&str> = batch.iter().map(|u| u.controller_instance.as_str()).collect();
        let created: Vec<chrono::DateTime<chrono::Utc>> = batch.iter().map(|u| u.created_at).collect();
        let details: Vec<String> = batch.iter().map(|u| u.details.to_string()).collect();
        let params: [(&(dyn ToSql + Sync), Type); 8] = [
            (&ids, Type::TEXT_ARRAY),
            (&values, Type::TEXT_ARRAY),
            (&states, Type::TEXT_ARRAY),
            (&owners, Type::TEXT_ARRAY),
            (&instances, Type::TEXT_ARRAY),
            (&created, Type::TIMESTAMPTZ_ARRAY),
            (&details, Type::TEXT_ARRAY),
            (&audit.actor, Type::TEXT),
        ];
        let rows = self.write(WHAT, &sql, &params).await?;
        Ok(outcomes(ids.iter().copied(), rows.iter().filter_map(|r| r.try_get::<_, String>(0).ok())))
    }

    /// Runs one write statement in its own transaction, fenced by the lease if
    /// there is one, and commits.
    pub(super) async fn write(
        &mut self,
        what: &'static str,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.write_checked(what, sql, params, true).await
    }

    /// As [`Store::write`], and with `pause`, refused while an operator has
    /// paused sessiond. Settling stops already sent is bookkeeping, not a
    /// repair: it goes on while paused; so does setting the pause itself.
    pub(super) async fn write_checked(
        &mut self,
        what: &'static str,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
        pause: bool,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let timeout = self.timeout;
        self.count(2); // the statement, COMMIT
        let tx = self.begin_write(what, pause).await?;
        let rows = statement(&tx, what, timeout, sql, params).await?;
        commit(tx, what, timeout).await?;
        Ok(rows)
    }

    /// A write transaction, fenced by the lease if there is one and, with
    /// `pause`, refused while an operator has paused sessiond.
    async fn begin_write(
        &mut self,
        what: &'static str,
        pause: bool,
    ) -> Result<tokio_postgres::Transaction<'_>, StoreError> {
        let timeout = self.timeout;
        let fence = self.fence.clone();
        let leases = self.own("sessiond_leases");
        let pause_table = self.own("sessiond_pause");
        let counter = std::sync::Arc::clone(&self.round_trips);
        let tx = self.begin(what, Tx::Write).await?;
        if let Some(fence) = &fence {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            super::lease::check(&tx, &leases, fence, timeout).await?;
        }
        if let Some(pause_table) = pause.then_some(&pause_table) {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            super::operator::check_not_paused(&tx, pause_table, timeout).await?;
        }
        Ok(tx)
    }

    /// Records the intent to stop these sessions, before any request is sent.
    /// An intent is recorded only for a row still exactly as classified and not
    /// locked by the application at this instant, and only if no other stop of
    /// the same session is in flight (whoever sends it). The transaction is
    /// short: no lock is held while the stops are sent.
    ///
    /// `evidence_since` is when the pass began gathering the evidence for
    /// these stops, by the database's clock: a session with a stop settled as
    /// done from then on was stopped since (by another process, say, which
    /// settled its stop while this one was being recorded, and could not touch
    /// the row this statement held), so its stop is a conflict too.
    ///
    /// Returns each stop's intent id, or `None` for a conflict.
    pub async fn open_stops(
        &mut self,
        stops: &[StopIntent],
        audit: &AuditContext,
        expires_in: Duration,
        evidence_since: DateTime<Utc>,
    ) -> Result<Vec<Option<i64>>, StoreError> {
        const WHAT: &str = "record stop intents";
        let table = self.table()?;
        let sql = table.open_stops_sql();
        let stale_sql = table.stale_stops_sql();
        let ids: Vec<&str> = stops.iter().map(|z| z.id.as_str()).collect();
        let versions: Vec<&str> = stops.iter().map(|z| z.version.as_str()).collect();
        let states: Vec<&str> = stops.iter().map(|z| z.state.as_str()).collect();
        let ends: Vec<bool> = stops.iter().map(|z| z.end_row).collect();
        let controllers: Vec<&str> = stops.iter().map(|z| z.controller.as_str()).collect();
        let kinds: Vec<&str> = stops.iter().map(|z| z.reason).collect();
        let details: Vec<String> = stops.iter().map(|z| z.details.to_string()).collect();
        let expires_ms = i64::try_from(expires_in.as_millis()).unwrap_or(i64::MAX);
        let params: [(&(dyn ToSql + Sync), Type); 10] = [
            (&ids, Type::TEXT_ARRAY),
            (&versions, Type::TEXT_ARRAY),
            (&states, Type::TEXT_ARRAY),
            (&ends, Type::BOOL_ARRAY),
            (&controllers, Type::TEXT_ARRAY),
            (&kinds, Type::TEXT_ARRAY),
            (&details, Type::TEXT_ARRAY),
            (&audit.pass_id, Type::TEXT),
            (&audit.actor, Type::TEXT),
            (&expires_ms, Type::INT8),
        ];
        let timeout = self.timeout;
        self.count(2); // the statement, COMMIT
        let counter = std::sync::Arc::clone(&self.round_trips);
        let tx = self.begin_write(WHAT, true).await?;
        let rows = statement(&tx, WHAT, timeout, &sql, &params).await?;
        let mut by_id: HashMap<String, i64> = HashMap::with_capacity(rows.len());
        for r in &rows {
            by_id.insert(r.try_get(1).map_err(q(WHAT))?, r.try_get(0).map_err(q(WHAT))?);
        }
        // A second statement, so it sees what committed while the insert
        // waited for another process's intent of the same session.
        if !by_id.is_empty() {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let opened: Vec<i64> = by_id.values().copied().collect();
            let params: [(&(dyn ToSql + Sync), Type); 2] =
                [(&opened, Type::INT8_ARRAY), (&evidence_since, Type::TIMESTAMPTZ)];
            let stale = statement(&tx, WHAT, timeout, &stale_sql, &params).await?;
            if !stale.is_empty() {
                let mut refused = std::collections::HashSet::with_capacity(stale.len());
                for r in &stale {
                    refused.insert(r.try_get::<_, i64>(0).map_err(q(WHAT))?);
                }
                tracing::info!(
                    stops = refused.len(),
                    "stops not sent: their sessions were stopped after this pass gathered its evidence"
                );
                by_id.retain(|_, intent| !refused.contains(intent));
            }
        }
        commit(tx, WHAT, timeout).await?;
        Ok(ids.iter().map(|id| by_id.get(*id).copied()).collect())
    }

    /// Settles stop intents with what became of them, in one statement: the
    /// intent is closed; for a stop that took effect, the audit row is written
    /// and the session's row touched (or, for a duplicate, ended), but only if
    /// the row is still as it was when the intent was recorded and nobody holds
    /// it: an application that re-activated the session meanwhile keeps its
    /// write. An intent already settled (by another pass) is left alone, so a
    /// stop is audited exactly once. Returns, per intent, whether this call
    /// settled it and whether the row was changed.
    pub async fn settle_stops(&mut self, settles: &[Settle], audit: &AuditContext) -> Result<Vec<Settled>, StoreError> {
        const WHAT: &str = "settle stop intents";
        let table = self.table()?;
        let sql = table.settle_stops_sql();
        let stopped = written(table, RowState::Stopped)?.to_owned();
        let ids: Vec<i64> = settles.iter().map(|s| s.intent).collect();
        let outcomes: Vec<&str> = settles.iter().map(|s| s.outcome.as_str()).collect();
        let details: Vec<String> = settles.iter().map(|s| s.details.to_string()).collect();
        let params: [(&(dyn ToSql + Sync), Type); 6] = [
            (&ids, Type::INT8_ARRAY),
            (&outcomes, Type::TEXT_ARRAY),
            (&details, Type::TEXT_ARRAY),
            (&audit.actor, Type::TEXT),
            (&stopped, Type::TEXT),
            (&audit.term, Type::INT8),
        ];
        let rows = self.write_checked(WHAT, &sql, &params, false).await?;
        let mut done: HashMap<i64, bool> = HashMap::with_capacity(rows.len());
        for r in &rows {
            done.insert(r.try_get(0).map_err(q(WHAT))?, r.try_get(1).map_err(q(WHAT))?);
        }
        Ok(ids
            .iter()
            .map(|id| match done.get(id) {
                Some(&row_updated) => Settled { by_us: true, row_updated },
                None => Settled { by_us: false, row_updated: false },
            })
            .collect())
    }
}

/// One statement of a write transaction, within the store's timeout.
async fn statement(
    tx: &tokio_postgres::Transaction<'_>,
    what: &'static str,
    timeout: Duration,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    tokio::time::timeout(timeout, tx.query_typed(sql, params))
        .await
        .map_err(|_| StoreError::Timeout { what, timeout })?
        .map_err(q(what))
}

async fn commit(tx: tokio_postgres::Transaction<'_>, what: &'static str, timeout: Duration) -> Result<(), StoreError> {
    tokio::time::timeout(timeout, tx.commit())
        .await
        .map_err(|_| StoreError::Timeout { what, timeout })?
        .map_err(q(what))
}

/// The table's value for a state a repair writes. The config refuses repairs
/// whose state has no value, so a missing one here is a row-level failure.
fn written(table: &super::Table, state: RowState) -> Result<&str, StoreError> {
    table.vocabulary.written(state).ok_or_else(|| {
        StoreError::Mapping(super::MappingError {
            table: table.table.clone(),
            problems: vec![format!("sessions.states.{} has no value to write", state.as_str())],
        })
    })
}
