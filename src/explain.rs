//! One session explained, for `sessiond explain` and `GET /sessions/{id}`: its
//! row as mapped, what each controller lists for it, the finding of a pass
//! with its decision and why, and its audit history.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::model::{InstanceSnapshot, SessionId};
use crate::reconcile::classify::Decision;
use crate::reconcile::FindingResult;
use crate::store::operator::{AuditView, RowView};

/// Audit rows shown, newest first.
pub const AUDIT_ROWS: i64 = 20;

/// One controller's entry for a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LiveEntry {
    pub controller: String,
    pub state: &'static str,
    pub owner_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
}

/// The entries of the sessions that have findings, from a pass's lists: the
/// ones an operator asks about. Sessions without findings were consistent.
///
/// One merge of the sorted subjects with each list walked in id order: no
/// hash of each of a million listed ids.
pub fn entries_of<'a>(
    subjects: impl Iterator<Item = &'a str>,
    instances: &[InstanceSnapshot],
) -> BTreeMap<String, Vec<LiveEntry>> {
    let mut wanted: Vec<&str> = subjects.collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut out: BTreeMap<String, Vec<LiveEntry>> = BTreeMap::new();
    for inst in instances {
        let Ok(list) = &inst.result else { continue };
        let mut next = wanted.iter().copied().peekable();
        let sessions = &list.sessions;
        for i in sessions.by_id() {
            let Some(id) = sessions.id(i) else { continue };
            while next.next_if(|w| *w < id).is_some() {}
            let Some(&w) = next.peek() else { break };
            if w == id {
                if let Some(s) = sessions.get(i) {
                    out.entry(id.to_owned()).or_default().push(entry(inst, s));
                }
            }
        }
    }
    out
}

fn entry(inst: &InstanceSnapshot, s: crate::model::LiveRef<'_>) -> LiveEntry {
    LiveEntry {
        controller: inst.name.clone(),
        state: s.state.as_str(),
        owner_id: s.owner_id.to_owned(),
        started_at: s.started_at,
    }
}

/// The entries of one id, from lists fetched now.
pub fn entries_for(id: &str, instances: &[InstanceSnapshot]) -> Vec<LiveEntry> {
    let mut out = Vec::new();
    for inst in instances {
        let Ok(list) = &inst.result else { continue };
        out.extend(list.sessions.iter().filter(|s| s.id == id).map(|s| entry(inst, s)));
    }
    out
}

/// A finding, as an operator reads it.
#[derive(Clone, Debug, Serialize)]
pub struct FindingView {
    pub session_id: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// repair, wait, guarded, deferred, report, note.
    pub decision: &'static str,
    /// Why, in words: what it waits for, what holds it back.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub detail: String,
    /// Consecutive passes that have seen it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streak: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<DateTime<Utc>>,
}

impl FindingView {
    pub fn of(f: &FindingResult, guard_tripped: bool) -> FindingView {
        let (decision, reason) = match &f.finding.decision {
            Decision::Repair => ("repair", "every rule allows it".to_owned()),
            Decision::Wait { reason } => ("wait", reason.to_string()),
            Decision::Guarded => (
                "guarded",
                "the mass-repair guard holds back this controller's orphans: too many of its live rows went missing \
                 at once, with no restart to explain them (POST /guard/release, or once --force)"
                    .to_owned(),
            ),
            Decision::Deferred { ahead, limit } => (
                "deferred",
                format!(
                    "{ahead} older repairs of this kind are ahead of it; reconcile.max_repairs_per_pass lets {limit} \
                     through per pass"
                ),
            ),
            Decision::Report { reason } => ("report", reason.to_string()),
            Decision::Note if f.finding.kind == crate::reconcile::classify::Kind::Unverifiable => (
                "note",
                format!(
                    "unverifiable: the list of {} could not be used this pass, so nobody can tell whether it holds \
                     the session; nothing is done until it can be read",
                    f.finding.instance.as_deref().unwrap_or("its controller")
                ),
            ),
            Decision::Note => ("note", "nothing to repair: reported only".to_owned()),
        };
        let reason = if guard_tripped && decision == "repair" {
            format!("{reason} (the guard tripped, but was released or overridden for this pass)")
        } else {
            reason
        };
        FindingView {
            session_id: f.finding.subject.clone(),
            kind: f.finding.kind.as_str(),
            controller: f.finding.instance.clone(),
            decision,
            reason,
            outcome: f.outcome.map(|o| format!("{o:?}").to_lowercase()),
            error: f.error.clone(),
            detail: f.finding.detail.clone(),
            streak: f.seen.map(|s| s.passes),
            first_seen: f.seen.map(|s| s.first_seen),
        }
    }
}

/// Everything known about one session.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub session_id: String,
    /// The row, or `None` when the table has none.
    pub row: Option<RowView>,
    /// What each controller lists for the id.
    pub controllers: Vec<LiveEntry>,
    /// Where `controllers` comes from.
    pub controllers_source: String,
    /// The findings about the id (one, or several of different kinds).
    pub findings: Vec<FindingView>,
    /// Which pass the findings come from, and what it was.
    pub pass: PassRef,
    /// Newest first, at most [`AUDIT_ROWS`].
    pub audit: Vec<AuditView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PassRef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    pub description: String,
    /// Controllers whose list the pass could not use, and why: their rows are
    /// unverifiable.
    pub unreachable: BTreeMap<String, String>,
}

/// Whether `id` is a session id sessiond would look up.
pub fn valid_id(id: &str, pattern: &regex::Regex) -> bool {
    id.len() <= 255 && !id.chars().any(char::is_control) && SessionId::parse(id, pattern).is_some()
}

/// The text `sessiond explain` prints.
pub fn render(e: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "session {}", e.session_id);
    let _ = writeln!(s, "\nROW");
    match &e.row {
        None => {
            let _ = writeln!(s, "  no row in the table");
        }
        Some(r) => {
            let _ = writeln!(
                s,
                "  state        {} ({})",
                r.state.unwrap_or("not in the mapping's vocabulary"),
                r.value.as_deref().unwrap_or("NULL")
            );
            if r.deleted_flag {
                let _ = writeln!(s, "  deleted      flagged");
            }
            let _ = writeln!(s, "  owner        {}", r.owner_id.as_deref().unwrap_or("-"));
            let _ = writeln!(s, "  controller   {}", r.controller_instance.as_deref().unwrap_or("-"));
            let _ = writeln!(s, "  created      {}", r.created_at.to_rfc3339());
            let _ = writeln!(s, "  changed      {}", r.changed_at.to_rfc3339());
        }
    }
    let _ = writeln!(s, "\nCONTROLLERS ({})", e.controllers_source);
    if e.controllers.is_empty() {
        let _ = writeln!(s, "  listed by none");
    }
    for c in &e.controllers {
        let started = c.started_at.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339());
        let _ = writeln!(s, "  {:<14} {:<9} owner {}  started {started}", c.controller, c.state, c.owner_id);
    }
    for (name, why) in &e.pass.unreachable {
        let _ = writeln!(s, "  {name:<14} unreachable: {why}");
    }
    let _ = writeln!(s, "\nFINDING ({})", e.pass.description);
    if e.findings.is_empty() {
        let _ = writeln!(s, "  none: the pass found this session consistent (or never saw it)");
    }
    for f in &e.findings {
        let _ = writeln!(s, "  {} on {}: {}", f.kind, f.controller.as_deref().unwrap_or("-"), f.detail);
        let _ = writeln!(s, "  decision     {}: {}", f.decision, f.reason);
        if let Some(o) = &f.outcome {
            let _ =
                writeln!(s, "  outcome      {o}{}", f.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default());
        }
        if let (Some(n), Some(first)) = (f.streak, f.first_seen) {
            let _ = writeln!(s, "  seen         {n} pass(es) in a row, first at {}", first.to_rfc3339());
        }
    }
    let _ = writeln!(s, "\nAUDIT (newest first, at most {AUDIT_ROWS})");
    if e.audit.is_empty() {
        let _ = writeln!(s, "  none");
    }
    for a in &e.audit {
        let _ = writeln!(
            s,
            "  {}  {:<10} {} -> {}  {}  by {}",
            a.at.to_rfc3339(),
            a.trigger,
            a.old_state.as_deref().unwrap_or("-"),
            a.new_state.as_deref().unwrap_or("-"),
            a.reason.as_deref().unwrap_or("-"),
            a.actor
        );
    }
    s
}

#[cfg(test)]
mod entries_tests {
    use super::*;
    use crate::model::{ControllerList, LiveSession, LiveSessions, LiveState};

    fn instance(name: &str, ids: &[String], owner: &str) -> InstanceSnapshot {
        let sessions: LiveSessions = ids
            .iter()
            .enumerate()
            .map(|(k, id)| LiveSession {
                id: SessionId::from_row(id.clone()),
                owner_id: format!("{owner}-{k}"),
                state: LiveState::Active,
                started_at: None,
            })
            .collect();
        InstanceSnapshot {
            name: name.to_owned(),
            fetched_at: DateTime::<Utc>::UNIX_EPOCH,
            result: Ok(ControllerList {
                boot_id: "b".into(),
                generated_at: None,
                sessions,
                invalid: Vec::new(),
                counters: None,
                problems: Vec::new(),
            }),
            boot_ids: Vec::new(),
        }
    }

    #[test]
    fn the_entries_of_some_subjects_are_every_listing_of_each_in_instance_then_list_order() {
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..300 {
            let id = |rng: &mut fastrand::Rng| format!("s{}", rng.u8(0..15));
            let lists: Vec<Vec<String>> = (0..3)
                .map(|_| {
                    let n = rng.usize(0..12);
                    (0..n).map(|_| id(&mut rng)).collect()
                })
                .collect();
            let n = rng.usize(0..8);
            let subjects: Vec<String> = (0..n).map(|_| id(&mut rng)).collect();
            let mut instances: Vec<InstanceSnapshot> =
                lists.iter().enumerate().map(|(j, ids)| instance(&format!("c{j}"), ids, &format!("o{j}"))).collect();
            instances.push(InstanceSnapshot { result: Err("unreachable".into()), ..instance("down", &[], "x") });
            // Each subject's entries: every instance in order, and in each its
            // listings in list order.
            let mut want: BTreeMap<String, Vec<LiveEntry>> = BTreeMap::new();
            for inst in &instances {
                let Ok(list) = &inst.result else { continue };
                for s in list.sessions.iter().filter(|s| subjects.iter().any(|w| w == s.id)) {
                    want.entry(s.id.to_owned()).or_default().push(entry(inst, s));
                }
            }
            let got = entries_of(subjects.iter().map(String::as_str), &instances);
            assert_eq!(got, want, "lists {lists:?} subjects {subjects:?}");
            for w in &subjects {
                assert_eq!(entries_for(w, &instances), want.get(w).cloned().unwrap_or_default());
            }
        }
    }
}
