//! Domain types shared by every part of a pass: session states on both sides,
//! validated session ids, and the snapshots the classifier compares.
//!
//! Wire formats (the controller's JSON, PostgreSQL rows) are converted into these
//! types at their boundary, so the classifier never sees an unvalidated value.

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use regex::Regex;
use serde::Serialize;

/// A session id that matched `sessions.id_pattern`. Only these ever reach a query.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SessionId(String);

impl SessionId {
    /// Validates `raw` against the configured pattern.
    pub fn parse(raw: &str, pattern: &Regex) -> Option<SessionId> {
        if pattern.is_match(raw) {
            Some(SessionId(raw.to_owned()))
        } else {
            None
        }
    }

    /// Wraps an id read back from the database, which is trusted to be the key of a
    /// row that exists; it never goes back into a query except as that row's key.
    pub fn from_row(raw: String) -> SessionId {
        SessionId(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The state column of a `sessions` row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum RowState {
    Creating,
    Active,
    Paused,
    Stopped,
    Failed,
    Deleted,
}

// `state as usize` indexes `RowState::ALL` (counts by state).
const _: () = {
    let mut i = 0;
    while i < RowState::ALL.len() {
        assert!(RowState::ALL[i] as usize == i);
        i += 1;
    }
};

impl RowState {
    pub const ALL: [RowState; 6] = [
        RowState::Creating,
        RowState::Active,
        RowState::Paused,
        RowState::Stopped,
        RowState::Failed,
        RowState::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RowState::Creating => "creating",
            RowState::Active => "active",
            RowState::Paused => "paused",
            RowState::Stopped => "stopped",
            RowState::Failed => "failed",
            RowState::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<RowState> {
        RowState::ALL.into_iter().find(|state| state.as_str() == s)
    }

    /// Live rows are the ones the partial unique index limits to one per owner.
    pub fn is_live(self) -> bool {
        matches!(self, RowState::Creating | RowState::Active | RowState::Paused)
    }
}

impl fmt::Display for RowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state a controller reports for a live session. `running` is the
/// controller's synonym for `active`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveState {
    Creating,
    Active,
    Paused,
}

impl LiveState {
    pub fn parse(s: &str) -> Option<LiveState> {
        match s {
            "creating" => Some(LiveState::Creating),
            "active" | "running" => Some(LiveState::Active),
            "paused" => Some(LiveState::Paused),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LiveState::Creating => "creating",
            LiveState::Active => "active",
            LiveState::Paused => "paused",
        }
    }

    /// The row state that agrees with this live state.
    pub fn row_state(self) -> RowState {
        match self {
            LiveState::Creating => RowState::Creating,
            LiveState::Active => RowState::Active,
            LiveState::Paused => RowState::Paused,
        }
    }
}

/// One well-formed session in a controller's list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveSession {
    pub id: SessionId,
    pub owner_id: String,
    pub state: LiveState,
    /// When the controller says the session started (the controller's clock).
    pub started_at: Option<DateTime<Utc>>,
}

/// A list's ids and owners pass 4 GiB.
#[derive(Debug, thiserror::Error)]
#[error("the list's ids and owners pass 4 GiB: this session is kept as an unusable entry")]
pub struct ListFull;

/// A session of [`LiveSessions`], borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveRef<'a> {
    /// It matched `sessions.id_pattern` when it was listed.
    pub id: &'a str,
    pub owner_id: &'a str,
    pub state: LiveState,
    pub started_at: Option<DateTime<Utc>>,
}

impl LiveRef<'_> {
    /// The id, owned; it was validated when the list was read.
    pub fn session_id(&self) -> SessionId {
        SessionId(self.id.to_owned())
    }
}

/// Where a live session's fields are: its id then its owner in the arena, the
/// rest by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LiveMeta {
    start: u32,
    id_len: u32,
    owner_len: u32,
    started_at: Option<DateTime<Utc>>,
    state: LiveState,
}

/// The well-formed sessions of a controller's list, as columns: every string
/// in one arena and a fixed-size record per session, so a list of a million
/// is two allocations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveSessions {
    text: String,
    meta: Vec<LiveMeta>,
    /// How many sessions from the first are in id order.
    sorted: usize,
    prefix: SharedPrefix,
}

impl LiveSessions {
    pub fn with_capacity(sessions: usize, bytes: usize) -> LiveSessions {
        LiveSessions {
            text: String::with_capacity(bytes),
            meta: Vec::with_capacity(sessions),
            sorted: 0,
            prefix: SharedPrefix::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// The state of each session, without the rest of it.
    pub fn states(&self) -> impl ExactSizeIterator<Item = LiveState> + '_ {
        self.meta.iter().map(|m| m.state)
    }

    /// Drops every session, keeping the room.
    pub fn clear(&mut self) {
        self.text.clear();
        self.meta.clear();
        self.sorted = 0;
        self.prefix = SharedPrefix::default();
    }

    /// Appends a session whose id matched `sessions.id_pattern`. Offsets are
    /// 32-bit: past 4 GiB of ids and owners in one list, the session is not
    /// appended, and the caller keeps it as an unusable entry (held, never
    /// taken for absent).
    pub(crate) fn push_checked(
        &mut self,
        id: &str,
        owner_id: &str,
        state: LiveState,
        started_at: Option<DateTime<Utc>>,
    ) -> Result<(), ListFull> {
        let end = self.text.len() + id.len() + owner_id.len();
        let (Ok(start), Ok(id_len), Ok(owner_len), Ok(_)) = (
            u32::try_from(self.text.len()),
            u32::try_from(id.len()),
            u32::try_from(owner_id.len()),
            u32::try_from(end),
        ) else {
            return Err(ListFull);
        };
        if self.sorted == self.meta.len() && self.id(self.sorted.wrapping_sub(1)).is_none_or(|last| last <= id) {
            self.sorted += 1;
        }
        self.text.push_str(id);
        self.text.push_str(owner_id);
        self.meta.push(LiveMeta { start, id_len, owner_len, started_at, state });
        self.prefix.push(id);
        Ok(())
    }

    /// Appends an owned session (tests).
    ///
    /// # Panics
    ///
    /// Past 4 GiB of ids and owners, which no list built by hand reaches.
    pub fn push(&mut self, s: LiveSession) {
        if let Err(e) = self.push_checked(s.id.as_str(), &s.owner_id, s.state, s.started_at) {
            panic!("{e}");
        }
    }

    /// The id of session `i`, without the rest of it.
    pub fn id(&self, i: usize) -> Option<&str> {
        let m = self.meta.get(i)?;
        self.text.get(m.start as usize..m.start as usize + m.id_len as usize)
    }

    /// Puts the sessions in id order, equal ids in list order, so that every
    /// later walk in id order is a plain walk instead of a sort. Indices
    /// change: call it before any index is handed out.
    pub fn sort_by_id(&mut self) {
        if self.sorted == self.meta.len() {
            return;
        }
        // Among equal ids (an ambiguous listing), the first listed stays first.
        // One core: the lists are parsed and sorted four at once already.
        sort_packed(&mut self.text, &mut self.meta, self.prefix.len(), Cores::One);
        self.sorted = self.meta.len();
    }

    /// The indices of the sessions in id order (equal ids in list order).
    /// A list sent in id order, or sorted by [`Self::sort_by_id`], costs
    /// nothing more to walk.
    pub fn by_id(&self) -> impl Iterator<Item = usize> + '_ {
        id_order(self.meta.len(), self.sorted, move |i| self.id(i).unwrap_or_default())
    }

    pub fn get(&self, i: usize) -> Option<LiveRef<'_>> {
        let m = self.meta.get(i)?;
        let id_end = m.start as usize + m.id_len as usize;
        Some(LiveRef {
            id: self.text.get(m.start as usize..id_end)?,
            owner_id: self.text.get(id_end..id_end + m.owner_len as usize)?,
            state: m.state,
            started_at: m.started_at,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = LiveRef<'_>> + '_ {
        (0..self.meta.len()).filter_map(|i| self.get(i))
    }

    /// Sets a session's start time (tests of a controller that omits it).
    pub fn set_started_at(&mut self, i: usize, started_at: Option<DateTime<Utc>>) {
        if let Some(m) = self.meta.get_mut(i) {
            m.started_at = started_at;
        }
    }
}

impl FromIterator<LiveSession> for LiveSessions {
    fn from_iter<I: IntoIterator<Item = LiveSession>>(iter: I) -> LiveSessions {
        let mut out = LiveSessions::default();
        for s in iter {
            out.push(s);
        }
        out
    }
}

/// An entry of a controller's list that could not be used. Its raw id still counts
/// as "held by the controller", so the row it names is never taken for an orphan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidEntry {
    /// The id exactly as sent; never used in a query.
    pub raw_id: Option<String>,
    pub kind: InvalidEntryKind,
    pub problem: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidEntryKind {
    /// The id does not match `sessions.id_pattern` (or is missing).
    InvalidId,
    /// The id is fine but another field is unusable (unknown state, no owner, …).
    InvalidEntry,
}

/// What became of a finding that has a repair: the `outcome` label of
/// `sessiond_repairs_total`, the report's counts and the log's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RepairResult {
    Repaired,
    /// The row changed since it was read; left alone.
    Conflict,
    Failed,
    /// Held back by the mass-repair guard.
    Guarded,
    /// Policy, observe mode or a dry run: reported, not repaired.
    Reported,
    /// Left for a later pass (reconcile.max_repairs_per_pass).
    Deferred,
}

impl RepairResult {
    pub const ALL: [RepairResult; 6] = [
        RepairResult::Repaired,
        RepairResult::Conflict,
        RepairResult::Failed,
        RepairResult::Guarded,
        RepairResult::Reported,
        RepairResult::Deferred,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RepairResult::Repaired => "repaired",
            RepairResult::Conflict => "conflict",
            RepairResult::Failed => "failed",
            RepairResult::Guarded => "guarded",
            RepairResult::Reported => "reported",
            RepairResult::Deferred => "deferred",
        }
    }
}

impl fmt::Display for RepairResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a lookup of a session id finds, as the application's API would
/// answer: the `result` and `reason` labels of the lookup metrics, the
/// counters a controller reports, and `sessiond_lookup`'s answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LookupResult {
    Found,
    /// A well-formed id with no row and no trace in the audit trail.
    NeverExisted,
    /// The row was deleted.
    Deleted,
    /// Not a session id at all.
    InvalidFormat,
}

impl LookupResult {
    pub const ALL: [LookupResult; 4] =
        [LookupResult::Found, LookupResult::NeverExisted, LookupResult::Deleted, LookupResult::InvalidFormat];

    /// `found` or `not_found`.
    pub fn result(self) -> &'static str {
        match self {
            LookupResult::Found => "found",
            _ => "not_found",
        }
    }

    /// Why: `exists`, `never_existed`, `deleted` or `invalid_format`.
    pub fn reason(self) -> &'static str {
        match self {
            LookupResult::Found => "exists",
            LookupResult::NeverExisted => "never_existed",
            LookupResult::Deleted => "deleted",
            LookupResult::InvalidFormat => "invalid_format",
        }
    }
}

/// The application's own cumulative counters, as the controller reports them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AppCounters {
    pub sessions_created: u64,
    pub sessions_reused: u64,
    pub lookups_found: u64,
    pub lookups_invalid_format: u64,
    pub lookups_never_existed: u64,
    pub lookups_deleted: u64,
    pub cleanups_succeeded: u64,
    pub cleanups_failed: u64,
    /// How long creating a session took, as the controller measures it.
    pub create_seconds: Option<CreateHistogram>,
}

impl AppCounters {
    /// The lookups the application answered, by what they found.
    pub fn lookups(&self, what: LookupResult) -> u64 {
        match what {
            LookupResult::Found => self.lookups_found,
            LookupResult::NeverExisted => self.lookups_never_existed,
            LookupResult::Deleted => self.lookups_deleted,
            LookupResult::InvalidFormat => self.lookups_invalid_format,
        }
    }
}

/// A cumulative histogram of session creation times, since the controller's
/// boot: `cumulative[i]` creates took at most `bounds[i]` seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CreateHistogram {
    /// Finite upper bounds, ascending.
    pub bounds: Vec<f64>,
    pub cumulative: Vec<u64>,
    /// Every create (the `+Inf` bucket).
    pub count: u64,
    pub sum: f64,
}

/// What one controller instance answered in this pass.
#[derive(Clone, Debug, PartialEq)]
pub struct ControllerList {
    pub boot_id: String,
    /// When the controller made the document, by its own clock.
    pub generated_at: Option<DateTime<Utc>>,
    pub sessions: LiveSessions,
    pub invalid: Vec<InvalidEntry>,
    pub counters: Option<AppCounters>,
    /// Optional parts of the document that were present but malformed.
    pub problems: Vec<PayloadProblem>,
}

/// A malformed optional part of a controller's document: the list is still
/// used, the part is not, and the problem is logged and counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadProblem {
    /// `counters` or `generated_at`.
    pub part: &'static str,
    pub detail: String,
}

/// One instance's side of the snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceSnapshot {
    pub name: String,
    /// When sessiond sent the request: nothing created after this can be in the list.
    pub fetched_at: DateTime<Utc>,
    pub result: Result<ControllerList, String>,
    /// The boot id of every answer this pass, the list's first, then those of
    /// the verification fetches. Several processes behind one URL show here.
    pub boot_ids: Vec<String>,
}

impl InstanceSnapshot {
    pub fn is_reachable(&self) -> bool {
        self.result.is_ok()
    }
}

/// A `sessions` row as read by a pass, with the token that makes a repair a
/// compare-and-set: the row's `xmin`, which changes on every write to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub id: SessionId,
    /// `None` when the table has no owner column.
    pub owner_id: Option<String>,
    /// `None` when the table has no instance column: the row belongs to the fleet.
    pub controller_instance: Option<String>,
    pub state: RowState,
    /// Row times are on sessiond's clock: the store converts them from the
    /// database's clock with the offset it measures at each read.
    pub created_at: DateTime<Utc>,
    /// The latest of created_at, updated_at, ended_at and deleted_at.
    pub changed_at: DateTime<Utc>,
    pub version: String,
}

/// A row of [`Rows`], borrowed: the fields of a [`SessionRow`], with its
/// strings in the snapshot's arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowRef<'a> {
    pub id: &'a str,
    pub owner_id: Option<&'a str>,
    pub controller_instance: Option<&'a str>,
    pub state: RowState,
    pub created_at: DateTime<Utc>,
    pub changed_at: DateTime<Utc>,
    pub version: &'a str,
}

/// A fixed-size record of a column whose strings, id first, sit one after
/// another in the column's arena from `start`.
trait ArenaRecord {
    fn start(&self) -> u32;
    fn set_start(&mut self, start: u32);
    fn id_len(&self) -> u32;
    /// The bytes of all its strings.
    fn span(&self) -> usize;
    /// Whether it keeps a sort key (see [`sort_packed`]).
    const KEYED: bool = false;
    fn key(&self) -> u64 {
        0
    }
    fn set_key(&mut self, _key: u64) {}
}

impl ArenaRecord for LiveMeta {
    fn start(&self) -> u32 {
        self.start
    }
    fn set_start(&mut self, start: u32) {
        self.start = start;
    }
    fn id_len(&self) -> u32 {
        self.id_len
    }
    fn span(&self) -> usize {
        self.id_len as usize + self.owner_len as usize
    }
}

impl ArenaRecord for RowMeta {
    fn start(&self) -> u32 {
        self.start
    }
    fn set_start(&mut self, start: u32) {
        self.start = start;
    }
    fn id_len(&self) -> u32 {
        self.id_len
    }
    fn span(&self) -> usize {
        let len = |n: u32| if n == NULL_LEN { 0 } else { n as usize };
        len(self.id_len) + len(self.owner_len) + len(self.instance_len) + len(self.version_len)
    }
    const KEYED: bool = true;
    fn key(&self) -> u64 {
        self.key
    }
    fn set_key(&mut self, key: u64) {
        self.key = key;
    }
}

/// Whether a sort may take a second core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cores {
    One,
    Two,
}

/// Below this many records one core sorts them: splitting costs a selection
/// pass and a thread.
const TWO_CORE_SORT_MIN: usize = 1 << 16;

/// Sorts the records by id, then packs the strings in the records' order.
///
/// With [`Cores::Two`] and many records, a selection first puts every record
/// that sorts before the median on its left and the rest on its right (in
/// place, in linear time), and each side is then sorted on its own core: no
/// merge, no buffer. If no second thread can be made, this one sorts all.
///
/// The sort is in place, with no buffer (a stable sort would take half the
/// records' size again at its peak): the arena offset grows with every push,
/// so among equal ids the record pushed first stays first. Records are
/// compared by a key first ([`key_of`]), and by their ids only when keys are
/// equal: with UUIDs, whose strings sit anywhere in the arena, a comparison
/// of ids is a cache miss, and most comparisons become one of two integers.
/// Rows keep their key; a list's records, which have no room for one, are
/// sorted through temporary pairs ([`sort_by_temporary_keys`]) on one core.
///
/// Packing copies each record's strings into a new arena in the records'
/// order: a walk in id order then reads the strings in memory order too,
/// instead of jumping to wherever each was appended (a cache miss per
/// comparison when ids arrived in random order). With two cores, each half
/// is packed by the thread that sorted it.
///
/// `shared` is a number of leading bytes every record's id has (see
/// [`SharedPrefix`]); the longer, the fewer comparisons read ids.
fn sort_packed<M: ArenaRecord + Send + Copy>(text: &mut String, records: &mut [M], shared: usize, cores: Cores) {
    let arena = text.as_str();
    let span = |m: &M| m.start() as usize..m.start() as usize + m.span();
    let id = |m: &M| arena.get(m.start() as usize..m.start() as usize + m.id_len() as usize).unwrap_or_default();
    let order = |a: &M, b: &M| a.key().cmp(&b.key()).then_with(|| id(a).cmp(id(b))).then(a.start().cmp(&b.start()));
    // Packing is skipped, and nothing moved, if a span is out of bounds,
    // which the pushes that laid them out rule out. Checked in the same walk
    // that sets the keys (each walk of a million records reads 100 MB), on
    // both cores when there are two.
    let in_arena = |m: &M| arena.get(span(m)).is_some();
    let keyed = |records: &mut [M]| {
        let mut all_in = true;
        for m in records.iter_mut() {
            all_in &= in_arena(m);
            let key = key_of(id(m), shared);
            m.set_key(key);
        }
        all_in
    };
    let in_bounds = if !M::KEYED {
        records.iter().all(in_arena)
    } else if cores == Cores::Two && records.len() >= TWO_CORE_SORT_MIN {
        let (left, right) = records.split_at_mut(records.len() / 2);
        let both = std::thread::scope(|s| {
            let other = std::thread::Builder::new().name("sessiond-sort".into()).spawn_scoped(s, || keyed(left));
            let right_in = keyed(right);
            other.ok().map(|other| other.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)) && right_in)
        });
        // No second thread: this one does them all.
        both.unwrap_or_else(|| keyed(records))
    } else {
        keyed(records)
    };
    let packable = u32::try_from(arena.len()).is_ok() && in_bounds;
    if !M::KEYED {
        sort_by_temporary_keys(records, id, shared);
    } else if cores == Cores::Two && records.len() >= TWO_CORE_SORT_MIN {
        let n = records.len();
        let mid = n / 2;
        records.select_nth_unstable_by(mid, order);
        let (left, right) = records.split_at_mut(mid);
        // Each half is sorted, then packed into its own part of the new
        // arena, by its own thread; the new offsets wait in `starts` until
        // the arena is whole.
        let left_bytes: usize = left.iter().map(|m| m.span()).sum();
        let right_bytes: usize = right.iter().map(|m| m.span()).sum();
        let mut bytes = vec![0u8; if packable { left_bytes + right_bytes } else { 0 }];
        let mut starts = vec![0u32; if packable { n } else { 0 }];
        let (left_out, right_out) = bytes.split_at_mut(if packable { left_bytes } else { 0 });
        let (left_starts, right_starts) = starts.split_at_mut(if packable { mid } else { 0 });
        let both = std::thread::scope(|s| {
            let other = std::thread::Builder::new().name("sessiond-sort".into()).spawn_scoped(s, || {
                left.sort_unstable_by(order);
                pack_into(left, arena, left_out, left_starts, 0)
            });
            right.sort_unstable_by(order);
            let right_packed = pack_into(right, arena, right_out, right_starts, left_bytes);
            other.is_ok_and(|other| other.join().is_ok_and(|left_packed| left_packed)) && right_packed
        });
        if both && packable {
            // Whole strings copied end to end are UTF-8; were they not, the
            // records would keep their offsets, and this core pack them below.
            if let Ok(packed) = String::from_utf8(bytes) {
                for (record, start) in records.iter_mut().zip(starts) {
                    record.set_start(start);
                }
                *text = packed;
                return;
            }
        } else if !both {
            // No second thread (or, impossibly, a sort that panicked): this
            // core sorts them all, the right side already in order.
            records.sort_unstable_by(order);
        }
    } else {
        records.sort_unstable_by(order);
    }
    if !packable {
        return;
    }
    let mut packed = String::with_capacity(arena.len());
    for record in records.iter_mut() {
        let strings = arena.get(span(record)).unwrap_or_default();
        // Checked above; no larger than the arena, whose length fits in 32 bits.
        record.set_start(packed.len() as u32);
        packed.push_str(strings);
    }
    *text = packed;
}

/// Copies the records' strings end to end into `out`, and where each record's
/// start there (plus `base`) into `starts`. False if anything did not fit,
/// which the caller's sizes rule out.
fn pack_into<M: ArenaRecord>(records: &[M], arena: &str, out: &mut [u8], starts: &mut [u32], base: usize) -> bool {
    let mut at = 0;
    for (record, start) in records.iter().zip(starts.iter_mut()) {
        let from = record.start() as usize;
        let Some(strings) = arena.as_bytes().get(from..from + record.span()) else { return false };
        let Some(to) = out.get_mut(at..at + strings.len()) else { return false };
        to.copy_from_slice(strings);
        // Below the arena's length, which fits in 32 bits (checked by the caller).
        *start = (base + at) as u32;
        at += strings.len();
    }
    at == out.len()
}

/// The leading bytes every id pushed so far shares, kept as ids are pushed,
/// while each is in cache. Found afterwards, by a walk of every record and
/// its id, it cost the sort of 1M rows some 30 ms on one core (inferred from
/// timers around it; the read stage fell by as much, paired), a tenth of the
/// read's time after the `COPY` (docs/performance.md, ninth run).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SharedPrefix {
    /// The first id's bytes, cut to what every later id shared with them;
    /// `None` before the first.
    bytes: Option<Vec<u8>>,
}

impl SharedPrefix {
    fn push(&mut self, id: &str) {
        let id = id.as_bytes();
        match &mut self.bytes {
            None => self.bytes = Some(id.to_vec()),
            // One comparison, the usual case: the id shares the prefix.
            Some(bytes) if id.starts_with(bytes) => {}
            Some(bytes) => bytes.truncate(common_prefix_len(bytes, id)),
        }
    }

    fn len(&self) -> usize {
        self.bytes.as_ref().map_or(0, Vec::len)
    }
}

/// How many leading bytes `a` and `b` share.
fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(a, b)| a == b).count()
}

/// The sort key of an id whose first `shared` bytes every id has: the eight
/// bytes that follow (zero past the id's end), big-endian. A key that sorts
/// lower is an id that sorts lower, so most comparisons read no string.
fn key_of(id: &str, shared: usize) -> u64 {
    let mut key = [0u8; 8];
    let tail = id.as_bytes().get(shared..).unwrap_or_default();
    for (k, b) in key.iter_mut().zip(tail) {
        *k = *b;
    }
    u64::from_be_bytes(key)
}

/// Sorts records that keep no key (a list's, 28 bytes each) through a
/// (key, index) pair each, then moves them into that order in place, one
/// cycle of the permutation at a time. The pairs are temporary (16 bytes a
/// record), and lists are sorted where they are parsed, before the rows are
/// read: below the pass's peak.
fn sort_by_temporary_keys<'a, M: ArenaRecord + Copy>(records: &mut [M], id: impl Fn(&M) -> &'a str, shared: usize) {
    let by_id = |a: &M, b: &M| id(a).cmp(id(b)).then(a.start().cmp(&b.start()));
    if u32::try_from(records.len()).is_err() {
        records.sort_unstable_by(by_id);
        return;
    }
    // Indices below `u32::MAX`, checked above.
    let mut keyed: Vec<(u64, u32)> =
        records.iter().enumerate().map(|(i, m)| (key_of(id(m), shared), i as u32)).collect();
    keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| by_id(&records[a.1 as usize], &records[b.1 as usize])));
    // Position p takes the record at keyed[p].1; a position done is marked
    // by pointing at itself.
    for start in 0..keyed.len() {
        let mut at = start;
        let first = records[start];
        loop {
            let from = keyed[at].1 as usize;
            keyed[at].1 = at as u32;
            if from == start {
                records[at] = first;
                break;
            }
            records[at] = records[from];
            at = from;
        }
    }
}

/// Indices `0..len` in id order, when `0..sorted` already are: the others are
/// sorted once (stably) and merged in, the lower index first among equal ids.
fn id_order<'a>(
    len: usize,
    sorted: usize,
    id: impl Fn(usize) -> &'a str + Copy + 'a,
) -> impl Iterator<Item = usize> + 'a {
    let mut tail: Vec<usize> = (sorted.min(len)..len).collect();
    tail.sort_by(|&a, &b| id(a).cmp(id(b)));
    let mut head = (0..sorted.min(len)).peekable();
    let mut tail = tail.into_iter().peekable();
    std::iter::from_fn(move || match (head.peek(), tail.peek()) {
        (Some(&h), Some(&t)) if id(t) < id(h) => tail.next(),
        (Some(_), _) => head.next(),
        (None, _) => tail.next(),
    })
}

/// Ids in id order, each with what its run gives with it.
pub type IdRun<'a, T> = Box<dyn Iterator<Item = (&'a str, T)> + Send + 'a>;

/// Merges runs that are each in id order into one, in id order: among equal
/// ids, the earlier run's first, and within a run, the run's own order. No
/// run is copied; the heap holds one entry per run.
pub struct MergeById<'a, T> {
    runs: Vec<IdRun<'a, T>>,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<Head<'a, T>>>,
    /// Bytes every head's id begins with: the first id seen, cut to what
    /// each later one shared with it. The heads are keyed after it.
    prefix: Option<&'a [u8]>,
}

/// A run's next id, keyed by the 8 bytes after the prefix every head shares
/// (see [`key_of`]): most comparisons are of two integers, and read no id.
struct Head<'a, T> {
    key: u64,
    id: &'a str,
    run: usize,
    item: T,
}

impl<T> PartialEq for Head<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl<T> Eq for Head<'_, T> {}

impl<T> PartialOrd for Head<'_, T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Head<'_, T> {
    /// Id order (keys of ids that share a prefix order as the ids do), then
    /// the earlier run.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key).then_with(|| self.id.cmp(other.id)).then(self.run.cmp(&other.run))
    }
}

impl<'a, T> MergeById<'a, T> {
    pub fn new(runs: Vec<IdRun<'a, T>>) -> MergeById<'a, T> {
        let mut merge = MergeById { heap: std::collections::BinaryHeap::with_capacity(runs.len()), runs, prefix: None };
        for run in 0..merge.runs.len() {
            if let Some((id, item)) = merge.runs.get_mut(run).and_then(Iterator::next) {
                merge.share_prefix(id);
                let key = merge.key(id);
                merge.heap.push(std::cmp::Reverse(Head { key, id, run, item }));
            }
        }
        merge
    }

    fn key(&self, id: &str) -> u64 {
        key_of(id, self.prefix.map_or(0, <[u8]>::len))
    }

    /// Makes the prefix one `id` shares too: if it does not, the prefix is
    /// cut to what it does share, and the heads are keyed again.
    fn share_prefix(&mut self, id: &'a str) {
        let id = id.as_bytes();
        let Some(prefix) = self.prefix else {
            self.prefix = Some(id);
            return;
        };
        if id.starts_with(prefix) {
            return;
        }
        let shared = common_prefix_len(prefix, id);
        self.prefix = prefix.get(..shared);
        let mut heads = std::mem::take(&mut self.heap).into_vec();
        for head in &mut heads {
            head.0.key = key_of(head.0.id, shared);
        }
        self.heap = heads.into();
    }
}

impl<'a, T> Iterator for MergeById<'a, T> {
    /// The id, the run it came from, and what the run gave with it.
    type Item = (&'a str, usize, T);

    fn next(&mut self) -> Option<Self::Item> {
        let run = self.heap.peek()?.0.run;
        let Some((id, item)) = self.runs.get_mut(run).and_then(Iterator::next) else {
            let std::cmp::Reverse(Head { id, item, .. }) = self.heap.pop()?;
            return Some((id, run, item));
        };
        if self.prefix.is_some_and(|p| id.as_bytes().starts_with(p)) {
            // The run's next head takes the place of the one given out, and
            // sinks once: half the heap's work of a pop and then a push.
            let key = self.key(id);
            let mut top = self.heap.peek_mut()?;
            let Head { id, item, .. } = std::mem::replace(&mut top.0, Head { key, id, run, item });
            return Some((id, run, item));
        }
        // A shorter prefix: the heads are keyed again first.
        let std::cmp::Reverse(out) = self.heap.pop()?;
        self.share_prefix(id);
        let key = self.key(id);
        self.heap.push(std::cmp::Reverse(Head { key, id, run, item }));
        Some((out.id, run, out.item))
    }
}

/// A string field that is NULL.
const NULL_LEN: u32 = u32::MAX;

/// Where a row's fields are: its strings, one after another in the arena
/// (id, owner, instance, version), and the rest by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RowMeta {
    start: u32,
    /// Sort key: see [`sort_packed`].
    key: u64,
    id_len: u32,
    owner_len: u32,
    instance_len: u32,
    version_len: u32,
    created_at: DateTime<Utc>,
    changed_at: DateTime<Utc>,
    state: RowState,
}

impl RowMeta {
    /// This row's id, in the arena `text` its strings are in.
    fn id<'t>(&self, text: &'t str) -> Option<&'t str> {
        text.get(self.start as usize..self.start as usize + self.id_len as usize)
    }

    /// Room not yet filled in [`TwoRuns`].
    const PLACEHOLDER: RowMeta = RowMeta {
        start: 0,
        key: 0,
        id_len: 0,
        owner_len: 0,
        instance_len: 0,
        version_len: 0,
        created_at: DateTime::<Utc>::MIN_UTC,
        changed_at: DateTime::<Utc>::MIN_UTC,
        state: RowState::Active,
    };
}

/// The rows of a snapshot, as columns: every string in one arena, and a
/// fixed-size record per row. A million rows are two allocations, not four
/// million, and dropping them is two frees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rows {
    text: String,
    meta: Vec<RowMeta>,
    /// How many rows from the first are in id order.
    sorted: usize,
    prefix: SharedPrefix,
}

/// The rows' strings do not fit: offsets are 32-bit, so one pass reads at
/// most 4 GiB of ids, owners, instances and versions (some 80 million rows).
#[derive(Debug, thiserror::Error)]
#[error("the strings of the rows read pass 4 GiB at row {id:.64}: sessiond reads at most that much in one pass")]
pub struct RowTooLong {
    pub id: String,
}

/// The id of the last of `meta`, whose strings are in `text`.
fn last_id<'t>(text: &'t str, meta: &[RowMeta]) -> Option<&'t str> {
    meta.last()?.id(text)
}

/// Appends a row's strings to `text`, and returns its record.
fn record(text: &mut String, row: RowRef<'_>) -> Result<RowMeta, RowTooLong> {
    let len = |s: &str| u32::try_from(s.len()).ok().filter(|n| *n != NULL_LEN);
    let opt_len = |s: Option<&str>| s.map_or(Some(NULL_LEN), len);
    let (Some(id_len), Some(owner_len), Some(instance_len), Some(version_len), Ok(start)) = (
        len(row.id),
        opt_len(row.owner_id),
        opt_len(row.controller_instance),
        len(row.version),
        u32::try_from(text.len()),
    ) else {
        return Err(RowTooLong { id: row.id.chars().take(64).collect() });
    };
    text.push_str(row.id);
    text.push_str(row.owner_id.unwrap_or_default());
    text.push_str(row.controller_instance.unwrap_or_default());
    text.push_str(row.version);
    Ok(RowMeta {
        key: 0,
        start,
        id_len,
        owner_len,
        instance_len,
        version_len,
        created_at: row.created_at,
        changed_at: row.changed_at,
        state: row.state,
    })
}

impl Rows {
    /// Room for `rows` more rows with `bytes` more bytes of strings.
    pub fn reserve(&mut self, rows: usize, bytes: usize) {
        self.meta.reserve(rows);
        self.text.reserve(bytes);
    }

    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Appends a row.
    pub fn push_parts(&mut self, row: RowRef<'_>) -> Result<(), RowTooLong> {
        let in_order = self.sorted == self.meta.len() && last_id(&self.text, &self.meta).is_none_or(|l| l <= row.id);
        self.meta.push(record(&mut self.text, row)?);
        self.prefix.push(row.id);
        if in_order {
            self.sorted += 1;
        }
        Ok(())
    }

    /// Appends an owned row (tests; the store appends with `push_parts`).
    ///
    /// # Panics
    ///
    /// Past 4 GiB of row strings, which no rows built by hand reach.
    pub fn push(&mut self, row: SessionRow) {
        let r = RowRef {
            id: row.id.as_str(),
            owner_id: row.owner_id.as_deref(),
            controller_instance: row.controller_instance.as_deref(),
            state: row.state,
            created_at: row.created_at,
            changed_at: row.changed_at,
            version: &row.version,
        };
        if let Err(e) = self.push_parts(r) {
            panic!("{e}");
        }
    }

    pub fn get(&self, i: usize) -> Option<RowRef<'_>> {
        let m = self.meta.get(i)?;
        let mut at = m.start as usize;
        let mut take = |n: u32| {
            if n == NULL_LEN {
                return None;
            }
            let s = self.text.get(at..at + n as usize);
            at += n as usize;
            s
        };
        let id = take(m.id_len).unwrap_or_default();
        let owner_id = take(m.owner_len);
        let controller_instance = take(m.instance_len);
        let version = take(m.version_len).unwrap_or_default();
        Some(RowRef {
            id,
            owner_id,
            controller_instance,
            state: m.state,
            created_at: m.created_at,
            changed_at: m.changed_at,
            version,
        })
    }

    /// The id of row `i`, without the rest of the row.
    pub fn id(&self, i: usize) -> Option<&str> {
        self.meta.get(i)?.id(&self.text)
    }

    /// Puts the rows in id order, equal ids in the order read, so that every
    /// later walk in id order is a plain walk instead of a sort. Indices
    /// change: call it before any index is handed out.
    pub fn sort_by_id(&mut self) {
        if self.sorted == self.meta.len() {
            return;
        }
        // Two cores: the read sorts once the `COPY` is done, when PostgreSQL
        // and the controllers are idle.
        sort_packed(&mut self.text, &mut self.meta, self.prefix.len(), Cores::Two);
        self.sorted = self.meta.len();
    }

    /// The indices of the rows in id order (equal ids in the order read). Rows
    /// read in id order, or sorted by [`Self::sort_by_id`], cost nothing more
    /// to walk; rows appended since are sorted on each walk.
    pub fn by_id(&self) -> impl Iterator<Item = usize> + '_ {
        id_order(self.meta.len(), self.sorted, move |i| self.id(i).unwrap_or_default())
    }

    /// The state of each row, without the rest of it.
    pub fn states(&self) -> impl ExactSizeIterator<Item = RowState> + '_ {
        self.meta.iter().map(|m| m.state)
    }

    pub fn iter(&self) -> impl Iterator<Item = RowRef<'_>> + '_ {
        (0..self.meta.len()).filter_map(|i| self.get(i))
    }
}

/// Rows read as two runs at once: two halves of the table streamed side by
/// side, their chunks arriving interleaved. The strings share one arena; each
/// run keeps its records apart, in the order read, until [`TwoRuns::join`]
/// puts the second after the first. A table whose rows lie in id order stays
/// in id order, and needs no sort.
///
/// Both runs fill one allocation, the first from its start and the second
/// from its end: records are never held twice, and nothing is allocated
/// and freed on the side (glibc would keep such memory for the thread that
/// freed it, and the classifier, on another, would not reuse it).
#[derive(Debug)]
pub struct TwoRuns {
    text: String,
    /// `first` records at the start, `second` at the end (the last read first).
    slots: Vec<RowMeta>,
    first: usize,
    second: usize,
    /// How many of each run's records, from its first, are in id order.
    first_sorted: usize,
    second_sorted: usize,
    prefix: SharedPrefix,
}

/// Which of [`TwoRuns`]'s runs a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    First,
    Second,
}

impl TwoRuns {
    /// Room for `rows` rows with `bytes` bytes of strings; more grows it.
    pub fn with_capacity(rows: usize, bytes: usize) -> TwoRuns {
        TwoRuns {
            text: String::with_capacity(bytes),
            slots: vec![RowMeta::PLACEHOLDER; rows],
            first: 0,
            second: 0,
            first_sorted: 0,
            second_sorted: 0,
            prefix: SharedPrefix::default(),
        }
    }

    fn id_at(&self, i: usize) -> Option<&str> {
        self.slots.get(i)?.id(&self.text)
    }

    pub fn push_parts(&mut self, run: Run, row: RowRef<'_>) -> Result<(), RowTooLong> {
        if self.first + self.second == self.slots.len() {
            // Full (more rows than the listed sessions, say): an eighth more
            // room, the second run moved to the new end. Only an eighth:
            // the room is filled up front, so it all counts in memory.
            let old = self.slots.len();
            let more = (old / 8).max(1024);
            self.slots.resize(old + more, RowMeta::PLACEHOLDER);
            self.slots.copy_within(old - self.second..old, old + more - self.second);
        }
        let n = self.slots.len();
        let (at, last, count, sorted) = match run {
            Run::First => (self.first, self.first.checked_sub(1), self.first, self.first_sorted),
            Run::Second => {
                (n - 1 - self.second, (self.second > 0).then_some(n - self.second), self.second, self.second_sorted)
            }
        };
        let in_order = sorted == count && last.and_then(|i| self.id_at(i)).is_none_or(|l| l <= row.id);
        let record = record(&mut self.text, row)?;
        if let Some(slot) = self.slots.get_mut(at) {
            *slot = record;
        }
        self.prefix.push(row.id);
        let (count, sorted) = match run {
            Run::First => (&mut self.first, &mut self.first_sorted),
            Run::Second => (&mut self.second, &mut self.second_sorted),
        };
        *count += 1;
        if in_order {
            *sorted += 1;
        }
        Ok(())
    }

    /// The rows of both runs, the second's after the first's.
    pub fn join(self) -> Rows {
        let TwoRuns { text, mut slots, first, second, first_sorted, second_sorted, prefix } = self;
        let n = slots.len();
        slots[n - second..].reverse();
        slots.copy_within(n - second.., first);
        slots.truncate(first + second);
        let mut rows = Rows { text, meta: slots, sorted: first_sorted, prefix };
        let last = first.checked_sub(1).and_then(|i| rows.id(i));
        let next = rows.id(first);
        if first_sorted == first && last.zip(next).is_none_or(|(last, next)| last <= next) {
            rows.sorted += second_sorted;
        }
        rows
    }
}

impl FromIterator<SessionRow> for Rows {
    fn from_iter<I: IntoIterator<Item = SessionRow>>(iter: I) -> Rows {
        let mut rows = Rows::default();
        for row in iter {
            rows.push(row);
        }
        rows
    }
}

/// The database side of a pass: every live row, and the row of every session a
/// controller holds (whatever its state).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DbSnapshot {
    pub rows: Rows,
    /// Rows whose state the vocabulary does not know: findings, never repaired.
    pub invalid_rows: Vec<InvalidRow>,
    /// When the read began, by sessiond's clock. Row times are on the same clock.
    pub read_at: DateTime<Utc>,
    /// Stop requests recorded and not settled yet.
    pub open_intents: Vec<OpenIntent>,
    /// Live sessions with no row whose id the audit trail knows: their row
    /// existed and was deleted. Such a session is stopped, never re-inserted.
    pub gone: Vec<GoneRow>,
    /// The rows created recently, for rapid creates; empty when not read.
    pub recent_creates: Vec<RecentCreate>,
    /// The database's clock at the read.
    pub db_now: Option<DateTime<Utc>>,
}

impl DbSnapshot {
    /// An instant on sessiond's clock moved onto the database's, by the
    /// offset measured at the read (to within half a round trip).
    pub fn db_clock(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        self.db_now.map_or(at, |now| at + (now - self.read_at))
    }
}

/// A row created recently: its id, owner and creation time (the table's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentCreate {
    pub id: String,
    pub owner: String,
    pub created_at: DateTime<Utc>,
}

/// The last audit row of a session whose row is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoneRow {
    pub id: SessionId,
    pub old_state: Option<String>,
    pub new_state: Option<String>,
    /// `app` or `reconciler`: who made that last change.
    pub trigger: String,
    /// When, on sessiond's clock.
    pub at: DateTime<Utc>,
}

/// A row read with a state in no list of the vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidRow {
    pub id: SessionId,
    /// The value as the table holds it (`None`: NULL).
    pub value: Option<String>,
    pub controller_instance: Option<String>,
}

/// A stop request recorded before it was sent, and not settled yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenIntent {
    pub intent: i64,
    pub session_id: String,
    pub controller: String,
    pub kind: String,
    /// Past its expiry by the database's clock: its sender is gone (or slower
    /// than it promised), and any pass may settle it.
    pub expired: bool,
}

/// What became of a stop request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// The controller answered 2xx or 404, or a later pass found the session gone.
    Stopped,
    /// The request failed before it could reach the controller, or was refused.
    Failed,
    /// The request may have reached the controller (it timed out, or its answer
    /// was lost): the intent stays open and a later pass settles it from what
    /// the controller's list shows.
    Uncertain,
    /// Recorded but never sent: the pass ran out of time first.
    NotSent,
    /// Left by a process that could not settle it while the controller still
    /// holds the session: the request may never have reached it.
    Unconfirmed,
}

impl StopOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StopOutcome::Stopped => "stopped",
            StopOutcome::Failed => "failed",
            StopOutcome::Uncertain => "uncertain",
            StopOutcome::NotSent => "not_sent",
            StopOutcome::Unconfirmed => "unconfirmed",
        }
    }
}

/// What sessiond believes about the process(es) answering at an instance's URL,
/// kept across passes, and (except the candidate) across its own restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootRecord {
    /// The boot id confirmed to answer there: one process, steadily.
    pub trusted: Option<String>,
    /// When the trusted boot id last changed to another confirmed one (a
    /// restart, dated from the new one's first sight); `None` until then, as the
    /// first boot id ever seen explains nothing.
    pub changed_at: Option<DateTime<Utc>>,
    /// Other boot ids seen, oldest first: one of them answering again means
    /// several processes answer at one URL.
    pub history: Vec<String>,
    /// Since when answers have disagreed.
    pub inconsistent_since: Option<DateTime<Utc>>,
    /// A boot id on probation (in memory only).
    pub candidate: Option<BootCandidate>,
}

impl BootRecord {
    /// Whether the parts kept in the database are the same.
    pub fn same_persisted(&self, other: &BootRecord) -> bool {
        self.trusted == other.trusted
            && self.changed_at == other.changed_at
            && self.history == other.history
            && self.inconsistent_since == other.inconsistent_since
    }
}

/// A boot id answering steadily but not trusted yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootCandidate {
    pub boot_id: String,
    /// First seen.
    pub since: DateTime<Utc>,
    /// Agreeing answers so far, and the passes they span.
    pub fetches: u32,
    pub passes: u32,
}

/// Boot records keyed by instance name.
pub type BootRecords = HashMap<String, BootRecord>;

#[cfg(test)]
mod order_tests {
    use super::*;

    fn row<'a>(id: &'a str, version: &'a str) -> RowRef<'a> {
        RowRef {
            id,
            owner_id: Some("o"),
            controller_instance: None,
            state: RowState::Active,
            created_at: DateTime::<Utc>::MIN_UTC,
            changed_at: DateTime::<Utc>::MIN_UTC,
            version,
        }
    }

    /// Two runs read side by side, from room too small for them: every row
    /// once, each with its own strings, and in id order once sorted.
    #[test]
    fn two_runs_join_to_every_row_once_in_id_order() {
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..300 {
            let n = rng.usize(0..60);
            let sorted_input = round % 3 == 0;
            let mut all = ids(&mut rng, n, false);
            if sorted_input {
                all.sort();
            }
            let cut = rng.usize(0..=n);
            if round % 3 == 1 {
                // Each half in id order, the halves overlapping.
                all[..cut].sort();
                all[cut..].sort();
            }
            let (first, second) = all.split_at(cut);
            let mut runs = TwoRuns::with_capacity(rng.usize(0..8), 0);
            let (mut a, mut b) = (first.iter().enumerate(), second.iter().enumerate());
            loop {
                let next =
                    if rng.bool() { a.next().map(|x| (Run::First, x)) } else { b.next().map(|x| (Run::Second, x)) };
                let next =
                    next.or_else(|| a.next().map(|x| (Run::First, x))).or_else(|| b.next().map(|x| (Run::Second, x)));
                let Some((run, (i, id))) = next else { break };
                let version = format!("{run:?}{i}");
                runs.push_parts(run, row(id, &version)).expect("fits");
            }
            let mut rows = runs.join();
            let read: Vec<(String, String)> = rows.iter().map(|r| (r.id.to_owned(), r.version.to_owned())).collect();
            let expected: Vec<(String, String)> = first
                .iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), format!("First{i}")))
                .chain(second.iter().enumerate().map(|(i, id)| (id.clone(), format!("Second{i}"))))
                .collect();
            assert_eq!(read, expected, "round {round}: the first run, then the second, each in the order read");
            if sorted_input {
                assert_eq!(rows.sorted, n, "round {round}: rows read in id order need no sort");
            }
            rows.sort_by_id();
            let walked: Vec<&str> = rows.by_id().filter_map(|i| rows.id(i)).collect();
            let mut sorted = all.clone();
            sorted.sort();
            assert_eq!(walked, sorted, "round {round}");
        }
    }

    /// The prefix kept as ids arrive is the longest every id shares, for
    /// rows pushed one by one, rows read as two runs, and lists; the sort
    /// starts its keys there.
    #[test]
    fn the_prefix_kept_as_ids_arrive_is_the_one_every_id_shares() {
        let mut rng = fastrand::Rng::with_seed(11);
        let shapes = ["exec_20261121_0959", "exec_2026", "exé", "ex\u{e9}t", "", "e"];
        for round in 0..600 {
            let n = rng.usize(0..30);
            let fixed = shapes[rng.usize(0..shapes.len())];
            let ids: Vec<String> = (0..n)
                .map(|_| {
                    let shape = if round % 2 == 0 { fixed } else { shapes[rng.usize(0..shapes.len())] };
                    format!("{shape}{}", rng.u16(0..300))
                })
                .collect();
            let first = ids.first().map(String::as_bytes).unwrap_or_default();
            let every = ids.iter().map(|id| first.iter().zip(id.as_bytes()).take_while(|(a, b)| a == b).count());
            let shared = every.min().unwrap_or(0);

            let mut rows = Rows::default();
            let mut runs = TwoRuns::with_capacity(rng.usize(0..8), 0);
            for id in &ids {
                rows.push_parts(row(id, "1")).expect("fits");
                let run = if rng.bool() { Run::First } else { Run::Second };
                runs.push_parts(run, row(id, "1")).expect("fits");
            }
            let list: LiveSessions = ids.iter().map(|id| session(id)).collect();
            assert_eq!(rows.prefix.len(), shared, "round {round}: rows {ids:?}");
            assert_eq!(runs.join().prefix.len(), shared, "round {round}: two runs {ids:?}");
            assert_eq!(list.prefix.len(), shared, "round {round}: a list {ids:?}");
        }
    }

    fn session(id: &str) -> LiveSession {
        LiveSession { id: SessionId(id.to_owned()), owner_id: "o".into(), state: LiveState::Active, started_at: None }
    }

    /// Ids drawn from a small alphabet, so that equal ids are common.
    fn ids(rng: &mut fastrand::Rng, n: usize, sorted_prefix: bool) -> Vec<String> {
        let mut v: Vec<String> = (0..n).map(|_| format!("s{}", rng.u8(0..12))).collect();
        if sorted_prefix {
            let cut = rng.usize(0..=n);
            v[..cut].sort();
        }
        v
    }

    #[test]
    fn by_id_is_a_stable_sort_whatever_the_order_pushed() {
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..400 {
            let n = rng.usize(0..40);
            let pushed = ids(&mut rng, n, round % 2 == 0);
            let list: LiveSessions = pushed.iter().map(|id| session(id)).collect();
            let mut want: Vec<usize> = (0..pushed.len()).collect();
            want.sort_by(|&a, &b| pushed[a].cmp(&pushed[b]));
            assert_eq!(list.by_id().collect::<Vec<_>>(), want, "{pushed:?}");
        }
    }

    #[test]
    fn sorting_in_place_is_a_stable_sort_that_moves_each_entry_whole() {
        let mut rng = fastrand::Rng::with_seed(13);
        for round in 0..400 {
            let n = rng.usize(0..40);
            let pushed = ids(&mut rng, n, round % 2 == 0);
            // Each entry's other fields say where it was pushed.
            let mut list = LiveSessions::default();
            let mut rows = Rows::default();
            let at = |k: usize| DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(k as i64);
            for (k, id) in pushed.iter().enumerate() {
                list.push(LiveSession {
                    id: SessionId(id.clone()),
                    owner_id: format!("owner-{k}"),
                    state: LiveState::Active,
                    started_at: Some(at(k)),
                });
                rows.push(SessionRow {
                    id: SessionId(id.clone()),
                    owner_id: Some(format!("owner-{k}")),
                    controller_instance: (k % 2 == 0).then(|| format!("ctrl-{k}")),
                    state: RowState::Active,
                    created_at: at(k),
                    changed_at: at(k),
                    version: format!("v{k}"),
                });
            }
            let mut want: Vec<usize> = (0..pushed.len()).collect();
            want.sort_by(|&a, &b| pushed[a].cmp(&pushed[b]));
            list.sort_by_id();
            rows.sort_by_id();
            assert_eq!(list.by_id().collect::<Vec<_>>(), (0..n).collect::<Vec<_>>());
            assert_eq!(rows.by_id().collect::<Vec<_>>(), (0..n).collect::<Vec<_>>());
            for (i, &k) in want.iter().enumerate() {
                let s = list.get(i).unwrap_or_else(|| panic!("session {i}"));
                assert_eq!(
                    (s.id, s.owner_id, s.started_at),
                    (pushed[k].as_str(), format!("owner-{k}").as_str(), Some(at(k))),
                    "{pushed:?}"
                );
                let r = rows.get(i).unwrap_or_else(|| panic!("row {i}"));
                assert_eq!(r.id, pushed[k], "{pushed:?}");
                assert_eq!(r.owner_id, Some(format!("owner-{k}").as_str()));
                assert_eq!(r.controller_instance, (k % 2 == 0).then(|| format!("ctrl-{k}")).as_deref());
                assert_eq!((r.version, r.created_at), (format!("v{k}").as_str(), at(k)));
            }
            // What is appended after the sort (the rows read by id) is walked
            // in its place, and reads back whole.
            let late = format!("s{}", rng.u8(0..12));
            rows.push(SessionRow {
                id: SessionId(late.clone()),
                owner_id: None,
                controller_instance: Some("late".into()),
                state: RowState::Stopped,
                created_at: at(99),
                changed_at: at(99),
                version: "v99".into(),
            });
            let ids: Vec<&str> = rows.by_id().filter_map(|i| rows.id(i)).collect();
            assert!(ids.is_sorted(), "{ids:?}");
            assert_eq!(rows.by_id().filter(|&i| i == n).count(), 1);
            let r = rows.get(n).unwrap_or_else(|| panic!("row {n}"));
            assert_eq!(
                (r.id, r.owner_id, r.controller_instance, r.version),
                (late.as_str(), None, Some("late"), "v99")
            );
        }
    }

    #[test]
    fn rows_sorted_on_two_cores_are_in_the_same_stable_order() {
        // Enough rows for the two-core sort, ids from 0 to 70 000 apart, so
        // many are equal (about 2 each) and some sort across the median.
        let mut rng = fastrand::Rng::with_seed(17);
        let n = TWO_CORE_SORT_MIN + rng.usize(0..1000);
        let pushed: Vec<String> = (0..n).map(|_| format!("exec_{:06}", rng.usize(0..n / 2))).collect();
        let at = DateTime::<Utc>::UNIX_EPOCH;
        let mut rows = Rows::default();
        for (k, id) in pushed.iter().enumerate() {
            rows.push(SessionRow {
                id: SessionId(id.clone()),
                owner_id: Some(format!("owner-{k}")),
                controller_instance: None,
                state: RowState::Active,
                created_at: at,
                changed_at: at,
                version: format!("v{k}"),
            });
        }
        let mut want: Vec<usize> = (0..n).collect();
        want.sort_by(|&a, &b| pushed[a].cmp(&pushed[b]));
        rows.sort_by_id();
        for (i, &k) in want.iter().enumerate() {
            let r = rows.get(i).unwrap_or_else(|| panic!("row {i}"));
            assert_eq!((r.id, r.version), (pushed[k].as_str(), format!("v{k}").as_str()), "row {i}");
            assert_eq!(r.owner_id, Some(format!("owner-{k}").as_str()));
        }
    }

    #[test]
    fn rows_and_lists_sort_by_their_keys_as_by_their_ids() {
        // Ids that share a prefix (or not), of every length around the
        // eight bytes a key holds, some a prefix of another, some with
        // multi-byte characters, many equal.
        let mut rng = fastrand::Rng::with_seed(19);
        let pieces = ["0", "1", "9", "a", "z", "_", "\u{e9}", "\u{1f600}", "\u{7f}"];
        for round in 0..600 {
            let shared = ["", "s", "exec_2026", "\u{e9}\u{e9}"][round % 4];
            let n = rng.usize(0..60);
            let pushed: Vec<String> = (0..n)
                .map(|_| {
                    let len = rng.usize(0..12);
                    let tail: String = (0..len).map(|_| pieces[rng.usize(0..pieces.len())]).collect();
                    format!("{shared}{tail}")
                })
                .collect();
            let mut rows = Rows::default();
            let mut list = LiveSessions::default();
            for (k, id) in pushed.iter().enumerate() {
                list.push(LiveSession {
                    id: SessionId(id.clone()),
                    owner_id: format!("o{k}"),
                    state: LiveState::Active,
                    started_at: None,
                });
                rows.push(SessionRow {
                    id: SessionId(id.clone()),
                    owner_id: None,
                    controller_instance: None,
                    state: RowState::Active,
                    created_at: DateTime::<Utc>::UNIX_EPOCH,
                    changed_at: DateTime::<Utc>::UNIX_EPOCH,
                    version: format!("v{k}"),
                });
            }
            let mut want: Vec<usize> = (0..n).collect();
            want.sort_by(|&a, &b| pushed[a].cmp(&pushed[b]));
            rows.sort_by_id();
            list.sort_by_id();
            let got: Vec<(&str, &str)> = rows.iter().map(|r| (r.id, r.version)).collect();
            let listed: Vec<(&str, &str)> = list.iter().map(|s| (s.id, s.owner_id)).collect();
            let versions: Vec<(&str, String)> = want.iter().map(|&k| (pushed[k].as_str(), format!("v{k}"))).collect();
            let versions: Vec<(&str, &str)> = versions.iter().map(|(id, v)| (*id, v.as_str())).collect();
            assert_eq!(got, versions, "{pushed:?}");
            let owners: Vec<(&str, String)> = want.iter().map(|&k| (pushed[k].as_str(), format!("o{k}"))).collect();
            let owners: Vec<(&str, &str)> = owners.iter().map(|(id, o)| (*id, o.as_str())).collect();
            assert_eq!(listed, owners, "{pushed:?}");
        }
    }

    #[test]
    fn merging_runs_is_a_stable_sort_of_their_concatenation() {
        let mut rng = fastrand::Rng::with_seed(11);
        // Ids sharing long prefixes, short ones and none, so that the prefix
        // the merge keys its heads after is cut at every point of a merge.
        let shapes = ["exec_20261121_0959", "exec_2026", "exé", "ex\u{e8}", "", "e", "f"];
        for round in 0..1200 {
            let runs: Vec<Vec<String>> = (0..rng.usize(0..6))
                .map(|_| {
                    let n = rng.usize(0..15);
                    let mut r = if round % 3 == 0 {
                        ids(&mut rng, n, false)
                    } else {
                        (0..n).map(|_| format!("{}{}", shapes[rng.usize(0..shapes.len())], rng.u16(0..400))).collect()
                    };
                    r.sort();
                    r
                })
                .collect();
            let mut want: Vec<(String, usize, usize)> = runs
                .iter()
                .enumerate()
                .flat_map(|(run, ids)| ids.iter().enumerate().map(move |(i, id)| (id.clone(), run, i)))
                .collect();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            let iters: Vec<IdRun<'_, usize>> = runs
                .iter()
                .map(|r| Box::new(r.iter().enumerate().map(|(i, id)| (id.as_str(), i))) as IdRun<'_, usize>)
                .collect();
            let got: Vec<(String, usize, usize)> =
                MergeById::new(iters).map(|(id, run, i)| (id.to_owned(), run, i)).collect();
            assert_eq!(got, want, "{runs:?}");
        }
    }
}
