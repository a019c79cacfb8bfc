//! The simulated application of the demo: users create, reuse, look up and stop
//! sessions through simulated controllers and a real PostgreSQL, the way the
//! services in the incident write-ups did — including their faults, injected at
//! a steady rate:
//!
//! | fault | how the application gets it wrong | what sessiond sees |
//! |---|---|---|
//! | orphan | a cleanup clears the controller's memory, then fails to update the row | orphaned |
//! | zombie | a stop updates the row, then races the cleanup and never reaches the controller | zombie |
//! | unpersisted | the row insert fails after the controller took the session | unpersisted |
//! | stuck | the controller fails to start the session; the `creating` row stays | stuck_creating |
//! | restart | a controller restarts and forgets every session it held | orphaned (explained) |
//!
//! The simulator knows the truth. Every fault is recorded, and the user it
//! happened to is parked until sessiond repairs it (a real user could not
//! create a new session while their broken one holds the owner's one live row).
//! At the end, [`App::verdict`] compares the audit trail with that truth.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use chrono::Utc;
use tokio_postgres::Client;

use crate::model::LookupResult;
use crate::reconcile::classify::Kind;
use crate::simctl::SimController;

/// A fault the application injected, and whether sessiond has repaired it.
#[derive(Clone, Debug)]
pub struct Fault {
    pub kind: Kind,
    pub session_id: String,
    pub user: usize,
    pub injected: Instant,
    pub repaired: Option<Instant>,
    /// Resolved by something other than sessiond (a controller restart took the
    /// live session with it); no repair is expected.
    pub moot: bool,
}

/// What the application does per user.
#[derive(Clone, Debug, PartialEq, Eq)]
enum UserState {
    Idle,
    Live(String),
    /// Waiting for sessiond to repair fault number `usize`.
    Parked(usize),
}

/// The simulated application.
pub struct App {
    db: Client,
    controllers: Vec<SimController>,
    rng: fastrand::Rng,
    users: Vec<UserState>,
    pub faults: Vec<Fault>,
    fault_rate: f64,
    pub restarts: u32,
    /// `--unhealthy-app`: the application also breaches its own SLOs.
    unhealthy: bool,
    /// When each user last created a session.
    last_create: Vec<Option<Instant>>,
}

/// A healthy application's user does not get a new session within this long
/// of the last one (longer than the default `rapid_create_window`).
const CREATE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(15);

/// The comparison of the audit trail with the truth.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    pub injected: BTreeMap<&'static str, u64>,
    pub repaired: u64,
    /// Faults older than the settle time that sessiond has not repaired (and
    /// that nothing else resolved).
    pub outstanding: Vec<String>,
    /// Faults too young to have been repaired yet (an interrupted run).
    pub in_repair: u64,
    /// Audit rows written by sessiond that match no injected fault.
    pub wrong: Vec<String>,
    pub mean_repair_seconds: f64,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.outstanding.is_empty() && self.wrong.is_empty()
    }

    pub fn line(&self) -> String {
        let injected: Vec<String> = self.injected.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let total: u64 = self.injected.values().sum();
        format!(
            "demo verdict: {} injected={total} ({}) repaired={} in_repair={} outstanding={} wrong={} mean_time_to_repair={:.1}s",
            if self.ok() { "OK" } else { "FAILED" },
            if injected.is_empty() { "none".to_owned() } else { injected.join(" ") },
            self.repaired,
            self.in_repair,
            self.outstanding.len(),
            self.wrong.len(),
            self.mean_repair_seconds,
        )
    }
}

fn session_id(rng: &mut fastrand::Rng) -> String {
    format!("exec_{}_{:08x}", Utc::now().format("%Y%m%d_%H%M%S"), rng.u32(..))
}

impl App {
    /// `unhealthy`: users of parked sessions keep retrying (failed lookups),
    /// sessions are reused less (a reuse ratio near 85%), and users may get
    /// sessions in quick succession. A healthy application only has the
    /// injected faults, which are sessiond's to repair.
    pub fn new(
        db: Client,
        controllers: Vec<SimController>,
        users: usize,
        fault_rate: f64,
        seed: u64,
        unhealthy: bool,
    ) -> App {
        App {
            db,
            controllers,
            rng: fastrand::Rng::with_seed(seed),
            users: vec![UserState::Idle; users],
            faults: Vec::new(),
            fault_rate,
            restarts: 0,
            unhealthy,
            last_create: vec![None; users],
        }
    }

    fn owner(user: usize) -> String {
        format!("user-{user:04}")
    }

    fn controller_of(&self, user: usize) -> usize {
        user % self.controllers.len()
    }

    fn instance(&self, user: usize) -> String {
        self.controllers[self.controller_of(user)].instance()
    }

    /// Creates a session for every user, without faults: the starting fleet.
    pub async fn populate(&mut self) -> Result<(), tokio_postgres::Error> {
        for user in 0..self.users.len() {
            self.create(user, false).await?;
        }
        Ok(())
    }

    fn roll(&mut self) -> bool {
        self.rng.f64() < self.fault_rate
    }

    fn park(&mut self, user: usize, kind: Kind, id: String) {
        self.faults.push(Fault { kind, session_id: id, user, injected: Instant::now(), repaired: None, moot: false });
        self.users[user] = UserState::Parked(self.faults.len() - 1);
    }

    async fn create(&mut self, user: usize, faults: bool) -> Result<(), tokio_postgres::Error> {
        if !self.unhealthy && self.last_create[user].is_some_and(|at| at.elapsed() < CREATE_COOLDOWN) {
            return Ok(());
        }
        self.last_create[user] = Some(Instant::now());
        let id = session_id(&mut self.rng);
        let owner = App::owner(user);
        let instance = self.instance(user);
        let ctrl = self.controllers[self.controller_of(user)].clone();
        let fault = if faults && self.roll() { Some(self.rng.bool()) } else { None };
        if fault == Some(true) {
            // The controller took the session; the row insert failed.
            ctrl.add(&id, &owner, "running", Some(Utc::now()));
            ctrl.count_lookup(LookupResult::Found);
            self.park(user, Kind::Unpersisted, id);
            return Ok(());
        }
        let inserted = self
            .db
            .execute(
                "INSERT INTO sessions (session_id, owner_id, controller_instance, state) VALUES ($1, $2, $3, 'creating')
                 ON CONFLICT DO NOTHING",
                &[&id, &owner, &instance],
            )
            .await?;
        if inserted == 0 {
            return Ok(()); // the owner still has a live row: try again later
        }
        if fault == Some(false) {
            // The controller failed to start it; nobody cleaned up the row.
            self.park(user, Kind::StuckCreating, id);
            return Ok(());
        }
        ctrl.add(&id, &owner, "running", Some(Utc::now()));
        self.db
            .execute("UPDATE sessions SET state = 'active', updated_at = now() WHERE session_id = $1", &[&id])
            .await?;
        ctrl.count_lookup(LookupResult::Found);
        self.users[user] = UserState::Live(id);
        Ok(())
    }

    /// The application's own stop of a row.
    async fn mark_stopped(&self, id: &str) -> Result<u64, tokio_postgres::Error> {
        self.db
            .execute(
                "UPDATE sessions SET state = 'stopped', ended_at = now(), updated_at = now(), end_reason = 'user'
                  WHERE session_id = $1",
                &[&id],
            )
            .await
    }

    async fn stop(&mut self, user: usize, id: String, faults: bool) -> Result<(), tokio_postgres::Error> {
        let ctrl = self.controllers[self.controller_of(user)].clone();
        if faults && self.roll() {
            if self.rng.bool() {
                // Cleanup cleared memory, then the row update failed.
                ctrl.remove(&id);
                ctrl.count_cleanup(false);
                self.park(user, Kind::Orphaned, id);
            } else {
                // The row says stopped; the stop raced cleanup and never reached the controller.
                self.mark_stopped(&id).await?;
                ctrl.count_cleanup(false);
                self.park(user, Kind::Zombie, id);
            }
            return Ok(());
        }
        self.mark_stopped(&id).await?;
        ctrl.remove(&id);
        ctrl.count_cleanup(true);
        self.users[user] = UserState::Idle;
        Ok(())
    }

    /// One application operation for a random user.
    pub async fn step(&mut self, inject: bool) -> Result<(), tokio_postgres::Error> {
        let user = self.rng.usize(..self.users.len());
        let ctrl = self.controllers[self.controller_of(user)].clone();
        match self.users[user].clone() {
            UserState::Parked(_) => {
                // The user retries and fails: their session cannot be found.
                // A healthy application's user waits for the repair instead.
                if self.unhealthy {
                    ctrl.count_lookup(if self.rng.u8(..10) == 0 {
                        LookupResult::InvalidFormat
                    } else {
                        LookupResult::NeverExisted
                    });
                }
            }
            UserState::Idle => {
                if self.rng.u8(..4) == 0 {
                    self.create(user, inject).await?;
                }
            }
            UserState::Live(id) => {
                if self.rng.u8(..100) < if self.unhealthy { 85 } else { 98 } {
                    ctrl.reuse();
                    ctrl.count_lookup(LookupResult::Found);
                } else {
                    self.stop(user, id, inject).await?;
                }
            }
        }
        Ok(())
    }

    /// Restarts one controller: it forgets every session. The rows of the users
    /// it served become orphans that its new boot id explains.
    pub async fn restart(&mut self, which: usize) -> Result<(), tokio_postgres::Error> {
        // Take in what sessiond repaired so far, so a repaired fault becomes a
        // live session that the restart then loses.
        self.check_repairs().await?;
        let ctrl = self.controllers[which].clone();
        ctrl.restart();
        self.restarts += 1;
        let served: Vec<usize> = (0..self.users.len()).filter(|u| self.controller_of(*u) == which).collect();
        for user in served {
            match self.users[user].clone() {
                UserState::Live(id) => self.park(user, Kind::Orphaned, id),
                UserState::Parked(f) => {
                    let fault = &mut self.faults[f];
                    // A session the controller held is gone with it: nothing left to repair.
                    if matches!(fault.kind, Kind::Zombie | Kind::Unpersisted) && fault.repaired.is_none() {
                        fault.moot = true;
                        self.users[user] = UserState::Idle;
                    }
                }
                UserState::Idle => {}
            }
        }
        Ok(())
    }

    /// Unparks users whose fault sessiond has repaired.
    pub async fn check_repairs(&mut self) -> Result<(), tokio_postgres::Error> {
        let parked: Vec<(usize, usize)> = self
            .users
            .iter()
            .enumerate()
            .filter_map(|(u, s)| if let UserState::Parked(f) = s { Some((u, *f)) } else { None })
            .collect();
        if parked.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = parked.iter().map(|(_, f)| self.faults[*f].session_id.clone()).collect();
        let rows = self.db.query("SELECT session_id, state FROM sessions WHERE session_id = ANY($1)", &[&ids]).await?;
        let states: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for (user, f) in parked {
            let fault = &self.faults[f];
            let ctrl = &self.controllers[self.controller_of(user)];
            let state = states.get(&fault.session_id).map(String::as_str);
            let (repaired, next) = match fault.kind {
                Kind::Orphaned => (matches!(state, Some("stopped")), UserState::Idle),
                Kind::StuckCreating => (matches!(state, Some("failed")), UserState::Idle),
                Kind::Zombie => (!ctrl.holds(&fault.session_id), UserState::Idle),
                Kind::Unpersisted => (state.is_some(), UserState::Live(fault.session_id.clone())),
                _ => (false, UserState::Idle),
            };
            if repaired {
                self.faults[f].repaired = Some(Instant::now());
                self.users[user] = next;
            }
        }
        Ok(())
    }

    /// Compares what sessiond wrote to the audit trail since `since` with what
    /// was injected. Unrepaired faults younger than `settle` are in repair, not
    /// failures.
    pub async fn verdict(
        &mut self,
        since: chrono::DateTime<Utc>,
        settle: std::time::Duration,
    ) -> Result<Verdict, tokio_postgres::Error> {
        self.check_repairs().await?;
        let mut v = Verdict::default();
        // The repairs each session may legitimately have had.
        let mut allowed: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut times = Vec::new();
        for f in &self.faults {
            let reasons = allowed.entry(f.session_id.as_str()).or_default();
            reasons.push(f.kind.as_str());
            if f.moot {
                // The restart raced sessiond: it may have repaired the fault just
                // before, and an inserted row then became an orphan.
                if f.kind == Kind::Unpersisted {
                    reasons.push(Kind::Orphaned.as_str());
                }
                continue;
            }
            *v.injected.entry(f.kind.as_str()).or_default() += 1;
            match f.repaired {
                Some(at) => {
                    v.repaired += 1;
                    times.push(at.duration_since(f.injected).as_secs_f64());
                }
                None if f.injected.elapsed() < settle => v.in_repair += 1,
                None => v.outstanding.push(format!("{} {}", f.kind.as_str(), f.session_id)),
            }
        }
        v.mean_repair_seconds = if times.is_empty() { 0.0 } else { times.iter().sum::<f64>() / times.len() as f64 };
        let rows = self
            .db
            .query(
                "SELECT session_id, coalesce(reason, '') FROM session_audit
                  WHERE trigger = 'reconciler' AND at >= $1 ORDER BY id",
                &[&since],
            )
            .await?;
        for r in rows {
            let id: String = r.get(0);
            let reason: String = r.get(1);
            if !allowed.get(id.as_str()).is_some_and(|r| r.contains(&reason.as_str())) {
                v.wrong.push(format!("{reason} {id}"));
            }
        }
        Ok(v)
    }
}
