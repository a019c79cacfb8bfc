//! One reconciliation pass, as data flow:
//!
//! ```text
//! controllers ──fetch_all──┐
//!                          ├─► classify (pure) ─► plan ─► apply ─► PassReport
//! PostgreSQL ──snapshot────┘        ▲                         │
//!                         Memory ───┘◄────────────────────────┘
//! ```
//!
//! [`Reconciler`] owns what lives between passes: the database connection, the
//! memory of earlier passes (confirmation streaks, unreachable-since times) and
//! the boot ids of the controllers. A failed pass never poisons the next: the
//! connection is dropped and re-made, and the memory of a pass that could not
//! classify is left as it was.

pub mod apply;
pub mod boots;
pub mod classify;
pub mod rapid;
pub mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Config, Mode};
use crate::controller::ControllerClient;
use crate::model::{BootRecords, InstanceSnapshot, LiveState, RepairResult, RowState};
use crate::store::{AuditContext, Outcome, Store, StoreError};
use classify::{Decision, Finding, Kind, Memory, PassOptions, Probes};

/// How a pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PassOutcome {
    /// Everything was read and every repair attempted got an answer.
    Ok,
    /// Something could not be read (an instance) or a repair batch failed.
    Partial,
    /// The database could not be read: nothing was classified.
    Failed,
}

impl PassOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            PassOutcome::Ok => "ok",
            PassOutcome::Partial => "partial",
            PassOutcome::Failed => "failed",
        }
    }
}

/// One instance, as this pass saw it.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceReport {
    pub name: String,
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub sessions: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The trusted boot id changed this pass: a confirmed controller restart.
    pub restarted: bool,
    /// What this pass could trust of the list (unset when nothing was read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust: Option<boots::Trust>,
    #[serde(skip)]
    pub counters: Option<crate::model::AppCounters>,
    /// Optional parts of the document that were present but malformed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub payload_problems: Vec<String>,
    #[serde(skip)]
    pub problem_parts: Vec<&'static str>,
    #[serde(skip)]
    pub live_states: BTreeMap<&'static str, u64>,
}

/// A finding and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct FindingResult {
    #[serde(flatten)]
    pub finding: Finding,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Consecutive passes (of this process) that have seen it, and since when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen: Option<classify::Streak>,
}

impl FindingResult {
    /// A repair is due and has not happened yet: it waits (for grace or
    /// confirmations), is guarded or deferred, or failed.
    /// What became of its repair; `None` while it waits, or for a finding
    /// that has no repair.
    pub fn repair_outcome(&self) -> Option<RepairResult> {
        Some(match (&self.finding.decision, self.outcome) {
            (Decision::Repair, Some(Outcome::Repaired)) => RepairResult::Repaired,
            (Decision::Repair, Some(Outcome::Conflict)) => RepairResult::Conflict,
            (Decision::Repair, Some(Outcome::Failed)) => RepairResult::Failed,
            (Decision::Repair, Some(Outcome::Deferred)) => RepairResult::Deferred,
            (Decision::Guarded, _) => RepairResult::Guarded,
            (Decision::Deferred { .. }, _) => RepairResult::Deferred,
            (Decision::Report { .. }, _) => RepairResult::Reported,
            _ => return None,
        })
    }

    pub fn awaits_repair(&self) -> bool {
        self.finding.repair.is_some()
            && match &self.finding.decision {
                Decision::Wait { .. } | Decision::Guarded | Decision::Deferred { .. } => true,
                Decision::Repair => !matches!(self.outcome, Some(Outcome::Repaired)),
                Decision::Report { .. } | Decision::Note => false,
            }
    }
}

/// The part this process played in a pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Role {
    /// `[ha]` is off: the only replica.
    Single,
    /// It held the lease, with this term, for the pass.
    Leader { term: i64, holder: String },
    /// Another replica leads (or none does yet): nothing was fetched, read
    /// or repaired.
    Follower {
        #[serde(skip_serializing_if = "Option::is_none")]
        leader: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        term: Option<i64>,
    },
}

impl Role {
    pub fn is_follower(&self) -> bool {
        matches!(self, Role::Follower { .. })
    }

    /// The leader's term (none without `[ha]`).
    pub fn term(&self) -> Option<i64> {
        match self {
            Role::Single => None,
            Role::Leader { term, .. } => Some(*term),
            Role::Follower { term, .. } => *term,
        }
    }
}

/// What the read stage of a pass hands to classification.
struct Read {
    instances: Vec<InstanceSnapshot>,
    db: crate::model::DbSnapshot,
    shape: classify::TableShape,
    writable: BTreeSet<RowState>,
    /// Observe mode, a dry run or a pause: decide, change nothing.
    read_only: bool,
    /// Controllers whose guard an operator released for this pass.
    released: BTreeSet<String>,
}

/// What the classify stage hands to the apply stage.
struct Classified {
    findings: Vec<Finding>,
    /// Stop intents a gone process left unsettled, and what became of them.
    settle: Vec<classify::SettleIntent>,
    boots: BootRecords,
    /// The boot records differ from the stored ones.
    boots_changed: bool,
}

/// Everything a pass found and did; rendered by `once`, logged by `run`, exported
/// as metrics.
#[derive(Clone, Debug, Serialize)]
pub struct PassReport {
    pub pass_id: String,
    pub role: Role,
    pub started_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub outcome: PassOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The config cannot work against this database (the sessions table does
    /// not fit its mapping): no later pass can be right, so the process stops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    pub mode: Mode,
    pub dry_run: bool,
    pub forced: bool,
    pub database_up: bool,
    pub instances: Vec<InstanceReport>,
    /// Database rows read, by state.
    pub rows_by_state: BTreeMap<&'static str, u64>,
    pub findings: Vec<FindingResult>,
    pub guard_tripped: BTreeMap<String, BTreeSet<Kind>>,
    pub probes: Probes,
    /// Round trips to the database this pass (statements, BEGIN and COMMIT).
    pub db_round_trips: u64,
    /// Sessions created since the previous pass within
    /// `reconcile.rapid_create_window` of another of the same owner.
    pub rapid_creates: u64,
    /// Where the pass spent its time, in seconds.
    pub stages: Stages,
    /// An operator paused sessiond: the pass changed nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused: Option<crate::store::operator::Pause>,
    /// Controllers whose guard an operator released for this pass.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<String>,
    /// Audit rows older than `[audit] retain` pruned by this pass.
    pub audit_pruned: u64,
    /// What the controllers listed for each id with a finding (for
    /// `GET /sessions/{id}`); the lists themselves are not kept.
    #[serde(skip)]
    pub entries: Arc<BTreeMap<String, Vec<crate::explain::LiveEntry>>>,
}

/// Seconds spent in each stage of a pass.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Stages {
    pub fetch: f64,
    pub read: f64,
    pub classify: f64,
    pub apply: f64,
}

impl PassReport {
    /// A report of a pass that starts at `started_at` and has found nothing yet.
    pub fn new(role: Role, mode: Mode, started_at: DateTime<Utc>) -> PassReport {
        PassReport {
            pass_id: uuid::Uuid::new_v4().to_string(),
            role,
            started_at,
            duration_seconds: 0.0,
            outcome: PassOutcome::Ok,
            error: None,
            config_error: None,
            mode,
            dry_run: false,
            forced: false,
            database_up: false,
            instances: Vec::new(),
            rows_by_state: BTreeMap::new(),
            findings: Vec::new(),
            guard_tripped: BTreeMap::new(),
            probes: Probes::default(),
            db_round_trips: 0,
            rapid_creates: 0,
            stages: Stages::default(),
            paused: None,
            released: Vec::new(),
            audit_pruned: 0,
            entries: Arc::default(),
        }
    }

    /// Findings per kind.
    pub fn findings_by_kind(&self) -> BTreeMap<Kind, u64> {
        let mut m = BTreeMap::new();
        for f in &self.findings {
            *m.entry(f.finding.kind).or_default() += 1;
        }
        m
    }

    /// What became of the findings that have a repair, per kind.
    pub fn outcomes_by_kind(&self) -> BTreeMap<(Kind, RepairResult), u64> {
        let mut m = BTreeMap::new();
        for f in &self.findings {
            if let Some(label) = f.repair_outcome() {
                *m.entry((f.finding.kind, label)).or_default() += 1;
            }
        }
        m
    }
}

/// How a pass is asked to behave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassRequest {
    /// Find and report; change nothing anywhere.
    pub dry_run: bool,
    /// Override the mass-repair guard for this pass.
    pub force: bool,
    /// Repair only what has been seen in `confirmations` consecutive passes:
    /// the daemon does; `once` acts on what it sees in its one pass.
    pub require_confirmations: bool,
}

impl PassRequest {
    /// A pass of `sessiond once`: acts on its one pass.
    pub fn once() -> PassRequest {
        PassRequest::default()
    }

    /// A pass of the daemon: findings need their confirmations.
    pub fn daemon() -> PassRequest {
        PassRequest { require_confirmations: true, ..PassRequest::default() }
    }

    pub fn dry_run(self, dry_run: bool) -> PassRequest {
        PassRequest { dry_run, ..self }
    }

    pub fn force(self, force: bool) -> PassRequest {
        PassRequest { force, ..self }
    }
}

/// Holds what lives between passes and runs them.
pub struct Reconciler {
    config: Arc<Config>,
    client: ControllerClient,
    store: Option<Store>,
    memory: Memory,
    /// `None` until read from the database.
    boots: Option<BootRecords>,
    actor: String,
    /// Ticked at every stage of a pass, for the watchdog.
    progress: Option<crate::progress::Progress>,
    /// Round trips to the database, across reconnections.
    round_trips: Arc<AtomicU64>,
    /// The malformed parts each controller's document had last time, so each
    /// is logged once when it appears or changes, not every pass.
    payload_problems: BTreeMap<String, Vec<String>>,
    /// With `[ha]`: the lease; only its holder runs passes.
    lease: Option<crate::lease::Lease>,
    /// The term of the last pass this replica led (none: it followed).
    led_term: Option<i64>,
    /// The rapid creates earlier passes counted.
    rapid: rapid::RapidCreates,
    /// Controllers whose guard an operator released for the next pass.
    released: BTreeSet<String>,
    /// When the audit trail was last pruned (`[audit] retain`).
    pruned_at: Option<Instant>,
    /// An id whose list entries a pass keeps even without a finding
    /// (`sessiond explain`).
    watched: Option<String>,
}

impl Reconciler {
    pub fn new(config: Arc<Config>) -> Result<Reconciler, crate::controller::ControllerError> {
        Ok(Reconciler {
            client: ControllerClient::new(&config.controllers)?,
            config,
            store: None,
            memory: Memory::default(),
            boots: None,
            actor: format!("sessiond@{}", hostname()),
            progress: None,
            round_trips: Arc::new(AtomicU64::new(0)),
            payload_problems: BTreeMap::new(),
            lease: None,
            led_term: None,
            rapid: rapid::RapidCreates::default(),
            released: BTreeSet::new(),
            pruned_at: None,
            watched: None,
        })
    }

    /// Releases the mass-repair guard of `controller` for the next pass
    /// that reaches classification (an operator's `POST /guard/release`).
    pub fn release_guard(&mut self, controller: &str) {
        self.released.insert(controller.to_owned());
    }

    /// Keeps what the controllers list for `id` in every report
    /// ([`PassReport::entries`]), finding or not.
    pub fn watch(&mut self, id: &str) {
        self.watched = Some(id.to_owned());
    }

    /// Runs passes only while `lease` is held, fencing every write by it.
    pub fn set_lease(&mut self, lease: crate::lease::Lease) {
        self.actor = format!("sessiond@{}", lease.holder());
        self.lease = Some(lease);
    }

    pub fn lease(&self) -> Option<&crate::lease::Lease> {
        self.lease.as_ref()
    }

    /// The role of the coming pass, and the fence its writes carry. A replica
    /// that starts leading (again) forgets what earlier passes saw: another
    /// leader may have acted in between, so confirmations start over.
    fn take_role(&mut self) -> (Role, Option<crate::store::Fence>) {
        let Some(lease) = &self.lease else { return (Role::Single, None) };
        let fence = lease.fence();
        let role = match &fence {
            Some(f) => Role::Leader { term: f.term, holder: f.holder.clone() },
            None => {
                let view = lease.view();
                Role::Follower { leader: view.holder, term: view.term }
            }
        };
        let term = fence.as_ref().map(|f| f.term);
        if term != self.led_term {
            self.memory = Memory::default();
            self.boots = None;
            self.rapid = rapid::RapidCreates::default();
            self.led_term = term;
        }
        (role, fence)
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Reports progress through `progress` at every stage of a pass.
    pub fn set_progress(&mut self, progress: crate::progress::Progress) {
        self.progress = Some(progress);
    }

    fn tick(&self) {
        if let Some(p) = &self.progress {
            p.tick();
        }
    }

    /// Takes a new config from the next pass on. Memory is kept: findings keep
    /// their confirmation streaks across a reload.
    pub fn set_config(&mut self, config: Arc<Config>) {
        if config.database != self.config.database || config.sessions != self.config.sessions {
            self.store = None;
        }
        if config.controllers != self.config.controllers {
            match ControllerClient::new(&config.controllers) {
                Ok(client) => self.client = client,
                // The config was validated; a client that still cannot be made
                // leaves the affected controllers unreachable, and says why.
                Err(e) => tracing::error!(error = %e, "cannot set up the controller clients of the new config"),
            }
        }
        self.config = config;
    }

    /// Logs a controller's malformed optional parts (counters, generated_at)
    /// when they appear or change, and when they are gone; they are counted in
    /// a metric every pass.
    fn log_payload_problems(&mut self, instances: &[InstanceReport]) {
        for inst in instances.iter().filter(|i| i.reachable) {
            let before = self.payload_problems.get(&inst.name).cloned().unwrap_or_default();
            if before == inst.payload_problems {
                continue;
            }
            if inst.payload_problems.is_empty() {
                tracing::info!(controller = %inst.name, "the controller's document is well-formed again");
            } else {
                tracing::warn!(
                    controller = %inst.name,
                    problems = %inst.payload_problems.join("; "),
                    "part of the controller's document is malformed and is not used"
                );
            }
            self.payload_problems.insert(inst.name.clone(), inst.payload_problems.clone());
        }
    }

    /// Runs one pass.
    pub async fn pass(&mut self, req: PassRequest) -> PassReport {
        let PassRequest { dry_run, force, .. } = req;
        let started = Instant::now();
        let started_at = Utc::now();
        let cfg = Arc::clone(&self.config);
        let (role, fence) = self.take_role();
        let mut report = PassReport::new(role, cfg.daemon.mode, started_at);
        report.dry_run = dry_run;
        report.forced = force;

        if report.role.is_follower() {
            // Another replica leads: fetch nothing, read nothing, repair nothing.
            report.database_up = self.lease.as_ref().is_some_and(crate::lease::Lease::reaches_database);
            if !report.database_up {
                report.outcome = PassOutcome::Failed;
                report.error = Some("the lease cannot be read or renewed: the database is not reachable".into());
            }
            report.duration_seconds = started.elapsed().as_secs_f64();
            report::log_summary(&report);
            return report;
        }

        // Controllers first, then the database: a row written between the two
        // reads is protected by the snapshot-skew rule, and a session created
        // between them is protected by grace.
        // Each list is read once, and its boot id a few more times over new
        // connections: more while a boot id is unconfirmed (see `boots`).
        let passes = if req.require_confirmations { cfg.reconcile.confirmations } else { 1 };
        let known = self.boots.as_ref();
        let verifications =
            |name: &str, first: &str| boots::verifications(known.and_then(|b| b.get(name)), first, passes);
        let instances = self.client.fetch_all(&cfg.controllers, &cfg.sessions.id_pattern, &verifications).await;
        report.stages.fetch = started.elapsed().as_secs_f64();
        self.tick();
        report.instances = instances.iter().map(instance_report).collect();
        self.log_payload_problems(&report.instances);

        // The plan applies only while the evidence it rests on is fresh.
        let deadline = started + cfg.reconcile.plan_max_age();
        match self.read_and_classify(&cfg, instances, &mut report, req, deadline, fence).await {
            Ok(()) => {}
            Err(StoreError::Fenced { term }) => {
                tracing::warn!(term, "this replica lost the lease during the pass; nothing more was written");
                report.outcome = PassOutcome::Partial;
                report.database_up = true;
                report.error =
                    Some(format!("the lease of term {term} was lost during the pass; the new leader carries on"));
            }
            Err(e) if e.is_fatal() => {
                tracing::error!(error = %e, "the sessions table does not fit the config; no pass can be right");
                report.outcome = PassOutcome::Failed;
                report.database_up = true;
                report.error = Some(e.to_string());
                report.config_error = Some(e.to_string());
                self.store = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "pass failed: database unavailable");
                report.outcome = PassOutcome::Failed;
                report.error = Some(e.to_string());
                self.store = None;
            }
        }
        if report.outcome == PassOutcome::Ok && report.instances.iter().any(|i| !i.reachable) {
            report.outcome = PassOutcome::Partial;
        }
        report.duration_seconds = started.elapsed().as_secs_f64();
        report::log_summary(&report);
        report
    }

    /// The pass after the controllers were fetched: read, classify, apply.
    async fn read_and_classify(
        &mut self,
        cfg: &Arc<Config>,
        instances: Vec<InstanceSnapshot>,
        report: &mut PassReport,
        req: PassRequest,
        deadline: Instant,
        fence: Option<crate::store::Fence>,
    ) -> Result<(), StoreError> {
        let round_trips_before = self.round_trips.load(Ordering::Relaxed);
        let read = self.read(cfg, instances, report, req, fence.clone()).await?;
        let read_only = read.read_only;
        // The lists were fetched from the pass's start on: a stop of a session
        // stopped since then rests on stale evidence (see `Store::open_stops`).
        let evidence_since = read.db.db_clock(report.started_at) - apply::EVIDENCE_MARGIN;
        let classified = self.classify_read(cfg, read, report, req).await;
        if read_only {
            self.boots = Some(classified.boots);
            report.findings = classified
                .findings
                .into_iter()
                .map(|finding| FindingResult { finding, outcome: None, error: None, seen: None })
                .collect();
            annotate(&mut report.findings, &self.memory);
            report.db_round_trips = self.round_trips.load(Ordering::Relaxed) - round_trips_before;
            return Ok(());
        }
        self.apply_classified(cfg, classified, report, deadline, fence, evidence_since).await?;
        report.db_round_trips = self.round_trips.load(Ordering::Relaxed) - round_trips_before;
        self.prune_audit(cfg, report).await;
        Ok(())
    }

    /// Stage 1, read: connects if needed, notes a pause, and reads the rows
    /// of the live sessions and of every live row (one snapshot).
    async fn read(
        &mut self,
        cfg: &Arc<Config>,
        mut instances: Vec<InstanceSnapshot>,
        report: &mut PassReport,
        req: PassRequest,
        fence: Option<crate::store::Fence>,
    ) -> Result<Read, StoreError> {
        if self.store.as_ref().is_none_or(Store::is_closed) {
            self.store = Some(connect(cfg, &self.round_trips).await?);
        }
        let Some(store) = self.store.as_mut() else { unreachable!("the store was connected just above") };
        store.set_fence(fence);
        // Paused by an operator: look, change nothing. Every write checks the
        // pause again, so one set during the pass stops it before its next batch.
        report.paused = store.pause_state().await?;
        let read_only = req.dry_run || cfg.daemon.mode == Mode::Observe || report.paused.is_some();
        let released = std::mem::take(&mut self.released);
        report.released = released.iter().cloned().collect();
        let table = store.table()?;
        normalize_ids(&mut instances, table.id.kind);
        let shape = classify::TableShape { owner: table.owner.is_some(), instance: table.instance.is_some() };
        let writable: BTreeSet<RowState> =
            RowState::ALL.into_iter().filter(|s| table.vocabulary.written(*s).is_some()).collect();
        if self.boots.is_none() {
            self.boots = Some(store.load_boots().await?);
        }
        // Every listed id, in id order: one merge of the lists.
        let lists = instances.iter().filter_map(|i| i.result.as_ref().ok());
        let count = lists.clone().map(|l| l.sessions.len()).sum();
        let runs: Vec<crate::model::IdRun<'_, ()>> = lists
            .map(|l| {
                let sessions = &l.sessions;
                Box::new(sessions.by_id().filter_map(move |i| sessions.id(i).map(|id| (id, ())))) as Box<_>
            })
            .collect();
        let live_ids = crate::model::MergeById::new(runs).map(|(id, _, ())| id);
        let read_started = std::time::Instant::now();
        let window = cfg.reconcile.rapid_create_window;
        let lookback = window.map(|w| rapid::lookback(w, cfg.daemon.interval));
        let db = store.snapshot(live_ids, count, lookback).await?;
        if let (Some(w), Some(lookback), Some(now)) = (window, lookback, db.db_now) {
            report.rapid_creates = self.rapid.observe(&db.recent_creates, w, now, lookback);
            if report.rapid_creates > 0 {
                tracing::warn!(
                    rapid_creates = report.rapid_creates,
                    window = %humantime::format_duration(w),
                    "sessions were created within the window of another session of the same owner: the \
                     duplicate-sessions race"
                );
            }
        }
        report.stages.read = read_started.elapsed().as_secs_f64();
        self.tick();
        report.database_up = true;
        let mut by_state = [0u64; RowState::ALL.len()];
        for state in db.rows.states() {
            by_state[state as usize] += 1;
        }
        for (state, n) in RowState::ALL.into_iter().zip(by_state).filter(|(_, n)| *n > 0) {
            report.rows_by_state.insert(state.as_str(), n);
        }
        Ok(Read { instances, db, shape, writable, read_only, released })
    }

    /// Stage 2, classify: which controller lists to trust (boot ids), then
    /// the pure classifier, on the blocking pool. Touches no database.
    async fn classify_read(
        &mut self,
        cfg: &Arc<Config>,
        read: Read,
        report: &mut PassReport,
        req: PassRequest,
    ) -> Classified {
        let PassRequest { force, require_confirmations, .. } = req;
        let Read { instances, db, shape, writable, read_only, released } = read;
        let now = Utc::now();
        let previous_boots = self.boots.clone().unwrap_or_default();
        let passes = if require_confirmations { cfg.reconcile.confirmations } else { 1 };
        let (boots, observed) = boots::observe(&previous_boots, &instances, now, passes);
        for inst in &mut report.instances {
            inst.restarted = observed.restarted.contains(&inst.name);
            inst.trust = observed.trust.get(&inst.name).cloned();
            if let Some(boots::Trust::Inconsistent { boot_ids }) = &inst.trust {
                inst.reachable = false;
                inst.error = Some(format!(
                    "several processes answer at this URL (boot ids {}): its list is not used until one boot id \
                     holds steadily",
                    boot_ids.join(", ")
                ));
            }
        }
        for name in &observed.became_inconsistent {
            tracing::error!(
                controller = %name,
                "several processes answer at this controller's URL (answers with different boot ids, or a boot id \
                 that came back after another): each has its own sessions, so no list is complete; its rows are \
                 unverifiable until one boot id holds steadily. Run one process per URL, or serve the list from \
                 state all of them share"
            );
        }
        let trust = observed.trust;
        let stoppable: BTreeSet<String> =
            cfg.controllers.iter().filter(|c| c.stop_url.is_some()).map(|c| c.name.clone()).collect();
        // Classifying a large fleet takes CPU time: it runs on the blocking pool
        // so the endpoints keep answering meanwhile. The snapshots move there and
        // are dropped there.
        let classify_started = std::time::Instant::now();
        let memory = std::mem::take(&mut self.memory);
        let for_classify = Arc::clone(cfg);
        let boots_for_classify = boots.clone();
        let watched = self.watched.clone();
        let (classification, entries) = crate::on_blocking_pool(move || {
            let c = classify::classify(&classify::Input {
                now,
                config: &for_classify.reconcile,
                instances: &instances,
                db: &db,
                memory: &memory,
                boots: &boots_for_classify,
                trust: &trust,
                stoppable: &stoppable,
                writable: &writable,
                shape,
                options: PassOptions { read_only, force, require_confirmations },
                released: &released,
            });
            let subjects = c.findings.iter().map(|f| f.subject.as_str()).chain(watched.as_deref());
            let entries = crate::explain::entries_of(subjects, &instances);
            (c, entries)
        })
        .await;
        self.tick();
        report.stages.classify = classify_started.elapsed().as_secs_f64();
        self.memory = classification.memory;
        report.entries = Arc::new(entries);
        report.guard_tripped = classification.guard_tripped;
        report.probes = classification.probes;
        for (inst, kinds) in &report.guard_tripped {
            let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            if force {
                tracing::warn!(controller = %inst, kinds = ?kinds, "mass-repair guard overridden by --force");
            } else {
                tracing::warn!(controller = %inst, kinds = ?kinds, "mass-repair guard tripped: repairs held back");
            }
        }

        let boots_changed = boots.len() != previous_boots.len()
            || boots.iter().any(|(k, v)| previous_boots.get(k).is_none_or(|p| !p.same_persisted(v)));
        Classified { findings: classification.findings, settle: classification.settle, boots, boots_changed }
    }

    /// Stage 3, apply: saves changed boot records, then makes the repairs
    /// the classification decided, within the plan's deadline and the lease.
    async fn apply_classified(
        &mut self,
        cfg: &Arc<Config>,
        classified: Classified,
        report: &mut PassReport,
        deadline: Instant,
        fence: Option<crate::store::Fence>,
        evidence_since: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let Classified { findings, settle, boots, boots_changed } = classified;
        if boots_changed {
            let Some(store) = self.store.as_mut() else { unreachable!("the read stage connected the store") };
            store.save_boots(&boots).await?;
        }
        self.boots = Some(boots);

        let audit =
            AuditContext { actor: self.actor.clone(), pass_id: report.pass_id.clone(), term: report.role.term() };
        let apply_started = std::time::Instant::now();
        let ctx = apply::ApplyContext {
            store: &mut self.store,
            database: &cfg.database,
            round_trips: &self.round_trips,
            client: &self.client,
            config: cfg,
            audit: &audit,
            progress: self.progress.as_ref(),
            deadline,
            evidence_since,
            lease: self.lease.as_ref().filter(|_| fence.is_some()),
            fence,
        };
        let applied = apply::apply(ctx, findings, &settle).await;
        report.stages.apply = apply_started.elapsed().as_secs_f64();
        if applied.any_failed || applied.expired {
            report.outcome = PassOutcome::Partial;
        }
        if applied.expired {
            report.error = Some(format!(
                "the pass took longer than its plan may live ({}); the repairs left were deferred to a fresh pass",
                humantime::format_duration(cfg.reconcile.plan_max_age())
            ));
        }
        report.findings = applied.results;
        annotate(&mut report.findings, &self.memory);
        Ok(())
    }

    /// With `[audit] retain`, deletes audit rows older than that, at most once
    /// an hour and a bounded number per pass, through the one function allowed
    /// to. A failure is logged; it never fails the pass.
    async fn prune_audit(&mut self, cfg: &Config, report: &mut PassReport) {
        const BATCH: i32 = 10_000;
        const BATCHES_PER_PASS: u32 = 10;
        let Some(retain) = cfg.audit.retain else { return };
        if self.pruned_at.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(3600)) {
            return;
        }
        let Some(store) = self.store.as_mut() else { return };
        let mut pruned = 0;
        let mut complete = false;
        for _ in 0..BATCHES_PER_PASS {
            match store.prune_audit(retain, BATCH).await {
                Ok(n) => {
                    pruned += n;
                    if n < BATCH as u64 {
                        complete = true;
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning the audit trail failed; the next pass tries again");
                    return;
                }
            }
        }
        report.audit_pruned = pruned;
        // A backlog goes on next pass; once caught up, once an hour.
        if complete {
            self.pruned_at = Some(Instant::now());
        }
        if pruned > 0 {
            tracing::info!(pruned, retain = %humantime::format_duration(retain), "pruned old audit rows");
        }
    }
}

/// Each finding's streak: how many passes have seen it, since when.
fn annotate(findings: &mut [FindingResult], memory: &Memory) {
    for f in findings {
        f.seen = memory.streaks.get(&(f.finding.kind, f.finding.subject.clone())).copied();
    }
}

/// Connects, checks sessiond's schema, and binds the sessions table (a table
/// that does not fit is fatal).
pub async fn connect(cfg: &Config, round_trips: &Arc<AtomicU64>) -> Result<Store, StoreError> {
    let mut store = Store::connect(&cfg.database).await?;
    store.share_round_trips(Arc::clone(round_trips));
    store.check_schema().await?;
    store.bind_table(&cfg.sessions, &cfg.reconcile.policy).await?;
    Ok(store)
}

/// Ids as the table's id column writes them: a uuid or integer column reads
/// back its canonical text (`A0EE…` as `a0ee…`, `007` as `7`), so the lists'
/// ids are put in that form before they are compared with rows. An id such a
/// column cannot hold is an invalid id.
fn normalize_ids(instances: &mut [InstanceSnapshot], kind: crate::store::mapping::Kind) {
    use crate::store::mapping::Kind;
    let canonical = |id: &str| -> Option<String> {
        match kind {
            Kind::Uuid => uuid::Uuid::parse_str(id).ok().map(|u| u.hyphenated().to_string()),
            Kind::Int => id.parse::<i64>().ok().map(|n| n.to_string()),
            _ => Some(id.to_owned()),
        }
    };
    if !matches!(kind, Kind::Uuid | Kind::Int) {
        return;
    }
    for inst in instances {
        let Ok(list) = &mut inst.result else { continue };
        let mut kept = crate::model::LiveSessions::with_capacity(list.sessions.len(), list.sessions.len() * 48);
        for s in list.sessions.iter() {
            // The canonical form of a valid id of the column's type.
            let kept_as = canonical(s.id)
                .ok_or_else(|| "session_id is not a value of the table's id column type".to_owned())
                .and_then(|c| kept.push_checked(&c, s.owner_id, s.state, s.started_at).map_err(|e| e.to_string()));
            if let Err(problem) = kept_as {
                list.invalid.push(crate::model::InvalidEntry {
                    raw_id: Some(s.id.to_owned()),
                    kind: crate::model::InvalidEntryKind::InvalidId,
                    problem,
                });
            }
        }
        list.sessions = kept;
    }
}

fn instance_report(s: &InstanceSnapshot) -> InstanceReport {
    match &s.result {
        Ok(list) => {
            // Counted by state, then named: a million sessions, one add each.
            let (mut creating, mut active, mut paused) = (0u64, 0u64, 0u64);
            for state in list.sessions.states() {
                *match state {
                    LiveState::Creating => &mut creating,
                    LiveState::Active => &mut active,
                    LiveState::Paused => &mut paused,
                } += 1;
            }
            let counted = [(LiveState::Creating, creating), (LiveState::Active, active), (LiveState::Paused, paused)];
            let live_states: BTreeMap<&'static str, u64> =
                counted.into_iter().filter(|(_, n)| *n > 0).map(|(state, n)| (state.row_state().as_str(), n)).collect();
            InstanceReport {
                name: s.name.clone(),
                reachable: true,
                error: None,
                sessions: list.sessions.len() + list.invalid.len(),
                boot_id: Some(list.boot_id.clone()),
                restarted: false,
                trust: None,
                counters: list.counters.clone(),
                payload_problems: list.problems.iter().map(|p| format!("{}: {}", p.part, p.detail)).collect(),
                problem_parts: list.problems.iter().map(|p| p.part).collect(),
                live_states,
            }
        }
        Err(e) => InstanceReport {
            name: s.name.clone(),
            reachable: false,
            error: Some(e.clone()),
            sessions: 0,
            boot_id: None,
            restarted: false,
            trust: None,
            counters: None,
            payload_problems: Vec::new(),
            problem_parts: Vec::new(),
            live_states: BTreeMap::new(),
        },
    }
}

/// The host name for the audit trail's `actor`.
pub fn hostname() -> String {
    // /proc/sys is hidden under the unit's ProcSubset=pid; /etc/hostname is not.
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// The live-row states, for reports.
pub const LIVE_ROW_STATES: [RowState; 3] = [RowState::Creating, RowState::Active, RowState::Paused];
