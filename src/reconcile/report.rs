//! Rendering a [`PassReport`]: the one summary log line per pass, the human table
//! `once` prints, and its JSON form.

use std::fmt::Write as _;

use super::{PassOutcome, PassReport, Role};
use crate::model::RepairResult;
use crate::reconcile::classify::{Decision, Kind};

/// Logs one structured line for the pass. Per-session details stay at debug.
pub fn log_summary(report: &PassReport) {
    if let Role::Follower { leader, term } = &report.role {
        // Changes of leader are logged by the lease; a follower's turns are quiet.
        tracing::debug!(leader = leader.as_deref().unwrap_or("none"), term = ?term, "following");
        if report.outcome == PassOutcome::Failed {
            tracing::error!(error = report.error.as_deref().unwrap_or(""), "follower cannot reach the database");
        }
        return;
    }
    let up = report.instances.iter().filter(|i| i.reachable).count();
    for f in &report.findings {
        tracing::debug!(
            pass_id = %report.pass_id,
            kind = f.finding.kind.as_str(),
            session_id = %f.finding.subject,
            controller = f.finding.instance.as_deref().unwrap_or(""),
            decision = ?f.finding.decision,
            outcome = ?f.outcome,
            detail = %f.finding.detail,
            "finding"
        );
    }
    let rows: u64 = report.rows_by_state.values().sum();
    if report.outcome == PassOutcome::Failed {
        tracing::error!(
            pass_id = %report.pass_id,
            outcome = report.outcome.as_str(),
            duration_ms = (report.duration_seconds * 1000.0) as u64,
            controllers_up = up,
            controllers = report.instances.len(),
            error = report.error.as_deref().unwrap_or(""),
            "pass failed"
        );
        return;
    }
    let found = report.findings_by_kind();
    let outcomes = report.outcomes_by_kind();
    let duration_ms = (report.duration_seconds * 1000.0) as u64;
    let read_only = report.dry_run || report.mode == crate::config::Mode::Observe || report.paused.is_some();
    if crate::logging::structured() {
        // One field per count, so a log query can filter and sum them.
        let n = |k: Kind| found.get(&k).copied().unwrap_or(0);
        let done = |o: RepairResult| outcomes.iter().filter(|((_, out), _)| *out == o).map(|(_, n)| *n).sum::<u64>();
        tracing::info!(
            pass_id = %report.pass_id,
            outcome = report.outcome.as_str(),
            duration_ms,
            controllers_up = up,
            controllers = report.instances.len(),
            rows,
            findings = report.findings.len(),
            orphaned = n(Kind::Orphaned),
            zombie = n(Kind::Zombie),
            unpersisted = n(Kind::Unpersisted),
            duplicate = n(Kind::Duplicate),
            stuck_creating = n(Kind::StuckCreating),
            drift = n(Kind::Drift),
            invalid_id = n(Kind::InvalidId),
            invalid_entry = n(Kind::InvalidEntry),
            invalid_row = n(Kind::InvalidRow),
            unverifiable = n(Kind::Unverifiable),
            repaired = done(RepairResult::Repaired),
            repair_conflicts = done(RepairResult::Conflict),
            repair_failures = done(RepairResult::Failed),
            repairs_guarded = done(RepairResult::Guarded),
            repairs_deferred = done(RepairResult::Deferred),
            repairs_reported = done(RepairResult::Reported),
            read_only,
            paused = report.paused.is_some(),
            "pass complete"
        );
    } else {
        let findings = kv(found.iter().map(|(k, n)| (k.as_str().to_owned(), *n)));
        let repairs = kv(outcomes.iter().map(|((k, o), n)| (format!("{}.{o}", k.as_str()), *n)));
        tracing::info!(
            pass_id = %report.pass_id,
            outcome = report.outcome.as_str(),
            duration_ms,
            controllers_up = up,
            controllers = report.instances.len(),
            rows,
            findings = %findings,
            repairs = %repairs,
            read_only,
            paused = report.paused.is_some(),
            "pass complete"
        );
    }
}

fn kv(items: impl Iterator<Item = (String, u64)>) -> String {
    let parts: Vec<String> = items.map(|(k, v)| format!("{k}={v}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" ")
    }
}

/// A one-line summary for systemd's `STATUS=`.
pub fn status_line(report: &PassReport) -> String {
    if let Role::Follower { leader, term } = &report.role {
        return match (leader, term) {
            (Some(l), Some(t)) => format!("following: {l} leads (term {t})"),
            _ => "following: no leader yet".into(),
        };
    }
    let up = report.instances.iter().filter(|i| i.reachable).count();
    let findings = kv(report.findings_by_kind().iter().map(|(k, n)| (k.as_str().to_owned(), *n)));
    let repaired: u64 =
        report.outcomes_by_kind().iter().filter(|((_, o), _)| *o == RepairResult::Repaired).map(|(_, n)| *n).sum();
    let mut line = format!(
        "last pass {} in {:.2}s: {up}/{} controllers up, database {}, findings: {findings}, repaired {repaired}",
        report.outcome.as_str(),
        report.duration_seconds,
        report.instances.len(),
        if report.database_up { "up" } else { "DOWN" },
    );
    if !report.guard_tripped.is_empty() {
        line.push_str(", GUARD TRIPPED");
    }
    line
}

/// The report as pretty JSON.
pub fn to_json(report: &PassReport) -> String {
    serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\": \"cannot render report: {e}\"}}"))
}

/// The report as a human-readable table.
pub fn to_table(report: &PassReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "pass {}  outcome={}  {:.3}s{}{}",
        report.pass_id,
        report.outcome.as_str(),
        report.duration_seconds,
        if report.dry_run { "  (dry run: nothing changed)" } else { "" },
        if report.mode == crate::config::Mode::Observe { "  (observe mode: nothing changed)" } else { "" },
    );
    if let Role::Leader { term, holder } = &report.role {
        let _ = writeln!(s, "leader {holder}, term {term}");
    }
    if let Some(e) = &report.error {
        let _ = writeln!(s, "error: {e}");
    }
    if let Some(p) = &report.paused {
        let _ = writeln!(
            s,
            "PAUSED by {} at {}{}: nothing was repaired (POST /resume to resume)",
            p.by,
            p.at.to_rfc3339(),
            p.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
        );
    }
    let _ = writeln!(s, "\nCONTROLLER           STATUS       SESSIONS  NOTE");
    for i in &report.instances {
        let note = match (&i.error, i.restarted) {
            (Some(e), _) => e.clone(),
            (None, true) => "restarted (new boot_id)".into(),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "{:<20} {:<12} {:>8}  {}",
            i.name,
            if i.reachable { "up" } else { "UNREACHABLE" },
            i.sessions,
            note
        );
    }
    let rows: u64 = report.rows_by_state.values().sum();
    let _ = writeln!(s, "database             {:<12} {:>8}", if report.database_up { "up" } else { "DOWN" }, rows);
    for (inst, kinds) in &report.guard_tripped {
        let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        let _ = writeln!(
            s,
            "\nGUARD {} on {inst} for {}{}",
            if report.forced { "overridden (--force)" } else { "TRIPPED" },
            kinds.join(", "),
            if report.forced { "" } else { ": repairs held back; re-run with --force once you have checked" }
        );
    }
    if report.findings.is_empty() {
        let _ = writeln!(s, "\nno findings");
        return s;
    }
    let _ = writeln!(s, "\nKIND             SESSION                                CONTROLLER   RESULT         DETAIL");
    for f in &report.findings {
        let result = match (&f.finding.decision, f.outcome) {
            (_, Some(o)) => format!("{o:?}").to_lowercase(),
            (Decision::Wait { reason }, None) => format!("waiting: {reason}"),
            (Decision::Guarded, None) => "guarded".into(),
            (Decision::Deferred { ahead, .. }, None) => format!("deferred: {ahead} ahead"),
            (Decision::Report { reason }, None) => format!("reported: {reason}"),
            (Decision::Repair, None) => "planned".into(),
            (Decision::Note, None) => "noted".into(),
        };
        let detail = match &f.error {
            Some(e) => format!("{}; error: {e}", f.finding.detail),
            None => f.finding.detail.clone(),
        };
        let _ = writeln!(
            s,
            "{:<16} {:<38} {:<12} {:<14} {}",
            f.finding.kind.as_str(),
            f.finding.subject,
            f.finding.instance.as_deref().unwrap_or("-"),
            result,
            detail
        );
    }
    let _ = writeln!(s);
    for ((kind, outcome), n) in report.outcomes_by_kind() {
        let _ = writeln!(s, "{:<16} {outcome:<10} {n}", kind.as_str());
    }
    s
}
