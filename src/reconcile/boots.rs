//! What sessiond believes about the process (or processes) behind each
//! controller URL, from the boot ids they answer with. Pure, like the
//! classifier: boot records and this pass's answers in, new records and a
//! verdict per instance out.
//!
//! A controller's list is read as "everything this instance holds". That is
//! only true if one process answers at its URL. Several processes behind one
//! URL (a FastAPI app run with several workers, say) each answer with their own
//! memory and their own boot id, and each one's list makes the others'
//! sessions look orphaned. So a list is trusted for what it does *not* hold only
//! once its boot id has held steadily:
//!
//! - **Trusted.** The boot id has been the only one answered over enough
//!   fetches. The list is used in full.
//! - **Probation.** A boot id seen for the first time (sessiond's first sight,
//!   or a restart) is not trusted yet: what the list holds counts (a held row is
//!   never an orphan), but nothing is ended for being absent from it, and its
//!   change of boot id explains no orphan until it is confirmed.
//! - **Inconsistent.** Answers disagree within one pass, or a boot id seen
//!   before comes back after another (A→B→A): several processes answer at this
//!   URL. The instance is treated as unreachable, its rows unverifiable, until
//!   one boot id holds steadily for much longer.
//!
//! Every pass reads each instance's list once and its boot id a few more times
//! over new connections (cheap: only as far as `boot_id`), so that a second
//! process shows itself. [`verifications`] says how many.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::model::{BootCandidate, BootRecord, BootRecords, InstanceSnapshot};

/// Agreeing answers a new boot id needs before it is trusted.
pub const PROBATION_FETCHES: u32 = 16;
/// Agreeing answers, and passes, an inconsistent instance needs to be trusted
/// again: far more, because it has shown several processes already.
pub const RECOVERY_FETCHES: u32 = 48;
pub const RECOVERY_PASSES: u32 = 6;
/// Extra boot-id fetches per pass of a trusted instance.
pub const STEADY_VERIFICATIONS: usize = 3;
/// Boot ids remembered besides the trusted one.
const HISTORY: usize = 16;

/// What this pass may believe of an instance's list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Trust {
    /// One process, confirmed: the list is used in full.
    Trusted,
    /// A boot id not confirmed yet: what the list holds counts, what it lacks
    /// does not.
    Probation { boot_id: String, fetches: u32, needed: u32 },
    /// Several processes answer at this URL: treated as unreachable.
    Inconsistent { boot_ids: Vec<String> },
}

impl Trust {
    /// Why absence from this list proves nothing, if it does not.
    pub fn absence_unproven(&self, instance: &str) -> Option<String> {
        match self {
            Trust::Trusted => None,
            Trust::Probation { boot_id, fetches, needed } => Some(format!(
                "{instance}'s boot id {boot_id} is not confirmed yet ({fetches} of {needed} answers agree)"
            )),
            Trust::Inconsistent { .. } => Some(format!("{instance} answers with several boot ids")),
        }
    }
}

/// The verification fetches to make of an instance this pass, after its list
/// answered with boot id `first`. `passes` is the number of passes a new boot
/// id must span: the confirmations the daemon needs, or 1 for `once`, which
/// must decide within its one pass.
pub fn verifications(record: Option<&BootRecord>, first: &str, passes: u32) -> usize {
    let passes = passes.max(1);
    match record {
        Some(r) if r.trusted.as_deref() == Some(first) && r.inconsistent_since.is_none() && r.candidate.is_none() => {
            STEADY_VERIFICATIONS
        }
        Some(r) if r.inconsistent_since.is_some() => {
            (RECOVERY_FETCHES.div_ceil(RECOVERY_PASSES.max(passes)) as usize).max(STEADY_VERIFICATIONS + 1) - 1
        }
        _ => (PROBATION_FETCHES.div_ceil(passes) as usize).max(STEADY_VERIFICATIONS + 1) - 1,
    }
}

/// What changed for one instance this pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub trust: BTreeMap<String, Trust>,
    /// Instances whose trusted boot id changed this pass: a confirmed restart.
    pub restarted: Vec<String>,
    /// Instances that became inconsistent this pass.
    pub became_inconsistent: Vec<String>,
}

/// Updates the boot records with this pass's answers. `passes` as in
/// [`verifications`].
pub fn observe(
    previous: &BootRecords,
    instances: &[InstanceSnapshot],
    now: DateTime<Utc>,
    passes: u32,
) -> (BootRecords, Observed) {
    let passes = passes.max(1);
    let mut boots = previous.clone();
    let mut seen = Observed::default();
    for inst in instances {
        if inst.result.is_err() || inst.boot_ids.is_empty() {
            continue;
        }
        let rec = boots.entry(inst.name.clone()).or_default();
        let was_inconsistent = rec.inconsistent_since.is_some();
        let mut distinct: Vec<&String> = Vec::new();
        for b in &inst.boot_ids {
            if !distinct.contains(&b) {
                distinct.push(b);
            }
        }
        let trust = if distinct.len() > 1 {
            // Two processes within one pass.
            inconsistent(rec, distinct.iter().map(|b| b.as_str()), now)
        } else {
            let id = distinct[0];
            let n = inst.boot_ids.len() as u32;
            let trusted = rec.trusted.as_ref() == Some(id);
            let is_candidate = rec.candidate.as_ref().is_some_and(|c| &c.boot_id == id);
            if trusted && rec.candidate.is_none() && rec.inconsistent_since.is_none() {
                Trust::Trusted
            } else if is_candidate {
                candidate(rec, id, n, now, passes, &mut seen, &inst.name)
            } else if rec.history.contains(id) || (trusted && rec.candidate.is_some()) {
                // A boot id moved away from comes back after another: A→B→A.
                let mut ids: Vec<String> = rec.candidate.iter().map(|c| c.boot_id.clone()).collect();
                ids.push(id.clone());
                inconsistent(rec, ids.iter().map(String::as_str), now)
            } else {
                // A new boot id (a restart, or sessiond's first sight), or the
                // trusted one answering again after an inconsistency.
                candidate(rec, id, n, now, passes, &mut seen, &inst.name)
            }
        };
        if matches!(trust, Trust::Inconsistent { .. }) && !was_inconsistent {
            seen.became_inconsistent.push(inst.name.clone());
        }
        seen.trust.insert(inst.name.clone(), trust);
    }
    (boots, seen)
}

/// Records a boot id, other than the trusted one, answering steadily this pass.
fn candidate(
    rec: &mut BootRecord,
    id: &str,
    answers: u32,
    now: DateTime<Utc>,
    passes: u32,
    seen: &mut Observed,
    name: &str,
) -> Trust {
    match &mut rec.candidate {
        Some(c) if c.boot_id == id => {
            c.fetches += answers;
            c.passes += 1;
        }
        other => {
            if let Some(old) = other.take() {
                remember(&mut rec.history, old.boot_id);
            }
            *other = Some(BootCandidate { boot_id: id.to_owned(), since: now, fetches: answers, passes: 1 });
        }
    }
    let Some(c) = &rec.candidate else { unreachable!("the candidate was set just above") };
    let (needed_fetches, needed_passes) = if rec.inconsistent_since.is_some() {
        (RECOVERY_FETCHES, RECOVERY_PASSES.max(passes))
    } else {
        (PROBATION_FETCHES, passes)
    };
    if c.fetches < needed_fetches || c.passes < needed_passes {
        return Trust::Probation { boot_id: id.to_owned(), fetches: c.fetches, needed: needed_fetches };
    }
    // Confirmed. A change from another trusted boot id is a restart, dated from
    // when the new one was first seen; the first boot id ever explains nothing.
    let since = c.since;
    let before = rec.trusted.replace(id.to_owned());
    if let Some(before) = before.filter(|b| b != id) {
        remember(&mut rec.history, before);
        rec.changed_at = Some(since);
        seen.restarted.push(name.to_owned());
    }
    rec.history.retain(|h| h != id);
    rec.candidate = None;
    rec.inconsistent_since = None;
    Trust::Trusted
}

fn inconsistent<'a>(rec: &mut BootRecord, ids: impl Iterator<Item = &'a str>, now: DateTime<Utc>) -> Trust {
    let mut boot_ids: Vec<String> = Vec::new();
    for id in ids {
        if rec.trusted.as_deref() != Some(id) {
            remember(&mut rec.history, id.to_owned());
        }
        boot_ids.push(id.to_owned());
    }
    if let Some(c) = rec.candidate.take() {
        if rec.trusted.as_deref() != Some(c.boot_id.as_str()) {
            remember(&mut rec.history, c.boot_id);
        }
    }
    rec.inconsistent_since.get_or_insert(now);
    Trust::Inconsistent { boot_ids }
}

fn remember(history: &mut Vec<String>, id: String) {
    history.retain(|h| h != &id);
    history.push(id);
    if history.len() > HISTORY {
        history.remove(0);
    }
}
