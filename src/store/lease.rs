//! The leader lease in the database, and the fence every repair passes.
//!
//! A lease is one row of `sessiond_leases`, acquired and renewed by single
//! statements that use the database's clock only. Its `term` increases on every
//! takeover. A write transaction of a fenced store first locks the lease row
//! (`FOR SHARE`) and checks that it still names this holder and term and has
//! not expired: a takeover waits for the transaction to end, and a leader that
//! lost its lease (paused, partitioned) writes nothing.

use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};

use super::{q, Store, StoreError, Tx};

/// The lease a store's writes are fenced by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub name: String,
    pub holder: String,
    pub term: i64,
}

/// What the lease row says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub holder: String,
    pub term: i64,
    /// Not expired by the database's clock.
    pub valid: bool,
    /// How long until it expires, by the database's clock (zero once expired).
    pub remaining: Duration,
}

impl Store {
    /// Fences this store's writes by `fence` (or stops fencing them).
    pub fn set_fence(&mut self, fence: Option<Fence>) {
        self.fence = fence;
    }

    /// Acquires or renews the lease `name` for `holder`, for `lease`: a renewal
    /// while it holds it, a takeover (a new term) when it has expired. Returns
    /// the term held, or `None` while someone else holds it.
    pub async fn acquire_lease(
        &mut self,
        name: &str,
        holder: &str,
        lease: Duration,
    ) -> Result<Option<i64>, StoreError> {
        const WHAT: &str = "acquire the lease";
        let sql = format!(
            "INSERT INTO {t} AS l (name, holder, term, renewed_at, expires_at)
             VALUES ($1, $2, 1, now(), now() + $3::bigint * interval '1 millisecond')
             ON CONFLICT (name) DO UPDATE
                SET holder = EXCLUDED.holder,
                    term = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > now() THEN l.term
                                ELSE l.term + 1 END,
                    renewed_at = now(),
                    expires_at = EXCLUDED.expires_at
              WHERE (l.holder = EXCLUDED.holder AND l.expires_at > now()) OR l.expires_at <= now()
             RETURNING term",
            t = self.own("sessiond_leases")
        );
        let ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let params: [(&(dyn ToSql + Sync), Type); 3] = [(&name, Type::TEXT), (&holder, Type::TEXT), (&ms, Type::INT8)];
        let rows = self.lease_statement(WHAT, &sql, &params).await?;
        rows.first().map(|r| r.try_get(0).map_err(q(WHAT))).transpose()
    }

    /// Gives the lease up at once (on shutdown), if `holder` still holds it.
    pub async fn release_lease(&mut self, name: &str, holder: &str, term: i64) -> Result<(), StoreError> {
        const WHAT: &str = "release the lease";
        let sql = format!(
            "UPDATE {} SET expires_at = now() WHERE name = $1 AND holder = $2 AND term = $3",
            self.own("sessiond_leases")
        );
        let params: [(&(dyn ToSql + Sync), Type); 3] =
            [(&name, Type::TEXT), (&holder, Type::TEXT), (&term, Type::INT8)];
        self.lease_statement(WHAT, &sql, &params).await.map(|_| ())
    }

    /// Who holds the lease, by the database's clock.
    pub async fn lease_holder(&mut self, name: &str) -> Result<Option<LeaseRow>, StoreError> {
        const WHAT: &str = "read the lease";
        let sql = format!(
            "SELECT holder, term, expires_at > now(),
                    greatest(0, ceil(extract(epoch FROM expires_at - now()) * 1000))::bigint
               FROM {} WHERE name = $1",
            self.own("sessiond_leases")
        );
        let params: [(&(dyn ToSql + Sync), Type); 1] = [(&name, Type::TEXT)];
        let rows = self.lease_statement(WHAT, &sql, &params).await?;
        let Some(r) = rows.first() else { return Ok(None) };
        Ok(Some(LeaseRow {
            holder: r.try_get(0).map_err(q(WHAT))?,
            term: r.try_get(1).map_err(q(WHAT))?,
            valid: r.try_get(2).map_err(q(WHAT))?,
            remaining: Duration::from_millis(u64::try_from(r.try_get::<_, i64>(3).map_err(q(WHAT))?).unwrap_or(0)),
        }))
    }

    /// A lease statement in its own transaction; it may wait for a repair
    /// transaction that holds the lease row (that is the fence at work).
    async fn lease_statement(
        &mut self,
        what: &'static str,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let timeout = self.timeout;
        self.count(2);
        let tx = self.begin(what, Tx::Lease).await?;
        let rows = tokio::time::timeout(timeout, tx.query_typed(sql, params))
            .await
            .map_err(|_| StoreError::Timeout { what, timeout })?
            .map_err(q(what))?;
        tokio::time::timeout(timeout, tx.commit())
            .await
            .map_err(|_| StoreError::Timeout { what, timeout })?
            .map_err(q(what))?;
        Ok(rows)
    }
}

/// Checks, inside a write transaction, that the lease still names this
/// holder and term and has not expired, and locks its row until the
/// transaction ends, so no takeover can happen in between.
pub(super) async fn check(
    tx: &tokio_postgres::Transaction<'_>,
    leases: &str,
    fence: &Fence,
    timeout: Duration,
) -> Result<(), StoreError> {
    const WHAT: &str = "check the lease";
    let sql = format!(
        "SELECT 1 FROM {leases} WHERE name = $1 AND holder = $2 AND term = $3 AND expires_at > clock_timestamp()
            FOR SHARE"
    );
    let params: [(&(dyn ToSql + Sync), Type); 3] =
        [(&fence.name, Type::TEXT), (&fence.holder, Type::TEXT), (&fence.term, Type::INT8)];
    let rows = tokio::time::timeout(timeout, tx.query_typed(&sql, &params))
        .await
        .map_err(|_| StoreError::Timeout { what: WHAT, timeout })?
        .map_err(q(WHAT))?;
    if rows.is_empty() {
        return Err(StoreError::Fenced { term: fence.term });
    }
    Ok(())
}
