//! The database side of `sessiond check`: the connection and its TLS,
//! sessiond's schema, the sessions table against its mapping (columns, types,
//! the state values it holds), and the privileges each enabled repair needs.

use tokio_postgres::types::Type;

use super::{CheckLine, Status};
use crate::config::{Config, Policy};
use crate::store::{Store, Table, SCHEMA_VERSION};

/// Checks the database.
pub async fn check(cfg: &Config) -> Vec<CheckLine> {
    let line = |status, check, detail: String| CheckLine::new(status, "database", check, detail);
    let mut out = Vec::new();
    let mut store = match Store::connect(&cfg.database).await {
        Ok(s) => s,
        Err(e) => {
            out.push(line(Status::Fail, "connection", e.to_string()));
            return out;
        }
    };
    let tls = store.tls().await.unwrap_or(None);
    out.push(line(
        Status::Ok,
        "connection",
        format!(
            "{} ({}, sslmode {})",
            cfg.database.url,
            tls.map_or_else(|| "not encrypted".to_owned(), |v| format!("TLS {v}")),
            serde_json::to_value(cfg.database.sslmode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        ),
    ));
    match store.intermediary(&cfg.database).await {
        Ok(Some(why)) => out.push(line(
            Status::Warn,
            "pooler",
            format!(
                "connected through a pooler or proxy ({why}): run and once work in transaction pooling mode; \
                 migrate needs a direct connection"
            ),
        )),
        Ok(None) => {}
        Err(e) => out.push(line(Status::Warn, "pooler", format!("cannot tell whether a pooler is in between: {e}"))),
    }
    out.push(match store.check_schema().await {
        Ok(()) => line(Status::Ok, "schema", format!("sessiond's schema is at version {SCHEMA_VERSION}")),
        Err(e) => line(Status::Fail, "schema", e.to_string()),
    });
    if cfg.ha.enabled {
        let (lease, statement) = (cfg.ha.lease, cfg.database.statement_timeout);
        out.push(if lease < statement * 2 {
            line(
                Status::Warn,
                "lease sizing",
                format!(
                    "ha.lease {} is shorter than twice database.statement_timeout {}: a renewal that waits on a slow \
                     repair may lose the lease; 3 × statement_timeout or more is safe",
                    humantime::format_duration(lease),
                    humantime::format_duration(statement)
                ),
            )
        } else {
            line(
                Status::Ok,
                "lease sizing",
                format!(
                    "ha.lease {}, renewed every {}; a failover takes about a lease",
                    humantime::format_duration(lease),
                    humantime::format_duration(std::time::Duration::from_millis((lease / 3).as_millis() as u64))
                ),
            )
        });
        out.push(match store.lease_holder(crate::lease::LEASE_NAME).await {
            Ok(Some(l)) if l.valid => line(Status::Ok, "lease", format!("{} leads (term {})", l.holder, l.term)),
            Ok(Some(l)) => line(
                Status::Warn,
                "lease",
                format!("no replica leads: the lease of {} (term {}) has expired", l.holder, l.term),
            ),
            Ok(None) => line(Status::Ok, "lease", "no replica has led yet".to_owned()),
            Err(e) => line(Status::Fail, "lease", e.to_string()),
        });
    }
    let table = match store.bind_table(&cfg.sessions, &cfg.reconcile.policy).await {
        Ok(t) => t.clone(),
        Err(crate::store::StoreError::Mapping(m)) => {
            for p in &m.problems {
                out.push(line(Status::Fail, "table", format!("{}: {p}", m.table)));
            }
            return out;
        }
        Err(e) => {
            out.push(line(Status::Fail, "table", e.to_string()));
            return out;
        }
    };
    out.push(line(Status::Ok, "table", describe(&table)));
    out.push(states(&store, &table).await);
    out.push(lookup(&store, cfg).await);
    if let Some(l) = rapid_index(&store, cfg, &table).await {
        out.push(l);
    }
    out.extend(privileges(&store, cfg, &table).await);
    out
}

/// Rapid creates read the rows created since the last pass, every pass: on a
/// large table without an index on `created_at`, that is a scan each time.
async fn rapid_index(store: &Store, cfg: &Config, t: &Table) -> Option<CheckLine> {
    let line = |status, detail: String| CheckLine::new(status, "database", "rapid creates", detail);
    cfg.reconcile.rapid_create_window?;
    if t.owner.is_none() {
        return Some(line(Status::Ok, "not counted: the table has no owner column".to_owned()));
    }
    Some(match store.created_at_indexed().await {
        Ok(true) => line(
            Status::Ok,
            format!("rows created since the last pass are read through an index on {}", t.created_at.name),
        ),
        Ok(false) => line(
            Status::Warn,
            format!(
                "no index of {} leads with {}: every pass scans the table to count rapid creates. Create one \
                 (CREATE INDEX CONCURRENTLY ON {} ({})) or set reconcile.rapid_create_window = \"off\"",
                t.name,
                t.created_at.name,
                t.table,
                t.created_at.q()
            ),
        ),
        Err(e) => line(Status::Warn, e.to_string()),
    })
}

/// Whether `sessiond_lookup` exists and was made from this config.
async fn lookup(store: &Store, cfg: &Config) -> CheckLine {
    let line = |status, detail: String| CheckLine::new(status, "database", "lookup", detail);
    let expected = match store.lookup_expected(&cfg.sessions) {
        Ok(e) => e,
        Err(e) => return line(Status::Warn, e.to_string()),
    };
    match store.lookup_installed().await {
        Ok(Some(found)) if found == expected => {
            line(Status::Ok, format!("{}.sessiond_lookup matches this config", cfg.database.schema))
        }
        Ok(Some(_)) => line(
            Status::Warn,
            format!(
                "{}.sessiond_lookup was made from another mapping or id pattern: run sessiond migrate to remake it",
                cfg.database.schema
            ),
        ),
        Ok(None) => line(
            Status::Warn,
            format!("{}.sessiond_lookup does not exist: run sessiond migrate to make it", cfg.database.schema),
        ),
        Err(e) => line(Status::Warn, e.to_string()),
    }
}

fn describe(t: &Table) -> String {
    let mut cols = vec![
        format!("id {} {}", t.id.name, t.id.sql_type),
        format!("state {} {}", t.state.name, t.state.sql_type),
        format!("created_at {} {}", t.created_at.name, t.created_at.sql_type),
    ];
    for (k, c) in [
        ("owner", &t.owner),
        ("instance", &t.instance),
        ("updated_at", &t.updated_at),
        ("ended_at", &t.ended_at),
        ("end_reason", &t.end_reason),
        ("deleted", &t.deleted),
    ] {
        if let Some(c) = c {
            cols.push(format!("{k} {} {}", c.name, c.sql_type));
        }
    }
    format!("{}: {}", t.name, cols.join(", "))
}

/// Every state value the table holds is in the vocabulary.
async fn states(store: &Store, t: &Table) -> CheckLine {
    let line = |status, detail: String| CheckLine::new(status, "database", "state values", detail);
    let sql = format!("SELECT t.{}::text, count(*) FROM {} t GROUP BY 1 ORDER BY 2 DESC", t.state.q(), t.table);
    let rows = match store.query(&sql, &[]).await {
        Ok(rows) => rows,
        Err(e) => return line(Status::Fail, e.to_string()),
    };
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for r in rows {
        let value: Option<String> = r.get(0);
        let n: i64 = r.get(1);
        match value.as_deref().and_then(|v| t.vocabulary.read(v).map(|s| (v, s))) {
            Some((v, s)) => known.push(format!("{v:?} as {s} ({n})")),
            None => unknown.push(format!("{} ({n} rows)", value.map_or("NULL".into(), |v| format!("{v:?}")))),
        }
    }
    if unknown.is_empty() {
        line(Status::Ok, if known.is_empty() { "the table is empty".into() } else { known.join(", ") })
    } else {
        line(
            Status::Fail,
            format!(
                "values in no list of sessions.states: {}; add each to the state it means (such rows are reported \
                 as invalid_row and never repaired)",
                unknown.join(", ")
            ),
        )
    }
}

/// The privileges each enabled repair needs, on the sessions table and on
/// sessiond's own tables.
async fn privileges(store: &Store, cfg: &Config, t: &Table) -> Vec<CheckLine> {
    let p = &cfg.reconcile.policy;
    let col = |c: &Option<crate::store::mapping::Col>| c.as_ref().map(|c| c.name.as_str().to_owned());
    let ending: Vec<String> = std::iter::once(Some(t.state.name.as_str().to_owned()))
        .chain([col(&t.updated_at), col(&t.ended_at), col(&t.end_reason)])
        .flatten()
        .collect();
    let following: Vec<String> = std::iter::once(Some(t.state.name.as_str().to_owned()))
        .chain([col(&t.owner), col(&t.instance), col(&t.updated_at)])
        .flatten()
        .collect();
    let touching: Vec<String> = vec![col(&t.updated_at).unwrap_or_else(|| t.state.name.as_str().to_owned())];
    let inserting: Vec<String> = [
        Some(t.id.name.as_str().to_owned()),
        Some(t.state.name.as_str().to_owned()),
        Some(t.created_at.name.as_str().to_owned()),
        col(&t.owner),
        col(&t.instance),
        col(&t.updated_at),
        col(&t.deleted),
    ]
    .into_iter()
    .flatten()
    .collect();
    // The row's version (xmin) is read too: a grant on named columns alone
    // does not cover it.
    let reading: Vec<String> = [
        Some("xmin".to_owned()),
        Some(t.id.name.as_str().to_owned()),
        Some(t.state.name.as_str().to_owned()),
        Some(t.created_at.name.as_str().to_owned()),
        col(&t.owner),
        col(&t.instance),
        col(&t.updated_at),
        col(&t.ended_at),
        col(&t.deleted),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut needs: Vec<(&str, &str, Vec<String>, bool)> = vec![("read", "SELECT", reading, true)];
    for (kind, policy) in [("orphaned", p.orphaned), ("stuck_creating", p.stuck_creating), ("duplicate", p.duplicate)] {
        needs.push((kind, "UPDATE", ending.clone(), policy == Policy::Repair));
    }
    needs.push(("drift", "UPDATE", following, p.drift == Policy::Repair));
    needs.push(("zombie", "UPDATE", touching, p.zombie == Policy::Repair));
    needs.push(("unpersisted", "INSERT", inserting, p.unpersisted == Policy::Repair));
    let mut out = Vec::new();
    for (what, privilege, columns, enabled) in needs {
        if !enabled {
            continue;
        }
        let mut missing = Vec::new();
        for c in &columns {
            let sql = "SELECT has_column_privilege($1, $2, $3)";
            let ok = store
                .query(sql, &[(&t.table, Type::TEXT), (c, Type::TEXT), (&privilege, Type::TEXT)])
                .await
                .ok()
                .and_then(|rows| rows.first().map(|r| r.get::<_, bool>(0)))
                .unwrap_or(false);
            if !ok {
                missing.push(c.clone());
            }
        }
        out.push(if missing.is_empty() {
            CheckLine::new(
                Status::Ok,
                "database",
                "privileges",
                format!("{what}: {privilege} on {}", columns.join(", ")),
            )
        } else {
            CheckLine::new(
                Status::Fail,
                "database",
                "privileges",
                format!(
                    "{what}: this role lacks {privilege} on {} of {} (see docs/sessiond-role-mapped.sql)",
                    missing.join(", "),
                    t.table
                ),
            )
        });
    }
    let own: [(&str, &[&str]); 5] = [
        ("sessiond_pause", &["SELECT", "INSERT", "UPDATE"]),
        ("session_audit", &["INSERT"]),
        ("sessiond_stop_intents", &["SELECT", "INSERT", "UPDATE"]),
        ("sessiond_instance_state", &["SELECT", "INSERT", "UPDATE"]),
        ("sessiond_schema_migrations", &["SELECT"]),
    ];
    let mut missing = Vec::new();
    for (table, privileges) in own {
        let name = format!("{}.\"{table}\"", cfg.database.schema.quoted());
        for privilege in privileges {
            let ok = store
                .query("SELECT has_table_privilege($1, $2)", &[(&name, Type::TEXT), (privilege, Type::TEXT)])
                .await
                .ok()
                .and_then(|rows| rows.first().map(|r| r.get::<_, bool>(0)))
                .unwrap_or(false);
            if !ok {
                missing.push(format!("{privilege} on {table}"));
            }
        }
    }
    // The snapshot reads each live id's latest audit row: no resurrection.
    let audit = format!("{}.\"session_audit\"", cfg.database.schema.quoted());
    for column in ["id", "session_id", "old_state", "new_state", "trigger", "at"] {
        let ok = store
            .query("SELECT has_column_privilege($1, $2, 'SELECT')", &[(&audit, Type::TEXT), (&column, Type::TEXT)])
            .await
            .ok()
            .and_then(|rows| rows.first().map(|r| r.get::<_, bool>(0)))
            .unwrap_or(false);
        if !ok {
            missing.push(format!("SELECT on session_audit.{column}"));
        }
    }
    out.push(if missing.is_empty() {
        CheckLine::new(Status::Ok, "database", "privileges", "sessiond's own tables: all it needs")
    } else {
        CheckLine::new(
            Status::Fail,
            "database",
            "privileges",
            format!("sessiond's own tables: this role lacks {} (see docs/sessiond-role.sql)", missing.join(", ")),
        )
    });
    out
}
