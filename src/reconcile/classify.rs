//! The classifier: a pure, synchronous function from the two snapshots, the
//! memory of earlier passes and the config to a list of findings, each with the
//! decision taken about it and, where the decision is to repair, the repair.
//!
//! Architecture Invariant: nothing here does I/O or reads a clock. Time comes in
//! as `now`, so every safety rule can be tested by moving a number.
//!
//! Rules are applied in this order for each finding: what it is (kind), whether
//! it may be acted on at all (grace, confirmations), the policy for its kind, and
//! finally the mass-repair guard over the whole pass.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rustc_hash::{FxHashMap, FxHashSet};

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::Serialize;

use crate::config::{Policy, ReconcileConfig};
use crate::model::{
    BootRecords, ControllerList, DbSnapshot, InstanceSnapshot, InvalidEntryKind, LiveSession, RowState, SessionId,
    SessionRow, StopOutcome,
};
use crate::reconcile::boots::Trust;

/// The kinds of finding. The label values are part of the metrics contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Orphaned,
    Zombie,
    Unpersisted,
    Duplicate,
    StuckCreating,
    Drift,
    InvalidId,
    InvalidEntry,
    Unverifiable,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Orphaned,
        Kind::Zombie,
        Kind::Unpersisted,
        Kind::Duplicate,
        Kind::StuckCreating,
        Kind::Drift,
        Kind::InvalidId,
        Kind::InvalidEntry,
        Kind::Unverifiable,
    ];

    /// The kinds that have a repair.
    pub const REPAIRABLE: [Kind; 6] =
        [Kind::Orphaned, Kind::Zombie, Kind::Unpersisted, Kind::Duplicate, Kind::StuckCreating, Kind::Drift];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Orphaned => "orphaned",
            Kind::Zombie => "zombie",
            Kind::Unpersisted => "unpersisted",
            Kind::Duplicate => "duplicate",
            Kind::StuckCreating => "stuck_creating",
            Kind::Drift => "drift",
            Kind::InvalidId => "invalid_id",
            Kind::InvalidEntry => "invalid_entry",
            Kind::Unverifiable => "unverifiable",
        }
    }

    fn policy(self, config: &ReconcileConfig) -> Policy {
        let p = &config.policy;
        match self {
            Kind::Orphaned => p.orphaned,
            Kind::Zombie => p.zombie,
            Kind::Unpersisted => p.unpersisted,
            Kind::Duplicate => p.duplicate,
            Kind::StuckCreating => p.stuck_creating,
            Kind::Drift => p.drift,
            Kind::InvalidId | Kind::InvalidEntry | Kind::Unverifiable => Policy::Report,
        }
    }
}

/// What a pass decided about a finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Repair it now; the plan is in [`Finding::repair`].
    Repair,
    /// Not yet: too young, not confirmed, or its evidence is incomplete.
    Wait { reason: String },
    /// The mass-repair guard held it back.
    Guarded,
    /// Reported only: policy `report`, `observe` mode, `--dry-run`, or no way to repair.
    Report { reason: String },
    /// A finding with no repair (invalid ids, unverifiable rows).
    Note,
}

/// A change the apply step makes. Row changes carry the version they were
/// classified against; they apply only if the row still has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Repair {
    UpdateRow {
        id: SessionId,
        version: String,
        from: RowState,
        to: RowState,
        /// Set for drift: the owner the controller reports.
        owner_id: Option<String>,
        /// Set for drift: the instance that holds the session.
        controller_instance: Option<String>,
        end_reason: Option<&'static str>,
    },
    InsertRow {
        id: SessionId,
        owner_id: String,
        controller_instance: String,
        state: RowState,
        created_at: DateTime<Utc>,
    },
    /// Ask the controller to stop a session; with `end_row`, also mark its row
    /// stopped (a duplicate the controller holds). Applies only if the row still
    /// has `row_version`.
    StopLive { id: SessionId, controller_instance: String, row_version: String, row_state: RowState, end_row: bool },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: Kind,
    /// The session id, or for an invalid id, the raw value (for the report only).
    pub subject: String,
    pub instance: Option<String>,
    pub detail: String,
    #[serde(flatten)]
    pub decision: Decision,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<Repair>,
}

/// How this pass was asked to behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PassOptions {
    /// `observe` mode or `--dry-run`: decide, but turn every repair into a report.
    pub read_only: bool,
    /// `--force`: the mass-repair guard does not apply to this pass.
    pub force: bool,
    /// `once` acts on one pass; the daemon requires `confirmations` passes.
    pub require_confirmations: bool,
}

/// What sessiond remembers from one pass to the next (in the daemon's memory).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Consecutive passes each finding has been seen, and when it was first seen.
    pub streaks: HashMap<(Kind, String), Streak>,
    /// Since when each unreachable instance has been unreachable.
    pub unreachable_since: HashMap<String, DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Streak {
    pub passes: u32,
    pub first_seen: DateTime<Utc>,
}

/// The application's lookups, replayed: every live controller session looked up
/// in the database as the application's API would.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Probes {
    pub found: u64,
    pub never_existed: u64,
    pub deleted: u64,
    pub invalid_format: u64,
}

/// Everything a classification produces.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Classification {
    pub findings: Vec<Finding>,
    pub memory: Memory,
    /// Instances whose repairs the guard held back, with the kinds held.
    pub guard_tripped: BTreeMap<String, BTreeSet<Kind>>,
    pub probes: Probes,
    /// Stop intents left unsettled by a process that is gone, and what this
    /// pass's lists say became of them.
    pub settle: Vec<SettleIntent>,
}

/// An abandoned stop intent, and its outcome as this pass sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleIntent {
    pub intent: i64,
    pub session_id: String,
    pub outcome: StopOutcome,
    pub detail: String,
}

/// Everything the classifier looks at.
pub struct Input<'a> {
    pub now: DateTime<Utc>,
    pub config: &'a ReconcileConfig,
    pub instances: &'a [InstanceSnapshot],
    pub db: &'a DbSnapshot,
    pub memory: &'a Memory,
    /// Boot records after this pass's lists were observed (see `boots::observe`).
    pub boots: &'a BootRecords,
    /// What each reachable instance's list may be trusted for (`boots::observe`);
    /// an instance missing here is trusted.
    pub trust: &'a BTreeMap<String, Trust>,
    /// Instances with a `stop_url`: zombies elsewhere can only be reported.
    pub stoppable: &'a BTreeSet<String>,
    pub options: PassOptions,
}

/// How long a live session had been running when its list was fetched. Both
/// ends come from the controller's own clock (`generated_at − started_at`), so a
/// controller whose clock is behind or ahead of ours cannot make a session look
/// older than it is. Without both, the age counts from when sessiond first saw
/// the session, by sessiond's clock: a `once` pass then sees it as new.
fn live_age(input: &Input<'_>, inst: &InstanceSnapshot, list: &ControllerList, live: &LiveSession) -> ChronoDuration {
    if let (Some(generated), Some(started)) = (list.generated_at, live.started_at) {
        return generated - started;
    }
    let first_seen = input
        .memory
        .streaks
        .get(&(Kind::Unpersisted, live.id.to_string()))
        .map_or(inst.fetched_at, |s| s.first_seen.min(inst.fetched_at));
    inst.fetched_at - first_seen
}

fn to_chrono(d: std::time::Duration) -> ChronoDuration {
    ChronoDuration::from_std(d).unwrap_or(ChronoDuration::MAX)
}

/// Where a live session was seen.
struct Held<'a> {
    instance: &'a str,
    /// `None` when the entry itself was unusable (unknown state, no owner, …).
    session: Option<&'a LiveSession>,
    /// Listed more than once: held, but never acted on.
    ambiguous: bool,
}

impl<'a> Held<'a> {
    /// The listing, if it is the only one and usable.
    fn usable(&self) -> Option<&'a LiveSession> {
        if self.ambiguous {
            None
        } else {
            self.session
        }
    }
}

/// Why an orphan is not surprising: the guard does not count explained orphans.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Explained {
    No,
    Restart,
    InstanceDead,
}

struct Candidate {
    finding: Finding,
    /// The moment the finding's subject last changed (for choosing the newest).
    changed_at: Option<DateTime<Utc>>,
    /// How old the evidence was when its snapshot was taken, for `grace`: a row's
    /// age at the moment the controller list it is compared with was fetched, or
    /// a live session's age by its controller's own clock. Never measured
    /// against the time of classification, which a stalled process would stretch.
    age: Option<ChronoDuration>,
    explained: Explained,
}

/// Classifies one pass. Pure: same input, same output.
pub fn classify(input: &Input<'_>) -> Classification {
    let now = input.now;
    let cfg = input.config;
    let grace = to_chrono(cfg.grace);

    let mut out = Classification::default();
    let mut candidates: Vec<Candidate> = Vec::new();

    // Reachability, and how long each unreachable instance has been so. An
    // instance where several processes answer is not reachable for this pass:
    // none of its lists can be trusted. It is not "down" either, so it never
    // counts towards instance_dead_after.
    let mut reachable: FxHashMap<&str, &InstanceSnapshot> = FxHashMap::default();
    let mut dead: BTreeSet<&str> = BTreeSet::new();
    let mut unreachable: FxHashMap<&str, String> = FxHashMap::default();
    for inst in input.instances {
        match (&inst.result, input.trust.get(&inst.name)) {
            (Ok(_), Some(Trust::Inconsistent { boot_ids })) => {
                unreachable.insert(
                    &inst.name,
                    format!(
                        "several processes answer at its URL (boot ids {}); its rows are unverifiable until one \
                         boot id holds steadily",
                        boot_ids.join(", ")
                    ),
                );
            }
            (Ok(_), _) => {
                reachable.insert(&inst.name, inst);
            }
            (Err(err), _) => {
                let since = input.memory.unreachable_since.get(&inst.name).copied().unwrap_or(inst.fetched_at);
                out.memory.unreachable_since.insert(inst.name.clone(), since);
                if let Some(after) = cfg.instance_dead_after {
                    if now - since >= to_chrono(after) {
                        dead.insert(&inst.name);
                    }
                }
                unreachable.insert(&inst.name, err.clone());
            }
        }
    }
    // Lists that are used: reachable instances only.
    let lists = || input.instances.iter().filter(|i| reachable.contains_key(i.name.as_str()));
    // Why absence from an instance's list proves nothing yet (a boot id on probation).
    let unproven = |instance: &str| input.trust.get(instance).and_then(|t| t.absence_unproven(instance));

    // Every id a reachable controller holds, valid or not. Invalid entries still
    // count as held: their rows must never be taken for orphans. An id listed
    // more than once (twice by one instance, or by two) is ambiguous: it is held,
    // reported, and never acted on, because nothing says which listing is right.
    let live_count: usize = lists().filter_map(|i| i.result.as_ref().ok()).map(|l| l.sessions.len()).sum();
    let mut held: FxHashMap<&str, Held<'_>> = FxHashMap::default();
    held.reserve(live_count);
    let mut ambiguous: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let describe = |inst: &str, session: Option<&LiveSession>| match session {
        Some(s) => format!("{inst} ({})", s.state.as_str()),
        None => format!("{inst} (unusable entry)"),
    };
    for inst in lists() {
        let Ok(list) = &inst.result else { continue };
        let listings = list
            .sessions
            .iter()
            .map(|s| (s.id.as_str(), Some(s)))
            .chain(list.invalid.iter().filter_map(|bad| bad.raw_id.as_deref().map(|raw| (raw, None))));
        for (id, session) in listings {
            match held.get_mut(id) {
                Some(first) => {
                    let seen = ambiguous.entry(id).or_insert_with(|| vec![describe(first.instance, first.session)]);
                    seen.push(describe(&inst.name, session));
                    first.ambiguous = true;
                }
                None => {
                    held.insert(id, Held { instance: &inst.name, session, ambiguous: false });
                }
            }
        }
        for bad in &list.invalid {
            let kind = match bad.kind {
                InvalidEntryKind::InvalidId => Kind::InvalidId,
                InvalidEntryKind::InvalidEntry => Kind::InvalidEntry,
            };
            if kind == Kind::InvalidId {
                out.probes.invalid_format += 1;
            }
            let subject = bad.raw_id.clone().unwrap_or_else(|| "<missing>".into());
            candidates.push(note(kind, &subject, Some(&inst.name), bad.problem.clone()));
        }
    }
    for (id, listings) in &ambiguous {
        let first = held.get(id).map(|h| h.instance);
        candidates.push(note(
            Kind::InvalidEntry,
            id,
            first,
            format!(
                "listed {} times: by {}; nothing is done until one listing remains",
                listings.len(),
                listings.join(", ")
            ),
        ));
    }

    let rows_by_id: FxHashMap<&str, &SessionRow> = input.db.rows.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut live_rows_per_instance: FxHashMap<&str, usize> = FxHashMap::default();
    // Rows a row-side finding already deals with; duplicates leave them alone.
    let mut handled_rows: BTreeSet<&str> = BTreeSet::new();

    // Row side: every live row.
    for row in input.db.rows.iter().filter(|r| r.state.is_live()) {
        *live_rows_per_instance.entry(row.controller_instance.as_str()).or_default() += 1;
        if let Some(h) = held.get(row.id.as_str()) {
            if let Some(live) = h.usable() {
                let fetched_at = reachable.get(h.instance).map_or(input.db.read_at, |s| s.fetched_at);
                if let Some(mut c) = drift(row, live, h.instance, fetched_at) {
                    let claimed_by = row.controller_instance.as_str();
                    if claimed_by != h.instance && !reachable.contains_key(claimed_by) {
                        // The instance the row names may hold the session too.
                        c.finding.decision =
                            Decision::Wait { reason: format!("the row's instance {claimed_by} is unreachable") };
                    }
                    candidates.push(c);
                }
            }
            continue;
        }
        let instance = row.controller_instance.as_str();
        let snapshot = reachable.get(instance);
        let is_dead = dead.contains(instance);
        if snapshot.is_none() && !is_dead {
            let why = match unreachable.get(instance) {
                Some(err) => format!("instance {instance} is unreachable: {err}"),
                None => format!("instance {instance} is not configured"),
            };
            candidates.push(note(Kind::Unverifiable, row.id.as_str(), Some(instance), why));
            continue;
        }
        // What the row is compared with was read at this moment.
        let reference = snapshot.map_or(input.db.read_at, |s| s.fetched_at);
        if row.state == RowState::Creating {
            if reference - row.created_at >= to_chrono(cfg.creating_timeout) {
                handled_rows.insert(row.id.as_str());
                candidates.push(Candidate {
                    finding: Finding {
                        kind: Kind::StuckCreating,
                        subject: row.id.to_string(),
                        instance: Some(instance.to_owned()),
                        detail: format!("creating since {}, not live", row.created_at.to_rfc3339()),
                        decision: unproven(instance).map_or(Decision::Note, |reason| Decision::Wait { reason }),
                        repair: Some(end_row(row, RowState::Failed, "stuck_creating")),
                    },
                    changed_at: Some(row.changed_at),
                    age: Some(reference - row.changed_at),
                    explained: Explained::No,
                });
            }
            // A younger 'creating' row is a creation in progress, not an orphan.
            continue;
        }
        // Snapshot skew: a row that changed after (or within grace of) the moment
        // its instance's list was taken may simply not be in that list yet.
        let explained = if is_dead {
            Explained::InstanceDead
        } else {
            if row.changed_at > reference - grace {
                continue;
            }
            match input.boots.get(instance).and_then(|b| b.changed_at) {
                Some(restart) if row.created_at < restart => Explained::Restart,
                _ => Explained::No,
            }
        };
        handled_rows.insert(row.id.as_str());
        let detail = match explained {
            Explained::InstanceDead => {
                format!("instance {instance} has been unreachable longer than instance_dead_after")
            }
            Explained::Restart => format!("{} but absent from {instance}'s list since it restarted", row.state),
            Explained::No => format!("{} but absent from {instance}'s list", row.state),
        };
        candidates.push(Candidate {
            finding: Finding {
                kind: Kind::Orphaned,
                subject: row.id.to_string(),
                instance: Some(instance.to_owned()),
                detail,
                // On probation, absence from the list proves nothing yet.
                decision: unproven(instance).map_or(Decision::Note, |reason| Decision::Wait { reason }),
                repair: Some(end_row(row, RowState::Stopped, "orphaned")),
            },
            changed_at: Some(row.changed_at),
            age: Some(reference - row.changed_at),
            explained,
        });
    }

    // Controller side: every well-formed live session.
    for inst in lists() {
        let Ok(list) = &inst.result else { continue };
        for live in &list.sessions {
            match held.get(live.id.as_str()).and_then(Held::usable) {
                Some(only) if std::ptr::eq(only, live) => {}
                _ => continue, // listed more than once: reported above, never acted on
            }
            match rows_by_id.get(live.id.as_str()) {
                Some(row) if row.state.is_live() => out.probes.found += 1,
                Some(row) => {
                    if row.state == RowState::Deleted {
                        out.probes.deleted += 1;
                    } else {
                        out.probes.found += 1;
                    }
                    candidates.push(Candidate {
                        finding: Finding {
                            kind: Kind::Zombie,
                            subject: live.id.to_string(),
                            instance: Some(inst.name.clone()),
                            detail: format!("live on {} but the row is {}", inst.name, row.state),
                            decision: Decision::Note,
                            repair: Some(Repair::StopLive {
                                id: live.id.clone(),
                                controller_instance: inst.name.clone(),
                                row_version: row.version.clone(),
                                row_state: row.state,
                                end_row: false,
                            }),
                        },
                        changed_at: Some(row.changed_at),
                        // A row stopped just before the list was taken may be a
                        // stop the controller has not carried out yet.
                        age: Some(inst.fetched_at - row.changed_at),
                        explained: Explained::No,
                    });
                }
                None => {
                    out.probes.never_existed += 1;
                    let age = live_age(input, inst, list, live);
                    candidates.push(Candidate {
                        finding: Finding {
                            kind: Kind::Unpersisted,
                            subject: live.id.to_string(),
                            instance: Some(inst.name.clone()),
                            detail: format!("live on {} with no row", inst.name),
                            decision: Decision::Note,
                            repair: Some(Repair::InsertRow {
                                id: live.id.clone(),
                                owner_id: live.owner_id.clone(),
                                controller_instance: inst.name.clone(),
                                state: live.state.row_state(),
                                created_at: inst.fetched_at - age.max(ChronoDuration::zero()),
                            }),
                        },
                        changed_at: Some(inst.fetched_at - age),
                        age: Some(age),
                        explained: Explained::No,
                    });
                }
            }
        }
    }

    // Live rows that stay live after this pass, by the owner they will have once
    // drift is repaired, sorted so that an owner's rows are adjacent.
    let mut by_owner: Vec<(&str, &SessionRow)> = input
        .db
        .rows
        .iter()
        .filter(|r| r.state.is_live() && !handled_rows.contains(r.id.as_str()))
        .map(|r| {
            let owner =
                held.get(r.id.as_str()).and_then(Held::usable).map_or(r.owner_id.as_str(), |s| s.owner_id.as_str());
            (owner, r)
        })
        .collect();
    by_owner.sort_unstable_by(|a, b| a.0.cmp(b.0));
    unpersisted_duplicates(&by_owner, &mut candidates);
    // Duplicates span instances: their rows are compared with the earliest list.
    let earliest_fetch = reachable.values().map(|s| s.fetched_at).min().unwrap_or(input.db.read_at);
    duplicates(&by_owner, &held, &reachable, &dead, &unproven, earliest_fetch, &mut candidates);
    drop(by_owner);

    // Stops recorded by earlier passes (or another sessiond) and not settled.
    // One still in flight holds back any new stop of its session; one whose
    // sender is gone is settled by what this pass's lists show.
    let mut in_flight: FxHashSet<&str> = FxHashSet::default();
    for intent in &input.db.open_intents {
        if !intent.expired {
            in_flight.insert(intent.session_id.as_str());
            continue;
        }
        if !reachable.contains_key(intent.controller.as_str()) {
            continue; // settled once its controller answers again
        }
        let still_held = held.get(intent.session_id.as_str()).is_some_and(|h| h.instance == intent.controller);
        let (outcome, detail) = if still_held {
            in_flight.insert(intent.session_id.as_str());
            (
                StopOutcome::Unconfirmed,
                format!("the sender stopped before settling it, and {} still holds the session", intent.controller),
            )
        } else {
            (
                StopOutcome::Stopped,
                format!("the sender stopped before settling it; {} no longer holds the session", intent.controller),
            )
        };
        out.settle.push(SettleIntent { intent: intent.intent, session_id: intent.session_id.clone(), outcome, detail });
    }

    // Decide: grace, confirmations, policy.
    let mut next_streaks = HashMap::new();
    for c in &mut candidates {
        let key = (c.finding.kind, c.finding.subject.clone());
        let previous = input.memory.streaks.get(&key);
        let streak = Streak {
            passes: previous.map_or(1, |s| s.passes.saturating_add(1)),
            first_seen: previous.map_or(now, |s| s.first_seen),
        };
        next_streaks.insert(key, streak);
        if c.finding.repair.is_none() {
            c.finding.decision = Decision::Note;
            continue;
        }
        if let Decision::Wait { .. } = c.finding.decision {
            continue; // already held for want of evidence
        }
        if matches!(c.finding.repair, Some(Repair::StopLive { .. })) && in_flight.contains(c.finding.subject.as_str()) {
            c.finding.decision = Decision::Wait { reason: "a stop of this session is in flight or unsettled".into() };
            continue;
        }
        let young = c.age.is_some_and(|age| age < grace);
        c.finding.decision = if young {
            Decision::Wait { reason: format!("younger than grace ({})", humantime::format_duration(cfg.grace)) }
        } else if input.options.require_confirmations && streak.passes < cfg.confirmations {
            Decision::Wait { reason: format!("seen in {} of {} passes", streak.passes, cfg.confirmations) }
        } else if c.finding.kind.policy(cfg) == Policy::Report {
            Decision::Report { reason: "policy is report".into() }
        } else if matches!(&c.finding.repair, Some(Repair::StopLive { controller_instance, .. })
            if !input.stoppable.contains(controller_instance))
        {
            Decision::Report { reason: "no stop_url is configured for this instance".into() }
        } else {
            Decision::Repair
        };
    }
    out.memory.streaks = next_streaks;

    guard(input, &live_rows_per_instance, &mut candidates, &mut out.guard_tripped);

    for c in &mut candidates {
        if c.finding.decision == Decision::Repair && input.options.read_only {
            c.finding.decision = Decision::Report { reason: "read-only pass (observe mode or --dry-run)".into() };
        }
        // A finding that waits has no repair yet; a guarded or reported one keeps
        // it, so the report shows what would have been done.
        if let Decision::Wait { .. } = c.finding.decision {
            c.finding.repair = None;
        }
    }
    out.findings = candidates.into_iter().map(|c| c.finding).collect();
    out.findings.sort_by(|a, b| (a.kind, &a.subject).cmp(&(b.kind, &b.subject)));
    out
}

/// Ends a row (to `stopped` or `failed`), compare-and-set on its version.
fn end_row(row: &SessionRow, to: RowState, reason: &'static str) -> Repair {
    Repair::UpdateRow {
        id: row.id.clone(),
        version: row.version.clone(),
        from: row.state,
        to,
        owner_id: None,
        controller_instance: None,
        end_reason: Some(reason),
    }
}

fn note(kind: Kind, subject: &str, instance: Option<&str>, detail: String) -> Candidate {
    Candidate {
        finding: Finding {
            kind,
            subject: subject.to_owned(),
            instance: instance.map(str::to_owned),
            detail,
            decision: Decision::Note,
            repair: None,
        },
        changed_at: None,
        age: None,
        explained: Explained::No,
    }
}

/// A live row and its live session disagree on state, owner or instance.
fn drift(row: &SessionRow, live: &LiveSession, instance: &str, fetched_at: DateTime<Utc>) -> Option<Candidate> {
    let want_state = live.state.row_state();
    let mut diffs = Vec::new();
    if row.state != want_state {
        diffs.push(format!("state {} vs {}", row.state, live.state.as_str()));
    }
    if row.owner_id != live.owner_id {
        diffs.push("owner differs".to_owned());
    }
    if row.controller_instance != instance {
        diffs.push(format!("instance {} vs {}", row.controller_instance, instance));
    }
    if diffs.is_empty() {
        return None;
    }
    Some(Candidate {
        finding: Finding {
            kind: Kind::Drift,
            subject: row.id.to_string(),
            instance: Some(instance.to_owned()),
            detail: diffs.join(", "),
            decision: Decision::Note,
            repair: Some(Repair::UpdateRow {
                id: row.id.clone(),
                version: row.version.clone(),
                from: row.state,
                to: want_state,
                owner_id: (row.owner_id != live.owner_id).then(|| live.owner_id.clone()),
                controller_instance: (row.controller_instance != instance).then(|| instance.to_owned()),
                end_reason: None,
            }),
        },
        changed_at: Some(row.changed_at),
        age: Some(fetched_at - row.changed_at),
        explained: Explained::No,
    })
}

/// A live session with no row whose owner already has a live row that stays, or
/// that shares its owner with another such session, cannot be inserted: the
/// one-live-session-per-owner index would refuse it on every pass. It is a
/// duplicate held by the controller, reported for an operator to resolve, and
/// the newest session of a row-less owner is the one inserted.
fn unpersisted_duplicates(by_owner: &[(&str, &SessionRow)], candidates: &mut [Candidate]) {
    let mut newest: HashMap<String, (Option<DateTime<Utc>>, String)> = HashMap::new();
    for c in candidates.iter() {
        if let (Kind::Unpersisted, Some(Repair::InsertRow { owner_id, .. })) = (c.finding.kind, &c.finding.repair) {
            let entry = newest.entry(owner_id.clone()).or_insert((c.changed_at, c.finding.subject.clone()));
            if (c.changed_at, &c.finding.subject) > (entry.0, &entry.1) {
                *entry = (c.changed_at, c.finding.subject.clone());
            }
        }
    }
    if newest.is_empty() {
        return;
    }
    let row_of =
        |owner: &str| by_owner.binary_search_by(|(o, _)| (*o).cmp(owner)).ok().map(|i| by_owner[i].1.id.as_str());
    for c in candidates.iter_mut() {
        let Some(Repair::InsertRow { owner_id, .. }) = &c.finding.repair else { continue };
        let detail = if let Some(row) = row_of(owner_id) {
            format!("live with no row while its owner has live row {row}; not inserted")
        } else if newest.get(owner_id).is_some_and(|(_, keep)| keep != &c.finding.subject) {
            format!(
                "live with no row, as is a newer session of its owner ({}); only that one is inserted",
                newest.get(owner_id).map_or("", |(_, k)| k.as_str())
            )
        } else {
            continue;
        };
        c.finding.kind = Kind::Duplicate;
        c.finding.detail = detail;
        c.finding.repair = None;
    }
}

/// More than one live row for an owner: keep the one the controller holds (the
/// newest of those if it holds several, else the newest row) and stop the rest.
/// Rows that another finding already stops are left to it, and a group with a
/// row on an unreachable instance waits: we cannot know what that instance holds.
fn duplicates(
    by_owner: &[(&str, &SessionRow)],
    held: &FxHashMap<&str, Held<'_>>,
    reachable: &FxHashMap<&str, &InstanceSnapshot>,
    dead: &BTreeSet<&str>,
    unproven: &dyn Fn(&str) -> Option<String>,
    reference: DateTime<Utc>,
    candidates: &mut Vec<Candidate>,
) {
    let mut superseded: FxHashSet<String> = FxHashSet::default();
    for group in by_owner.chunk_by(|a, b| a.0 == b.0).filter(|g| g.len() > 1) {
        let rows: Vec<&SessionRow> = group.iter().map(|(_, r)| *r).collect();
        let verifiable = rows.iter().all(|r| {
            held.contains_key(r.id.as_str())
                || reachable.contains_key(r.controller_instance.as_str())
                || dead.contains(r.controller_instance.as_str())
        });
        let newest = |rs: &mut dyn Iterator<Item = &&SessionRow>| -> Option<SessionId> {
            rs.max_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id))).map(|r| r.id.clone())
        };
        let held_newest = newest(&mut rows.iter().filter(|r| held.contains_key(r.id.as_str())));
        let keep = held_newest.or_else(|| newest(&mut rows.iter()));
        let ambiguous = rows.iter().any(|r| held.get(r.id.as_str()).is_some_and(|h| h.ambiguous));
        for row in rows.iter().filter(|r| Some(&r.id) != keep.as_ref()) {
            // Ending a row nobody holds rests on its absence from the lists.
            let absent_unproven =
                if held.contains_key(row.id.as_str()) { None } else { unproven(row.controller_instance.as_str()) };
            let decision = if !verifiable {
                Decision::Wait { reason: "another row of this owner is on an unreachable instance".into() }
            } else if let Some(reason) = absent_unproven {
                Decision::Wait { reason }
            } else if ambiguous {
                Decision::Wait { reason: "a session of this owner is listed more than once".into() }
            } else {
                Decision::Note
            };
            // Stopping a row supersedes making it follow the controller.
            superseded.insert(row.id.to_string());
            let holder = held.get(row.id.as_str()).map(|h| h.instance);
            let repair = match holder {
                // The controller runs it: stop it there, and end its row.
                Some(instance) => Repair::StopLive {
                    id: row.id.clone(),
                    controller_instance: instance.to_owned(),
                    row_version: row.version.clone(),
                    row_state: row.state,
                    end_row: true,
                },
                None => end_row(row, RowState::Stopped, "duplicate"),
            };
            candidates.push(Candidate {
                finding: Finding {
                    kind: Kind::Duplicate,
                    subject: row.id.to_string(),
                    instance: Some(row.controller_instance.clone()),
                    detail: format!(
                        "{} live rows for one owner; keeping {}",
                        rows.len(),
                        keep.as_ref().map_or("none", |k| k.as_str())
                    ),
                    decision,
                    repair: Some(repair),
                },
                changed_at: Some(row.changed_at),
                age: Some(reference - row.changed_at),
                explained: Explained::No,
            });
        }
    }
    if !superseded.is_empty() {
        candidates.retain(|c| !(c.finding.kind == Kind::Drift && superseded.contains(&c.finding.subject)));
    }
}

/// The mass-repair guard. Two limits, both lifted by `--force`:
/// - more than `guard_min_orphans - 1` unexplained orphans that are also more than
///   `max_orphan_fraction` of an instance's live rows hold back that instance's
///   orphan repairs (a restart or a declared-dead instance explains orphans);
/// - more than `max_repairs_per_pass` repairs of one kind hold back that kind.
fn guard(
    input: &Input<'_>,
    live_rows: &FxHashMap<&str, usize>,
    candidates: &mut [Candidate],
    tripped: &mut BTreeMap<String, BTreeSet<Kind>>,
) {
    let cfg = input.config;
    let mut unexplained: BTreeMap<String, usize> = BTreeMap::new();
    for c in candidates.iter() {
        if c.finding.kind == Kind::Orphaned && c.explained == Explained::No {
            if let Some(inst) = &c.finding.instance {
                *unexplained.entry(inst.clone()).or_default() += 1;
            }
        }
    }
    let mut held_instances: BTreeSet<String> = BTreeSet::new();
    for (inst, &n) in &unexplained {
        let total = live_rows.get(inst.as_str()).copied().unwrap_or(0).max(1);
        if n >= cfg.guard_min_orphans && n as f64 / total as f64 > cfg.max_orphan_fraction {
            held_instances.insert(inst.clone());
        }
    }
    for c in candidates.iter_mut() {
        if c.finding.kind == Kind::Orphaned && c.explained == Explained::No {
            if let Some(inst) = &c.finding.instance {
                if held_instances.contains(inst) && c.finding.decision == Decision::Repair {
                    tripped.entry(inst.clone()).or_default().insert(Kind::Orphaned);
                    if !input.options.force {
                        c.finding.decision = Decision::Guarded;
                    }
                }
            }
        }
    }

    let mut per_kind: BTreeMap<Kind, usize> = BTreeMap::new();
    for c in candidates.iter().filter(|c| c.finding.decision == Decision::Repair) {
        *per_kind.entry(c.finding.kind).or_default() += 1;
    }
    for c in candidates.iter_mut() {
        if per_kind.get(&c.finding.kind).is_some_and(|&n| n > cfg.max_repairs_per_pass)
            && c.finding.decision == Decision::Repair
        {
            if let Some(inst) = &c.finding.instance {
                tripped.entry(inst.clone()).or_default().insert(c.finding.kind);
            }
            if !input.options.force {
                c.finding.decision = Decision::Guarded;
            }
        }
    }
}
