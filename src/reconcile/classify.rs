//! The classifier: a pure, synchronous function from the two snapshots, the
//! memory of earlier passes and the config to a list of findings, each with the
//! decision taken about it and, where the decision is to repair, the repair.
//!
//! Architecture Invariant: nothing here does I/O or reads a clock. Time comes in
//! as `now`, so every safety rule can be tested by moving a number. One sort
//! (the live rows by owner) runs on a second, scoped thread alongside stages 3
//! and 4; it reads only what they do not write, so the output is the same
//! whichever finishes first.
//!
//! A pass goes through named stages, in order:
//!
//! 1. [`reachability`]: which instances' lists are usable this pass;
//! 2. [`listings`]: every id a usable list holds, and what is wrong with a list;
//! 3. [`rows`]: each live row against the lists (orphans, drift, stuck rows);
//! 4. [`sessions`]: each listed session against the rows (zombies, unpersisted);
//! 5. [`duplicates`]: owners with more than one live session;
//! 6. [`intents`]: stops recorded earlier and not settled;
//! 7. [`decide`]: grace, then confirmations, then policy, per finding;
//! 8. [`guard`]: the mass-repair guard over the whole pass;
//! 9. [`read_only`]: `observe` and `--dry-run` turn every repair into a report.
//!
//! Why a finding is held back is a typed [`Hold`], so tests assert the reason,
//! not a sentence.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use rustc_hash::{FxHashMap, FxHashSet};

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::Serialize;

use crate::config::{Policy, ReconcileConfig};
use crate::model::{
    BootRecords, ControllerList, DbSnapshot, GoneRow, IdRun, InstanceSnapshot, InvalidEntryKind, LiveRef, LookupResult,
    MergeById, RowRef, RowState, SessionId, StopOutcome,
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
    InvalidRow,
    Unverifiable,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Orphaned,
        Kind::Zombie,
        Kind::Unpersisted,
        Kind::Duplicate,
        Kind::StuckCreating,
        Kind::Drift,
        Kind::InvalidId,
        Kind::InvalidEntry,
        Kind::InvalidRow,
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
            Kind::InvalidRow => "invalid_row",
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
            Kind::InvalidId | Kind::InvalidEntry | Kind::InvalidRow | Kind::Unverifiable => Policy::Report,
        }
    }
}

/// Why a finding that has a repair waits this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Younger than `grace` at its snapshot.
    Young { grace: std::time::Duration },
    /// Seen in fewer than `confirmations` consecutive passes.
    Confirming { seen: u32, needed: u32 },
    /// A stop of this session is recorded and not settled.
    StopInFlight,
    /// Absence from this instance's list proves nothing yet: its boot id is
    /// not confirmed.
    Unproven { why: String },
    /// The row names an instance that did not answer, which may hold it too.
    InstanceUnreachable { instance: String },
    /// Another row of the owner is on an instance that did not answer.
    OwnerUnverifiable,
    /// A session of the owner is listed more than once.
    Ambiguous,
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::Young { grace } => write!(f, "younger than grace ({})", humantime::format_duration(*grace)),
            Hold::Confirming { seen, needed } => write!(f, "seen in {seen} of {needed} passes"),
            Hold::StopInFlight => f.write_str("a stop of this session is in flight or unsettled"),
            Hold::Unproven { why } => f.write_str(why),
            Hold::InstanceUnreachable { instance } => write!(f, "the row's instance {instance} is unreachable"),
            Hold::OwnerUnverifiable => f.write_str("another row of this owner is on an unreachable instance"),
            Hold::Ambiguous => f.write_str("a session of this owner is listed more than once"),
        }
    }
}

impl Serialize for Hold {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why a finding that has a repair is only reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReportReason {
    /// `reconcile.policy.<kind> = "report"`.
    Policy,
    /// `observe` mode or `--dry-run`.
    ReadOnly,
    /// The instance has no `stop_url`.
    NoStopUrl,
    /// The table has no value for the state the repair would write.
    NoStateValue { state: RowState },
}

impl fmt::Display for ReportReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReportReason::Policy => f.write_str("policy is report"),
            ReportReason::ReadOnly => f.write_str("read-only pass (observe mode or --dry-run)"),
            ReportReason::NoStopUrl => f.write_str("no stop_url is configured for this instance"),
            ReportReason::NoStateValue { state } => {
                write!(f, "the table has no value for state {state} (sessions.states.{state})")
            }
        }
    }
}

impl Serialize for ReportReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a pass decided about a finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Repair it now; the plan is in [`Finding::repair`].
    Repair,
    /// Not yet: too young, not confirmed, or its evidence is incomplete.
    Wait { reason: Hold },
    /// The mass-repair guard held it back.
    Guarded,
    /// More repairs of its kind than `max_repairs_per_pass` are due: `ahead`
    /// older ones go first, this pass or the next ones.
    Deferred { ahead: usize, limit: usize },
    /// Reported only: policy `report`, `observe` mode, `--dry-run`, or no way to repair.
    Report { reason: ReportReason },
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

impl Repair {
    /// The state the repair writes to the row, if it writes one.
    fn writes(&self) -> Option<RowState> {
        match self {
            Repair::UpdateRow { to, .. } => Some(*to),
            Repair::InsertRow { state, .. } => Some(*state),
            Repair::StopLive { end_row: true, .. } => Some(RowState::Stopped),
            Repair::StopLive { .. } => None,
        }
    }
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

/// The shape of the sessions table, as far as the rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableShape {
    /// The table has an owner column: duplicates can be found.
    pub owner: bool,
    /// The table has an instance column: a row belongs to one instance.
    /// Without one, a row belongs to the fleet, and absence means absence from
    /// every list.
    pub instance: bool,
}

impl Default for TableShape {
    fn default() -> Self {
        TableShape { owner: true, instance: true }
    }
}

/// What sessiond remembers from one pass to the next (in the daemon's memory).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Consecutive passes each finding has been seen, and when it was first seen.
    pub streaks: HashMap<(Kind, String), Streak>,
    /// Since when each unreachable instance has been unreachable.
    pub unreachable_since: HashMap<String, DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Streak {
    pub passes: u32,
    pub first_seen: DateTime<Utc>,
}

/// Lookups by what they found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProbeCounts {
    pub found: u64,
    pub never_existed: u64,
    pub deleted: u64,
    pub invalid_format: u64,
}

impl ProbeCounts {
    pub fn get(&self, what: LookupResult) -> u64 {
        match what {
            LookupResult::Found => self.found,
            LookupResult::NeverExisted => self.never_existed,
            LookupResult::Deleted => self.deleted,
            LookupResult::InvalidFormat => self.invalid_format,
        }
    }
}

/// The application's lookups, replayed: every live controller session looked up
/// in the database as the application's API would. `young` counts those of
/// sessions younger than `grace` (by the controller's `generated_at −
/// started_at`): their misses are the creation race, the window in which an
/// application's own API answers "not found" for a session it just created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Probes {
    #[serde(flatten)]
    pub all: ProbeCounts,
    pub young: ProbeCounts,
}

impl Probes {
    fn count(&mut self, result: LookupResult, young: bool) {
        let add = |c: &mut ProbeCounts| match result {
            LookupResult::Found => c.found += 1,
            LookupResult::NeverExisted => c.never_existed += 1,
            LookupResult::Deleted => c.deleted += 1,
            LookupResult::InvalidFormat => c.invalid_format += 1,
        };
        add(&mut self.all);
        if young {
            add(&mut self.young);
        }
    }
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
    /// Canonical states the table has a value for (writing another is reported).
    pub writable: &'a BTreeSet<RowState>,
    pub shape: TableShape,
    pub options: PassOptions,
    /// Controllers whose mass-repair guard an operator released for this
    /// pass (`POST /guard/release`): tripped, reported, but not held back.
    pub released: &'a BTreeSet<String>,
}

/// How long a live session had been running when its list was fetched. Both
/// ends come from the controller's own clock (`generated_at − started_at`), so a
/// controller whose clock is behind or ahead of ours cannot make a session look
/// older than it is. Without both, the age counts from when sessiond first saw
/// the session, by sessiond's clock: a `once` pass then sees it as new.
fn live_age(input: &Input<'_>, inst: &InstanceSnapshot, list: &ControllerList, live: LiveRef<'_>) -> ChronoDuration {
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

/// Where a listed id was seen: its first listing, in the order of the
/// configured instances. The id is read from the list itself. Kept as a
/// [`Slot`]; this is the view of one.
#[derive(Clone, Copy)]
struct Held<'a> {
    source: &'a InstanceSnapshot,
    /// The entry's index in its list's sessions, or, when the entry itself
    /// was unusable (unknown state, no owner, …), in its invalid entries.
    index: u32,
    unusable: bool,
    /// Listed more than once: held, but never acted on.
    ambiguous: bool,
}

impl<'a> Held<'a> {
    fn instance(&self) -> &'a str {
        &self.source.name
    }

    /// The listed id.
    fn id(&self) -> &'a str {
        let Ok(list) = &self.source.result else { return "" };
        let i = self.index as usize;
        let id =
            if self.unusable { list.invalid.get(i).and_then(|bad| bad.raw_id.as_deref()) } else { list.sessions.id(i) };
        id.unwrap_or_default()
    }

    /// The listed session, if the entry is a usable one.
    fn session(&self) -> Option<LiveRef<'a>> {
        let list = self.source.result.as_ref().ok()?;
        if self.unusable {
            return None;
        }
        list.sessions.get(self.index as usize)
    }

    /// The listed session, if it is the only listing of its id and usable.
    fn usable(&self) -> Option<LiveRef<'a>> {
        if self.ambiguous {
            None
        } else {
            self.session()
        }
    }
}

/// A [`Held`] as the listings keep it: 8 bytes, not 16, a million of them at
/// the pass's peak. Its instance is its place in the configured instances.
#[derive(Clone, Copy)]
struct Slot {
    index: u32,
    source: u16,
    unusable: bool,
    ambiguous: bool,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 8);

/// Every id the usable lists hold, one entry per id, sorted by id: one side of
/// the join. No hash map: the rows are matched to it by one merge.
struct Listings<'a> {
    instances: &'a [InstanceSnapshot],
    entries: Vec<Slot>,
}

impl<'a> Listings<'a> {
    /// Entry `k`.
    fn at(&self, k: usize) -> Option<Held<'a>> {
        self.entries.get(k).and_then(|s| self.view(*s))
    }

    fn view(&self, s: Slot) -> Option<Held<'a>> {
        let source = self.instances.get(s.source as usize)?;
        Some(Held { source, index: s.index, unusable: s.unusable, ambiguous: s.ambiguous })
    }

    /// Every entry with its index, in id order.
    fn iter(&self) -> impl Iterator<Item = (usize, Held<'a>)> + '_ {
        (0..self.entries.len()).filter_map(|k| self.at(k).map(|h| (k, h)))
    }

    /// For the few lookups outside the merge (stop intents, duplicate groups).
    fn get(&self, id: &str) -> Option<Held<'a>> {
        let id_of = |s: &Slot| self.view(*s).map_or("", |h| h.id());
        self.entries.binary_search_by(|s| id_of(s).cmp(id)).ok().and_then(|i| self.at(i))
    }
}

/// No entry on the other side of the join.
const UNMATCHED: u32 = u32::MAX;

/// The rows and the listings matched on id, while the listings are merged
/// (the rows are walked in id order alongside). Indices are 32-bit (4 bytes
/// a row and a listing, at the pass's peak), so each side holds fewer than
/// `u32::MAX` entries.
struct Join {
    /// For each row (by index in `db.rows`), its id's listing entry.
    listing_of_row: Vec<u32>,
    /// For each listing entry, its id's row.
    row_of_listing: Vec<u32>,
}

impl Join {
    /// The listing entry of a row's id.
    fn listing<'a>(&self, listings: &Listings<'a>, row: usize) -> Option<Held<'a>> {
        listings.at(*self.listing_of_row.get(row)? as usize)
    }

    /// The row of a listing entry's id (`UNMATCHED`, which no row has, if none).
    fn row(&self, listing: usize) -> usize {
        self.row_of_listing.get(listing).map_or(UNMATCHED, |r| *r) as usize
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

/// The key the guard counts a row under: its instance, or the whole fleet when
/// the table has no instance column.
const FLEET: &str = "";

/// Which lists are usable this pass.
struct Reach<'a> {
    /// Instances whose lists are used.
    reachable: FxHashMap<&'a str, &'a InstanceSnapshot>,
    /// Instances unreachable for longer than `instance_dead_after`.
    dead: BTreeSet<&'a str>,
    /// Why each unusable instance is so.
    unreachable: FxHashMap<&'a str, String>,
    /// The earliest list fetched: rows compared with every list are compared
    /// with this one.
    earliest: DateTime<Utc>,
}

impl Reach<'_> {
    /// Why absence from `instance`'s list proves nothing yet (probation).
    fn unproven(&self, input: &Input<'_>, instance: &str) -> Option<Hold> {
        input.trust.get(instance).and_then(|t| t.absence_unproven(instance)).map(|why| Hold::Unproven { why })
    }

    /// For a row of the whole fleet (no instance column): whether every list
    /// answered, and if not, which did not.
    fn fleet_gap(&self, input: &Input<'_>) -> Option<String> {
        input.instances.iter().find_map(|i| {
            self.unreachable.get(i.name.as_str()).map(|why| format!("instance {} is unreachable: {why}", i.name))
        })
    }

    /// For a row of the whole fleet: why absence proves nothing yet.
    fn fleet_unproven(&self, input: &Input<'_>) -> Option<Hold> {
        input.instances.iter().find_map(|i| self.unproven(input, &i.name))
    }
}

/// Stage 1: which instances' lists are usable, and how long each unreachable
/// one has been so. An instance where several processes answer is not
/// reachable for this pass: none of its lists can be trusted. It is not "down"
/// either, so it never counts towards `instance_dead_after`.
fn reachability<'a>(input: &Input<'a>, out: &mut Classification) -> Reach<'a> {
    let cfg = input.config;
    let mut reach = Reach {
        reachable: FxHashMap::default(),
        dead: BTreeSet::new(),
        unreachable: FxHashMap::default(),
        earliest: input.db.read_at,
    };
    for inst in input.instances {
        match (&inst.result, input.trust.get(&inst.name)) {
            (Ok(_), Some(Trust::Inconsistent { boot_ids })) => {
                reach.unreachable.insert(
                    &inst.name,
                    format!(
                        "several processes answer at its URL (boot ids {}); its rows are unverifiable until one \
                         boot id holds steadily",
                        boot_ids.join(", ")
                    ),
                );
            }
            (Ok(_), _) => {
                reach.reachable.insert(&inst.name, inst);
                reach.earliest = reach.earliest.min(inst.fetched_at);
            }
            (Err(err), _) => {
                let since = input.memory.unreachable_since.get(&inst.name).copied().unwrap_or(inst.fetched_at);
                out.memory.unreachable_since.insert(inst.name.clone(), since);
                if let Some(after) = cfg.instance_dead_after {
                    if input.now - since >= to_chrono(after) {
                        reach.dead.insert(&inst.name);
                    }
                }
                reach.unreachable.insert(&inst.name, err.clone());
            }
        }
    }
    reach
}

/// Stage 2: every id a usable list holds, valid or not. Invalid entries still
/// count as held: their rows must never be taken for orphans. An id listed
/// more than once (twice by one instance, or by two) is ambiguous: it is held,
/// reported, and never acted on, because nothing says which listing is right.
/// The rows are joined to the listings in the same walk.
fn listings<'a>(
    input: &Input<'a>,
    reach: &Reach<'a>,
    out: &mut Classification,
    candidates: &mut Vec<Candidate>,
) -> Option<(Listings<'a>, Join)> {
    // The reachable instances, each with its place in the configuration.
    let places = || input.instances.iter().enumerate().filter(|(_, i)| reach.reachable.contains_key(i.name.as_str()));
    let lists = || places().map(|(_, i)| i);
    // Entries are found by a 32-bit index in their list: a list of 4G
    // entries is not a list in memory, and past it nothing is decided; nor
    // past 65 536 instances, which a 16-bit place holds.
    let indexable = |len: usize| len < u32::MAX as usize;
    if input.instances.len() > usize::from(u16::MAX) + 1 {
        return None;
    }
    if !lists()
        .filter_map(|i| i.result.as_ref().ok())
        .all(|l| indexable(l.sessions.len()) && indexable(l.invalid.len()))
    {
        return None;
    }
    let count: usize = lists().filter_map(|i| i.result.as_ref().ok()).map(|l| l.sessions.len() + l.invalid.len()).sum();
    // Every listing in id order, by one merge of the lists (each walked in id
    // order): among equal ids, the instances in order, and in an instance its
    // sessions, then its unusable entries.
    let mut runs: Vec<IdRun<'_, Slot>> = Vec::new();
    for (place, inst) in places() {
        let Ok(list) = &inst.result else { continue };
        // Below 65 536, checked above.
        let source = place as u16;
        let sessions = &list.sessions;
        runs.push(Box::new(sessions.by_id().filter_map(move |i| {
            let slot = Slot { source, index: i as u32, unusable: false, ambiguous: false };
            sessions.id(i).map(|id| (id, slot))
        })));
        let mut invalid: Vec<(&str, usize)> =
            list.invalid.iter().enumerate().filter_map(|(j, bad)| bad.raw_id.as_deref().map(|id| (id, j))).collect();
        // Stable: among equal raw ids, the first listed first.
        invalid.sort_by(|a, b| a.0.cmp(b.0));
        runs.push(Box::new(
            invalid
                .into_iter()
                .map(move |(id, j)| (id, Slot { source, index: j as u32, unusable: true, ambiguous: false })),
        ));
    }
    let rows = &input.db.rows;
    if rows.len() >= UNMATCHED as usize {
        return None;
    }
    // One walk of the merge: the entries, one per id, the ids listed more
    // than once, and the join with the rows (also in id order), each id read
    // once, as the merge gives it.
    let mut listings = Listings { instances: input.instances, entries: Vec::with_capacity(count) };
    let mut join = Join { listing_of_row: vec![UNMATCHED; rows.len()], row_of_listing: Vec::with_capacity(count) };
    let mut row_ids = rows.by_id().filter_map(|r| rows.id(r).map(|id| (r, id))).peekable();
    let mut previous: Option<&str> = None;
    // The listings of the current id, while it has more than one.
    let mut repeated: Vec<Slot> = Vec::new();
    let mut ambiguous: Vec<Vec<Slot>> = Vec::new();
    for (id, _, slot) in MergeById::new(runs) {
        if previous == Some(id) {
            if let Some(first) = listings.entries.last_mut() {
                if repeated.is_empty() {
                    repeated.push(*first);
                }
                first.ambiguous = true;
            }
            repeated.push(slot);
            continue;
        }
        previous = Some(id);
        if !repeated.is_empty() {
            ambiguous.push(std::mem::take(&mut repeated));
        }
        // Indices stay below `u32::MAX`: past it nothing is decided.
        let k = listings.entries.len();
        if k >= UNMATCHED as usize {
            return None;
        }
        let mut row = UNMATCHED;
        while row_ids.next_if(|&(_, r)| r < id).is_some() {}
        while let Some((r, _)) = row_ids.next_if(|&(_, r)| r == id) {
            // Below `u32::MAX`, checked above.
            join.listing_of_row[r] = k as u32;
            row = r as u32;
        }
        listings.entries.push(slot);
        join.row_of_listing.push(row);
    }
    if !repeated.is_empty() {
        ambiguous.push(repeated);
    }
    for inst in lists() {
        let Ok(list) = &inst.result else { continue };
        for bad in &list.invalid {
            let kind = match bad.kind {
                InvalidEntryKind::InvalidId => Kind::InvalidId,
                InvalidEntryKind::InvalidEntry => Kind::InvalidEntry,
            };
            if kind == Kind::InvalidId {
                // An unusable entry has no age: it counts as old.
                out.probes.count(LookupResult::InvalidFormat, false);
            }
            let subject = bad.raw_id.clone().unwrap_or_else(|| "<missing>".into());
            candidates.push(note(kind, &subject, Some(&inst.name), bad.problem.clone()));
        }
    }
    // An id listed more than once keeps its first listing, marked ambiguous.
    let describe = |h: &Held<'_>| match h.session() {
        Some(s) => format!("{} ({})", h.instance(), s.state.as_str()),
        None => format!("{} (unusable entry)", h.instance()),
    };
    for run in &ambiguous {
        let run: Vec<Held<'_>> = run.iter().filter_map(|s| listings.view(*s)).collect();
        let Some(first) = run.first() else { continue };
        let seen: Vec<String> = run.iter().map(describe).collect();
        candidates.push(note(
            Kind::InvalidEntry,
            first.id(),
            Some(first.instance()),
            format!("listed {} times: by {}; nothing is done until one listing remains", seen.len(), seen.join(", ")),
        ));
    }
    Some((listings, join))
}

/// Stage 3: every live row against the lists. Returns the rows a finding here
/// already deals with (duplicates leave them alone), and the live rows per
/// instance for the guard.
fn rows<'a>(
    input: &Input<'a>,
    reach: &Reach<'a>,
    held: &Listings<'a>,
    join: &Join,
    candidates: &mut Vec<Candidate>,
) -> (Vec<bool>, FxHashMap<&'a str, usize>) {
    let cfg = input.config;
    let grace = to_chrono(cfg.grace);
    let mut handled = vec![false; input.db.rows.len()];
    let mut live_per_instance: FxHashMap<&str, usize> = FxHashMap::default();
    for (i, row) in input.db.rows.iter().enumerate().filter(|(_, r)| r.state.is_live()) {
        let instance = row.controller_instance;
        *live_per_instance.entry(instance.unwrap_or(FLEET)).or_default() += 1;
        if let Some(h) = join.listing(held, i) {
            if let Some(live) = h.usable() {
                let fetched_at = h.source.fetched_at;
                if let Some(mut c) = drift(row, live, h.instance(), fetched_at, input.shape) {
                    if let Some(claimed_by) = instance.filter(|c| *c != h.instance()) {
                        if !reach.reachable.contains_key(claimed_by) {
                            // The instance the row names may hold the session too.
                            c.finding.decision = Decision::Wait {
                                reason: Hold::InstanceUnreachable { instance: claimed_by.to_owned() },
                            };
                        }
                    }
                    candidates.push(c);
                }
            }
            continue;
        }
        // Not held by any list: absent from its instance's list (or, without
        // an instance column, from every list).
        let (reference, unproven, is_dead) = match instance {
            Some(name) => {
                let snapshot = reach.reachable.get(name);
                let is_dead = reach.dead.contains(name);
                if snapshot.is_none() && !is_dead {
                    let why = match reach.unreachable.get(name) {
                        Some(err) => format!("instance {name} is unreachable: {err}"),
                        None => format!("instance {name} is not configured"),
                    };
                    candidates.push(note(Kind::Unverifiable, row.id, Some(name), why));
                    continue;
                }
                (snapshot.map_or(input.db.read_at, |s| s.fetched_at), reach.unproven(input, name), is_dead)
            }
            None => {
                if let Some(why) = reach.fleet_gap(input) {
                    let why = format!("the table has no instance column, and {why}");
                    candidates.push(note(Kind::Unverifiable, row.id, None, why));
                    continue;
                }
                (reach.earliest, reach.fleet_unproven(input), false)
            }
        };
        let wait = |hold: Option<Hold>| hold.map_or(Decision::Note, |reason| Decision::Wait { reason });
        if row.state == RowState::Creating {
            if reference - row.created_at >= to_chrono(cfg.creating_timeout) {
                handled[i] = true;
                candidates.push(Candidate {
                    finding: Finding {
                        kind: Kind::StuckCreating,
                        subject: row.id.to_string(),
                        instance: instance.map(str::to_owned),
                        detail: format!("creating since {}, not live", row.created_at.to_rfc3339()),
                        decision: wait(unproven),
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
        // its list was taken may simply not be in that list yet.
        let explained = if is_dead {
            Explained::InstanceDead
        } else {
            if row.changed_at > reference - grace {
                continue;
            }
            // Without an instance column, no one restart explains a row: the
            // guard counts every orphan.
            match instance.and_then(|i| input.boots.get(i)).and_then(|b| b.changed_at) {
                Some(restart) if row.created_at < restart => Explained::Restart,
                _ => Explained::No,
            }
        };
        handled[i] = true;
        let whose = instance.map_or_else(|| "every controller's list".to_owned(), |i| format!("{i}'s list"));
        let detail = match explained {
            Explained::InstanceDead => format!(
                "instance {} has been unreachable longer than instance_dead_after",
                instance.unwrap_or_default()
            ),
            Explained::Restart => format!("{} but absent from {whose} since it restarted", row.state),
            Explained::No => format!("{} but absent from {whose}", row.state),
        };
        candidates.push(Candidate {
            finding: Finding {
                kind: Kind::Orphaned,
                subject: row.id.to_string(),
                instance: instance.map(str::to_owned),
                detail,
                // On probation, absence from the list proves nothing yet.
                decision: wait(unproven),
                repair: Some(end_row(row, RowState::Stopped, "orphaned")),
            },
            changed_at: Some(row.changed_at),
            age: Some(reference - row.changed_at),
            explained,
        });
    }
    for bad in &input.db.invalid_rows {
        let value = bad.value.as_deref().map_or_else(|| "NULL".to_owned(), |v| format!("{v:?}"));
        candidates.push(note(
            Kind::InvalidRow,
            bad.id.as_str(),
            bad.controller_instance.as_deref(),
            format!("state {value} is in no list of sessions.states; the row is left alone"),
        ));
    }
    (handled, live_per_instance)
}

/// Stage 4: every usable listed session against the rows: zombies and
/// unpersisted sessions, and the lookups the application's API would answer.
fn sessions(
    input: &Input<'_>,
    held: &Listings<'_>,
    join: &Join,
    out: &mut Classification,
    candidates: &mut Vec<Candidate>,
) {
    // Invalid and gone rows are few: the ids the live rows do not cover.
    let invalid: FxHashSet<&str> = input.db.invalid_rows.iter().map(|r| r.id.as_str()).collect();
    let gone: FxHashMap<&str, &GoneRow> = input.db.gone.iter().map(|g| (g.id.as_str(), g)).collect();
    for (k, h) in held.iter() {
        // An unusable entry, or an id listed more than once: reported above,
        // never acted on.
        let Some(live) = h.usable() else { continue };
        let inst = h.source;
        let Ok(list) = &inst.result else { continue };
        let young = match (list.generated_at, live.started_at) {
            (Some(generated), Some(started)) => generated - started < to_chrono(input.config.grace),
            // A session whose age the controller does not tell counts as old.
            _ => false,
        };
        match input.db.rows.get(join.row(k)) {
            Some(row) if row.state.is_live() => out.probes.count(LookupResult::Found, young),
            Some(row) => {
                if row.state == RowState::Deleted {
                    out.probes.count(LookupResult::Deleted, young);
                } else {
                    out.probes.count(LookupResult::Found, young);
                }
                // A row stopped just before the list was taken may be a
                // stop the controller has not carried out yet: its age counts.
                candidates.push(zombie(
                    inst,
                    live,
                    format!("live on {} but the row is {}", inst.name, row.state),
                    (row.version.to_owned(), row.state),
                    row.changed_at,
                ));
            }
            // A row exists, with a state the vocabulary does not know: it is
            // reported as such, and nothing is inserted over it.
            None if invalid.contains(live.id) => out.probes.count(LookupResult::Found, young),
            // No row, but the audit trail says there was one: it was
            // deleted. Re-inserting it would resurrect a session someone
            // ended; it is a zombie to stop.
            None if gone.contains_key(live.id) => {
                let g = gone[live.id];
                out.probes.count(LookupResult::Deleted, young);
                candidates.push(zombie(
                    inst,
                    live,
                    format!(
                        "live on {} but its row is gone: the audit trail shows it existed (last {} → {} by {}); \
                         a deleted session is stopped, never re-inserted",
                        inst.name,
                        g.old_state.as_deref().unwrap_or("none"),
                        g.new_state.as_deref().unwrap_or("none"),
                        g.trigger
                    ),
                    // No row to compare and set: the stop's intent checks it is still absent.
                    (String::new(), RowState::Deleted),
                    g.at,
                ));
            }
            None => {
                out.probes.count(LookupResult::NeverExisted, young);
                let age = live_age(input, inst, list, live);
                candidates.push(Candidate {
                    finding: Finding {
                        kind: Kind::Unpersisted,
                        subject: live.id.to_string(),
                        instance: Some(inst.name.clone()),
                        detail: format!("live on {} with no row", inst.name),
                        decision: Decision::Note,
                        repair: Some(Repair::InsertRow {
                            id: live.session_id(),
                            owner_id: live.owner_id.to_owned(),
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

/// Stage 6: stops recorded by earlier passes (or another sessiond) and not
/// settled. One still in flight holds back any new stop of its session; one
/// whose sender is gone is settled by what this pass's lists show. Returns the
/// sessions whose stop is in flight.
fn intents<'a>(
    input: &Input<'a>,
    reach: &Reach<'_>,
    held: &Listings<'_>,
    out: &mut Classification,
) -> FxHashSet<&'a str> {
    let mut in_flight: FxHashSet<&str> = FxHashSet::default();
    for intent in &input.db.open_intents {
        if !intent.expired {
            in_flight.insert(intent.session_id.as_str());
            continue;
        }
        if !reach.reachable.contains_key(intent.controller.as_str()) {
            continue; // settled once its controller answers again
        }
        let still_held = held.get(intent.session_id.as_str()).is_some_and(|h| h.instance() == intent.controller);
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
    in_flight
}

/// A zombie: `live` runs on `inst` while its row (`version`, `state`; an
/// empty version for a row that is gone) says it ended at `at`.
fn zombie(
    inst: &InstanceSnapshot,
    live: LiveRef<'_>,
    detail: String,
    (row_version, row_state): (String, RowState),
    at: DateTime<Utc>,
) -> Candidate {
    Candidate {
        finding: Finding {
            kind: Kind::Zombie,
            subject: live.id.to_string(),
            instance: Some(inst.name.clone()),
            detail,
            decision: Decision::Note,
            repair: Some(Repair::StopLive {
                id: live.session_id(),
                controller_instance: inst.name.clone(),
                row_version,
                row_state,
                end_row: false,
            }),
        },
        changed_at: Some(at),
        age: Some(inst.fetched_at - at),
        explained: Explained::No,
    }
}

/// Stage 7: grace, then confirmations, then policy, for each finding.
fn decide(input: &Input<'_>, in_flight: &FxHashSet<&str>, candidates: &mut [Candidate], out: &mut Classification) {
    let cfg = input.config;
    let grace = to_chrono(cfg.grace);
    let mut next_streaks = HashMap::new();
    for c in candidates.iter_mut() {
        let key = (c.finding.kind, c.finding.subject.clone());
        let previous = input.memory.streaks.get(&key);
        let streak = Streak {
            passes: previous.map_or(1, |s| s.passes.saturating_add(1)),
            first_seen: previous.map_or(input.now, |s| s.first_seen),
        };
        next_streaks.insert(key, streak);
        let Some(repair) = &c.finding.repair else {
            c.finding.decision = Decision::Note;
            continue;
        };
        if let Decision::Wait { .. } = c.finding.decision {
            continue; // already held for want of evidence
        }
        if matches!(repair, Repair::StopLive { .. }) && in_flight.contains(c.finding.subject.as_str()) {
            c.finding.decision = Decision::Wait { reason: Hold::StopInFlight };
            continue;
        }
        let unwritable = repair.writes().filter(|s| !input.writable.contains(s));
        c.finding.decision = if c.age.is_some_and(|age| age < grace) {
            Decision::Wait { reason: Hold::Young { grace: cfg.grace } }
        } else if input.options.require_confirmations && streak.passes < cfg.confirmations {
            Decision::Wait { reason: Hold::Confirming { seen: streak.passes, needed: cfg.confirmations } }
        } else if c.finding.kind.policy(cfg) == Policy::Report {
            Decision::Report { reason: ReportReason::Policy }
        } else if let Some(state) = unwritable {
            Decision::Report { reason: ReportReason::NoStateValue { state } }
        } else if matches!(repair, Repair::StopLive { controller_instance, .. }
            if !input.stoppable.contains(controller_instance))
        {
            Decision::Report { reason: ReportReason::NoStopUrl }
        } else {
            Decision::Repair
        };
    }
    out.memory.streaks = next_streaks;
}

/// Stage 9: a read-only pass turns every repair into a report. A finding that
/// waits has no repair yet; a guarded or reported one keeps it, so the report
/// shows what would have been done.
fn read_only(input: &Input<'_>, candidates: &mut [Candidate]) {
    for c in candidates.iter_mut() {
        if c.finding.decision == Decision::Repair && input.options.read_only {
            c.finding.decision = Decision::Report { reason: ReportReason::ReadOnly };
        }
        if let Decision::Wait { .. } = c.finding.decision {
            c.finding.repair = None;
        }
    }
}

/// Classifies one pass. Pure: same input, same output.
pub fn classify(input: &Input<'_>) -> Classification {
    let mut out = Classification::default();
    let mut candidates: Vec<Candidate> = Vec::new();
    let reach = reachability(input, &mut out);
    let listed = listings(input, &reach, &mut out, &mut candidates);
    let Some((held, join)) = listed else {
        // Past 32-bit indices nothing is decided: no finding, no repair, and
        // the streaks of earlier passes kept for the next.
        return Classification { memory: input.memory.clone(), ..Classification::default() };
    };
    // The owner groups of the live rows take a sort of every live row: it
    // runs on a second thread while stages 3 and 4 run on this one (the
    // database and the controllers are idle by now, so a core is free).
    // Without an owner column there are no owner groups.
    let (handled, live_per_instance, by_owner) = std::thread::scope(|scope| {
        let owners = || owner_order(input, &held, &join);
        let spawned = input
            .shape
            .owner
            .then(|| std::thread::Builder::new().name("classify-owners".into()).spawn_scoped(scope, owners));
        let (handled, live_per_instance) = rows(input, &reach, &held, &join, &mut candidates);
        sessions(input, &held, &join, &mut out, &mut candidates);
        let by_owner = match spawned {
            None => None,
            Some(Ok(thread)) => Some(thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))),
            // No thread to be had: the same work, on this one.
            Some(Err(_)) => Some(owners()),
        };
        (handled, live_per_instance, by_owner)
    });
    if let Some(mut entries) = by_owner {
        // Rows another finding already deals with are not in any group.
        entries.retain(|&(_, i)| !handled[i as usize]);
        duplicates(input, &reach, &held, &join, entries, &mut candidates);
    }
    let in_flight = intents(input, &reach, &held, &mut out);
    decide(input, &in_flight, &mut candidates, &mut out);
    guard(input, &reach, &live_per_instance, &mut candidates, &mut out.guard_tripped);
    read_only(input, &mut candidates);
    out.findings = candidates.into_iter().map(|c| c.finding).collect();
    out.findings.sort_by(|a, b| (a.kind, &a.subject).cmp(&(b.kind, &b.subject)));
    out
}

/// Ends a row (to `stopped` or `failed`), compare-and-set on its version.
fn end_row(row: RowRef<'_>, to: RowState, reason: &'static str) -> Repair {
    Repair::UpdateRow {
        id: SessionId::from_row(row.id.to_owned()),
        version: row.version.to_owned(),
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

/// A live row and its live session disagree on state, owner or instance (the
/// last two only when the table has those columns).
fn drift(
    row: RowRef<'_>,
    live: LiveRef<'_>,
    instance: &str,
    fetched_at: DateTime<Utc>,
    shape: TableShape,
) -> Option<Candidate> {
    let want_state = live.state.row_state();
    let mut diffs = Vec::new();
    if row.state != want_state {
        diffs.push(format!("state {} vs {}", row.state, live.state.as_str()));
    }
    let owner_differs = shape.owner && row.owner_id != Some(live.owner_id);
    if owner_differs {
        diffs.push("owner differs".to_owned());
    }
    let instance_differs = shape.instance && row.controller_instance != Some(instance);
    if instance_differs {
        diffs.push(format!("instance {} vs {}", row.controller_instance.unwrap_or("none"), instance));
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
                id: SessionId::from_row(row.id.to_owned()),
                version: row.version.to_owned(),
                from: row.state,
                to: want_state,
                owner_id: owner_differs.then(|| live.owner_id.to_owned()),
                controller_instance: instance_differs.then(|| instance.to_owned()),
                end_reason: None,
            }),
        },
        changed_at: Some(row.changed_at),
        age: Some(fetched_at - row.changed_at),
        explained: Explained::No,
    })
}

/// Every live row with an owner, as (hash of the owner, row index), sorted
/// so that an owner's rows are adjacent (see [`ByOwner`]). Reads only the
/// rows and the listings, so it runs alongside stages 3 and 4.
fn owner_order(input: &Input<'_>, held: &Listings<'_>, join: &Join) -> Vec<(u32, u32)> {
    let by_owner = ByOwner { entries: Vec::new(), input, held, join };
    let mut entries: Vec<(u32, u32)> = input
        .db
        .rows
        .states()
        .enumerate()
        .filter(|(_, state)| state.is_live())
        .filter_map(|(i, _)| {
            // Rows are at most 4 GiB of strings, so fewer than 4G.
            let i = u32::try_from(i).ok()?;
            by_owner.owner(i).map(|owner| (owner_hash(owner), i))
        })
        .collect();
    entries.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0).then_with(|| by_owner.owner(a.1).cmp(&by_owner.owner(b.1))).then(a.1.cmp(&b.1))
    });
    entries
}

/// Stage 5: owners with more than one live session, among the live rows no
/// earlier finding deals with (`entries`, from [`owner_order`]).
fn duplicates(
    input: &Input<'_>,
    reach: &Reach<'_>,
    held: &Listings<'_>,
    join: &Join,
    entries: Vec<(u32, u32)>,
    candidates: &mut Vec<Candidate>,
) {
    let by_owner = ByOwner { entries, input, held, join };
    unpersisted_duplicates(&by_owner, candidates);
    rows_of_one_owner(input, &by_owner, held, reach, candidates);
}

/// The live rows that stay live after this pass, by the owner they will have
/// once drift is repaired: a hash of the owner and the row's index per row
/// (8 bytes, no string), sorted so that an owner's rows are adjacent. Equal
/// hashes are told apart by the owners themselves.
struct ByOwner<'i, 'a> {
    entries: Vec<(u32, u32)>,
    input: &'i Input<'a>,
    held: &'i Listings<'a>,
    join: &'i Join,
}

impl<'a> ByOwner<'_, 'a> {
    /// The owner of a row: the controller's word for a listed session, else
    /// the row's own.
    fn owner(&self, row: u32) -> Option<&'a str> {
        let row = row as usize;
        let listed = self.join.listing(self.held, row).and_then(|h| h.usable()).map(|s| s.owner_id);
        listed.or_else(|| self.input.db.rows.get(row).and_then(|r| r.owner_id))
    }

    /// Each owner's rows.
    fn groups(&self) -> impl Iterator<Item = &[(u32, u32)]> {
        self.entries.chunk_by(|a, b| a.0 == b.0 && self.owner(a.1) == self.owner(b.1))
    }

    /// The id of a live row of `owner` that stays, if there is one.
    fn row_of(&self, owner: &str) -> Option<&'a str> {
        let key = owner_hash(owner);
        let i =
            self.entries.binary_search_by(|e| e.0.cmp(&key).then_with(|| self.owner(e.1).cmp(&Some(owner)))).ok()?;
        self.input.db.rows.id(self.entries[i].1 as usize)
    }
}

/// The hash the duplicate stage groups owners by (tests look for two owners
/// that share one).
#[doc(hidden)]
pub fn owner_hash_for_test(owner: &str) -> u32 {
    owner_hash(owner)
}

/// 32 bits, so that an entry is 8 bytes: equal hashes of different owners
/// (a few hundred pairs among a million owners) cost a string comparison, and
/// are told apart by it.
fn owner_hash(owner: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    owner.hash(&mut h);
    let h = h.finish();
    (h ^ (h >> 32)) as u32
}

/// A live session with no row whose owner already has a live row that stays, or
/// that shares its owner with another such session, cannot be inserted: the
/// one-live-session-per-owner index would refuse it on every pass. It is a
/// duplicate held by the controller, reported for an operator to resolve, and
/// the newest session of a row-less owner is the one inserted.
fn unpersisted_duplicates(by_owner: &ByOwner<'_, '_>, candidates: &mut [Candidate]) {
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
    for c in candidates.iter_mut() {
        let Some(Repair::InsertRow { owner_id, .. }) = &c.finding.repair else { continue };
        let detail = if let Some(row) = by_owner.row_of(owner_id) {
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
fn rows_of_one_owner(
    input: &Input<'_>,
    by_owner: &ByOwner<'_, '_>,
    held: &Listings<'_>,
    reach: &Reach<'_>,
    candidates: &mut Vec<Candidate>,
) {
    let mut superseded: FxHashSet<String> = FxHashSet::default();
    for group in by_owner.groups().filter(|g| g.len() > 1) {
        let rows: Vec<RowRef<'_>> = group.iter().filter_map(|(_, i)| input.db.rows.get(*i as usize)).collect();
        let verifiable = rows.iter().all(|r| {
            held.get(r.id).is_some()
                || match r.controller_instance {
                    Some(i) => reach.reachable.contains_key(i) || reach.dead.contains(i),
                    None => reach.fleet_gap(input).is_none(),
                }
        });
        let newest = |held_only: bool| {
            rows.iter()
                .filter(|r| !held_only || held.get(r.id).is_some())
                .max_by(|a, b| (a.created_at, a.id).cmp(&(b.created_at, b.id)))
                .map(|r| r.id)
        };
        let keep = newest(true).or_else(|| newest(false));
        let ambiguous = rows.iter().any(|r| held.get(r.id).is_some_and(|h| h.ambiguous));
        for &row in rows.iter().filter(|r| Some(r.id) != keep) {
            // Ending a row nobody holds rests on its absence from the lists.
            let absent_unproven = if held.get(row.id).is_some() {
                None
            } else {
                match row.controller_instance {
                    Some(i) => reach.unproven(input, i),
                    None => reach.fleet_unproven(input),
                }
            };
            let decision = if !verifiable {
                Decision::Wait { reason: Hold::OwnerUnverifiable }
            } else if let Some(reason) = absent_unproven {
                Decision::Wait { reason }
            } else if ambiguous {
                Decision::Wait { reason: Hold::Ambiguous }
            } else {
                Decision::Note
            };
            // Stopping a row supersedes making it follow the controller.
            superseded.insert(row.id.to_string());
            let holder = held.get(row.id).map(|h| h.instance());
            let repair = match holder {
                // The controller runs it: stop it there, and end its row.
                Some(instance) => Repair::StopLive {
                    id: SessionId::from_row(row.id.to_owned()),
                    controller_instance: instance.to_owned(),
                    row_version: row.version.to_owned(),
                    row_state: row.state,
                    end_row: true,
                },
                None => end_row(row, RowState::Stopped, "duplicate"),
            };
            candidates.push(Candidate {
                finding: Finding {
                    kind: Kind::Duplicate,
                    subject: row.id.to_string(),
                    instance: row.controller_instance.map(str::to_owned),
                    detail: format!("{} live rows for one owner; keeping {}", rows.len(), keep.unwrap_or("none")),
                    decision,
                    repair: Some(repair),
                },
                changed_at: Some(row.changed_at),
                age: Some(reach.earliest - row.changed_at),
                explained: Explained::No,
            });
        }
    }
    if !superseded.is_empty() {
        candidates.retain(|c| !(c.finding.kind == Kind::Drift && superseded.contains(&c.finding.subject)));
    }
}

/// Stage 8: the mass-repair guard. Two limits, both lifted by `--force`:
/// - at least `guard_min_orphans` unexplained orphans that are also more than
///   `max_orphan_fraction` of an instance's live rows (or the fleet's, without
///   an instance column) hold back those orphan repairs (a restart or a
///   declared-dead instance explains orphans);
///
/// Then the drain: up to `max_repairs_per_pass` repairs of one kind proceed,
/// oldest evidence first; the rest are deferred to later passes (unless
/// `--force`). A backlog drains at that rate with no one stepping in.
fn guard(
    input: &Input<'_>,
    reach: &Reach<'_>,
    live_rows: &FxHashMap<&str, usize>,
    candidates: &mut [Candidate],
    tripped: &mut BTreeMap<String, BTreeSet<Kind>>,
) {
    let cfg = input.config;
    let key = |c: &Candidate| c.finding.instance.clone().unwrap_or_default();
    // A trip over the fleet shows on every instance.
    let trip = |inst: &str, kind: Kind, tripped: &mut BTreeMap<String, BTreeSet<Kind>>| {
        if inst == FLEET {
            for name in reach.reachable.keys() {
                tripped.entry((*name).to_owned()).or_default().insert(kind);
            }
        } else {
            tripped.entry(inst.to_owned()).or_default().insert(kind);
        }
    };
    let mut unexplained: BTreeMap<String, usize> = BTreeMap::new();
    for c in candidates.iter() {
        if c.finding.kind == Kind::Orphaned && c.explained == Explained::No {
            *unexplained.entry(key(c)).or_default() += 1;
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
            let inst = key(c);
            if held_instances.contains(&inst) && c.finding.decision == Decision::Repair {
                trip(&inst, Kind::Orphaned, tripped);
                // Without an instance column the guard is the fleet's: releasing
                // any controller releases it.
                let released = input.released.contains(&inst) || (inst == FLEET && !input.released.is_empty());
                if !input.options.force && !released {
                    c.finding.decision = Decision::Guarded;
                }
            }
        }
    }

    if input.options.force {
        return;
    }
    let mut per_kind: BTreeMap<Kind, Vec<usize>> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate().filter(|(_, c)| c.finding.decision == Decision::Repair) {
        per_kind.entry(c.finding.kind).or_default().push(i);
    }
    let limit = cfg.max_repairs_per_pass;
    for (_, mut queue) in per_kind {
        if queue.len() <= limit {
            continue;
        }
        // Oldest evidence first; evidence of unknown age last; then by id, so
        // the order is the same every pass.
        queue.sort_by(|&a, &b| {
            let (a, b) = (&candidates[a], &candidates[b]);
            b.age
                .is_some()
                .cmp(&a.age.is_some())
                .then(b.age.cmp(&a.age))
                .then(a.finding.subject.cmp(&b.finding.subject))
        });
        for (ahead, &i) in queue.iter().enumerate().skip(limit) {
            candidates[i].finding.decision = Decision::Deferred { ahead, limit };
        }
    }
}
