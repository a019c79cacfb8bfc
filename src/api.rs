//! The operator's API: `GET /findings` and `GET /sessions/{id}` (the last
//! pass's findings, from memory, with one session's row and audit history
//! read from the database), and, with `[daemon] admin = true`, `POST /pass`,
//! `/pause`, `/resume` and `/guard/release`. No endpoint changes a row: each
//! action is a request to the daemon or the pause, and each is audited with
//! the authenticated user as its actor.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::{Response, StatusCode};

use crate::explain::{Explanation, FindingView, LiveEntry, PassRef, AUDIT_ROWS};
use crate::http::{text, unauthorized, Shared};
use crate::reconcile::classify::Kind;
use crate::reconcile::{FindingResult, PassReport, Role};

/// `/findings` answers at most this many findings (`limit`).
const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 1_000;

/// What the last pass found, as the API serves it.
pub struct LastFindings {
    pass_id: String,
    started_at: DateTime<Utc>,
    outcome: &'static str,
    role: Role,
    findings: Vec<FindingResult>,
    guard_tripped: BTreeMap<String, bool>,
    unreachable: BTreeMap<String, String>,
    entries: Arc<BTreeMap<String, Vec<LiveEntry>>>,
    paused: bool,
}

impl LastFindings {
    pub fn of(r: &PassReport) -> LastFindings {
        LastFindings {
            pass_id: r.pass_id.clone(),
            started_at: r.started_at,
            outcome: r.outcome.as_str(),
            role: r.role.clone(),
            findings: r.findings.clone(),
            guard_tripped: r.guard_tripped.keys().map(|k| (k.clone(), true)).collect(),
            unreachable: r
                .instances
                .iter()
                .filter(|i| !i.reachable)
                .map(|i| (i.name.clone(), i.error.clone().unwrap_or_else(|| "unreachable".into())))
                .collect(),
            entries: Arc::clone(&r.entries),
            paused: r.paused.is_some(),
        }
    }

    fn view(&self, f: &FindingResult) -> FindingView {
        let tripped = f.finding.instance.as_ref().is_some_and(|i| self.guard_tripped.contains_key(i));
        FindingView::of(f, tripped)
    }

    fn describe(&self) -> String {
        let mut s = format!("pass {} at {}, {}", self.pass_id, self.started_at.to_rfc3339(), self.outcome);
        if self.paused {
            s.push_str(", paused: nothing was repaired");
        }
        if self.role.is_follower() {
            s.push_str(", as a follower: the leader runs the passes, ask it");
        }
        s
    }
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    text(status, "application/json", serde_json::to_vec_pretty(v).unwrap_or_else(|_| b"{}".to_vec()))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// `a=b&c=d`, percent-decoded; a key given twice keeps the last value.
fn query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode_form(k), decode_form(v))
        })
        .collect()
}

/// A query value: percent-decoded, and `+` as a space, as forms send it.
fn decode_form(s: &str) -> String {
    decode(&s.replace('+', "%20"))
}

/// Percent-decoding (a path segment: `+` stays `+`); invalid escapes stay as
/// they are.
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The API's own connection, made (checked and bound) when there is none
/// or it has closed.
async fn connected<'a>(
    db: &'a mut Option<crate::store::Store>,
    cfg: &crate::config::Config,
) -> Result<&'a mut crate::store::Store, crate::store::StoreError> {
    if db.as_ref().is_none_or(crate::store::Store::is_closed) {
        let round_trips = Arc::new(std::sync::atomic::AtomicU64::new(0));
        *db = Some(crate::reconcile::connect(cfg, &round_trips).await?);
    }
    match db {
        Some(store) => Ok(store),
        None => unreachable!("connected just above"),
    }
}

/// `GET /findings[?kind=&controller=&limit=]`: the last pass's findings,
/// from memory, at most `limit`, with how many were left out.
pub fn findings(shared: &Shared, q: Option<&str>) -> Response<Full<Bytes>> {
    let q = query(q);
    let kind = match q.get("kind") {
        None => None,
        Some(k) => match Kind::ALL.into_iter().find(|x| x.as_str() == k) {
            Some(k) => Some(k),
            None => {
                let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                return error(StatusCode::BAD_REQUEST, format!("kind {k:?} is not one of {}", known.join(", ")));
            }
        },
    };
    let controller = q.get("controller");
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => DEFAULT_LIMIT,
        Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => return error(StatusCode::BAD_REQUEST, format!("limit must be a number from 1 to {MAX_LIMIT}")),
    };
    let Some(last) = shared.api.read().unwrap_or_else(|p| p.into_inner()).clone() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no pass has completed yet");
    };
    let matching: Vec<&FindingResult> = last
        .findings
        .iter()
        .filter(|f| kind.is_none_or(|k| f.finding.kind == k))
        .filter(|f| controller.is_none_or(|c| f.finding.instance.as_ref() == Some(c)))
        .collect();
    let views: Vec<FindingView> = matching.iter().take(limit).map(|f| last.view(f)).collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "pass": last.describe(),
            "pass_id": last.pass_id,
            "started_at": last.started_at,
            "outcome": last.outcome,
            "role": last.role,
            "total": last.findings.len(),
            "matched": matching.len(),
            "returned": views.len(),
            "left_out": matching.len() - views.len(),
            "findings": views,
        }),
    )
}

/// `GET /sessions/{id}`: what `sessiond explain` prints, as JSON. The
/// finding comes from the last pass (memory); the row and the audit history
/// from the database, read with the API's own connection.
pub async fn session(shared: &Shared, raw: &str) -> Response<Full<Bytes>> {
    let id = decode(raw);
    let cfg = Arc::clone(&shared.config.read().unwrap_or_else(|p| p.into_inner()));
    if !crate::explain::valid_id(&id, &cfg.sessions.id_pattern) {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({
                "error": "not a session id: it does not match sessions.id_pattern (or is too long, or has a control character)",
                "reason": crate::model::LookupResult::InvalidFormat.reason(),
            }),
        );
    }
    let last = shared.api.read().unwrap_or_else(|p| p.into_inner()).clone();
    let (row, audit, database_error) = {
        let mut db = shared.db.lock().await;
        let read = async { connected(&mut db, &cfg).await?.explain(&id, AUDIT_ROWS).await };
        match read.await {
            Ok((row, audit)) => (row, audit, None),
            Err(e) => {
                *db = None;
                (None, Vec::new(), Some(e.to_string()))
            }
        }
    };
    let explanation = explanation(&id, last.as_deref(), row, audit);
    let mut doc = serde_json::to_value(&explanation).unwrap_or_default();
    if let Some(e) = database_error {
        doc["database_error"] = e.into();
    }
    json(StatusCode::OK, &doc)
}

/// One session from the daemon's last pass and a read of the database.
pub fn explanation(
    id: &str,
    last: Option<&LastFindings>,
    row: Option<crate::store::operator::RowView>,
    audit: Vec<crate::store::operator::AuditView>,
) -> Explanation {
    let Some(last) = last else {
        return Explanation {
            session_id: id.to_owned(),
            row,
            controllers: Vec::new(),
            controllers_source: "no pass has completed yet".into(),
            findings: Vec::new(),
            pass: PassRef {
                pass_id: None,
                started_at: None,
                description: "no pass has completed yet".into(),
                unreachable: BTreeMap::new(),
            },
            audit,
        };
    };
    let findings: Vec<FindingView> =
        last.findings.iter().filter(|f| f.finding.subject == id).map(|f| last.view(f)).collect();
    let (controllers, source) = match last.entries.get(id) {
        Some(e) => (e.clone(), format!("as listed at pass {}", last.pass_id)),
        None if findings.is_empty() => (
            Vec::new(),
            "not kept: the last pass found nothing to say about this id (a live row is held as it says), and the \
             daemon keeps the lists' entries only for sessions with findings; sessiond explain fetches them"
                .into(),
        ),
        None => (Vec::new(), format!("listed by no controller at pass {}", last.pass_id)),
    };
    Explanation {
        session_id: id.to_owned(),
        row,
        controllers,
        controllers_source: source,
        findings,
        pass: PassRef {
            pass_id: Some(last.pass_id.clone()),
            started_at: Some(last.started_at),
            description: last.describe(),
            unreachable: last.unreachable.clone(),
        },
        audit,
    }
}

/// The paths of the admin endpoints (POST only).
pub const ADMIN_PATHS: [&str; 4] = ["/pass", "/pause", "/resume", "/guard/release"];

/// The admin endpoints.
pub async fn admin(shared: &Shared, path: &str, q: Option<&str>, header: Option<&str>) -> Response<Full<Bytes>> {
    let cfg = Arc::clone(&shared.config.read().unwrap_or_else(|p| p.into_inner()));
    if !cfg.daemon.admin {
        return error(
            StatusCode::FORBIDDEN,
            "the admin endpoints are off: set [daemon] admin = true (with basic auth in daemon.web_config_file, \
             unless daemon.listen is a loopback address)",
        );
    }
    let Some(user) = shared.web().user(header).await else { return unauthorized() };
    let actor = match user {
        Some(u) => format!("admin:{u}"),
        None => format!("admin:anonymous@{}", cfg.daemon.listen),
    };
    let q = query(q);
    let reason = q.get("reason").filter(|r| !r.is_empty()).map(|r| r.chars().take(500).collect::<String>());
    if path == "/guard/release" {
        let Some(controller) = q.get("controller") else {
            return error(StatusCode::BAD_REQUEST, "name the controller: /guard/release?controller=NAME");
        };
        if !cfg.controllers.iter().any(|c| &c.name == controller) {
            return error(StatusCode::BAD_REQUEST, format!("{controller:?} is not a configured controller"));
        }
        if let Some(kind) = q.get("kind").filter(|k| k.as_str() != Kind::Orphaned.as_str()) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("only orphan repairs are held back by the guard; {kind:?} is never guarded"),
            );
        }
    }
    let mut db = shared.db.lock().await;
    let result = async {
        let store = connected(&mut db, &cfg).await?;
        match path {
            "/pause" => store
                .set_pause(true, &actor, reason.as_deref())
                .await
                .map(|changed| serde_json::json!({ "paused": true, "changed": changed, "actor": actor })),
            "/resume" => store
                .set_pause(false, &actor, reason.as_deref())
                .await
                .map(|changed| serde_json::json!({ "paused": false, "changed": changed, "actor": actor })),
            "/pass" => store
                .audit_action("pass", &actor, &serde_json::json!({ "reason": reason }))
                .await
                .map(|()| serde_json::json!({ "accepted": "a pass starts now", "actor": actor })),
            _ => {
                let controller = q.get("controller").cloned().unwrap_or_default();
                store
                    .audit_action(
                        "guard_release",
                        &actor,
                        &serde_json::json!({ "controller": controller, "kind": "orphaned", "reason": reason }),
                    )
                    .await
                    .map(|()| {
                        serde_json::json!({
                            "released": controller,
                            "for": "the next pass: its orphan repairs go through even if the guard trips",
                            "actor": actor,
                        })
                    })
            }
        }
    }
    .await;
    match result {
        Ok(body) => {
            drop(db);
            match path {
                "/pass" => shared.pass_now.notify_one(),
                "/guard/release" => {
                    if let Some(c) = q.get("controller") {
                        shared.releases.lock().unwrap_or_else(|p| p.into_inner()).insert(c.clone());
                    }
                }
                _ => {}
            }
            tracing::warn!(actor = %actor, action = %path, "operator action");
            let status = if matches!(path, "/pass" | "/guard/release") { StatusCode::ACCEPTED } else { StatusCode::OK };
            json(status, &body)
        }
        Err(e) => {
            *db = None;
            error(StatusCode::SERVICE_UNAVAILABLE, format!("nothing was done: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{decode, decode_form, query};

    #[test]
    fn paths_keep_plus_signs_and_queries_read_them_as_spaces() {
        assert_eq!(decode("exec%5F1+2"), "exec_1+2");
        assert_eq!(decode_form("incident+42%21"), "incident 42!");
        assert_eq!(decode("%zz%4"), "%zz%4", "invalid escapes stay");
        assert_eq!(decode("%E2%9C%93"), "\u{2713}");
        let q = query(Some("kind=orphaned&controller=ctrl%2Da&reason=a+b&flag"));
        assert_eq!(q.get("controller").map(String::as_str), Some("ctrl-a"));
        assert_eq!(q.get("reason").map(String::as_str), Some("a b"));
        assert_eq!(q.get("flag").map(String::as_str), Some(""));
    }
}
