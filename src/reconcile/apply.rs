//! The apply step: turns the findings the classifier decided to repair into
//! batched store calls and controller stop requests, and records each outcome.
//!
//! A batch is one transaction. A batch that fails on one row's data is retried
//! a row at a time by the store, so a bad row costs only itself. A batch that
//! fails otherwise (the connection dropped, a timeout) fails its own repairs
//! only: the next group re-makes the connection if it has to, and goes on.
//! Compare-and-set keeps every write safe however late it comes.
//!
//! A stop request is recorded as an intent before it is sent and settled after
//! it is answered, in two short transactions: no row lock is held while a
//! controller is asked, and a process killed in between leaves an intent that a
//! later pass settles, so no stop is ever sent unrecorded or audited twice.
//!
//! The whole plan carries a deadline: a pass that stalls between reading and
//! writing (GC, SIGSTOP, a VM migration) stops applying when its evidence is
//! older than the deadline, and what is left is deferred to a fresh pass.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::config::{Config, DatabaseConfig};
use crate::controller::{header_safe, ControllerClient, ControllerError, StopFrom};
use crate::model::StopOutcome;
use crate::reconcile::classify::{Decision, Finding, Repair, SettleIntent};
use crate::reconcile::FindingResult;
use crate::store::{AuditContext, Outcome, RowInsert, RowResult, RowUpdate, Settle, StopIntent, Store, StoreError};

/// Rows per transaction: large enough that a big repair costs few round trips,
/// small enough that one failed batch loses little work and holds locks briefly.
pub const BATCH_SIZE: usize = 500;
/// Stops recorded per transaction, and sent before the batch is settled.
pub const ZOMBIE_BATCH_SIZE: usize = 200;
/// Stop requests in flight at once, per batch.
const STOP_CONCURRENCY: usize = 8;
/// How much earlier than the pass's start its evidence counts as gathered,
/// for refusing stops of sessions stopped since: more than the error of the
/// clock offset measured at the read and of `now()` in the settling
/// transaction. Too early only defers a stop to the next pass.
pub const EVIDENCE_MARGIN: chrono::Duration = chrono::Duration::seconds(1);

pub struct Applied {
    pub results: Vec<FindingResult>,
    /// Some repair failed (not a conflict): the pass is partial.
    pub any_failed: bool,
    /// The plan's deadline passed: what was left is deferred.
    pub expired: bool,
}

/// What the apply step works with.
pub struct ApplyContext<'a> {
    /// The connection, re-made here when a failure closed it.
    pub store: &'a mut Option<Store>,
    pub database: &'a DatabaseConfig,
    /// Round trips are counted here across a reconnection.
    pub round_trips: &'a Arc<AtomicU64>,
    pub client: &'a ControllerClient,
    pub config: &'a Config,
    pub audit: &'a AuditContext,
    pub progress: Option<&'a crate::progress::Progress>,
    /// Past this instant nothing more is applied.
    pub deadline: Instant,
    /// When the evidence for this plan began to be gathered, by the
    /// database's clock: a session with a stop settled as done since then is
    /// not stopped again on this plan.
    pub evidence_since: chrono::DateTime<chrono::Utc>,
    /// With several replicas: the lease, checked before every stop request,
    /// and the fence every write of a re-made connection gets.
    pub lease: Option<&'a crate::lease::Lease>,
    pub fence: Option<crate::store::Fence>,
}

impl ApplyContext<'_> {
    fn tick(&self) {
        if let Some(p) = self.progress {
            p.tick();
        }
    }

    /// The plan's deadline has passed, or this replica no longer leads.
    fn expired(&self) -> bool {
        Instant::now() >= self.deadline || self.lease.is_some_and(|l| !l.is_valid_now())
    }

    /// The connection, made anew if the last failure closed it.
    async fn store(&mut self) -> Result<&mut Store, StoreError> {
        if self.store.as_ref().is_none_or(Store::is_closed) {
            *self.store = None;
            let mut store = crate::reconcile::connect(self.config, self.round_trips).await?;
            store.set_fence(self.fence.clone());
            tracing::info!("database connection re-made during the pass");
            *self.store = Some(store);
        }
        match self.store.as_mut() {
            Some(s) => Ok(s),
            None => unreachable!("the store was connected just above"),
        }
    }
}

/// Applies every `Repair` decision in `findings`, after settling the intents
/// that earlier passes left.
pub async fn apply(mut ctx: ApplyContext<'_>, findings: Vec<Finding>, settle: &[SettleIntent]) -> Applied {
    let mut results: Vec<FindingResult> =
        findings.into_iter().map(|finding| FindingResult { finding, outcome: None, error: None, seen: None }).collect();
    settle_abandoned(&mut ctx, settle).await;

    let mut updates: Vec<usize> = Vec::new();
    let mut inserts: Vec<usize> = Vec::new();
    let mut stops: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        if r.finding.decision != Decision::Repair {
            continue;
        }
        match &r.finding.repair {
            Some(Repair::UpdateRow { .. }) => updates.push(i),
            Some(Repair::InsertRow { .. }) => inserts.push(i),
            Some(Repair::StopLive { controller_instance, .. }) => {
                stops.entry(controller_instance.clone()).or_default().push(i)
            }
            None => {}
        }
    }
    let audit = ctx.audit;
    let details = |f: &Finding| {
        serde_json::json!({
            "pass_id": audit.pass_id,
            "term": audit.term,
            "sessiond_version": env!("CARGO_PKG_VERSION"),
            "kind": f.kind.as_str(),
            "controller": f.instance,
            "detail": f.detail,
        })
    };
    let mut expired = false;

    for chunk in updates.chunks(BATCH_SIZE) {
        if expired || ctx.expired() {
            expired = true;
            defer(&mut results, chunk);
            continue;
        }
        let batch: Vec<RowUpdate> = chunk
            .iter()
            .filter_map(|&i| match &results[i].finding.repair {
                Some(Repair::UpdateRow { id, version, from, to, owner_id, controller_instance, end_reason }) => {
                    Some(RowUpdate {
                        id: id.clone(),
                        version: version.clone(),
                        from: *from,
                        to: *to,
                        owner_id: owner_id.clone(),
                        controller_instance: controller_instance.clone(),
                        end_reason: *end_reason,
                        reason: results[i].finding.kind.as_str(),
                        details: details(&results[i].finding),
                    })
                }
                _ => None,
            })
            .collect();
        let result = match ctx.store().await {
            Ok(store) => store.update_rows(&batch, audit).await,
            Err(e) => Err(e),
        };
        ctx.tick();
        match result {
            Ok(rows) => record(&mut results, chunk, &rows),
            Err(StoreError::Fenced { .. } | StoreError::Paused { .. }) => {
                expired = true;
                defer(&mut results, chunk);
            }
            Err(e) => {
                tracing::error!(error = %e, rows = chunk.len(), "repair batch failed and was rolled back");
                fail(&mut results, chunk, &e.to_string());
            }
        }
    }

    for chunk in inserts.chunks(BATCH_SIZE) {
        if expired || ctx.expired() {
            expired = true;
            defer(&mut results, chunk);
            continue;
        }
        let batch: Vec<RowInsert> = chunk
            .iter()
            .filter_map(|&i| match &results[i].finding.repair {
                Some(Repair::InsertRow { id, owner_id, controller_instance, state, created_at }) => Some(RowInsert {
                    id: id.clone(),
                    owner_id: owner_id.clone(),
                    controller_instance: controller_instance.clone(),
                    state: *state,
                    created_at: *created_at,
                    details: details(&results[i].finding),
                }),
                _ => None,
            })
            .collect();
        let result = match ctx.store().await {
            Ok(store) => store.insert_rows(&batch, audit).await,
            Err(e) => Err(e),
        };
        ctx.tick();
        match result {
            Ok(rows) => record(&mut results, chunk, &rows),
            Err(StoreError::Fenced { .. } | StoreError::Paused { .. }) => {
                expired = true;
                defer(&mut results, chunk);
            }
            Err(e) => {
                tracing::error!(error = %e, rows = chunk.len(), "insert batch failed and was rolled back");
                fail(&mut results, chunk, &e.to_string());
            }
        }
    }

    for (instance, idxs) in &stops {
        let Some(ctrl) = ctx.config.controllers.iter().find(|c| &c.name == instance) else {
            fail(&mut results, idxs, "instance is no longer configured");
            continue;
        };
        for chunk in idxs.chunks(ZOMBIE_BATCH_SIZE) {
            if expired || ctx.expired() {
                expired = true;
                defer(&mut results, chunk);
                continue;
            }
            expired |= stop_batch(&mut ctx, ctrl, chunk, &mut results, &details).await;
        }
    }

    if expired {
        let deferred = results.iter().filter(|r| r.outcome == Some(Outcome::Deferred)).count();
        if ctx.lease.is_some_and(|l| !l.is_valid_now()) {
            tracing::warn!(deferred, "this replica lost the lease during the pass; the rest is left to the leader");
        } else {
            tracing::warn!(deferred, "the pass ran past its plan's deadline; the rest is left for a fresh pass");
        }
    }
    let any_failed = results.iter().any(|r| r.outcome == Some(Outcome::Failed));
    Applied { results, any_failed, expired }
}

/// A stop's finding, its intent, and the controller's answer (`None`: not sent,
/// the deadline passed first).
type StopAnswer = (usize, i64, Option<Result<u16, ControllerError>>);

/// Records, sends and settles one batch of stops. Returns whether the deadline
/// passed while sending.
async fn stop_batch(
    ctx: &mut ApplyContext<'_>,
    ctrl: &crate::config::ControllerConfig,
    chunk: &[usize],
    results: &mut [FindingResult],
    details: &(dyn Fn(&Finding) -> serde_json::Value + Sync),
) -> bool {
    let audit = ctx.audit;
    let intents: Vec<StopIntent> = chunk
        .iter()
        .filter_map(|&i| match &results[i].finding.repair {
            Some(Repair::StopLive { id, row_version, row_state, end_row, .. }) => Some(StopIntent {
                id: id.clone(),
                controller: ctrl.name.clone(),
                version: row_version.clone(),
                state: *row_state,
                end_row: *end_row,
                reason: results[i].finding.kind.as_str(),
                details: details(&results[i].finding),
            }),
            _ => None,
        })
        .collect();
    // The sender promises to settle within this; after it, any pass may.
    let waves = chunk.len().div_ceil(STOP_CONCURRENCY) as u32 + 1;
    let expires_in = ctrl.timeout * waves + ctx.database.statement_timeout * 2;
    let since = ctx.evidence_since;
    let opened = match ctx.store().await {
        Ok(store) => store.open_stops(&intents, audit, expires_in, since).await,
        Err(e) => Err(e),
    };
    ctx.tick();
    let opened = match opened {
        Ok(o) => o,
        Err(StoreError::Fenced { .. } | StoreError::Paused { .. }) => {
            defer(results, chunk);
            return true;
        }
        Err(e) => {
            tracing::error!(error = %e, "recording stop intents failed; no stop was sent");
            fail(results, chunk, &e.to_string());
            return false;
        }
    };

    // Send the stops whose intent is recorded; the others are conflicts.
    let mut to_send = Vec::new();
    for ((&i, stop), intent) in chunk.iter().zip(&intents).zip(&opened) {
        match intent {
            Some(intent) => to_send.push((i, *intent, stop.id.clone())),
            None => results[i].outcome = Some(Outcome::Conflict),
        }
    }
    let deadline = ctx.deadline;
    let client = ctx.client;
    let progress = ctx.progress;
    let lease = ctx.lease;
    let actor = header_safe(&ctx.audit.actor);
    let term = ctx.audit.term;
    let actor = actor.as_str();
    let answers: Vec<StopAnswer> = futures_util::stream::iter(to_send.into_iter().map(|(i, intent, id)| async move {
        // A stall past the deadline sends nothing more from this plan, and a
        // replica sends a stop only while its lease is valid at that moment.
        if Instant::now() >= deadline || lease.is_some_and(|l| !l.is_valid_now()) {
            return (i, intent, None);
        }
        let from = StopFrom { actor, term };
        let answer = client.stop(ctrl, &id, &from).await;
        if let Some(p) = progress {
            p.tick();
        }
        (i, intent, Some(answer))
    }))
    .buffer_unordered(STOP_CONCURRENCY)
    .collect()
    .await;

    let mut settles = Vec::with_capacity(answers.len());
    let mut expired = false;
    for (i, intent, answer) in &answers {
        let (outcome, extra) = match answer {
            Some(Ok(status)) => (StopOutcome::Stopped, serde_json::json!({ "stop_status": status })),
            Some(Err(e)) => {
                tracing::warn!(controller = %ctrl.name, error = %e, "stop request failed");
                let uncertain = e.uncertain();
                results[*i].error = Some(if uncertain {
                    format!("{e}; whether it took effect is settled by a later pass")
                } else {
                    e.to_string()
                });
                let outcome = if uncertain { StopOutcome::Uncertain } else { StopOutcome::Failed };
                (outcome, serde_json::json!({ "error": e.to_string() }))
            }
            None => {
                expired = true;
                (
                    StopOutcome::NotSent,
                    serde_json::json!({ "error": "the plan's deadline passed, or the lease was lost, first" }),
                )
            }
        };
        settles.push(Settle { intent: *intent, outcome, details: extra });
    }
    if settles.is_empty() {
        return expired;
    }
    let mut settled = Err(StoreError::Timeout { what: "settle stop intents", timeout: Duration::ZERO });
    for attempt in 0..2 {
        settled = match ctx.store().await {
            Ok(store) => store.settle_stops(&settles, audit).await,
            Err(e) => Err(e),
        };
        match &settled {
            Ok(_) => break,
            Err(e) if attempt == 0 => tracing::warn!(error = %e, "settling stops failed; retrying once"),
            Err(_) => {}
        }
    }
    ctx.tick();
    match settled {
        Ok(_) => {
            for ((i, _, answer), settle) in answers.iter().zip(&settles) {
                results[*i].outcome = Some(match (answer, settle.outcome) {
                    (_, StopOutcome::Stopped) => Outcome::Repaired,
                    (None, _) => Outcome::Deferred,
                    _ => Outcome::Failed,
                });
            }
        }
        Err(e) => {
            // The stops went out, and each has its intent on record; a later
            // pass settles them (and writes their audit rows) once they expire.
            tracing::error!(error = %e, stops = settles.len(), "recording what the stops did failed; a later pass settles them");
            let why = format!(
                "the stop was sent and its intent recorded, but settling it failed ({e}); a later pass settles it"
            );
            for (i, _, answer) in &answers {
                results[*i].outcome = Some(if answer.is_none() { Outcome::Deferred } else { Outcome::Failed });
                results[*i].error.get_or_insert_with(|| why.clone());
            }
        }
    }
    expired
}

/// Settles the intents the classifier found abandoned by a process that is gone.
async fn settle_abandoned(ctx: &mut ApplyContext<'_>, settle: &[SettleIntent]) {
    if settle.is_empty() {
        return;
    }
    let settles: Vec<Settle> = settle
        .iter()
        .map(|s| Settle {
            intent: s.intent,
            outcome: s.outcome,
            details: serde_json::json!({ "settled_by": ctx.audit.pass_id, "settled_because": s.detail }),
        })
        .collect();
    let audit = ctx.audit;
    let result = match ctx.store().await {
        Ok(store) => store.settle_stops(&settles, audit).await,
        Err(e) => Err(e),
    };
    ctx.tick();
    match result {
        Ok(done) => {
            let n = done.iter().filter(|d| d.by_us).count();
            tracing::info!(settled = n, "settled stop intents left by an earlier pass");
        }
        Err(e) => tracing::error!(error = %e, "settling abandoned stop intents failed; the next pass tries again"),
    }
}

fn record(results: &mut [FindingResult], idxs: &[usize], rows: &[RowResult]) {
    for (&i, row) in idxs.iter().zip(rows) {
        results[i].outcome = Some(row.outcome());
        if let RowResult::Failed(e) = row {
            results[i].error = Some(e.clone());
        }
    }
}

fn fail(results: &mut [FindingResult], idxs: &[usize], why: &str) {
    for &i in idxs {
        results[i].outcome = Some(Outcome::Failed);
        results[i].error = Some(why.to_owned());
    }
}

fn defer(results: &mut [FindingResult], idxs: &[usize]) {
    for &i in idxs {
        results[i].outcome = Some(Outcome::Deferred);
    }
}
