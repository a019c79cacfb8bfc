//! Properties of the classifier over random worlds:
//! - it never repairs a session the controller holds live in a consistent row;
//! - it never repairs anything on an unreachable instance;
//! - a read-only pass plans no repair at all;
//! - it is idempotent: after its plan is applied (with the database's own rules:
//!   compare-and-set, one live row per owner), a second classification finds no
//!   repair that was not already planned and refused by a conflict.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use sessiond::config::ReconcileConfig;
use sessiond::model::{
    BootRecord, BootRecords, ControllerList, DbSnapshot, InstanceSnapshot, LiveSession, LiveState, RowState, SessionId,
    SessionRow,
};
use sessiond::reconcile::classify::{classify, Classification, Decision, Input, Kind, Memory, PassOptions, Repair};

const INSTANCES: [&str; 2] = ["a", "b"];
const ROW_STATES: [RowState; 6] =
    [RowState::Creating, RowState::Active, RowState::Paused, RowState::Stopped, RowState::Failed, RowState::Deleted];
const LIVE_STATES: [LiveState; 3] = [LiveState::Creating, LiveState::Active, LiveState::Paused];

#[derive(Clone, Debug)]
struct Spec {
    row: Option<(usize, usize, usize, i64)>,  // state, instance, owner, age
    live: Option<(usize, usize, usize, i64)>, // instance, state, owner, age
}

#[derive(Clone, Debug)]
struct World {
    now: DateTime<Utc>,
    cfg: ReconcileConfig,
    reachable: [bool; 2],
    lists: [Vec<LiveSession>; 2],
    rows: Vec<SessionRow>,
    options: PassOptions,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        proptest::option::of((0..6usize, 0..2usize, 0..4usize, 0..700i64)),
        proptest::option::of((0..2usize, 0..3usize, 0..4usize, 0..700i64)),
    )
        .prop_map(|(row, live)| Spec { row, live })
}

fn world() -> impl Strategy<Value = World> {
    (
        proptest::collection::vec(spec(), 0..14),
        any::<[bool; 2]>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0u64), Just(30u64)],
    )
        .prop_map(|(specs, reachable, read_only, force, grace)| {
            let now = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("a valid time");
            let cfg = ReconcileConfig {
                grace: std::time::Duration::from_secs(grace),
                confirmations: 1,
                guard_min_orphans: 3,
                ..ReconcileConfig::default()
            };
            let mut w = World {
                now,
                cfg,
                reachable,
                lists: [Vec::new(), Vec::new()],
                rows: Vec::new(),
                options: PassOptions { read_only, force, require_confirmations: false },
            };
            let mut live_owners: HashSet<usize> = HashSet::new();
            for (i, s) in specs.iter().enumerate() {
                let id = SessionId::from_row(format!("s{i}"));
                if let Some((state, inst, owner, age)) = s.row {
                    let state = ROW_STATES[state];
                    // The reference schema allows one live row per owner.
                    if state.is_live() && !live_owners.insert(owner) {
                        continue;
                    }
                    let at = now - Duration::seconds(age);
                    w.rows.push(SessionRow {
                        id: id.clone(),
                        owner_id: Some(format!("o{owner}")),
                        controller_instance: Some(INSTANCES[inst].into()),
                        state,
                        created_at: at,
                        changed_at: at,
                        version: "v0".into(),
                    });
                }
                if let Some((inst, state, owner, age)) = s.live {
                    w.lists[inst].push(LiveSession {
                        id,
                        owner_id: format!("o{owner}"),
                        state: LIVE_STATES[state],
                        started_at: Some(now - Duration::seconds(age)),
                    });
                }
            }
            w
        })
}

fn snapshots(w: &World) -> Vec<InstanceSnapshot> {
    (0..2)
        .map(|i| InstanceSnapshot {
            name: INSTANCES[i].into(),
            fetched_at: w.now - Duration::seconds(1),
            result: if w.reachable[i] {
                Ok(ControllerList {
                    boot_id: "boot".into(),
                    generated_at: Some(w.now - Duration::seconds(1)),
                    sessions: w.lists[i].iter().cloned().collect(),
                    invalid: vec![],
                    counters: None,
                    problems: vec![],
                })
            } else {
                Err("down".into())
            },
            boot_ids: if w.reachable[i] { vec!["boot".into()] } else { vec![] },
        })
        .collect()
}

fn run(w: &World, memory: &Memory) -> Classification {
    let boots: BootRecords = INSTANCES
        .iter()
        .map(|n| (n.to_string(), BootRecord { trusted: Some("boot".into()), ..BootRecord::default() }))
        .collect();
    let stoppable: BTreeSet<String> = INSTANCES.iter().map(|s| s.to_string()).collect();
    classify(&Input {
        now: w.now,
        config: &w.cfg,
        instances: &snapshots(w),
        db: &DbSnapshot {
            rows: w.rows.iter().cloned().collect(),
            invalid_rows: vec![],
            read_at: w.now,
            open_intents: vec![],
            ..Default::default()
        },
        memory,
        boots: &boots,
        trust: &std::collections::BTreeMap::new(),
        writable: &RowState::ALL.into_iter().collect(),
        shape: Default::default(),
        stoppable: &stoppable,
        options: w.options,
        released: &BTreeSet::new(),
    })
}

fn instance_of(w: &World, id: &str) -> Option<usize> {
    (0..2).find(|&i| w.lists[i].iter().any(|s| s.id.as_str() == id))
}

fn owner_has_other_live_row(w: &World, owner: &str, except: &str) -> bool {
    w.rows.iter().any(|r| r.state.is_live() && r.owner_id.as_deref() == Some(owner) && r.id.as_str() != except)
}

/// Applies a plan the way the store does: updates, then inserts, then stops;
/// each refused (a conflict) if it would break one-live-row-per-owner.
fn apply(w: &mut World, c: &Classification) -> BTreeSet<(Kind, String)> {
    let mut conflicts = BTreeSet::new();
    let repairs: Vec<_> = c.findings.iter().filter(|f| f.decision == Decision::Repair).collect();
    let order = |r: &Repair| match r {
        Repair::UpdateRow { .. } => 0,
        Repair::InsertRow { .. } => 1,
        Repair::StopLive { .. } => 2,
    };
    let mut sorted = repairs.clone();
    sorted.sort_by_key(|f| f.repair.as_ref().map_or(3, order));
    for f in sorted {
        let key = (f.kind, f.subject.clone());
        match &f.repair {
            Some(Repair::UpdateRow { id, to, owner_id, controller_instance, .. }) => {
                let Some(pos) = w.rows.iter().position(|r| &r.id == id) else {
                    conflicts.insert(key);
                    continue;
                };
                let new_owner = owner_id.clone().or_else(|| w.rows[pos].owner_id.clone()).unwrap_or_default();
                if to.is_live() && owner_has_other_live_row(w, &new_owner, id.as_str()) {
                    conflicts.insert(key);
                    continue;
                }
                let row = &mut w.rows[pos];
                row.state = *to;
                row.owner_id = Some(new_owner);
                if let Some(inst) = controller_instance {
                    row.controller_instance = Some(inst.clone());
                }
                row.changed_at = w.now;
                row.version = "v1".into();
            }
            Some(Repair::InsertRow { id, owner_id, controller_instance, state, created_at }) => {
                if w.rows.iter().any(|r| &r.id == id) || owner_has_other_live_row(w, owner_id, id.as_str()) {
                    conflicts.insert(key);
                    continue;
                }
                w.rows.push(SessionRow {
                    id: id.clone(),
                    owner_id: Some(owner_id.clone()),
                    controller_instance: Some(controller_instance.clone()),
                    state: *state,
                    created_at: *created_at,
                    changed_at: w.now.max(*created_at),
                    version: "v1".into(),
                });
            }
            Some(Repair::StopLive { id, end_row, .. }) => {
                for list in &mut w.lists {
                    list.retain(|s| &s.id != id);
                }
                if *end_row {
                    if let Some(row) = w.rows.iter_mut().find(|r| &r.id == id) {
                        row.state = RowState::Stopped;
                        row.changed_at = w.now;
                        row.version = "v1".into();
                    }
                }
            }
            None => {}
        }
    }
    conflicts
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn never_repairs_a_session_held_live_in_a_consistent_row(w in world()) {
        let c = run(&w, &Memory::default());
        for row in w.rows.iter().filter(|r| r.state.is_live()) {
            let Some(inst) = instance_of(&w, row.id.as_str()) else { continue };
            if !w.reachable[inst] {
                continue;
            }
            let live = w.lists[inst].iter().find(|s| s.id == row.id).expect("listed");
            let owner = row.owner_id.as_deref().unwrap_or_default();
            let consistent = live.state.row_state() == row.state
                && live.owner_id == owner
                && row.controller_instance.as_deref() == Some(INSTANCES[inst])
                && !owner_has_other_live_row(&w, owner, row.id.as_str())
                && (0..2).all(|i| w.lists[i].iter().filter(|s| s.owner_id == owner).count() <= usize::from(i == inst));
            if consistent {
                for f in c.findings.iter().filter(|f| f.subject == row.id.as_str()) {
                    prop_assert!(f.decision != Decision::Repair, "repaired a consistent session: {f:?}");
                }
            }
        }
    }

    #[test]
    fn never_repairs_on_an_unreachable_instance(w in world()) {
        let c = run(&w, &Memory::default());
        for f in c.findings.iter().filter(|f| f.decision == Decision::Repair) {
            let target = match &f.repair {
                Some(Repair::UpdateRow { id, .. }) => {
                    w.rows.iter().find(|r| &r.id == id).and_then(|r| r.controller_instance.clone())
                }
                Some(Repair::InsertRow { controller_instance, .. }) => Some(controller_instance.clone()),
                Some(Repair::StopLive { controller_instance, .. }) => Some(controller_instance.clone()),
                None => None,
            };
            let target = target.expect("a repair names its instance");
            let idx = INSTANCES.iter().position(|n| *n == target).expect("a known instance");
            prop_assert!(w.reachable[idx], "repair on unreachable {target}: {f:?}");
        }
    }

    #[test]
    fn a_read_only_pass_plans_no_repair(mut w in world()) {
        w.options.read_only = true;
        let c = run(&w, &Memory::default());
        prop_assert!(c.findings.iter().all(|f| f.decision != Decision::Repair));
    }

    #[test]
    fn classification_is_idempotent_after_its_plan_is_applied(w in world()) {
        let first = run(&w, &Memory::default());
        let mut after = w.clone();
        let conflicts = apply(&mut after, &first);
        let second = run(&after, &first.memory);
        for f in second.findings.iter().filter(|f| f.decision == Decision::Repair) {
            prop_assert!(
                conflicts.contains(&(f.kind, f.subject.clone())),
                "new repair after applying the plan: {f:?}\nfirst pass: {:#?}",
                first.findings
            );
        }
    }
}
