//! The classifier's rules, one test per rule, all through one `check` helper:
//! a world (both snapshots, memory, config) in, the findings as text out.
//!
//! These are pure: no database, no HTTP, no clock.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use sessiond::config::{Policy, ReconcileConfig};
use sessiond::model::{
    BootRecord, BootRecords, ControllerList, DbSnapshot, GoneRow, InstanceSnapshot, InvalidEntry, InvalidEntryKind,
    InvalidRow, LiveSession, LiveState, OpenIntent, RowState, SessionId, SessionRow,
};
use sessiond::reconcile::boots::Trust;
use sessiond::reconcile::classify::{classify, Classification, Decision, Input, Memory, PassOptions, TableShape};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("a valid time")
}

struct World {
    now: DateTime<Utc>,
    cfg: ReconcileConfig,
    instances: Vec<InstanceSnapshot>,
    rows: Vec<SessionRow>,
    memory: Memory,
    boots: BootRecords,
    stoppable: BTreeSet<String>,
    options: PassOptions,
    released: BTreeSet<String>,
    intents: Vec<OpenIntent>,
    /// What each instance's list may be trusted for; missing means trusted.
    trust: BTreeMap<String, Trust>,
    invalid_rows: Vec<InvalidRow>,
    /// Live ids with no row whose audit history says the row existed.
    gone: Vec<GoneRow>,
    writable: BTreeSet<RowState>,
    shape: TableShape,
}

impl World {
    /// One reachable instance `a` with an empty list, default config, `once`
    /// semantics (no confirmations needed).
    fn new() -> World {
        let mut w = World {
            now: t0(),
            cfg: ReconcileConfig::default(),
            instances: Vec::new(),
            rows: Vec::new(),
            memory: Memory::default(),
            boots: BootRecords::new(),
            stoppable: BTreeSet::new(),
            options: PassOptions::default(),
            released: BTreeSet::new(),
            intents: Vec::new(),
            trust: BTreeMap::new(),
            invalid_rows: Vec::new(),
            gone: Vec::new(),
            writable: RowState::ALL.into_iter().collect(),
            shape: TableShape::default(),
        };
        w.instance("a");
        w
    }

    /// The world `s` seconds later: the next pass's clock and fetches.
    fn later(&mut self, s: i64) -> &mut Self {
        let d = Duration::seconds(s);
        self.now += d;
        for i in &mut self.instances {
            i.fetched_at += d;
            if let Ok(list) = &mut i.result {
                list.generated_at = list.generated_at.map(|t| t + d);
            }
        }
        self
    }

    fn secs_ago(&self, s: i64) -> DateTime<Utc> {
        self.now - Duration::seconds(s)
    }

    fn instance(&mut self, name: &str) -> &mut Self {
        let fetched_at = self.secs_ago(1);
        self.instances.push(InstanceSnapshot {
            name: name.into(),
            fetched_at,
            result: Ok(ControllerList {
                boot_id: "boot-1".into(),
                generated_at: Some(fetched_at),
                sessions: Default::default(),
                invalid: vec![],
                counters: None,
                problems: vec![],
            }),
            boot_ids: vec!["boot-1".into()],
        });
        self.boots.insert(name.into(), BootRecord { trusted: Some("boot-1".into()), ..BootRecord::default() });
        self.stoppable.insert(name.into());
        self
    }

    fn unreachable(&mut self, name: &str) -> &mut Self {
        let fetched_at = self.secs_ago(1);
        self.instances.retain(|i| i.name != name);
        self.instances.push(InstanceSnapshot {
            name: name.into(),
            fetched_at,
            result: Err("connection refused".into()),
            boot_ids: vec![],
        });
        self
    }

    fn list(&mut self, inst: &str) -> &mut ControllerList {
        let Some(i) = self.instances.iter_mut().find(|i| i.name == inst) else { panic!("no instance {inst}") };
        match &mut i.result {
            Ok(l) => l,
            Err(_) => panic!("instance {inst} is unreachable"),
        }
    }

    /// A live session on `inst`, started `age` seconds ago.
    fn live(&mut self, inst: &str, id: &str, owner: &str, state: LiveState, age: i64) -> &mut Self {
        let started_at = Some(self.secs_ago(age));
        self.list(inst).sessions.push(LiveSession {
            id: SessionId::from_row(id.into()),
            owner_id: owner.into(),
            state,
            started_at,
        });
        self
    }

    fn invalid(&mut self, inst: &str, raw: &str, kind: InvalidEntryKind) -> &mut Self {
        self.list(inst).invalid.push(InvalidEntry { raw_id: Some(raw.into()), kind, problem: "bad".into() });
        self
    }

    /// A row created (and last changed) `age` seconds ago.
    fn row(&mut self, id: &str, owner: &str, inst: &str, state: RowState, age: i64) -> &mut Self {
        let at = self.secs_ago(age);
        self.rows.push(SessionRow {
            id: SessionId::from_row(id.into()),
            owner_id: Some(owner.into()),
            controller_instance: Some(inst.into()),
            state,
            created_at: at,
            changed_at: at,
            version: format!("v-{id}"),
        });
        self
    }

    fn run(&self) -> Classification {
        classify(&Input {
            now: self.now,
            config: &self.cfg,
            instances: &self.instances,
            db: &DbSnapshot {
                rows: self.rows.iter().cloned().collect(),
                invalid_rows: self.invalid_rows.clone(),
                read_at: self.now,
                open_intents: self.intents.clone(),
                gone: self.gone.clone(),
                ..Default::default()
            },
            memory: &self.memory,
            boots: &self.boots,
            trust: &self.trust,
            writable: &self.writable,
            shape: self.shape,
            stoppable: &self.stoppable,
            options: self.options,
            released: &self.released,
        })
    }
}

fn render(c: &Classification) -> String {
    let mut lines: Vec<String> = c
        .findings
        .iter()
        .map(|f| {
            let d = match &f.decision {
                Decision::Repair => "repair",
                Decision::Wait { .. } => "wait",
                Decision::Guarded => "guarded",
                Decision::Deferred { .. } => "deferred",
                Decision::Report { .. } => "report",
                Decision::Note => "note",
            };
            format!("{} {} {d}", f.kind.as_str(), f.subject)
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// Classifies `w` and compares the findings, one `kind subject decision` a line.
fn check(w: &World, expected: &str) -> Classification {
    let c = w.run();
    let mut want: Vec<&str> = expected.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    want.sort();
    assert_eq!(render(&c), want.join("\n"), "\nfindings differ from expected");
    c
}

const OLD: i64 = 600;

#[test]
fn consistent_sessions_have_no_findings() {
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, OLD).row("s1", "o1", "a", RowState::Active, OLD);
    w.live("a", "s2", "o2", LiveState::Paused, OLD).row("s2", "o2", "a", RowState::Paused, OLD);
    w.row("s3", "o3", "a", RowState::Stopped, OLD);
    check(&w, "");
}

#[test]
fn live_row_absent_from_its_reachable_instance_is_orphaned() {
    let mut w = World::new();
    w.row("s1", "o1", "a", RowState::Active, OLD);
    let c = check(&w, "orphaned s1 repair");
    assert!(matches!(
        &c.findings[0].repair,
        Some(sessiond::reconcile::classify::Repair::UpdateRow {
            to: RowState::Stopped,
            end_reason: Some("orphaned"),
            ..
        })
    ));
}

#[test]
fn row_created_after_the_snapshot_is_not_an_orphan() {
    let mut w = World::new();
    w.row("s1", "o1", "a", RowState::Active, 0); // the list was fetched 1s ago
    w.cfg.grace = std::time::Duration::ZERO;
    check(&w, "");
}

#[test]
fn row_created_within_grace_of_the_snapshot_is_not_an_orphan() {
    let mut w = World::new();
    w.row("s1", "o1", "a", RowState::Active, 20); // grace is 30s
    check(&w, "");
}

#[test]
fn nothing_younger_than_grace_is_repaired() {
    // The seeds' creation race: the session is live, its row is written 50-200 ms later.
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, 1);
    check(&w, "unpersisted s1 wait");
    w.later(31);
    check(&w, "unpersisted s1 repair");
}

#[test]
fn the_daemon_repairs_only_after_confirmations_consecutive_passes() {
    let mut w = World::new();
    w.options.require_confirmations = true;
    w.row("s1", "o1", "a", RowState::Active, OLD);
    let first = check(&w, "orphaned s1 wait");
    w.memory = first.memory;
    check(&w, "orphaned s1 repair");
}

#[test]
fn a_finding_that_goes_away_starts_its_confirmations_again() {
    let mut w = World::new();
    w.options.require_confirmations = true;
    w.row("s1", "o1", "a", RowState::Active, OLD);
    let first = w.run();
    // One pass where the session is back in the list: the streak is broken.
    let mut back = World::new();
    back.options.require_confirmations = true;
    back.live("a", "s1", "o1", LiveState::Active, OLD).row("s1", "o1", "a", RowState::Active, OLD);
    back.memory = first.memory;
    let between = check(&back, "");
    w.memory = between.memory;
    check(&w, "orphaned s1 wait");
}

#[test]
fn rows_of_an_unreachable_instance_are_unverifiable_not_orphans() {
    let mut w = World::new();
    w.unreachable("a");
    w.row("s1", "o1", "a", RowState::Active, OLD);
    check(&w, "unverifiable s1 note");
}

#[test]
fn rows_of_an_unconfigured_instance_are_unverifiable() {
    let mut w = World::new();
    w.row("s1", "o1", "zz", RowState::Active, OLD);
    check(&w, "unverifiable s1 note");
}

#[test]
fn instance_dead_after_turns_unverifiable_rows_into_orphans() {
    let mut w = World::new();
    w.cfg.instance_dead_after = Some(std::time::Duration::from_secs(300));
    w.unreachable("a");
    w.row("s1", "o1", "a", RowState::Active, OLD);
    // Unreachable for 100s: not dead yet.
    w.memory.unreachable_since.insert("a".into(), w.secs_ago(100));
    let c = check(&w, "unverifiable s1 note");
    assert_eq!(c.memory.unreachable_since.get("a"), Some(&w.secs_ago(100)), "the start of the outage is kept");
    w.memory.unreachable_since.insert("a".into(), w.secs_ago(301));
    check(&w, "orphaned s1 repair");
}

#[test]
fn dead_instance_orphans_do_not_trip_the_guard() {
    let mut w = World::new();
    w.cfg.instance_dead_after = Some(std::time::Duration::from_secs(60));
    w.unreachable("a");
    w.memory.unreachable_since.insert("a".into(), w.secs_ago(120));
    for i in 0..10 {
        w.row(&format!("s{i}"), &format!("o{i}"), "a", RowState::Active, OLD);
    }
    let c = w.run();
    assert!(c.findings.iter().all(|f| f.decision == Decision::Repair), "{}", render(&c));
    assert!(c.guard_tripped.is_empty());
}

#[test]
fn live_session_with_a_stopped_row_is_a_zombie() {
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, OLD).row("s1", "o1", "a", RowState::Stopped, OLD);
    w.live("a", "s2", "o2", LiveState::Active, OLD).row("s2", "o2", "a", RowState::Deleted, OLD);
    check(&w, "zombie s1 repair\nzombie s2 repair");
}

#[test]
fn a_stop_that_raced_cleanup_is_not_a_zombie_within_grace() {
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, OLD).row("s1", "o1", "a", RowState::Active, OLD);
    // The application just marked the row stopped and is about to stop the session.
    w.rows[0].state = RowState::Stopped;
    w.rows[0].changed_at = w.secs_ago(2);
    check(&w, "zombie s1 wait");
}

#[test]
fn zombie_on_an_instance_without_stop_url_is_reported() {
    let mut w = World::new();
    w.stoppable.clear();
    w.live("a", "s1", "o1", LiveState::Active, OLD).row("s1", "o1", "a", RowState::Failed, OLD);
    check(&w, "zombie s1 report");
}

#[test]
fn live_session_without_a_row_is_unpersisted_and_inserted_in_the_live_state() {
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Paused, OLD);
    let c = check(&w, "unpersisted s1 repair");
    assert!(matches!(
        &c.findings[0].repair,
        Some(sessiond::reconcile::classify::Repair::InsertRow { state: RowState::Paused, .. })
    ));
    assert_eq!(c.probes.all.never_existed, 1);
}

#[test]
fn unpersisted_session_without_started_at_ages_from_first_sight() {
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, 0);
    w.list("a").sessions.set_started_at(0, None);
    let first = check(&w, "unpersisted s1 wait");
    w.memory = first.memory;
    w.later(31);
    check(&w, "unpersisted s1 repair");
}

#[test]
fn duplicate_keeps_the_session_the_controller_holds() {
    // Seed: three sessions for one user within seconds. The controller holds two.
    let mut w = World::new();
    w.live("a", "s1", "u", LiveState::Active, OLD).row("s1", "u", "a", RowState::Active, OLD);
    w.live("a", "s2", "u", LiveState::Active, OLD - 5).row("s2", "u", "a", RowState::Active, OLD - 5);
    w.row("s3", "u", "a", RowState::Active, OLD - 10); // newest, but nobody holds it
    let c = check(&w, "duplicate s1 repair\norphaned s3 repair");
    let dup = c.findings.iter().find(|f| f.subject == "s1").expect("the duplicate finding");
    assert!(matches!(&dup.repair, Some(sessiond::reconcile::classify::Repair::StopLive { end_row: true, .. })));
}

/// Two owners whose 32-bit hashes are equal.
fn colliding_owners() -> (String, String) {
    let mut seen = std::collections::HashMap::new();
    for i in 0u32.. {
        let owner = format!("user-{i}");
        let hash = sessiond::reconcile::classify::owner_hash_for_test(&owner);
        if let Some(first) = seen.insert(hash, owner.clone()) {
            return (first, owner);
        }
    }
    unreachable!("2^32 owners have two equal 32-bit hashes")
}

#[test]
fn owners_that_share_a_hash_are_still_told_apart() {
    let (x, y) = colliding_owners();
    assert_ne!(x, y);
    // One owner with two live sessions, another with one: one duplicate.
    // The other owner's row comes between the first's.
    let mut w = World::new();
    w.live("a", "s1", &x, LiveState::Active, OLD).row("s1", &x, "a", RowState::Active, OLD);
    w.live("a", "s3", &y, LiveState::Active, OLD).row("s3", &y, "a", RowState::Active, OLD);
    w.live("a", "s2", &x, LiveState::Active, OLD - 5).row("s2", &x, "a", RowState::Active, OLD - 5);
    check(&w, "duplicate s1 repair");
    // A session with no row, whose owner has none either, is inserted, though
    // another owner with the same hash has a live row.
    let mut w = World::new();
    w.live("a", "s1", &x, LiveState::Active, OLD).row("s1", &x, "a", RowState::Active, OLD);
    w.live("a", "s3", &y, LiveState::Active, OLD);
    check(&w, "unpersisted s3 repair");
}

#[test]
fn duplicate_group_with_an_unverifiable_row_waits() {
    let mut w = World::new();
    w.instance("b");
    w.unreachable("b");
    w.live("a", "s1", "u", LiveState::Active, OLD).row("s1", "u", "a", RowState::Active, OLD);
    w.row("s2", "u", "b", RowState::Active, OLD - 5);
    check(&w, "duplicate s2 wait\nunverifiable s2 note");
}

#[test]
fn creating_row_older_than_creating_timeout_and_not_live_is_stuck() {
    let mut w = World::new();
    w.row("s1", "o1", "a", RowState::Creating, 121);
    w.row("s2", "o2", "a", RowState::Creating, 60); // still being created
    w.live("a", "s3", "o3", LiveState::Creating, 500).row("s3", "o3", "a", RowState::Creating, 500); // live: not stuck
    let c = check(&w, "stuck_creating s1 repair");
    assert!(matches!(
        &c.findings[0].repair,
        Some(sessiond::reconcile::classify::Repair::UpdateRow { to: RowState::Failed, .. })
    ));
}

#[test]
fn row_follows_the_controller_on_state_owner_and_instance() {
    let mut w = World::new();
    w.instance("b");
    w.live("a", "s1", "o1", LiveState::Paused, OLD).row("s1", "o1", "a", RowState::Active, OLD);
    w.live("a", "s2", "o2", LiveState::Active, OLD).row("s2", "wrong", "a", RowState::Active, OLD);
    w.live("b", "s3", "o3", LiveState::Active, OLD).row("s3", "o3", "a", RowState::Active, OLD);
    check(&w, "drift s1 repair\ndrift s2 repair\ndrift s3 repair");
}

#[test]
fn invalid_id_is_reported_and_never_makes_its_row_an_orphan() {
    let mut w = World::new();
    w.invalid("a", "weird id'; DROP TABLE sessions", InvalidEntryKind::InvalidId);
    w.invalid("a", "legacy-1", InvalidEntryKind::InvalidId);
    w.row("legacy-1", "o1", "a", RowState::Active, OLD);
    let c = check(&w, "invalid_id legacy-1 note\ninvalid_id weird id'; DROP TABLE sessions note");
    assert_eq!(c.probes.all.invalid_format, 2);
}

#[test]
fn an_entry_with_an_unknown_state_is_a_finding_and_the_rest_of_the_list_is_used() {
    let mut w = World::new();
    w.invalid("a", "s1", InvalidEntryKind::InvalidEntry);
    w.row("s1", "o1", "a", RowState::Active, OLD); // held, though unusable: not an orphan
    w.row("s2", "o2", "a", RowState::Active, OLD); // the rest of the list still counts
    check(&w, "invalid_entry s1 note\norphaned s2 repair");
}

fn many_orphans(w: &mut World, n: usize, total: usize) {
    for i in 0..total {
        let id = format!("s{i:03}");
        w.row(&id, &format!("o{i}"), "a", RowState::Active, OLD);
        if i >= n {
            w.live("a", &id, &format!("o{i}"), LiveState::Active, OLD);
        }
    }
}

#[test]
fn guard_holds_back_a_mass_disappearance() {
    let mut w = World::new();
    many_orphans(&mut w, 6, 10); // 60% > 50%, and 6 >= 5
    let c = w.run();
    assert!(c.findings.iter().all(|f| f.decision == Decision::Guarded), "{}", render(&c));
    assert!(c.guard_tripped.contains_key("a"));
}

#[test]
fn guard_leaves_small_fleets_repairable() {
    let mut w = World::new();
    many_orphans(&mut w, 4, 4); // 100%, but fewer than guard_min_orphans
    let c = w.run();
    assert!(c.findings.iter().all(|f| f.decision == Decision::Repair), "{}", render(&c));
    assert!(c.guard_tripped.is_empty());
}

#[test]
fn guard_allows_a_minority_of_orphans() {
    let mut w = World::new();
    many_orphans(&mut w, 5, 10); // 50% is not more than 50%
    let c = w.run();
    assert!(c.findings.iter().all(|f| f.decision == Decision::Repair), "{}", render(&c));
}

#[test]
fn a_controller_restart_explains_mass_orphans() {
    let mut w = World::new();
    many_orphans(&mut w, 10, 10); // the controller came back empty...
    w.boots.insert(
        "a".into(),
        BootRecord { trusted: Some("boot-2".into()), changed_at: Some(w.secs_ago(5)), ..BootRecord::default() },
    );
    let c = w.run(); // ...with a new boot id, after the rows were created
    assert!(c.findings.iter().all(|f| f.decision == Decision::Repair), "{}", render(&c));
    assert!(c.guard_tripped.is_empty());
}

#[test]
fn an_empty_list_with_an_unchanged_boot_id_trips_the_guard() {
    let mut w = World::new();
    many_orphans(&mut w, 10, 10);
    let c = w.run();
    assert!(c.findings.iter().all(|f| f.decision == Decision::Guarded), "{}", render(&c));
}

#[test]
fn force_overrides_the_guard_but_it_is_still_reported() {
    let mut w = World::new();
    many_orphans(&mut w, 10, 10);
    w.options.force = true;
    let c = w.run();
    assert!(c.findings.iter().all(|f| f.decision == Decision::Repair), "{}", render(&c));
    assert!(c.guard_tripped.contains_key("a"));
}

#[test]
fn a_released_guard_lets_that_controller_s_orphans_through_for_the_pass_and_still_reports_the_trip() {
    let mut w = World::new();
    many_orphans(&mut w, 10, 10);
    w.released.insert("a".into());
    let c = w.run();
    assert!(c.findings.iter().all(|f| f.decision == Decision::Repair), "{}", render(&c));
    assert!(c.guard_tripped.contains_key("a"), "still reported");
    w.released = BTreeSet::from(["b".to_owned()]);
    let c = w.run();
    assert!(c.findings.iter().all(|f| f.decision == Decision::Guarded), "another's release: {}", render(&c));
}

#[test]
fn more_repairs_of_one_kind_than_max_repairs_per_pass_drain_oldest_first() {
    let mut w = World::new();
    w.cfg.max_repairs_per_pass = 3;
    // Five unpersisted sessions of different ages, listed youngest first.
    for (i, age) in [(0, OLD), (1, OLD + 40), (2, OLD + 10), (3, OLD + 30), (4, OLD + 20)] {
        w.live("a", &format!("s{i}"), &format!("o{i}"), LiveState::Active, age);
    }
    w.live("a", "z1", "oz", LiveState::Active, OLD).row("z1", "oz", "a", RowState::Stopped, OLD);
    let c = w.run();
    let rendered = render(&c);
    let decision = |id: &str| c.findings.iter().find(|f| f.subject == id).map(|f| f.decision.clone());
    for id in ["s1", "s3", "s4"] {
        assert_eq!(decision(id), Some(Decision::Repair), "the oldest three first: {rendered}");
    }
    assert_eq!(decision("s2"), Some(Decision::Deferred { ahead: 3, limit: 3 }), "{rendered}");
    assert_eq!(decision("s0"), Some(Decision::Deferred { ahead: 4, limit: 3 }), "{rendered}");
    assert!(rendered.contains("zombie z1 repair"), "other kinds still repair: {rendered}");
    assert!(c.guard_tripped.is_empty(), "a backlog is not a mass disappearance: {rendered}");

    w.options.force = true;
    let c = w.run();
    assert!(c.findings.iter().all(|f| f.decision == Decision::Repair), "--force lifts the rate: {}", render(&c));
}

#[test]
fn report_policy_reports_instead_of_repairing() {
    let mut w = World::new();
    w.cfg.policy.orphaned = Policy::Report;
    w.row("s1", "o1", "a", RowState::Active, OLD);
    check(&w, "orphaned s1 report");
}

#[test]
fn a_read_only_pass_reports_every_repair() {
    let mut w = World::new();
    w.options.read_only = true;
    w.row("s1", "o1", "a", RowState::Active, OLD);
    w.live("a", "s2", "o2", LiveState::Active, OLD);
    check(&w, "orphaned s1 report\nunpersisted s2 report");
}

#[test]
fn lookup_probes_count_what_the_api_would_answer() {
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, OLD).row("s1", "o1", "a", RowState::Active, OLD);
    w.live("a", "s2", "o2", LiveState::Active, OLD).row("s2", "o2", "a", RowState::Deleted, OLD);
    w.live("a", "s3", "o3", LiveState::Active, OLD);
    let c = w.run();
    assert_eq!((c.probes.all.found, c.probes.all.deleted, c.probes.all.never_existed), (1, 1, 1));
}

#[test]
fn a_rowless_session_whose_owner_has_a_live_row_is_a_duplicate_not_an_insert() {
    let mut w = World::new();
    w.live("a", "s1", "u", LiveState::Active, OLD).row("s1", "u", "a", RowState::Active, OLD);
    w.live("a", "s2", "u", LiveState::Active, OLD - 5);
    w.live("a", "s3", "v", LiveState::Active, OLD);
    w.live("a", "s4", "v", LiveState::Active, OLD - 5); // newer: the one inserted
    check(&w, "duplicate s2 note\nduplicate s3 note\nunpersisted s4 repair");
}

#[test]
fn a_pass_that_stalls_after_reading_still_measures_grace_at_its_snapshots() {
    // The list was fetched, then the process stalled (GC, SIGSTOP, a VM
    // migration) while the application stopped s1, re-activated s2 with a new
    // owner and paused s3. Classification runs a minute later on the old list.
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, OLD).row("s1", "o1", "a", RowState::Stopped, 0);
    w.live("a", "s2", "o2", LiveState::Active, OLD).row("s2", "o9", "a", RowState::Active, 0);
    w.live("a", "s3", "o3", LiveState::Active, OLD).row("s3", "o3", "a", RowState::Paused, 0);
    w.now += Duration::seconds(60);
    check(&w, "drift s2 wait\ndrift s3 wait\nzombie s1 wait");
}

#[test]
fn a_controller_clock_behind_ours_does_not_make_its_sessions_look_old() {
    // The controller's clock is two minutes behind: by ours its session started
    // 121 s ago, by its own (generated_at - started_at) one second ago.
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, 121);
    let behind = w.instances[0].fetched_at - Duration::seconds(120);
    w.list("a").generated_at = Some(behind);
    check(&w, "unpersisted s1 wait");
    w.later(31);
    check(&w, "unpersisted s1 repair");
}

#[test]
fn without_generated_at_a_session_ages_from_when_sessiond_first_saw_it() {
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, OLD);
    w.list("a").generated_at = None;
    let first = check(&w, "unpersisted s1 wait");
    w.memory = first.memory;
    w.later(31);
    check(&w, "unpersisted s1 repair");
}

#[test]
fn an_id_listed_twice_by_one_instance_is_a_finding_and_never_a_write() {
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, OLD).live("a", "s1", "o1", LiveState::Paused, OLD);
    w.row("s1", "o1", "a", RowState::Active, OLD);
    w.live("a", "s2", "o2", LiveState::Active, OLD).live("a", "s2", "o2", LiveState::Active, OLD);
    w.row("s2", "o2", "a", RowState::Stopped, OLD);
    w.live("a", "s3", "o3", LiveState::Active, OLD).live("a", "s3", "o3", LiveState::Paused, OLD);
    let c = check(&w, "invalid_entry s1 note\ninvalid_entry s2 note\ninvalid_entry s3 note");
    let s1 = c.findings.iter().find(|f| f.subject == "s1").expect("the s1 finding");
    assert!(s1.detail.contains("listed 2 times"), "{}", s1.detail);
}

#[test]
fn an_id_listed_by_two_instances_is_a_finding_and_never_a_write() {
    let mut w = World::new();
    w.instance("b");
    w.live("a", "s1", "o1", LiveState::Active, OLD).live("b", "s1", "o1", LiveState::Active, OLD);
    w.row("s1", "o1", "a", RowState::Active, OLD);
    w.live("a", "s2", "o2", LiveState::Active, OLD).live("b", "s2", "o2", LiveState::Active, OLD);
    w.row("s2", "o2", "b", RowState::Stopped, OLD);
    let c = check(&w, "invalid_entry s1 note\ninvalid_entry s2 note");
    assert!(c.findings.iter().all(|f| f.repair.is_none()));
    let s1 = c.findings.iter().find(|f| f.subject == "s1").expect("the s1 finding");
    assert!(s1.detail.contains("by a (active), b (active)"), "{}", s1.detail);
}

/// The world's rows without an instance (a table with no instance column).
fn fleet(w: &mut World) -> &mut World {
    w.shape.instance = false;
    for r in &mut w.rows {
        r.controller_instance = None;
    }
    w
}

#[test]
fn without_an_instance_column_a_row_is_an_orphan_only_when_every_controller_answered_without_it() {
    let mut w = World::new();
    w.instance("b");
    w.live("b", "s1", "o1", LiveState::Active, OLD).row("s1", "o1", "a", RowState::Active, OLD);
    w.row("s2", "o2", "a", RowState::Active, OLD);
    fleet(&mut w);
    // s1 is held by b (no instance column: that is fine, and no drift); s2 by no one.
    check(&w, "orphaned s2 repair");
    w.unreachable("b");
    check(&w, "unverifiable s1 note\nunverifiable s2 note");
}

#[test]
fn without_an_instance_column_no_restart_explains_orphans_to_the_guard() {
    let mut w = World::new();
    many_orphans(&mut w, 10, 10);
    fleet(&mut w);
    w.boots.insert(
        "a".into(),
        BootRecord { trusted: Some("boot-2".into()), changed_at: Some(w.secs_ago(5)), ..BootRecord::default() },
    );
    let c = w.run();
    assert!(c.findings.iter().all(|f| f.decision == Decision::Guarded), "{}", render(&c));
    assert!(c.guard_tripped.contains_key("a"), "a fleet-wide trip shows on every instance");
}

#[test]
fn without_an_owner_column_there_are_no_duplicates() {
    let mut w = World::new();
    w.shape.owner = false;
    w.live("a", "s1", "u", LiveState::Active, OLD).row("s1", "u", "a", RowState::Active, OLD);
    w.live("a", "s2", "u", LiveState::Active, OLD - 5).row("s2", "u", "a", RowState::Active, OLD - 5);
    w.live("a", "s3", "u", LiveState::Active, OLD);
    for r in &mut w.rows {
        r.owner_id = None;
    }
    check(&w, "unpersisted s3 repair");
}

#[test]
fn a_repair_that_would_write_a_state_the_table_lacks_is_reported() {
    let mut w = World::new();
    w.writable.remove(&RowState::Paused);
    w.live("a", "s1", "o1", LiveState::Paused, OLD).row("s1", "o1", "a", RowState::Active, OLD);
    let c = check(&w, "drift s1 report");
    assert!(matches!(
        &c.findings[0].decision,
        Decision::Report {
            reason: sessiond::reconcile::classify::ReportReason::NoStateValue { state: RowState::Paused }
        }
    ));
}

#[test]
fn a_row_with_a_state_in_no_list_is_reported_and_nothing_is_inserted_over_it() {
    let mut w = World::new();
    w.live("a", "s1", "o1", LiveState::Active, OLD);
    w.invalid_rows.push(InvalidRow {
        id: SessionId::from_row("s1".into()),
        value: Some("RUNNING".into()),
        controller_instance: Some("a".into()),
    });
    let c = check(&w, "invalid_row s1 note");
    assert_eq!(c.probes.all.found, 1, "the row exists");
}

#[test]
fn why_a_finding_waits_is_typed() {
    use sessiond::reconcile::classify::Hold;
    let mut w = World::new();
    w.options.require_confirmations = true;
    w.row("s1", "o1", "a", RowState::Active, OLD);
    w.live("a", "s2", "o2", LiveState::Active, 1);
    let c = check(&w, "orphaned s1 wait\nunpersisted s2 wait");
    let hold = |id: &str| match &c.findings.iter().find(|f| f.subject == id).expect("a finding").decision {
        Decision::Wait { reason } => reason.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(hold("s1"), Hold::Confirming { seen: 1, needed: 2 });
    assert!(matches!(hold("s2"), Hold::Young { .. }));
}
