//! The apply step: turns the findings the classifier decided to repair into
//! batched store calls and controller stop requests, and records each outcome.
//!
//! A batch is one transaction. If a batch fails (the connection dropped, a
//! timeout), its repairs are `failed` and nothing of it is committed; the rest of
//! the pass's database work is skipped, because the connection is presumed gone,
//! and the next pass re-reads everything and converges.

use std::collections::BTreeMap;

use futures_util::StreamExt;

use crate::config::Config;
use crate::controller::ControllerClient;
use crate::model::{RowState, SessionId};
use crate::reconcile::classify::{Decision, Finding, Repair};
use crate::reconcile::FindingResult;
use crate::store::{AuditContext, Outcome, RowInsert, RowUpdate, StoppedZombie, Store};

/// Rows per transaction: large enough that a big repair costs few round trips,
/// small enough that one failed batch loses little work and holds locks briefly.
pub const BATCH_SIZE: usize = 500;
/// Zombies per transaction; their row locks are held while the stops run.
pub const ZOMBIE_BATCH_SIZE: usize = 200;
/// Stop requests in flight at once, per batch.
const STOP_CONCURRENCY: usize = 8;

pub struct Applied {
    pub results: Vec<FindingResult>,
    /// A store call failed; the connection should be re-made.
    pub store_failed: bool,
    /// Some repair failed (not a conflict): the pass is partial.
    pub any_failed: bool,
}

/// Applies every `Repair` decision in `findings`.
pub async fn apply(
    store: &mut Store,
    client: &ControllerClient,
    cfg: &Config,
    audit: &AuditContext,
    findings: Vec<Finding>,
    progress: Option<&crate::daemon::Progress>,
) -> Applied {
    let tick = || {
        if let Some(p) = progress {
            p.tick();
        }
    };
    let mut results: Vec<FindingResult> =
        findings.into_iter().map(|finding| FindingResult { finding, outcome: None, error: None }).collect();
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

    let mut store_failed = false;
    let details = |f: &Finding| {
        serde_json::json!({
            "pass_id": audit.pass_id,
            "sessiond_version": env!("CARGO_PKG_VERSION"),
            "kind": f.kind.as_str(),
            "controller": f.instance,
            "detail": f.detail,
        })
    };

    for chunk in updates.chunks(BATCH_SIZE) {
        if store_failed {
            fail(&mut results, chunk, "skipped: an earlier batch failed");
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
        let result = store.update_rows(&batch, audit).await;
        tick();
        match result {
            Ok(outcomes) => record(&mut results, chunk, &outcomes),
            Err(e) => {
                tracing::error!(error = %e, rows = chunk.len(), "repair batch failed and was rolled back");
                fail(&mut results, chunk, &e.to_string());
                store_failed = true;
            }
        }
    }

    for chunk in inserts.chunks(BATCH_SIZE) {
        if store_failed {
            fail(&mut results, chunk, "skipped: an earlier batch failed");
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
        let result = store.insert_rows(&batch, audit).await;
        tick();
        match result {
            Ok(outcomes) => record(&mut results, chunk, &outcomes),
            Err(e) => {
                tracing::error!(error = %e, rows = chunk.len(), "insert batch failed and was rolled back");
                fail(&mut results, chunk, &e.to_string());
                store_failed = true;
            }
        }
    }

    for (instance, idxs) in &stops {
        let Some(ctrl) = cfg.controllers.iter().find(|c| &c.name == instance) else {
            fail(&mut results, idxs, "instance is no longer configured");
            continue;
        };
        for chunk in idxs.chunks(ZOMBIE_BATCH_SIZE) {
            if store_failed {
                fail(&mut results, chunk, "skipped: an earlier batch failed");
                continue;
            }
            let mut ids = Vec::with_capacity(chunk.len());
            let mut versions = Vec::with_capacity(chunk.len());
            for &i in chunk {
                if let Some(Repair::StopLive { id, row_version, .. }) = &results[i].finding.repair {
                    ids.push(id.as_str().to_owned());
                    versions.push(row_version.clone());
                }
            }
            let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let version_refs: Vec<&str> = versions.iter().map(String::as_str).collect();
            let batch = match store.begin_zombies(&id_refs, &version_refs).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "zombie batch failed");
                    fail(&mut results, chunk, &e.to_string());
                    store_failed = true;
                    continue;
                }
            };
            // Stop only the zombies whose rows are still as classified.
            let to_stop: Vec<(usize, SessionId, RowState, bool)> = chunk
                .iter()
                .filter_map(|&i| match &results[i].finding.repair {
                    Some(Repair::StopLive { id, row_state, end_row, .. }) if batch.locked.contains(id.as_str()) => {
                        Some((i, id.clone(), *row_state, *end_row))
                    }
                    _ => None,
                })
                .collect();
            let answers: Vec<(usize, RowState, bool, Result<u16, String>)> =
                futures_util::stream::iter(to_stop.into_iter().map(|(i, id, state, end_row)| async move {
                    (i, state, end_row, client.stop(ctrl, &id).await.map_err(|e| e.to_string()))
                }))
                .buffer_unordered(STOP_CONCURRENCY)
                .collect()
                .await;
            let mut stopped = Vec::new();
            let mut stopped_idx = Vec::new();
            for (i, state, end_row, answer) in answers {
                match answer {
                    Ok(status) => {
                        let mut d = details(&results[i].finding);
                        d["stop_status"] = serde_json::json!(status);
                        stopped_idx.push(i);
                        stopped.push(StoppedZombie {
                            id: results[i].finding.subject.clone(),
                            state,
                            end_row,
                            reason: results[i].finding.kind.as_str(),
                            details: d,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(controller = %instance, error = %e, "stop request failed");
                        results[i].outcome = Some(Outcome::Failed);
                        results[i].error = Some(e);
                    }
                }
            }
            let result = batch.finish(&stopped, audit).await;
            tick();
            match result {
                Ok(()) => {
                    for &i in &stopped_idx {
                        results[i].outcome = Some(Outcome::Repaired);
                    }
                    for &i in chunk {
                        if results[i].outcome.is_none() {
                            results[i].outcome = Some(Outcome::Conflict);
                        }
                    }
                }
                Err(e) => {
                    // The stops went out but their rows and audit rows did not
                    // commit. The controller reports them gone next pass, so
                    // nothing is stopped twice; the audit gap is logged here.
                    tracing::error!(error = %e, stopped = stopped_idx.len(), "recording stopped sessions failed");
                    let unset: Vec<usize> = chunk.iter().copied().filter(|&i| results[i].outcome.is_none()).collect();
                    fail(&mut results, &stopped_idx, &e.to_string());
                    fail(&mut results, &unset, &e.to_string());
                    store_failed = true;
                }
            }
        }
    }

    let any_failed = results.iter().any(|r| r.outcome == Some(Outcome::Failed));
    Applied { results, store_failed, any_failed }
}

fn record(results: &mut [FindingResult], idxs: &[usize], outcomes: &[Outcome]) {
    for (&i, &o) in idxs.iter().zip(outcomes) {
        results[i].outcome = Some(o);
    }
}

fn fail(results: &mut [FindingResult], idxs: &[usize], why: &str) {
    for &i in idxs {
        results[i].outcome = Some(Outcome::Failed);
        results[i].error = Some(why.to_owned());
    }
}
