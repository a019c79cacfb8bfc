//! The database side of a pass: one read-only, repeatable-read transaction
//! that measures the database's clock, streams every live row, the rows of the
//! live controller ids that have none, and the stop intents not settled yet.

use chrono::{DateTime, Utc};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::{ToSql, Type};

use super::mapping::Kind;
use super::{q, Store, StoreError, Tx};
use crate::model::{DbSnapshot, GoneRow, InvalidRow, OpenIntent, RowState, SessionId, SessionRow};

impl Store {
    /// Reads every live row, and the row (in whatever state) of every id in
    /// `live_ids` that has no live row, in one transaction: a constant number of
    /// streamed statements, whatever the number of sessions. Only the ids
    /// without a live row — the zombie and unpersisted candidates, normally a
    /// few — are sent to the server.
    ///
    /// With `created_within`, it also reads the id, owner and creation time of
    /// every row created that recently (by the database's clock), for rapid
    /// creates.
    pub async fn snapshot(
        &mut self,
        live_ids: &[&str],
        created_within: Option<std::time::Duration>,
    ) -> Result<DbSnapshot, StoreError> {
        const WHAT: &str = "read the sessions";
        let table = self.table()?;
        let live_sql = table.live_rows_sql();
        let by_id_sql = table.rows_by_id_sql();
        let vocabulary = table.vocabulary.clone();
        let id_kind = table.id.kind;
        let live_values: Vec<String> = vocabulary.live_values().into_iter().map(str::to_owned).collect();
        let intents_sql = format!(
            "SELECT id, session_id, controller, kind, expires_at < now() FROM {} WHERE settled_at IS NULL",
            table.intents
        );
        let history_sql = format!(
            "SELECT DISTINCT ON (session_id) session_id, old_state, new_state, trigger, at
               FROM {} WHERE session_id = ANY($1::text[]) ORDER BY session_id, id DESC",
            table.audit
        );
        let recent_sql = table.recent_creates_sql();
        let timeout = self.timeout;
        let counter = std::sync::Arc::clone(&self.round_trips);
        let tx = self.begin(WHAT, Tx::Read).await?;
        let work = async {
            // The database's clock, against ours: row times move onto our
            // clock, the one the controller lists were fetched by.
            let sent = Utc::now();
            let db_now: DateTime<Utc> = tx
                .query_typed_one("SELECT clock_timestamp()", &[])
                .await
                .map_err(q(WHAT))?
                .try_get(0)
                .map_err(q(WHAT))?;
            let offset = db_now - (sent + (Utc::now() - sent) / 2);

            // Sized for the usual case (about one live row per live session), so
            // the vector is not reallocated, and briefly held twice, while it fills.
            let mut rows = Vec::with_capacity(live_ids.len() + live_ids.len() / 16 + 16);
            let mut invalid = Vec::new();
            let params: [(&(dyn ToSql + Sync), Type); 1] = [(&live_values, Type::TEXT_ARRAY)];
            let stream = tx.query_typed_raw(&live_sql, params).await.map_err(q(WHAT))?;
            pin_mut!(stream);
            while let Some(r) = stream.try_next().await.map_err(q(WHAT))? {
                convert(&r, &vocabulary, offset, &mut rows, &mut invalid)?;
            }
            let mut have: Vec<&str> = rows.iter().map(|r: &SessionRow| r.id.as_str()).collect();
            have.sort_unstable();
            // Ids the id column's type cannot hold have no row.
            let missing: Vec<&str> = live_ids
                .iter()
                .copied()
                .filter(|id| have.binary_search(id).is_err())
                .filter(|id| match id_kind {
                    Kind::Uuid => uuid::Uuid::parse_str(id).is_ok(),
                    Kind::Int => id.parse::<i64>().is_ok(),
                    _ => true,
                })
                .collect();
            drop(have);
            let mut statements = 3; // the clock, the live rows, the intents
            if !missing.is_empty() {
                statements += 1;
                let params: [(&(dyn ToSql + Sync), Type); 2] =
                    [(&missing, Type::TEXT_ARRAY), (&live_values, Type::TEXT_ARRAY)];
                let stream = tx.query_typed_raw(&by_id_sql, params).await.map_err(q(WHAT))?;
                pin_mut!(stream);
                while let Some(r) = stream.try_next().await.map_err(q(WHAT))? {
                    convert(&r, &vocabulary, offset, &mut rows, &mut invalid)?;
                }
            }
            let mut open_intents = Vec::new();
            for r in tx.query_typed(&intents_sql, &[]).await.map_err(q(WHAT))? {
                open_intents.push(OpenIntent {
                    intent: r.try_get(0).map_err(q(WHAT))?,
                    session_id: r.try_get(1).map_err(q(WHAT))?,
                    controller: r.try_get(2).map_err(q(WHAT))?,
                    kind: r.try_get(3).map_err(q(WHAT))?,
                    expired: r.try_get(4).map_err(q(WHAT))?,
                });
            }
            // Live ids with no row at all: does the audit trail know them?
            let mut gone = Vec::new();
            if !missing.is_empty() {
                let mut found: Vec<&str> =
                    rows.iter().map(|r| r.id.as_str()).chain(invalid.iter().map(|r| r.id.as_str())).collect();
                found.sort_unstable();
                let absent: Vec<&str> = missing.iter().copied().filter(|id| found.binary_search(id).is_err()).collect();
                if !absent.is_empty() {
                    statements += 1;
                    let params: [(&(dyn ToSql + Sync), Type); 1] = [(&absent, Type::TEXT_ARRAY)];
                    for r in tx.query_typed(&history_sql, &params).await.map_err(q(WHAT))? {
                        let at: DateTime<Utc> = r.try_get(4).map_err(q(WHAT))?;
                        gone.push(GoneRow {
                            id: SessionId::from_row(r.try_get::<_, String>(0).map_err(q(WHAT))?),
                            old_state: r.try_get(1).map_err(q(WHAT))?,
                            new_state: r.try_get(2).map_err(q(WHAT))?,
                            trigger: r.try_get(3).map_err(q(WHAT))?,
                            at: at - offset,
                        });
                    }
                }
            }
            // Rows created since the previous pass, for rapid creates.
            let mut recent_creates = Vec::new();
            if let (Some(sql), Some(lookback)) = (&recent_sql, created_within) {
                statements += 1;
                let ms = i64::try_from(lookback.as_millis()).unwrap_or(i64::MAX);
                let params: [(&(dyn ToSql + Sync), Type); 1] = [(&ms, Type::INT8)];
                let stream = tx.query_typed_raw(sql, params).await.map_err(q(WHAT))?;
                pin_mut!(stream);
                while let Some(r) = stream.try_next().await.map_err(q(WHAT))? {
                    recent_creates.push(crate::model::RecentCreate {
                        id: r.try_get(0).map_err(q(WHAT))?,
                        owner: r.try_get(1).map_err(q(WHAT))?,
                        created_at: r.try_get(2).map_err(q(WHAT))?,
                    });
                }
            }
            let snapshot = DbSnapshot {
                rows,
                invalid_rows: invalid,
                read_at: sent,
                open_intents,
                gone,
                recent_creates,
                db_now: Some(db_now),
            };
            Ok::<_, StoreError>((snapshot, statements))
        };
        let (snapshot, statements) =
            tokio::time::timeout(timeout, work).await.map_err(|_| StoreError::Timeout { what: WHAT, timeout })??;
        tokio::time::timeout(timeout, tx.commit())
            .await
            .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
            .map_err(q(WHAT))?;
        counter.fetch_add(statements + 1, std::sync::atomic::Ordering::Relaxed);
        Ok(snapshot)
    }
}

/// One row, as the select list orders it: id, state, created_at, changed_at,
/// xmin, owner, instance, deleted. Times move onto sessiond's clock. A row whose
/// state the vocabulary does not know is an invalid row, not an error.
fn convert(
    r: &tokio_postgres::Row,
    vocabulary: &crate::config::Vocabulary,
    offset: chrono::Duration,
    rows: &mut Vec<SessionRow>,
    invalid: &mut Vec<InvalidRow>,
) -> Result<(), StoreError> {
    const WHAT: &str = "read the sessions";
    let id: String = r.try_get(0).map_err(q(WHAT))?;
    let value: Option<String> = r.try_get(1).map_err(q(WHAT))?;
    let deleted: bool = r.try_get(7).map_err(q(WHAT))?;
    let instance: Option<String> = r.try_get(6).map_err(q(WHAT))?;
    let state = if deleted { Some(RowState::Deleted) } else { value.as_deref().and_then(|v| vocabulary.read(v)) };
    let Some(state) = state else {
        invalid.push(InvalidRow { id: SessionId::from_row(id), value, controller_instance: instance });
        return Ok(());
    };
    let created_at: DateTime<Utc> = r.try_get(2).map_err(q(WHAT))?;
    let changed_at: Option<DateTime<Utc>> = r.try_get(3).map_err(q(WHAT))?;
    rows.push(SessionRow {
        id: SessionId::from_row(id),
        owner_id: r.try_get(5).map_err(q(WHAT))?,
        controller_instance: instance,
        state,
        created_at: created_at - offset,
        changed_at: changed_at.unwrap_or(created_at) - offset,
        version: r.try_get(4).map_err(q(WHAT))?,
    });
    Ok(())
}
