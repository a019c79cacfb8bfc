//! The controller side of `sessiond check`: each controller fetched the way a
//! pass fetches it, its document checked against the contract, and its boot id
//! asked for as many times as a `once` pass would, to show whether one process
//! answers at its URL. The stop URL is checked for presence only: calling it
//! would stop a session.

use std::time::{Duration, Instant};

use super::{CheckLine, Status};
use crate::config::{Config, ControllerConfig};
use crate::controller::ControllerClient;
use crate::reconcile::boots;

/// Checks one controller.
pub async fn check(cfg: &Config, c: &ControllerConfig) -> Vec<CheckLine> {
    let subject = format!("controller {}", c.name);
    let line = |status, check, detail: String| CheckLine::new(status, &subject, check, detail);
    let mut out = Vec::new();
    let client = match ControllerClient::new(std::slice::from_ref(c)) {
        Ok(client) => client,
        Err(e) => {
            out.push(line(Status::Fail, "client", e.to_string()));
            return out;
        }
    };

    // Two full fetches, as two passes would make them.
    let mut bodies = Vec::new();
    for n in 1..=2 {
        let started = Instant::now();
        match client.fetch_body(c).await {
            Ok(body) => bodies.push((body, started.elapsed())),
            Err(e) => {
                out.push(line(Status::Fail, "fetch", format!("fetch {n} of 2: {e}")));
                return out;
            }
        }
    }
    let slowest = bodies.iter().map(|(_, t)| *t).max().unwrap_or_default();
    let largest = bodies.iter().map(|(b, _)| b.len() as u64).max().unwrap_or(0);
    out.push(line(
        if slowest * 2 > c.timeout { Status::Warn } else { Status::Ok },
        "latency",
        format!("answered in {} (timeout {})", ms(slowest), humantime::format_duration(c.timeout)),
    ));
    out.push(line(
        if largest * 2 > c.max_body_bytes { Status::Warn } else { Status::Ok },
        "size",
        format!("{largest} bytes (max_body_bytes {})", c.max_body_bytes),
    ));

    let pattern = &cfg.sessions.id_pattern;
    let mut lists = Vec::new();
    for (body, _) in &bodies {
        match crate::controller::parse(body, c, pattern) {
            Ok(list) => lists.push(list),
            Err(e) => {
                out.push(line(Status::Fail, "document", e.to_string()));
                return out;
            }
        }
    }
    out.extend(fields(&bodies[0].0, c, &line));
    let list = &lists[0];
    let by_state = {
        let mut m = std::collections::BTreeMap::new();
        for s in list.sessions.iter() {
            *m.entry(s.state.as_str()).or_insert(0u64) += 1;
        }
        m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    };
    out.push(line(
        Status::Ok,
        "sessions",
        format!(
            "{} listed{}",
            list.sessions.len(),
            if by_state.is_empty() { String::new() } else { format!(" ({by_state})") }
        ),
    ));
    for (kind, check) in [
        (crate::model::InvalidEntryKind::InvalidId, "session ids"),
        (crate::model::InvalidEntryKind::InvalidEntry, "entries"),
    ] {
        let bad: Vec<&crate::model::InvalidEntry> = list.invalid.iter().filter(|e| e.kind == kind).collect();
        out.push(match bad.first() {
            None if kind == crate::model::InvalidEntryKind::InvalidId => {
                line(Status::Ok, check, "every id matches sessions.id_pattern".into())
            }
            None => line(Status::Ok, check, "every entry has a known state, an owner and a valid started_at".into()),
            Some(first) => line(
                Status::Fail,
                check,
                format!(
                    "{} unusable, e.g. {}: {}",
                    bad.len(),
                    first.raw_id.as_deref().unwrap_or("<no id>"),
                    first.problem
                ),
            ),
        });
    }
    let without_start = list.sessions.iter().filter(|s| s.started_at.is_none()).count();
    if without_start > 0 {
        out.push(line(
            Status::Warn,
            "started_at",
            format!("{without_start} sessions have none: their age counts from when sessiond first sees them"),
        ));
    }
    for p in &list.problems {
        out.push(line(Status::Fail, p.part, format!("malformed, not used: {}", p.detail)));
    }

    // The boot id: stable across the two fetches, and across as many answers
    // as `once` asks for, each over a new connection.
    let mut seen: Vec<String> = lists.iter().map(|l| l.boot_id.clone()).collect();
    let more = boots::verifications(None, &seen[0], 1);
    let started = Instant::now();
    for _ in 0..more {
        match client.boot_id(c).await {
            Ok(id) => seen.push(id),
            Err(e) => {
                out.push(line(Status::Fail, "boot id", format!("a boot-id fetch failed: {e}")));
                return out;
            }
        }
    }
    let mut distinct: Vec<&String> = Vec::new();
    for b in &seen {
        if !distinct.contains(&b) {
            distinct.push(b);
        }
    }
    out.push(if distinct.len() == 1 {
        line(
            Status::Ok,
            "boot id",
            format!(
                "{} in all {} answers ({} per boot-id fetch)",
                seen[0],
                seen.len(),
                ms(started.elapsed() / more.max(1) as u32)
            ),
        )
    } else {
        line(
            Status::Fail,
            "boot id",
            format!(
                "{} different boot ids in {} answers ({}): several processes answer at this URL, each with its own \
                 sessions; sessiond will not use its lists (see docs/controller-contract.md)",
                distinct.len(),
                seen.len(),
                distinct.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )
    });

    out.push(match &c.stop_url {
        Some(u) => line(Status::Ok, "stop_url", format!("{u} (not called)")),
        None => {
            line(Status::Warn, "stop_url", "not set: zombies on this controller are reported, never stopped".into())
        }
    });
    out
}

/// The top-level fields a full parse tolerates missing, and their order.
fn fields(
    body: &[u8],
    c: &ControllerConfig,
    line: &dyn Fn(Status, &'static str, String) -> CheckLine,
) -> Vec<CheckLine> {
    let mut out = Vec::new();
    let Ok(TopLevelKeys(keys)) = serde_json::from_slice::<TopLevelKeys>(body) else { return out };
    let has = |k: &str| keys.iter().any(|x| x == k);
    out.push(match has("instance") {
        true => line(Status::Ok, "instance", format!("names itself {:?}", c.name)),
        false => line(Status::Warn, "instance", "the document does not name its instance; add \"instance\"".into()),
    });
    out.push(match has("generated_at") {
        true => line(Status::Ok, "generated_at", "present: session ages come from the controller's own clock".into()),
        false => line(
            Status::Warn,
            "generated_at",
            "absent: session ages count from when sessiond first sees them, and `once` never inserts".into(),
        ),
    });
    if !has("counters") {
        out.push(line(Status::Ok, "counters", "absent (optional): no application metrics from this controller".into()));
    }
    let position = |k: &str| keys.iter().position(|x| x == k);
    if let (Some(b), Some(s)) = (position("boot_id"), position("sessions")) {
        let cheap = b < s;
        out.push(line(
            if cheap { Status::Ok } else { Status::Warn },
            "field order",
            if cheap {
                "boot_id comes before sessions: a boot-id check reads a few bytes".into()
            } else {
                "boot_id comes after sessions: every boot-id check reads the whole list; put it first".into()
            },
        ));
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The top-level keys of a JSON object, in the order written.
struct TopLevelKeys(Vec<String>);

impl<'de> serde::Deserialize<'de> for TopLevelKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TopLevelKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TopLevelKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(TopLevelKeys(keys))
            }
        }
        d.deserialize_map(Visitor)
    }
}
