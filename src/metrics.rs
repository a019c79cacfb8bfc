//! The Prometheus metrics: one struct of typed handles, registered once, updated
//! from each pass's report. A scrape only renders what the last pass recorded; it
//! never waits on the database or a controller.
//!
//! Labels are bounded: finding kinds, outcomes, states and configured controller
//! names. No label ever carries a session id or an owner id. The label for a
//! controller is `controller`, because Prometheus owns `instance` and `job`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::config::Config;
use crate::model::{AppCounters, LookupResult, RepairResult};
use crate::reconcile::classify::Kind;
use crate::reconcile::{PassOutcome, PassReport, LIVE_ROW_STATES};

/// The content type of `/metrics`: the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The optional parts of a controller's document, for payload errors.
const PAYLOAD_PARTS: [&str; 3] = ["counters", "create_seconds", "generated_at"];

/// The `controller` label of a finding that concerns no configured controller.
pub const NO_CONTROLLER: &str = "none";

pub struct Metrics {
    registry: Registry,
    passes: IntCounterVec,
    duration: Histogram,
    last_success: Gauge,
    interval: Gauge,
    controller_up: IntGaugeVec,
    database_up: IntGauge,
    sessions: IntGaugeVec,
    discrepancies: IntGaugeVec,
    repairs: IntCounterVec,
    repair_latency: prometheus::HistogramVec,
    guard: IntGaugeVec,
    inconsistent: IntGaugeVec,
    payload_errors: IntCounterVec,
    probes: IntCounterVec,
    app_created: IntCounterVec,
    app_reused: IntCounterVec,
    app_lookups: IntCounterVec,
    app_cleanups: IntCounterVec,
    leader: IntGauge,
    leader_term: IntGauge,
    leader_transitions: prometheus::IntCounter,
    rapid_creates: prometheus::IntCounter,
    paused: IntGauge,
    mode: IntGaugeVec,
    reload_ok: IntGauge,
    reload_at: prometheus::Gauge,
    controller_restarts: IntCounterVec,
    deferred: IntGaugeVec,
    oldest_finding: prometheus::Gauge,
    audit_pruned: prometheus::IntCounter,
    /// Transitions already counted into `leader_transitions`.
    transitions_seen: Mutex<u64>,
    create_durations: std::sync::Arc<CreateDurations>,
    controllers: Mutex<BTreeSet<String>>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            opts(
                "sessiond_build_info",
                "Always 1; the labels are the running sessiond's version and the git revision it was built from.",
            ),
            &["version", "revision"],
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("SESSIOND_REVISION")]).set(1);
        let m = Metrics {
            passes: IntCounterVec::new(
                opts("sessiond_reconcile_passes_total", "Reconciliation passes, by outcome (ok, partial, failed)."),
                &["outcome"],
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new("sessiond_reconcile_pass_duration_seconds", "Duration of a reconciliation pass.")
                    .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
            )?,
            last_success: Gauge::with_opts(opts(
                "sessiond_reconcile_last_success_timestamp_seconds",
                "Unix time at which the last pass that read the database and classified (ok or partial) ended.",
            ))?,
            interval: Gauge::with_opts(opts(
                "sessiond_reconcile_interval_seconds",
                "The configured time between pass starts.",
            ))?,
            controller_up: IntGaugeVec::new(
                opts(
                    "sessiond_controller_up",
                    "1 if the controller instance answered the last pass with a usable list.",
                ),
                &["controller"],
            )?,
            database_up: IntGauge::with_opts(opts(
                "sessiond_database_up",
                "1 if the last pass could read the database.",
            ))?,
            sessions: IntGaugeVec::new(
                opts(
                    "sessiond_sessions",
                    "Live sessions in the last pass: held by the controllers (source=controller), \
                     or live rows (source=database), by state.",
                ),
                &["source", "state"],
            )?,
            discrepancies: IntGaugeVec::new(
                opts(
                    "sessiond_discrepancies",
                    "Findings of the last pass, by kind and by the configured controller they concern (none: a \
                     row that names no configured controller, or a finding of the whole fleet).",
                ),
                &["kind", "controller"],
            )?,
            repairs: IntCounterVec::new(
                opts(
                    "sessiond_repairs_total",
                    "What became of findings that have a repair: repaired, conflict (the row changed since it was \
                     read), failed, guarded (held back by the mass-repair guard), reported (policy, observe mode \
                     or dry run) or deferred (left for a later pass); controller as on sessiond_discrepancies.",
                ),
                &["kind", "outcome", "controller"],
            )?,
            repair_latency: prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "sessiond_repair_latency_seconds",
                    "From the pass that first saw a finding to the pass that repaired it, by kind.",
                )
                .buckets(vec![1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4.0 * 3600.0]),
                &["kind"],
            )?,
            guard: IntGaugeVec::new(
                opts(
                    "sessiond_repair_guard_tripped",
                    "1 if the mass-repair guard held back repairs for the controller in the last pass.",
                ),
                &["controller"],
            )?,
            inconsistent: IntGaugeVec::new(
                opts(
                    "sessiond_controller_inconsistent",
                    "1 if several processes answer at the controller's URL (boot ids that disagree, or one that came \
                     back after another): its list is not used and its rows are unverifiable.",
                ),
                &["controller"],
            )?,
            payload_errors: IntCounterVec::new(
                opts(
                    "sessiond_controller_payload_errors_total",
                    "Controller documents whose optional part (counters, create_seconds, generated_at) was present but malformed; \
                     the list itself was used.",
                ),
                &["controller", "part"],
            )?,
            probes: IntCounterVec::new(
                opts(
                    "sessiond_lookup_probes_total",
                    "Every live controller session looked up in the database each pass, as the application's API \
                     would: found, or not_found with the reason; age is young for sessions younger than grace (the \
                     creation race), old otherwise.",
                ),
                &["result", "reason", "age"],
            )?,
            app_created: IntCounterVec::new(
                opts(
                    "sessiond_app_sessions_created_total",
                    "Sessions the application created, as its controller reports.",
                ),
                &["controller"],
            )?,
            app_reused: IntCounterVec::new(
                opts(
                    "sessiond_app_sessions_reused_total",
                    "Sessions the application reused instead of creating, as its controller reports.",
                ),
                &["controller"],
            )?,
            app_lookups: IntCounterVec::new(
                opts(
                    "sessiond_app_lookups_total",
                    "Session lookups the application answered, as its controller reports.",
                ),
                &["controller", "result", "reason"],
            )?,
            app_cleanups: IntCounterVec::new(
                opts("sessiond_app_cleanups_total", "Session cleanups the application ran, as its controller reports."),
                &["controller", "outcome"],
            )?,
            leader: IntGauge::with_opts(opts(
                "sessiond_leader",
                "1 if this replica runs the passes: it holds the lease, or [ha] is off. 0 on a follower.",
            ))?,
            leader_term: IntGauge::with_opts(opts(
                "sessiond_leader_term",
                "The lease's term as this replica last saw it (it increases on every takeover); 0 without [ha].",
            ))?,
            leader_transitions: prometheus::IntCounter::with_opts(opts(
                "sessiond_leader_transitions_total",
                "Times this replica became, or stopped being, the leader.",
            ))?,
            rapid_creates: prometheus::IntCounter::with_opts(opts(
                "sessiond_rapid_creates_total",
                "Sessions created within reconcile.rapid_create_window of another session of the same owner: the \
                 duplicate-sessions race.",
            ))?,
            paused: IntGauge::with_opts(opts(
                "sessiond_paused",
                "Whether an operator has paused sessiond (POST /pause): 1 while passes look and change nothing.",
            ))?,
            deferred: IntGaugeVec::new(
                opts(
                    "sessiond_repairs_deferred",
                    "Repairs the last pass deferred to later ones, by kind: the backlog beyond \
                     reconcile.max_repairs_per_pass, drained oldest first.",
                ),
                &["kind"],
            )?,
            oldest_finding: prometheus::Gauge::with_opts(opts(
                "sessiond_oldest_finding_age_seconds",
                "How long the oldest finding still waiting for a repair (waiting, guarded, deferred or failed) has \
                 been seen, at the end of the last pass; 0 when there is none.",
            ))?,
            audit_pruned: prometheus::IntCounter::with_opts(opts(
                "sessiond_audit_pruned_total",
                "Audit rows deleted because they were older than [audit] retain.",
            ))?,
            mode: IntGaugeVec::new(
                opts("sessiond_mode", "1 for the mode the config sets (repair or observe), 0 for the other."),
                &["mode"],
            )?,
            reload_ok: IntGauge::with_opts(opts(
                "sessiond_config_last_reload_successful",
                "Whether the last config reload (SIGHUP) was applied: 1, or 0 if it was rejected and the running \
                 config stays (a restart would then fail).",
            ))?,
            reload_at: prometheus::Gauge::with_opts(opts(
                "sessiond_config_last_reload_success_timestamp_seconds",
                "Unix time of the last config load that was applied (start-up or reload).",
            ))?,
            controller_restarts: IntCounterVec::new(
                opts(
                    "sessiond_controller_restarts_total",
                    "Confirmed restarts of a controller (a new boot id that held steadily).",
                ),
                &["controller"],
            )?,
            transitions_seen: Mutex::new(0),
            create_durations: std::sync::Arc::new(CreateDurations::new()?),
            controllers: Mutex::new(BTreeSet::new()),
            registry,
        };
        m.leader.set(1);
        m.registry.register(Box::new(build_info))?;
        m.registry.register(Box::new(m.passes.clone()))?;
        m.registry.register(Box::new(m.duration.clone()))?;
        m.registry.register(Box::new(m.last_success.clone()))?;
        m.registry.register(Box::new(m.interval.clone()))?;
        m.registry.register(Box::new(m.controller_up.clone()))?;
        m.registry.register(Box::new(m.database_up.clone()))?;
        m.registry.register(Box::new(m.sessions.clone()))?;
        m.registry.register(Box::new(m.discrepancies.clone()))?;
        m.registry.register(Box::new(m.repairs.clone()))?;
        m.registry.register(Box::new(m.repair_latency.clone()))?;
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        m.registry.register(Box::new(m.guard.clone()))?;
        m.registry.register(Box::new(m.inconsistent.clone()))?;
        m.registry.register(Box::new(m.payload_errors.clone()))?;
        m.registry.register(Box::new(m.probes.clone()))?;
        m.registry.register(Box::new(m.app_created.clone()))?;
        m.registry.register(Box::new(m.app_reused.clone()))?;
        m.registry.register(Box::new(m.app_lookups.clone()))?;
        m.registry.register(Box::new(m.app_cleanups.clone()))?;
        m.registry.register(Box::new(m.leader.clone()))?;
        m.registry.register(Box::new(m.leader_term.clone()))?;
        m.registry.register(Box::new(m.leader_transitions.clone()))?;
        m.registry.register(Box::new(m.rapid_creates.clone()))?;
        m.registry.register(Box::new(m.paused.clone()))?;
        m.registry.register(Box::new(m.mode.clone()))?;
        m.registry.register(Box::new(m.reload_ok.clone()))?;
        m.registry.register(Box::new(m.reload_at.clone()))?;
        m.registry.register(Box::new(m.controller_restarts.clone()))?;
        m.reload_ok.set(1);
        m.reload_at.set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        m.registry.register(Box::new(m.deferred.clone()))?;
        m.registry.register(Box::new(m.oldest_finding.clone()))?;
        m.registry.register(Box::new(m.audit_pruned.clone()))?;
        m.registry.register(Box::new(SharedCollector(std::sync::Arc::clone(&m.create_durations))))?;

        // Every bounded series exists from the start, so rate() and absent()
        // behave before the first event of each kind.
        for outcome in [PassOutcome::Ok, PassOutcome::Partial, PassOutcome::Failed] {
            m.passes.with_label_values(&[outcome.as_str()]);
        }
        m.add_controller_series(NO_CONTROLLER);
        for kind in Kind::REPAIRABLE {
            m.repair_latency.with_label_values(&[kind.as_str()]);
        }
        for what in LookupResult::ALL {
            for age in ["young", "old"] {
                m.probes.with_label_values(&[what.result(), what.reason(), age]);
            }
        }
        for source in ["controller", "database"] {
            for state in LIVE_ROW_STATES {
                m.sessions.with_label_values(&[source, state.as_str()]).set(0);
            }
        }
        Ok(m)
    }

    /// Applies a (re)loaded config: the interval, and the set of controller labels
    /// (series of controllers no longer configured are removed).
    pub fn observe_config(&self, cfg: &Config) {
        self.interval.set(cfg.daemon.interval.as_secs_f64());
        for mode in [crate::config::Mode::Repair, crate::config::Mode::Observe] {
            self.mode.with_label_values(&[mode.as_str()]).set(i64::from(mode == cfg.daemon.mode));
        }
        let wanted: BTreeSet<String> = cfg.controllers.iter().map(|c| c.name.clone()).collect();
        let mut known = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        for gone in known.difference(&wanted) {
            let _ = self.controller_up.remove_label_values(&[gone]);
            let _ = self.guard.remove_label_values(&[gone]);
            let _ = self.inconsistent.remove_label_values(&[gone]);
            for part in PAYLOAD_PARTS {
                let _ = self.payload_errors.remove_label_values(&[gone, part]);
            }
            let _ = self.controller_restarts.remove_label_values(&[gone]);
            self.remove_app_series(gone);
            self.remove_finding_series(gone);
        }
        for name in wanted.difference(&known) {
            self.add_controller_series(name);
            self.controller_up.with_label_values(&[name]).set(0);
            self.guard.with_label_values(&[name]).set(0);
            self.inconsistent.with_label_values(&[name]).set(0);
            self.controller_restarts.with_label_values(&[name]);
            for part in PAYLOAD_PARTS {
                self.payload_errors.with_label_values(&[name, part]);
            }
        }
        *known = wanted;
    }

    /// The discrepancy and repair series of one `controller` label, at zero,
    /// so that increase() and absent() behave before the first event.
    fn add_controller_series(&self, controller: &str) {
        for kind in Kind::ALL {
            self.discrepancies.with_label_values(&[kind.as_str(), controller]).set(0);
        }
        for kind in Kind::REPAIRABLE {
            for outcome in RepairResult::ALL {
                self.repairs.with_label_values(&[kind.as_str(), outcome.as_str(), controller]);
            }
        }
    }

    fn remove_finding_series(&self, controller: &str) {
        for kind in Kind::ALL {
            let _ = self.discrepancies.remove_label_values(&[kind.as_str(), controller]);
        }
        for kind in Kind::REPAIRABLE {
            for outcome in RepairResult::ALL {
                let _ = self.repairs.remove_label_values(&[kind.as_str(), outcome.as_str(), controller]);
            }
        }
    }

    /// The application's counters of one controller, which only the leader
    /// exports.
    fn remove_app_series(&self, controller: &str) {
        let _ = self.app_created.remove_label_values(&[controller]);
        let _ = self.app_reused.remove_label_values(&[controller]);
        for what in LookupResult::ALL {
            let _ = self.app_lookups.remove_label_values(&[controller, what.result(), what.reason()]);
        }
        for outcome in ["succeeded", "failed"] {
            let _ = self.app_cleanups.remove_label_values(&[controller, outcome]);
        }
        self.create_durations.forget(controller);
    }

    /// A config reload was applied (`true`) or rejected.
    pub fn observe_reload(&self, applied: bool) {
        self.reload_ok.set(i64::from(applied));
        if applied {
            self.reload_at.set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        }
    }

    /// Follows the lease, at scrape time: whether this replica leads now.
    pub fn observe_lease(&self, lease: &crate::lease::Lease) {
        let view = lease.view();
        self.leader.set(i64::from(lease.is_valid_now()));
        self.leader_term.set(view.term.unwrap_or(0));
        let now = lease.transitions();
        let mut seen = self.transitions_seen.lock().unwrap_or_else(|p| p.into_inner());
        self.leader_transitions.inc_by(now.saturating_sub(*seen));
        *seen = now.max(*seen);
    }

    /// A follower's turn: it saw nothing, so it exports nothing of the fleet;
    /// the leader does. Only its own reach of the database is its to report.
    fn record_follower(&self, report: &PassReport) {
        self.database_up.set(i64::from(report.database_up));
        self.paused.set(0);
        self.oldest_finding.set(0.0);
        for kind in Kind::REPAIRABLE {
            let _ = self.deferred.remove_label_values(&[kind.as_str()]);
        }
        let known = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        for name in known.iter() {
            let _ = self.controller_up.remove_label_values(&[name]);
            let _ = self.guard.remove_label_values(&[name]);
            let _ = self.inconsistent.remove_label_values(&[name]);
            self.remove_app_series(name);
            for kind in Kind::ALL {
                let _ = self.discrepancies.remove_label_values(&[kind.as_str(), name]);
            }
        }
        for kind in Kind::ALL {
            let _ = self.discrepancies.remove_label_values(&[kind.as_str(), NO_CONTROLLER]);
        }
        for source in ["controller", "database"] {
            for state in LIVE_ROW_STATES {
                let _ = self.sessions.remove_label_values(&[source, state.as_str()]);
            }
        }
    }

    /// Records one pass.
    pub fn record_pass(&self, report: &PassReport, ended_unix: f64) {
        if report.role.is_follower() {
            self.record_follower(report);
            return;
        }
        self.passes.with_label_values(&[report.outcome.as_str()]).inc();
        self.duration.observe(report.duration_seconds);
        self.database_up.set(i64::from(report.database_up));
        if report.outcome != PassOutcome::Failed {
            self.last_success.set(ended_unix);
        }
        for inst in &report.instances {
            self.controller_up.with_label_values(&[&inst.name]).set(i64::from(inst.reachable));
            self.guard.with_label_values(&[&inst.name]).set(i64::from(report.guard_tripped.contains_key(&inst.name)));
            if inst.reachable || inst.trust.is_some() {
                let inconsistent = matches!(inst.trust, Some(crate::reconcile::boots::Trust::Inconsistent { .. }));
                self.inconsistent.with_label_values(&[&inst.name]).set(i64::from(inconsistent));
            }
            if inst.restarted {
                self.controller_restarts.with_label_values(&[&inst.name]).inc();
            }
            for part in &inst.problem_parts {
                self.payload_errors.with_label_values(&[inst.name.as_str(), part]).inc();
            }
            if let Some(c) = &inst.counters {
                self.record_app_counters(&inst.name, c);
            }
        }
        if report.outcome == PassOutcome::Failed {
            // Nothing was classified: keep the last known picture of the fleet.
            return;
        }
        for state in LIVE_ROW_STATES {
            let s = state.as_str();
            let held: u64 = report.instances.iter().map(|i| i.live_states.get(s).copied().unwrap_or(0)).sum();
            self.sessions.with_label_values(&["controller", s]).set(held as i64);
            let rows = report.rows_by_state.get(s).copied().unwrap_or(0);
            self.sessions.with_label_values(&["database", s]).set(rows as i64);
        }
        let ended = report.started_at + chrono::Duration::milliseconds((report.duration_seconds * 1000.0) as i64);
        self.record_findings(report, ended);
        let (all, young) = (&report.probes.all, &report.probes.young);
        for what in LookupResult::ALL {
            let (total, young) = (all.get(what), young.get(what));
            self.probes.with_label_values(&[what.result(), what.reason(), "young"]).inc_by(young);
            self.probes.with_label_values(&[what.result(), what.reason(), "old"]).inc_by(total.saturating_sub(young));
        }
        self.rapid_creates.inc_by(report.rapid_creates);
        self.paused.set(i64::from(report.paused.is_some()));
        self.audit_pruned.inc_by(report.audit_pruned);
        let outcomes = report.outcomes_by_kind();
        for kind in Kind::REPAIRABLE {
            let n = outcomes.get(&(kind, RepairResult::Deferred)).copied().unwrap_or(0);
            self.deferred.with_label_values(&[kind.as_str()]).set(n as i64);
        }
        let oldest = report
            .findings
            .iter()
            .filter(|f| f.awaits_repair())
            .filter_map(|f| f.seen.map(|s| s.first_seen))
            .min()
            .map_or(0.0, |first| (ended - first).num_milliseconds().max(0) as f64 / 1000.0);
        self.oldest_finding.set(oldest);
    }

    /// Discrepancies, repair outcomes and repair latencies of one pass, by
    /// kind and by the configured controller each finding concerns.
    fn record_findings(&self, report: &PassReport, ended: chrono::DateTime<chrono::Utc>) {
        let known = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        let label = |instance: Option<&String>| -> &str {
            match instance.and_then(|name| known.get(name)) {
                Some(name) => name.as_str(),
                None => NO_CONTROLLER,
            }
        };
        let mut found: BTreeMap<(Kind, &str), i64> = BTreeMap::new();
        for f in &report.findings {
            let controller = label(f.finding.instance.as_ref());
            *found.entry((f.finding.kind, controller)).or_default() += 1;
            let Some(outcome) = f.repair_outcome() else { continue };
            self.repairs.with_label_values(&[f.finding.kind.as_str(), outcome.as_str(), controller]).inc();
            if let (RepairResult::Repaired, Some(seen)) = (outcome, f.seen) {
                let waited = (ended - seen.first_seen).num_milliseconds().max(0) as f64 / 1000.0;
                self.repair_latency.with_label_values(&[f.finding.kind.as_str()]).observe(waited);
            }
        }
        for controller in known.iter().map(String::as_str).chain([NO_CONTROLLER]) {
            for kind in Kind::ALL {
                let n = found.get(&(kind, controller)).copied().unwrap_or(0);
                self.discrepancies.with_label_values(&[kind.as_str(), controller]).set(n);
            }
        }
    }

    /// Re-exports the application's cumulative counters exactly as the
    /// controller reports them. They go back to zero only when the controller
    /// restarts, which Prometheus reads as the counter reset it is; a restart
    /// or failover of sessiond changes nothing, since any replica exports the
    /// same values (the rules take the max over replicas before rate()).
    fn record_app_counters(&self, controller: &str, now: &AppCounters) {
        if let Some(h) = &now.create_seconds {
            self.create_durations.record(controller, h);
        }
        let set = |counter: prometheus::IntCounter, value: u64| {
            let current = counter.get();
            if value < current {
                counter.reset();
                counter.inc_by(value);
            } else {
                counter.inc_by(value - current);
            }
        };
        set(self.app_created.with_label_values(&[controller]), now.sessions_created);
        set(self.app_reused.with_label_values(&[controller]), now.sessions_reused);
        for what in LookupResult::ALL {
            set(self.app_lookups.with_label_values(&[controller, what.result(), what.reason()]), now.lookups(what));
        }
        set(self.app_cleanups.with_label_values(&[controller, "succeeded"]), now.cleanups_succeeded);
        set(self.app_cleanups.with_label_values(&[controller, "failed"]), now.cleanups_failed);
    }

    /// The exposition text.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        buf
    }
}

/// `sessiond_app_session_create_duration_seconds`: the controllers' creation
/// time histograms, re-exported as the controllers report them (see
/// `record_app_counters`).
struct CreateDurations {
    desc: prometheus::core::Desc,
    by_controller: Mutex<HashMap<String, crate::model::CreateHistogram>>,
}

impl CreateDurations {
    fn new() -> Result<CreateDurations, prometheus::Error> {
        Ok(CreateDurations {
            desc: prometheus::core::Desc::new(
                "sessiond_app_session_create_duration_seconds".into(),
                "How long the application took to create a session, as its controller reports \
                 (counters.create_seconds)."
                    .into(),
                vec!["controller".into()],
                HashMap::new(),
            )?,
            by_controller: Mutex::new(HashMap::new()),
        })
    }

    fn record(&self, controller: &str, now: &crate::model::CreateHistogram) {
        self.by_controller.lock().unwrap_or_else(|p| p.into_inner()).insert(controller.to_owned(), now.clone());
    }

    fn forget(&self, controller: &str) {
        self.by_controller.lock().unwrap_or_else(|p| p.into_inner()).remove(controller);
    }
}

impl prometheus::core::Collector for CreateDurations {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto;
        let all = self.by_controller.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&String> = all.keys().collect();
        names.sort();
        let mut metrics = Vec::with_capacity(names.len());
        for name in names {
            let Some(acc) = all.get(name) else { continue };
            let mut h = proto::Histogram::default();
            h.set_sample_count(acc.count);
            h.set_sample_sum(acc.sum);
            h.set_bucket(
                acc.bounds
                    .iter()
                    .zip(&acc.cumulative)
                    .map(|(b, c)| {
                        let mut bucket = proto::Bucket::default();
                        bucket.set_upper_bound(*b);
                        bucket.set_cumulative_count(*c);
                        bucket
                    })
                    .collect(),
            );
            let mut label = proto::LabelPair::default();
            label.set_name("controller".into());
            label.set_value(name.clone());
            let mut m = proto::Metric::from_label(vec![label]);
            m.set_histogram(h);
            metrics.push(m);
        }
        if metrics.is_empty() {
            return Vec::new();
        }
        let mut family = proto::MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        family.set_metric(metrics);
        vec![family]
    }
}

/// A collector the registry owns while the metrics keep a handle to it.
struct SharedCollector(std::sync::Arc<CreateDurations>);

impl prometheus::core::Collector for SharedCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}
