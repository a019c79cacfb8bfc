//! Several processes behind one controller URL, and the boot-id rules that keep
//! sessiond from ending their sessions. Pure: the boot records and the
//! classifier, pass after pass, with the answers a pass would get.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use sessiond::config::ReconcileConfig;
use sessiond::model::{
    BootRecord, BootRecords, ControllerList, DbSnapshot, InstanceSnapshot, LiveSession, LiveState, RowState, SessionId,
    SessionRow,
};
use sessiond::reconcile::boots::{self, Trust, PROBATION_FETCHES, RECOVERY_FETCHES, STEADY_VERIFICATIONS};
use sessiond::reconcile::classify::{classify, Decision, Input, Kind, Memory, PassOptions, Repair};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).single().expect("a valid time")
}

/// One pass's answers from instance `a`: the list's boot id first.
fn answers(ids: &[&str]) -> InstanceSnapshot {
    InstanceSnapshot {
        name: "a".into(),
        fetched_at: t0(),
        result: Ok(ControllerList {
            boot_id: ids[0].into(),
            generated_at: Some(t0()),
            sessions: Default::default(),
            invalid: vec![],
            counters: None,
            problems: vec![],
        }),
        boot_ids: ids.iter().map(|s| s.to_string()).collect(),
    }
}

/// Feeds passes of `n` answers all from `id`, returning the last verdict.
fn steady(boots: &mut BootRecords, id: &str, n: usize, passes: u32, needed_passes: u32) -> Trust {
    let mut last = None;
    for p in 0..passes {
        let now = t0() + Duration::seconds(15 * i64::from(p));
        let (next, seen) = boots::observe(boots, &[answers(&vec![id; n])], now, needed_passes);
        *boots = next;
        last = seen.trust.get("a").cloned();
    }
    last.expect("a verdict")
}

#[test]
fn a_first_boot_id_is_trusted_after_enough_agreeing_answers_and_explains_nothing() {
    let mut b = BootRecords::new();
    let per_pass = boots::verifications(None, "A", 2) + 1;
    assert!(matches!(steady(&mut b, "A", per_pass, 1, 2), Trust::Probation { .. }), "one pass is not enough");
    assert_eq!(steady(&mut b, "A", per_pass, 1, 2), Trust::Trusted);
    let rec = &b["a"];
    assert_eq!(rec.trusted.as_deref(), Some("A"));
    assert_eq!(rec.changed_at, None, "the first boot id explains nothing");
    assert_eq!(boots::verifications(Some(rec), "A", 2), STEADY_VERIFICATIONS);
    assert!(boots::verifications(Some(rec), "B", 2) > STEADY_VERIFICATIONS, "a new boot id is verified harder");
    // `once` must decide within its one pass: it asks for all the answers at once.
    assert_eq!(boots::verifications(None, "A", 1) + 1, PROBATION_FETCHES as usize);
    let mut once = BootRecords::new();
    assert_eq!(steady(&mut once, "A", PROBATION_FETCHES as usize, 1, 1), Trust::Trusted);
}

#[test]
fn a_restart_explains_orphans_only_once_confirmed_and_from_its_first_sight() {
    let mut b = BootRecords::new();
    b.insert("a".into(), BootRecord { trusted: Some("A".into()), ..BootRecord::default() });
    let first_sight = t0();
    let (next, seen) = boots::observe(&b, &[answers(&["B"; 8])], first_sight, 2);
    assert!(matches!(seen.trust["a"], Trust::Probation { .. }));
    assert_eq!(next["a"].changed_at, None, "an unconfirmed restart explains nothing");
    let (next, seen) = boots::observe(&next, &[answers(&["B"; 8])], first_sight + Duration::seconds(15), 2);
    assert_eq!(seen.trust["a"], Trust::Trusted);
    assert_eq!(seen.restarted, ["a"]);
    assert_eq!(next["a"].trusted.as_deref(), Some("B"));
    assert_eq!(next["a"].changed_at, Some(first_sight));
    assert_eq!(next["a"].history, ["A"]);
}

#[test]
fn answers_that_disagree_within_one_pass_make_the_instance_inconsistent() {
    let mut b = BootRecords::new();
    b.insert("a".into(), BootRecord { trusted: Some("A".into()), ..BootRecord::default() });
    let (next, seen) = boots::observe(&b, &[answers(&["A", "A", "B", "A"])], t0(), 2);
    assert!(matches!(&seen.trust["a"], Trust::Inconsistent { boot_ids } if boot_ids.len() == 2));
    assert_eq!(seen.became_inconsistent, ["a"]);
    assert_eq!(next["a"].inconsistent_since, Some(t0()));
}

#[test]
fn a_boot_id_that_comes_back_after_another_makes_the_instance_inconsistent() {
    let mut b = BootRecords::new();
    b.insert("a".into(), BootRecord { trusted: Some("A".into()), ..BootRecord::default() });
    let (b, _) = boots::observe(&b, &[answers(&["B"; 4])], t0(), 2); // a restart, perhaps
    let (b, seen) = boots::observe(&b, &[answers(&["A"; 4])], t0(), 2); // no: A is still there
    assert!(matches!(seen.trust["a"], Trust::Inconsistent { .. }), "{:?}", seen.trust["a"]);
    assert_eq!(b["a"].changed_at, None, "no restart was recorded");
    // And later, B again: still inconsistent.
    let (_, seen) = boots::observe(&b, &[answers(&["B"; 8])], t0(), 2);
    assert!(matches!(seen.trust["a"], Trust::Probation { .. } | Trust::Inconsistent { .. }));
    assert!(!matches!(seen.trust["a"], Trust::Trusted));
}

#[test]
fn an_inconsistent_instance_is_trusted_again_only_after_a_long_steady_run() {
    let mut b = BootRecords::new();
    b.insert(
        "a".into(),
        BootRecord {
            trusted: Some("A".into()),
            history: vec!["B".into()],
            inconsistent_since: Some(t0()),
            ..BootRecord::default()
        },
    );
    let per_pass = boots::verifications(b.get("a"), "C", 2) + 1;
    let passes_needed = RECOVERY_FETCHES.div_ceil(per_pass as u32);
    // One pass short of the run: still not trusted.
    let verdict = steady(&mut b, "C", per_pass, passes_needed - 1, 2);
    assert!(!matches!(verdict, Trust::Trusted), "{verdict:?}");
    assert_eq!(steady(&mut b, "C", per_pass, 1, 2), Trust::Trusted);
    assert_eq!(b["a"].inconsistent_since, None);
}

// ---------------------------------------------------------------------------
// N processes behind one URL, pass after pass.

/// A process answering at the URL: its boot id and the sessions in its memory.
#[derive(Clone, Debug)]
struct Process {
    boot: String,
    sessions: Vec<String>,
}

struct Fleet {
    processes: Vec<Process>,
    rows: Vec<SessionRow>,
    boots: BootRecords,
    memory: Memory,
    cfg: ReconcileConfig,
    now: DateTime<Utc>,
    restarts: u32,
}

impl Fleet {
    fn new(n: usize, per_process: usize, confirmations: u32) -> Fleet {
        let mut processes = Vec::new();
        let mut rows = Vec::new();
        for p in 0..n {
            let mut sessions = Vec::new();
            for s in 0..per_process {
                let id = format!("p{p}-s{s}");
                rows.push(row(&id, &format!("owner-{p}-{s}"), t0() - Duration::seconds(600)));
                sessions.push(id);
            }
            processes.push(Process { boot: format!("boot-{p}"), sessions });
        }
        let cfg = ReconcileConfig { confirmations, ..ReconcileConfig::default() };
        Fleet { processes, rows, boots: BootRecords::new(), memory: Memory::default(), cfg, now: t0(), restarts: 0 }
    }

    /// A process restarts: a new boot id and an empty memory.
    fn restart(&mut self, p: usize) {
        self.restarts += 1;
        self.processes[p] = Process { boot: format!("boot-{p}-r{}", self.restarts), sessions: vec![] };
    }

    /// Every session some process holds.
    fn held(&self) -> BTreeSet<String> {
        self.processes.iter().flat_map(|p| p.sessions.iter().cloned()).collect()
    }

    /// One daemon pass, its answers coming from processes `pick(k)` for the k-th
    /// fetch. Returns the findings that would end or stop a session some
    /// process holds.
    fn pass(&mut self, pick: &mut dyn FnMut(usize) -> usize) -> Vec<String> {
        self.now += Duration::seconds(15);
        // The list comes first; how many boot ids follow depends on its answer.
        let first_pick = pick(self.processes.len());
        let fetches =
            boots::verifications(self.boots.get("a"), &self.processes[first_pick].boot, self.cfg.confirmations) + 1;
        let mut who = vec![first_pick];
        who.extend((1..fetches).map(|_| pick(self.processes.len())));
        let first = &self.processes[who[0]];
        let list = ControllerList {
            boot_id: first.boot.clone(),
            generated_at: Some(self.now),
            sessions: first
                .sessions
                .iter()
                .map(|id| LiveSession {
                    id: SessionId::from_row(id.clone()),
                    owner_id: self
                        .rows
                        .iter()
                        .find(|r| r.id.as_str() == id)
                        .and_then(|r| r.owner_id.clone())
                        .unwrap_or_default(),
                    state: LiveState::Active,
                    started_at: Some(t0() - Duration::seconds(600)),
                })
                .collect(),
            invalid: vec![],
            counters: None,
            problems: vec![],
        };
        let snapshot = InstanceSnapshot {
            name: "a".into(),
            fetched_at: self.now,
            result: Ok(list),
            boot_ids: who.iter().map(|&p| self.processes[p].boot.clone()).collect(),
        };
        let instances = [snapshot];
        let (boots, seen) = boots::observe(&self.boots, &instances, self.now, self.cfg.confirmations);
        let stoppable: BTreeSet<String> = ["a".to_owned()].into();
        let c = classify(&Input {
            now: self.now,
            config: &self.cfg,
            instances: &instances,
            db: &DbSnapshot {
                rows: self.rows.iter().cloned().collect(),
                invalid_rows: vec![],
                read_at: self.now,
                open_intents: vec![],
                ..Default::default()
            },
            memory: &self.memory,
            boots: &boots,
            trust: &seen.trust,
            stoppable: &stoppable,
            writable: &RowState::ALL.into_iter().collect(),
            shape: Default::default(),
            options: PassOptions { read_only: false, force: false, require_confirmations: true },
            released: &BTreeSet::new(),
        });
        self.boots = boots;
        self.memory = c.memory;
        let held = self.held();
        c.findings
            .iter()
            .filter(|f| f.decision == Decision::Repair && held.contains(&f.subject))
            .filter(|f| match &f.repair {
                Some(Repair::UpdateRow { to, .. }) => !to.is_live(),
                Some(Repair::StopLive { .. }) => f.kind != Kind::Zombie,
                _ => false,
            })
            .map(|f| format!("{} {}", f.kind.as_str(), f.subject))
            .collect()
    }
}

fn row(id: &str, owner: &str, at: DateTime<Utc>) -> SessionRow {
    SessionRow {
        id: SessionId::from_row(id.into()),
        owner_id: Some(owner.into()),
        controller_instance: Some("a".into()),
        state: RowState::Active,
        created_at: at,
        changed_at: at,
        version: format!("v-{id}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// N = 2…4 processes answering in turn, for any confirmations: no session
    /// any of them holds is ever ended or stopped, with or without real
    /// restarts of some of them along the way.
    #[test]
    fn processes_answering_in_turn_never_have_their_sessions_ended(
        n in 2usize..=4,
        confirmations in 2u32..=5,
        per_process in 1usize..=6,
        offset in 0usize..4,
        restarts in proptest::collection::vec((0usize..40, 0usize..4), 0..4),
    ) {
        let mut fleet = Fleet::new(n, per_process, confirmations);
        let mut turn = offset;
        for pass in 0..40 {
            for (at, p) in &restarts {
                if *at == pass {
                    fleet.restart(p % n);
                }
            }
            let mut in_turn = |n: usize| {
                turn += 1;
                turn % n
            };
            let bad = fleet.pass(&mut in_turn);
            prop_assert!(bad.is_empty(), "pass {pass}: {bad:?}");
        }
        prop_assert!(fleet.boots["a"].trusted.is_none() || fleet.boots["a"].inconsistent_since.is_some(),
            "the instance is never trusted: {:?}", fleet.boots["a"]);
    }

    /// The same with a random process per request (seeded): with the fetches
    /// a pass makes, the chance of being fooled is below one in thirty thousand
    /// per instance, so these seeds never are.
    #[test]
    fn processes_answering_at_random_never_have_their_sessions_ended(
        n in 2usize..=4,
        confirmations in 2u32..=5,
        seed in any::<u64>(),
    ) {
        let mut fleet = Fleet::new(n, 3, confirmations);
        let mut rng = fastrand::Rng::with_seed(seed);
        for pass in 0..40 {
            let mut random = |n: usize| rng.usize(..n);
            let bad = fleet.pass(&mut random);
            prop_assert!(bad.is_empty(), "pass {pass}: {bad:?}");
        }
    }
}

#[test]
fn one_process_that_really_restarts_has_its_lost_sessions_ended_once_confirmed() {
    // The rule must not make sessiond useless: a single process that restarts
    // and forgets its sessions has their rows ended, explained by the restart.
    let mut fleet = Fleet::new(1, 10, 2);
    let mut only = |_: usize| 0;
    for _ in 0..3 {
        assert!(fleet.pass(&mut only).is_empty());
    }
    assert_eq!(fleet.boots["a"].trusted.as_deref(), Some("boot-0"));
    fleet.restart(0);
    let mut first_repair = None;
    for pass in 0..4 {
        fleet.now += Duration::seconds(15);
        let boot = fleet.processes[0].boot.clone();
        let fetches = boots::verifications(fleet.boots.get("a"), &boot, 2) + 1;
        let instances = [InstanceSnapshot {
            name: "a".into(),
            fetched_at: fleet.now,
            result: Ok(ControllerList {
                boot_id: boot.clone(),
                generated_at: Some(fleet.now),
                sessions: Default::default(),
                invalid: vec![],
                counters: None,
                problems: vec![],
            }),
            boot_ids: vec![boot; fetches],
        }];
        let (b, seen) = boots::observe(&fleet.boots, &instances, fleet.now, 2);
        let c = classify(&Input {
            now: fleet.now,
            config: &fleet.cfg,
            instances: &instances,
            db: &DbSnapshot {
                rows: fleet.rows.iter().cloned().collect(),
                invalid_rows: vec![],
                read_at: fleet.now,
                open_intents: vec![],
                ..Default::default()
            },
            memory: &fleet.memory,
            boots: &b,
            trust: &seen.trust,
            stoppable: &BTreeSet::new(),
            writable: &RowState::ALL.into_iter().collect(),
            shape: Default::default(),
            options: PassOptions { read_only: false, force: false, require_confirmations: true },
            released: &BTreeSet::new(),
        });
        fleet.boots = b;
        fleet.memory = c.memory;
        let repaired = c.findings.iter().filter(|f| f.decision == Decision::Repair).count();
        if repaired > 0 {
            first_repair = Some((pass, repaired));
            break;
        }
    }
    assert_eq!(first_repair, Some((1, 10)), "every lost session, in the second pass after the restart");
    assert!(fleet.boots["a"].changed_at.is_some(), "explained by the confirmed restart");
}
