//! The database side of a pass: one read-only, repeatable-read transaction
//! that measures the database's clock, streams every live row, the rows of the
//! live controller ids that have none, and the stop intents not settled yet.

use chrono::{DateTime, Utc};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;

use super::mapping::{Kind, Pages};
use super::{q, Store, StoreError, Tx};
use crate::model::{
    DbSnapshot, GoneRow, InvalidRow, OpenIntent, RowRef, RowState, RowTooLong, Rows, Run, SessionId, TwoRuns,
};

impl Store {
    /// Reads every live row, and the row (in whatever state) of every id in
    /// `live_ids` (`count` of them, in id order) that has no live row, in one
    /// transaction: a constant number of streamed statements, whatever the
    /// number of sessions. Only the ids without a live row — the zombie and
    /// unpersisted candidates, normally a few — are sent to the server.
    ///
    /// With `created_within`, it also reads the id, owner and creation time of
    /// every row created that recently (by the database's clock), for rapid
    /// creates.
    pub async fn snapshot(
        &mut self,
        live_ids: impl Iterator<Item = &str> + Send,
        count: usize,
        created_within: Option<std::time::Duration>,
    ) -> Result<DbSnapshot, StoreError> {
        let table = self.table()?.clone();
        let vocabulary = table.vocabulary.clone();
        let live_values_text = vocabulary.live_values();
        let by_id_sql = table.rows_by_id_sql();
        let id_kind = table.id.kind;
        let live_values: Vec<String> = live_values_text.iter().copied().map(str::to_owned).collect();
        let intents_sql = format!(
            "SELECT id, session_id, controller, kind, expires_at < now() FROM {} WHERE settled_at IS NULL",
            table.intents
        );
        let history_sql = table.last_audit_sql();
        let recent_sql = table.recent_creates_sql();
        let timeout = self.timeout;
        let counter = std::sync::Arc::clone(&self.round_trips);
        // A large table is read on two connections, its halves at once: the
        // `COPY` is bound by the one server process that runs it.
        let split = self.second_cfg.clone().map(|cfg| Split {
            cfg,
            second: self.second.take(),
            min_pages: self.split_min_pages,
            gate: self.split_gate.take(),
            relation: table.table.to_string(),
        });
        let tx = self.begin(WHAT, Tx::Read).await?;
        let mut second_used = None;
        let work = async {
            // The database's clock, against ours: row times move onto our
            // clock, the one the controller lists were fetched by. With a
            // second connection allowed, the same statement exports the
            // snapshot and measures the table.
            let sent = Utc::now();
            let first = match &split {
                Some(split) => tx.query_typed_one(SPLIT_FIRST_SQL, &[(&split.relation, Type::TEXT)]).await,
                None => tx.query_typed_one("SELECT clock_timestamp()", &[]).await,
            }
            .map_err(q(WHAT))?;
            let db_now: DateTime<Utc> = first.try_get(0).map_err(q(WHAT))?;
            let offset = db_now - (sent + (Utc::now() - sent) / 2);

            // Sized for the usual case (about one live row per live session), so
            // the columns are not reallocated, and briefly held twice, while they fill.
            let expected = count + count / 16 + 16;
            let mut invalid = Vec::new();
            let mut statements = 3; // the clock, the live rows, the intents
            let halves = match split {
                Some(split) => {
                    let snapshot: String = first.try_get(1).map_err(q(WHAT))?;
                    let pages: i64 = first.try_get(2).map_err(q(WHAT))?;
                    split.second_reader(&snapshot, pages, &counter).await
                }
                None => None,
            };
            let mut rows = if let Some((second, from_page)) = halves {
                statements += 1; // the second COPY (its BEGIN and COMMIT count themselves)
                let first_half = table.live_rows_copy_sql(&live_values_text, Some(Pages::Below(from_page)));
                let second_half = table.live_rows_copy_sql(&live_values_text, Some(Pages::From(from_page)));
                let (low, high) = futures_util::try_join!(
                    tx.copy_out(first_half.as_str()),
                    second.client.copy_out(second_half.as_str())
                )
                .map_err(q(WHAT))?;
                // One task decodes both, a chunk at a time as each arrives:
                // the rows of each half in their own run, so rows in id
                // order in the table stay in id order.
                let chunks =
                    futures_util::stream::select(low.map_ok(|c| (Run::First, c)), high.map_ok(|c| (Run::Second, c)));
                pin_mut!(chunks);
                let mut runs = TwoRuns::with_capacity(expected, expected * 48);
                let (mut first_copy, mut second_copy) = (BinaryCopy::default(), BinaryCopy::default());
                let mut instants = Instants::default();
                while let Some((run, chunk)) = chunks.try_next().await.map_err(q(WHAT))? {
                    let copy = match run {
                        Run::First => &mut first_copy,
                        Run::Second => &mut second_copy,
                    };
                    copy.feed(&chunk, |t| {
                        push_tuple(
                            t,
                            &vocabulary,
                            offset,
                            &mut instants,
                            &mut |r| runs.push_parts(run, r),
                            &mut invalid,
                        )
                    })?;
                }
                first_copy.finish()?;
                second_copy.finish()?;
                // Its transaction stays open: the second connection looks up
                // half of the ids below, in the same snapshot.
                second_used = Some(second);
                runs.join()
            } else {
                let mut rows = Rows::default();
                rows.reserve(expected, expected * 48);
                let live_sql = table.live_rows_copy_sql(&live_values_text, None);
                let stream = tx.copy_out(live_sql.as_str()).await.map_err(q(WHAT))?;
                pin_mut!(stream);
                let mut copy = BinaryCopy::default();
                let mut instants = Instants::default();
                while let Some(chunk) = stream.try_next().await.map_err(q(WHAT))? {
                    copy.feed(&chunk, |t| {
                        push_tuple(t, &vocabulary, offset, &mut instants, &mut |r| rows.push_parts(r), &mut invalid)
                    })?;
                }
                copy.finish()?;
                rows
            };
            // Once: the merge below and the classifier's join each walk the
            // rows in id order, and heap order is id order only where rows were
            // inserted in id order. The few rows read by id below stay
            // unsorted; a walk sorts only those. On the blocking pool: at 1M
            // rows the sort holds both cores for 0.1-0.2 s, and the runtime's
            // workers must go on answering `/metrics` meanwhile.
            let mut rows = crate::on_blocking_pool(move || {
                rows.sort_by_id();
                rows
            })
            .await;
            // The live ids without a live row: one merge of the two runs in id
            // order (the rows come in heap order, normally close to id order).
            let mut held = rows.by_id().filter_map(|i| rows.id(i)).peekable();
            let without_row = live_ids.filter(|id| {
                while held.next_if(|h| h < id).is_some() {}
                held.peek() != Some(id)
            });
            // Ids the id column's type cannot hold have no row.
            let mut missing: Vec<&str> = without_row
                .filter(|id| match id_kind {
                    Kind::Uuid => uuid::Uuid::parse_str(id).is_ok(),
                    Kind::Int => id.parse::<i64>().is_ok(),
                    _ => true,
                })
                .collect();
            // An id two lists hold is looked up, and its row read, once.
            missing.dedup();
            drop(held);
            // The rows of those ids, and the last audit row of those with no
            // row at all. With a second connection in the snapshot, each
            // looks up half of them: the lookups are bound by the server
            // process that runs them, one index lookup per id.
            let mut known_invalid: Vec<&str> = invalid.iter().map(|r| r.id.as_str()).collect();
            known_invalid.sort_unstable();
            let lookups = Lookups {
                by_id_sql: &by_id_sql,
                history_sql: &history_sql,
                live_values: &live_values,
                vocabulary: &vocabulary,
                offset,
            };
            let found = match &second_used {
                Some(second) if missing.len() >= 2 => {
                    let (low, high) = missing.split_at(missing.len() / 2);
                    let (low, high) = futures_util::try_join!(
                        lookups.run(&tx, low, &known_invalid),
                        lookups.run(&second.client, high, &known_invalid)
                    )?;
                    vec![low, high]
                }
                _ => vec![lookups.run(&tx, &missing, &known_invalid).await?],
            };
            drop(known_invalid);
            if let Some(second) = &second_used {
                second.bounded(WHAT, second.client.batch_execute("COMMIT")).await?;
            }
            let mut gone = Vec::new();
            for found in found {
                statements += found.statements;
                for row in found.rows.iter() {
                    rows.push_parts(row).map_err(|e| StoreError::Corrupt { what: WHAT, detail: e.to_string() })?;
                }
                invalid.extend(found.invalid);
                for r in &found.history {
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
        // Kept for the next pass only after a read that went through: a
        // connection a failed read left mid-transaction is dropped.
        self.second = second_used;
        Ok(snapshot)
    }
}

/// The two lookups by id of a read, on one connection.
struct Lookups<'a> {
    by_id_sql: &'a str,
    history_sql: &'a str,
    live_values: &'a [String],
    vocabulary: &'a crate::config::Vocabulary,
    offset: chrono::Duration,
}

/// What [`Lookups::run`] found: the rows (not live) of the ids, converted as
/// they streamed in (those whose state the vocabulary does not know in
/// `invalid`), and the last audit row of each id with no row at all.
struct Found {
    rows: Rows,
    invalid: Vec<InvalidRow>,
    history: Vec<tokio_postgres::Row>,
    statements: u64,
}

impl Lookups<'_> {
    /// Looks `ids` up: their rows, then the audit trail of those that have
    /// none and are not among `known_invalid` (live rows the `COPY` read but
    /// could not use, sorted). No statement for no ids.
    async fn run(
        &self,
        client: &impl GenericClient,
        ids: &[&str],
        known_invalid: &[&str],
    ) -> Result<Found, StoreError> {
        let mut found = Found { rows: Rows::default(), invalid: Vec::new(), history: Vec::new(), statements: 0 };
        if ids.is_empty() {
            return Ok(found);
        }
        let params: [(&(dyn ToSql + Sync), Type); 2] =
            [(&ids, Type::TEXT_ARRAY), (&self.live_values, Type::TEXT_ARRAY)];
        let stream = client.query_typed_raw(self.by_id_sql, params).await.map_err(q(WHAT))?;
        pin_mut!(stream);
        while let Some(r) = stream.try_next().await.map_err(q(WHAT))? {
            convert(&r, self.vocabulary, self.offset, &mut found.rows, &mut found.invalid)?;
        }
        found.statements += 1;
        let read = found.rows.iter().map(|r| r.id).chain(found.invalid.iter().map(|r| r.id.as_str()));
        let mut with_row: Vec<&str> = read.collect();
        with_row.sort_unstable();
        let absent: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| with_row.binary_search(id).is_err() && known_invalid.binary_search(id).is_err())
            .collect();
        if !absent.is_empty() {
            let params: [(&(dyn ToSql + Sync), Type); 1] = [(&absent, Type::TEXT_ARRAY)];
            found.history = client.query_typed(self.history_sql, &params).await.map_err(q(WHAT))?;
            found.statements += 1;
        }
        Ok(found)
    }
}

/// The read's first statement when it may go on two connections: the
/// database's clock, the snapshot exported for the second, and the table's
/// size in pages. 0 pages (one connection) for a partitioned table, whose
/// parent has none of its own (a view is refused when the table is bound),
/// and before PostgreSQL 14, which scans a `ctid` range as a filter on the
/// whole table.
const SPLIT_FIRST_SQL: &str = "SELECT clock_timestamp(), pg_export_snapshot(),
    CASE WHEN current_setting('server_version_num')::int >= 140000
         THEN pg_relation_size($1::regclass) / current_setting('block_size')::bigint ELSE 0 END";

/// How long the second connection may take to connect, and then to begin its
/// transaction on the snapshot, before the read goes on, on one; each at most
/// a quarter of the statement timeout, which also ends a transaction left
/// idle that long.
const SECOND_BEGIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a read on two connections needs, taken from the store for the read.
struct Split {
    cfg: crate::config::DatabaseConfig,
    second: Option<Box<Store>>,
    min_pages: i64,
    gate: Option<super::SplitGate>,
    relation: String,
}

impl Split {
    /// The second connection, in a transaction on `snapshot`, and the page
    /// where its half begins; or `None` for a read on one connection: a table
    /// under `min_pages` pages, or a second connection that cannot be had
    /// (logged: the read goes on, on one).
    async fn second_reader(
        self,
        snapshot: &str,
        pages: i64,
        counter: &std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Option<(Box<Store>, u64)> {
        let from_page = u64::try_from(pages / 2).ok().filter(|_| pages >= self.min_pages.max(2))?;
        if let Some(gate) = self.gate {
            let _ = gate.exported.send(());
            let _ = gate.resume.await;
        }
        // Not long, for each of connecting and beginning: the first
        // transaction waits meanwhile, and through a pooler whose server
        // connections are all taken (one of them by the first transaction)
        // the second would wait for good.
        let wait = SECOND_BEGIN_WAIT.min(self.cfg.statement_timeout / 4);
        let mut second = match self.second {
            Some(second) if !second.is_closed() => second,
            _ => match tokio::time::timeout(wait, Store::connect(&self.cfg)).await {
                Ok(Ok(second)) => Box::new(second),
                Ok(Err(e)) => {
                    tracing::warn!(
                        error = %e,
                        "the live rows are read on one connection: a second could not be opened (database.read_connections = 1 reads on one without trying)"
                    );
                    return None;
                }
                Err(_) => {
                    tracing::warn!(
                        waited = ?wait,
                        "the live rows are read on one connection: a second could not be opened in time (database.read_connections = 1 reads on one without trying)"
                    );
                    return None;
                }
            },
        };
        second.share_round_trips(std::sync::Arc::clone(counter));
        match tokio::time::timeout(wait, second.begin_on_snapshot(WHAT, snapshot)).await {
            Ok(Ok(())) => Some((second, from_page)),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the live rows are read on one connection: the second could not share the snapshot");
                None
            }
            Err(_) => {
                tracing::warn!(
                    waited = ?wait,
                    "the live rows are read on one connection: the second got no server connection in time (a pooler's pool full?); database.read_connections = 1 reads on one without trying"
                );
                None
            }
        }
    }
}

/// One row, as the select list orders it: id, state, created_at, changed_at,
/// xmin, owner, instance, deleted. Times move onto sessiond's clock. A row whose
/// state the vocabulary does not know is an invalid row, not an error.
fn convert(
    r: &tokio_postgres::Row,
    vocabulary: &crate::config::Vocabulary,
    offset: chrono::Duration,
    rows: &mut Rows,
    invalid: &mut Vec<InvalidRow>,
) -> Result<(), StoreError> {
    let id: &str = r.try_get(0).map_err(q(WHAT))?;
    let created_at: DateTime<Utc> = r.try_get(2).map_err(q(WHAT))?;
    let changed_at: Option<DateTime<Utc>> = r.try_get(3).map_err(q(WHAT))?;
    let fields = Fields {
        id,
        state: r.try_get(1).map_err(q(WHAT))?,
        created_at,
        changed_at,
        version: r.try_get(4).map_err(q(WHAT))?,
        owner_id: r.try_get(5).map_err(q(WHAT))?,
        instance: r.try_get(6).map_err(q(WHAT))?,
        deleted: r.try_get(7).map_err(q(WHAT))?,
    };
    fields.push(vocabulary, offset, &mut |row| rows.push_parts(row), invalid)
}

const WHAT: &str = "read the sessions";

/// The fields of one row, borrowed from wherever they were decoded.
struct Fields<'a> {
    id: &'a str,
    state: Option<&'a str>,
    created_at: DateTime<Utc>,
    changed_at: Option<DateTime<Utc>>,
    version: &'a str,
    owner_id: Option<&'a str>,
    instance: Option<&'a str>,
    deleted: bool,
}

impl Fields<'_> {
    fn push(
        self,
        vocabulary: &crate::config::Vocabulary,
        offset: chrono::Duration,
        push: &mut impl FnMut(RowRef<'_>) -> Result<(), RowTooLong>,
        invalid: &mut Vec<InvalidRow>,
    ) -> Result<(), StoreError> {
        let state = if self.deleted { Some(RowState::Deleted) } else { self.state.and_then(|v| vocabulary.read(v)) };
        let Some(state) = state else {
            invalid.push(InvalidRow {
                id: SessionId::from_row(self.id.to_owned()),
                value: self.state.map(str::to_owned),
                controller_instance: self.instance.map(str::to_owned),
            });
            return Ok(());
        };
        push(RowRef {
            id: self.id,
            owner_id: self.owner_id,
            controller_instance: self.instance,
            state,
            created_at: self.created_at - offset,
            changed_at: self.changed_at.unwrap_or(self.created_at) - offset,
            version: self.version,
        })
        .map_err(|e| StoreError::Corrupt { what: WHAT, detail: e.to_string() })
    }
}

/// The select list's eight fields, from one tuple of a binary `COPY`.
fn push_tuple(
    t: &[Option<&[u8]>],
    vocabulary: &crate::config::Vocabulary,
    offset: chrono::Duration,
    instants: &mut Instants,
    push: &mut impl FnMut(RowRef<'_>) -> Result<(), RowTooLong>,
    invalid: &mut Vec<InvalidRow>,
) -> Result<(), StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { what: WHAT, detail };
    let &[id, state, created_at, changed_at, version, owner_id, instance, deleted] = t else {
        return Err(corrupt(format!("a row has {} fields, not the 8 selected", t.len())));
    };
    let id = text("id", id)?.ok_or_else(|| corrupt("a row has a NULL id".into()))?;
    let mut instant = |name: &str, v: Option<&[u8]>| -> Result<Option<DateTime<Utc>>, StoreError> {
        let Some(b) = v else { return Ok(None) };
        let micros = <[u8; 8]>::try_from(b)
            .map(i64::from_be_bytes)
            .map_err(|_| corrupt(format!("the {name} of row {id} is not a timestamptz")))?;
        Some(micros)
            .filter(|m| *m != i64::MAX && *m != i64::MIN)
            .and_then(|m| instants.at(m))
            .map(Some)
            .ok_or_else(|| corrupt(format!("the {name} of row {id} is infinite or out of range")))
    };
    let fields = Fields {
        id,
        state: text("state", state)?,
        created_at: instant("creation time", created_at)?
            .ok_or_else(|| corrupt(format!("row {id} has no creation time")))?,
        changed_at: instant("change time", changed_at)?,
        version: text("xmin", version)?.unwrap_or_default(),
        owner_id: text("owner", owner_id)?,
        instance: text("instance", instance)?,
        deleted: matches!(deleted, Some([1])),
    };
    fields.push(vocabulary, offset, push, invalid)
}

/// A text field, which must be UTF-8 (the connection's encoding).
fn text<'b>(name: &str, v: Option<&'b [u8]>) -> Result<Option<&'b str>, StoreError> {
    v.map(|b| {
        std::str::from_utf8(b)
            .map_err(|_| StoreError::Corrupt { what: WHAT, detail: format!("the {name} of a row is not UTF-8") })
    })
    .transpose()
}

/// PostgreSQL's binary timestamps, microseconds from 2000-01-01 00:00:00
/// UTC, as times. The date of the last day seen is kept: a table's times
/// fall on few days, and finding the date of a day count is most of the
/// cost of a conversion (two a row).
#[derive(Debug, Default)]
struct Instants {
    /// The last day seen, counted from 2000-01-01, and its date.
    day: Option<(i64, chrono::NaiveDate)>,
}

impl Instants {
    /// The time `micros` after 2000-01-01 00:00:00 UTC; `None` past the
    /// dates a time can hold.
    fn at(&mut self, micros: i64) -> Option<DateTime<Utc>> {
        const DAY: i64 = 86_400_000_000;
        let (day, in_day) = (micros.div_euclid(DAY), micros.rem_euclid(DAY));
        let date = match self.day {
            Some((seen, date)) if seen == day => date,
            _ => {
                let epoch = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)?;
                let days = chrono::Days::new(day.unsigned_abs());
                let date = if day >= 0 { epoch.checked_add_days(days)? } else { epoch.checked_sub_days(days)? };
                self.day = Some((day, date));
                date
            }
        };
        let seconds = u32::try_from(in_day / 1_000_000).ok()?;
        let nanos = u32::try_from(in_day % 1_000_000 * 1_000).ok()?;
        let time = chrono::NaiveTime::from_num_seconds_from_midnight_opt(seconds, nanos)?;
        Some(date.and_time(time).and_utc())
    }
}

/// A reader of `COPY … TO STDOUT (FORMAT binary)` as its chunks arrive:
/// the signature and header, then tuples (a field count, then each field's
/// length, `-1` for NULL, and bytes), then a `-1` trailer. A tuple split
/// across chunks waits in `pending`; the others are read in place.
#[derive(Default)]
struct BinaryCopy {
    pending: Vec<u8>,
    header_read: bool,
    ended: bool,
}

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl BinaryCopy {
    fn feed(
        &mut self,
        chunk: &[u8],
        mut each: impl FnMut(&[Option<&[u8]>]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut pending = std::mem::take(&mut self.pending);
        let data: &[u8] = if pending.is_empty() {
            chunk
        } else {
            pending.extend_from_slice(chunk);
            &pending
        };
        let mut fields: Vec<Option<&[u8]>> = Vec::with_capacity(8);
        let mut at = 0;
        loop {
            let rest = &data[at..];
            if !self.header_read {
                let Some(n) = header_len(rest)? else { break };
                self.header_read = true;
                at += n;
                continue;
            }
            if self.ended {
                if !rest.is_empty() {
                    return Err(StoreError::Corrupt { what: WHAT, detail: "data after the end of COPY".into() });
                }
                break;
            }
            fields.clear();
            match tuple(rest, &mut fields)? {
                None => break,
                Some(Tuple::End) => {
                    self.ended = true;
                    at += 2;
                }
                Some(Tuple::Row(n)) => {
                    each(&fields)?;
                    at += n;
                }
            }
        }
        let left = data[at..].to_vec();
        drop(fields);
        pending.clear();
        pending.extend_from_slice(&left);
        self.pending = pending;
        Ok(())
    }

    /// Every tuple was complete, and the trailer came.
    fn finish(&self) -> Result<(), StoreError> {
        if self.ended && self.pending.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Corrupt { what: WHAT, detail: "COPY ended in the middle of a row".into() })
        }
    }
}

/// The length of the signature and header, once all of it is there.
fn header_len(b: &[u8]) -> Result<Option<usize>, StoreError> {
    if b.len() < SIGNATURE.len() + 8 {
        return Ok(None);
    }
    if &b[..SIGNATURE.len()] != SIGNATURE {
        return Err(StoreError::Corrupt { what: WHAT, detail: "COPY did not start with the binary signature".into() });
    }
    let ext = be_i32(&b[SIGNATURE.len() + 4..]).unwrap_or(0);
    let ext = usize::try_from(ext)
        .map_err(|_| StoreError::Corrupt { what: WHAT, detail: "a negative COPY header extension".into() })?;
    let n = SIGNATURE.len() + 8 + ext;
    Ok((b.len() >= n).then_some(n))
}

enum Tuple {
    /// A tuple of this many bytes; its fields are in the vector.
    Row(usize),
    End,
}

/// One tuple at the start of `b`, or `None` until all of it is there.
fn tuple<'b>(b: &'b [u8], fields: &mut Vec<Option<&'b [u8]>>) -> Result<Option<Tuple>, StoreError> {
    let Some(count) = b.get(..2).map(|c| i16::from_be_bytes([c[0], c[1]])) else { return Ok(None) };
    if count == -1 {
        return Ok(Some(Tuple::End));
    }
    let count = usize::try_from(count)
        .map_err(|_| StoreError::Corrupt { what: WHAT, detail: format!("a COPY tuple of {count} fields") })?;
    let mut at = 2;
    for _ in 0..count {
        let Some(len) = be_i32(&b[at..]) else { return Ok(None) };
        at += 4;
        if len < 0 {
            fields.push(None);
            continue;
        }
        let end = at + len as usize;
        let Some(value) = b.get(at..end) else { return Ok(None) };
        fields.push(Some(value));
        at = end;
    }
    Ok(Some(Tuple::Row(at)))
}

fn be_i32(b: &[u8]) -> Option<i32> {
    b.get(..4).map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kept dates or not, a time is 2000-01-01 plus the microseconds, as
    /// chrono's own arithmetic says, for times near and far, before and after
    /// 2000, on and around day boundaries, and past what a date can hold.
    #[test]
    fn binary_timestamps_read_as_the_epoch_plus_their_microseconds() {
        const DAY: i64 = 86_400_000_000;
        let epoch = DateTime::<Utc>::from_timestamp(946_684_800, 0).unwrap_or_default();
        let reference = |m: i64| epoch.checked_add_signed(chrono::Duration::microseconds(m));
        let mut rng = fastrand::Rng::with_seed(5);
        let mut instants = Instants::default();
        let mut checked = 0;
        for round in 0..200_000 {
            let m = match round % 6 {
                0 => rng.i64(-300 * 365 * DAY..300 * 365 * DAY),
                1 => rng.i64(-3..3) * DAY + rng.i64(-2..2),
                2 => 849 * DAY * 10 + rng.i64(0..3 * DAY),
                3 => rng.i64(i64::MIN + 1..i64::MAX),
                4 => [0, -1, 1, DAY - 1, DAY, -DAY, -DAY - 1, i64::MAX - 1, i64::MIN + 1][rng.usize(0..9)],
                // Around the ends of what a date holds (±262 143 years).
                _ => rng.i64(-280_000 * 365..280_000 * 365) * DAY + rng.i64(0..DAY),
            };
            assert_eq!(instants.at(m), reference(m), "{m} µs");
            checked += usize::from(reference(m).is_some());
        }
        assert!(checked > 150_000, "most times were in range: {checked}");
        // Times one after another, as a table's are: the kept date is used,
        // then left for the next day's, or the day before's.
        let mut m = 849 * DAY * 10 - 5 * DAY;
        for _ in 0..100_000 {
            m += rng.i64(-DAY / 4..DAY / 2);
            assert_eq!(instants.at(m), reference(m), "{m} µs");
        }
    }

    /// A binary COPY stream of `rows`, each a list of fields (`None` is NULL).
    fn stream(rows: &[Vec<Option<&[u8]>>]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(&0i32.to_be_bytes()); // flags
        b.extend_from_slice(&4i32.to_be_bytes()); // a header extension of 4 bytes
        b.extend_from_slice(b"skip");
        for row in rows {
            b.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for f in row {
                match f {
                    Some(v) => {
                        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        b.extend_from_slice(v);
                    }
                    None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    fn read_all(chunks: &[&[u8]]) -> Result<Vec<Vec<Option<Vec<u8>>>>, StoreError> {
        let mut copy = BinaryCopy::default();
        let mut out = Vec::new();
        for c in chunks {
            copy.feed(c, |t| {
                out.push(t.iter().map(|f| f.map(<[u8]>::to_vec)).collect());
                Ok(())
            })?;
        }
        copy.finish()?;
        Ok(out)
    }

    #[test]
    fn tuples_split_anywhere_across_chunks_read_the_same() {
        let rows =
            vec![vec![Some(&b"a"[..]), None, Some(&b""[..])], vec![Some(&b"longer value"[..]), Some(&b"x"[..]), None]];
        let whole = stream(&rows);
        let want = read_all(&[&whole]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(want.len(), 2);
        assert_eq!(want[0], vec![Some(b"a".to_vec()), None, Some(Vec::new())]);
        for i in 0..=whole.len() {
            for j in i..=whole.len() {
                let got =
                    read_all(&[&whole[..i], &whole[i..j], &whole[j..]]).unwrap_or_else(|e| panic!("{i}/{j}: {e}"));
                assert_eq!(got, want, "split at {i} and {j}");
            }
        }
    }

    #[test]
    fn a_truncated_or_foreign_stream_is_an_error_not_fewer_rows() {
        let whole = stream(&[vec![Some(&b"abc"[..])]]);
        for cut in 0..whole.len() {
            let err = read_all(&[&whole[..cut]]).err().map(|e| e.to_string());
            assert!(err.is_some_and(|e| e.contains("read the sessions")), "cut at {cut} read as complete");
        }
        let mut foreign = whole.clone();
        foreign[0] = b'X';
        let err = read_all(&[&foreign]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("binary signature"), "{err}");
        let mut trailing = whole;
        trailing.push(0);
        let err = read_all(&[&trailing]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("after the end"), "{err}");
    }
}
