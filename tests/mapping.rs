//! sessiond on tables it did not create, shaped like the incident write-ups'
//! own: `data_collection_sessions` (its own status words, a nullable soft-delete
//! flag, no owner, no instance column, timestamps without a time zone) and
//! `conversation_sessions` (uuid ids and owners, status `active`/`ended`, its own
//! partial unique index), beside the reference table. Each is repaired with its
//! own vocabulary, the application's concurrent write wins, the audit trail is
//! in sessiond's own schema, and the table's definition is the same before and
//! after `migrate` and a repair pass.

mod common;

use common::{ago, run_async, sid, table_definition, text, write, TestDb};
use sessiond::simctl::SimController;

/// A table of the application's, and how sessiond is told about it.
struct Fixture {
    /// The table as pg_dump names it.
    table: &'static str,
    ddl: &'static str,
    sessions_toml: &'static str,
    /// Inserts a row: (id, owner, state value, seconds ago).
    insert: &'static str,
    active: &'static str,
    stopped: &'static str,
    /// Ids in the form the table keeps.
    id: fn(u32) -> String,
    owner: fn(u32) -> String,
}

const DATA_COLLECTION: Fixture = Fixture {
    table: "app.data_collection_sessions",
    ddl: r#"
CREATE SCHEMA app;
CREATE TABLE app.data_collection_sessions (
    session_id  text PRIMARY KEY,
    status      varchar(20) NOT NULL DEFAULT 'running',
    symbols     text[],
    start_time  timestamp without time zone NOT NULL DEFAULT now(),
    end_time    timestamp without time zone,
    updated_at  timestamp without time zone,
    is_deleted  boolean,
    notes       text
);
CREATE INDEX data_collection_sessions_status ON app.data_collection_sessions (status);
CREATE FUNCTION app.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.notes := coalesce(NEW.notes, '') || '+'; RETURN NEW; END $$;
CREATE TRIGGER data_collection_sessions_touch BEFORE UPDATE ON app.data_collection_sessions
    FOR EACH ROW EXECUTE FUNCTION app.touch();
"#,
    sessions_toml: r#"
[sessions]
table = "app.data_collection_sessions"

[sessions.columns]
id = "session_id"
state = "status"
created_at = "start_time"
updated_at = "updated_at"
ended_at = "end_time"
deleted = "is_deleted"

[sessions.states]
creating = []
active = ["running", "active"]
paused = []
stopped = ["stopped", "completed"]
failed = []
deleted = []
"#,
    insert: "INSERT INTO app.data_collection_sessions (session_id, notes, status, start_time, updated_at)
             VALUES ($1, $2, $3, (now() AT TIME ZONE 'UTC') - make_interval(secs => $4),
                     (now() AT TIME ZONE 'UTC') - make_interval(secs => $4))",
    active: "running",
    stopped: "stopped",
    id: sid,
    owner: |n| format!("u{n}"),
};

const CONVERSATION: Fixture = Fixture {
    table: "public.conversation_sessions",
    ddl: r#"
CREATE TABLE conversation_sessions (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    subcontractor_id uuid NOT NULL,
    status           text DEFAULT 'active',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz,
    ended_at         timestamptz
);
CREATE UNIQUE INDEX conversation_sessions_one_active ON conversation_sessions (subcontractor_id)
    WHERE status = 'active';
"#,
    sessions_toml: r#"
[sessions]
table = "conversation_sessions"

[sessions.columns]
id = "id"
state = "status"
created_at = "created_at"
owner = "subcontractor_id"
updated_at = "updated_at"
ended_at = "ended_at"

[sessions.states]
creating = []
active = ["active"]
paused = []
stopped = ["ended"]
failed = []
deleted = []
"#,
    insert: "INSERT INTO conversation_sessions (id, subcontractor_id, status, created_at, updated_at)
             VALUES ($1::text::uuid, $2::text::uuid, $3, now() - make_interval(secs => $4),
                     now() - make_interval(secs => $4))",
    active: "active",
    stopped: "ended",
    id: |n| format!("00000000-0000-4000-8000-{n:012x}"),
    owner: |n| format!("11111111-0000-4000-8000-{n:012x}"),
};

const REFERENCE: Fixture = Fixture {
    table: "sessiond.sessions",
    ddl: "",
    sessions_toml: "",
    insert: "INSERT INTO sessiond.sessions (session_id, owner_id, controller_instance, state, created_at, updated_at)
             VALUES ($1, $2, 'ctrl-a', $3, now() - make_interval(secs => $4), now() - make_interval(secs => $4))",
    active: "active",
    stopped: "stopped",
    id: sid,
    owner: |n| format!("u{n}"),
};

impl Fixture {
    async fn row(&self, db: &TestDb, n: u32, value: &str, secs: f64) {
        db.client()
            .await
            .execute(self.insert, &[&(self.id)(n), &(self.owner)(n), &value, &secs])
            .await
            .unwrap_or_else(|e| panic!("insert into {}: {e}", self.table));
    }

    async fn state(&self, db: &TestDb, n: u32) -> Option<String> {
        let (col, state) = match self.table {
            "app.data_collection_sessions" => ("session_id", "status"),
            "public.conversation_sessions" => ("id", "status"),
            _ => ("session_id", "state"),
        };
        db.client()
            .await
            .query_opt(&format!("SELECT {state}::text FROM {} WHERE {col}::text = $1", self.table), &[&(self.id)(n)])
            .await
            .expect("read a row")
            .map(|r| r.get(0))
    }

    fn config(&self, db: &TestDb, a: &SimController) -> String {
        format!(
            "[daemon]\nlisten = \"127.0.0.1:0\"\n\n[database]\nurl = \"{}\"\nschema = \"sessiond\"\nstatement_timeout = \"5s\"\n\n{}\
             [reconcile]\ngrace = \"0s\"\nconfirmations = 1\n{}",
            db.url,
            a.controller_toml("2s"),
            self.sessions_toml
        )
    }
}

async fn adopt(f: &Fixture) {
    let db = TestDb::empty().await;
    if !f.ddl.is_empty() {
        db.client().await.batch_execute(f.ddl).await.expect("the application's table");
    }
    let a = SimController::start("ctrl-a").await.expect("controller");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "sessiond.toml", &f.config(&db, &a));
    let p = path.to_str().expect("utf-8");

    // The application's table before sessiond touches the database (the
    // reference table, made by migrate, from just after).
    let existing = (!f.ddl.is_empty()).then(|| table_definition(&db.url, f.table));
    let migrated = run_async(&["migrate", "--config", p]).await;
    assert_eq!(migrated.status.code(), Some(0), "{}", text(&migrated.stderr));
    let before = existing.unwrap_or_else(|| table_definition(&db.url, f.table));

    // Healthy sessions, an orphan, a zombie, an unpersisted session, and an
    // orphan whose row the application holds while it writes it.
    for n in 0..8 {
        f.row(&db, n, f.active, 600.0).await;
        a.add(&(f.id)(n), &(f.owner)(n), "running", Some(ago(600)));
    }
    f.row(&db, 20, f.active, 600.0).await; // orphan
    f.row(&db, 21, f.stopped, 600.0).await; // zombie
    a.add(&(f.id)(21), &(f.owner)(21), "running", Some(ago(700)));
    a.add(&(f.id)(22), &(f.owner)(22), "running", Some(ago(600))); // unpersisted
    f.row(&db, 23, f.active, 600.0).await; // the application's own write is in flight
    let mut app = db.client().await;
    let tx = app.transaction().await.expect("begin");
    let update = match f.table {
        "app.data_collection_sessions" => "UPDATE app.data_collection_sessions SET notes = 'app' WHERE session_id = $1",
        "public.conversation_sessions" => "UPDATE conversation_sessions SET updated_at = now() WHERE id::text = $1",
        _ => "UPDATE sessiond.sessions SET end_reason = 'app' WHERE session_id = $1",
    };
    tx.execute(update, &[&(f.id)(23)]).await.expect("the application's write");

    let once = run_async(&["once", "--json", "--config", p]).await;
    tx.commit().await.expect("commit the application's write");
    let report: serde_json::Value = serde_json::from_slice(&once.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&once.stdout), text(&once.stderr)));
    assert_eq!(once.status.code(), Some(0), "{report}");
    let mut outcomes: Vec<String> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| format!("{}.{}", f["kind"].as_str().unwrap_or(""), f["outcome"].as_str().unwrap_or("-")))
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        ["orphaned.conflict", "orphaned.repaired", "unpersisted.repaired", "zombie.repaired"],
        "{}",
        f.table
    );
    assert_eq!(f.state(&db, 20).await.as_deref(), Some(f.stopped), "the orphan ends in the table's own word");
    assert_eq!(f.state(&db, 22).await.as_deref(), Some(f.active), "inserted in the table's own word");
    assert_eq!(f.state(&db, 23).await.as_deref(), Some(f.active), "the application's write wins");
    assert_eq!(a.stops(), [(f.id)(21)]);
    for n in 0..8 {
        assert_eq!(f.state(&db, n).await.as_deref(), Some(f.active));
    }
    let audited: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM sessiond.session_audit WHERE trigger = 'reconciler'", &[])
        .await
        .expect("the audit trail is in sessiond's schema")
        .get(0);
    assert_eq!(audited, 3);
    assert_eq!(table_definition(&db.url, f.table), before, "{} is exactly as it was", f.table);
}

#[tokio::test]
async fn a_data_collection_sessions_table_is_reconciled_in_its_own_words_and_left_as_it_was() {
    adopt(&DATA_COLLECTION).await;
}

#[tokio::test]
async fn a_conversation_sessions_table_with_uuid_ids_is_reconciled_and_left_as_it_was() {
    adopt(&CONVERSATION).await;
}

#[tokio::test]
async fn the_reference_table_in_a_schema_of_its_own_works_unchanged() {
    adopt(&REFERENCE).await;
}

/// An empty database with the data-collection table, migrated, and a
/// controller; `tweak` edits the config before it is written. The directory
/// holds the config for as long as it is kept.
async fn data_collection(tweak: impl FnOnce(String) -> String) -> (TestDb, SimController, tempfile::TempDir, String) {
    let db = TestDb::empty().await;
    db.client().await.batch_execute(DATA_COLLECTION.ddl).await.expect("the table");
    let a = SimController::start("ctrl-a").await.expect("controller");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "sessiond.toml", &tweak(DATA_COLLECTION.config(&db, &a)));
    let p = path.to_str().expect("utf-8").to_owned();
    assert_eq!(run_async(&["migrate", "--config", &p]).await.status.code(), Some(0));
    (db, a, dir, p)
}

/// The (kind, subject) of every finding of a `once --json` report.
fn kinds(report: &serde_json::Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| (f["kind"].as_str().unwrap_or("").to_owned(), f["subject"].as_str().unwrap_or("").to_owned()))
        .collect()
}

/// The live rows are read by `COPY`, which takes no parameters: the live
/// values are written into it as literals, and must read exactly as configured.
#[tokio::test]
async fn a_live_value_with_a_quote_and_a_backslash_is_read_as_written() {
    let odd = r"it's \ on";
    let (db, a, _dir, p) = data_collection(|config| {
        let config = config.replace(r#"active = ["running", "active"]"#, r#"active = ["running", "it's \\ on"]"#);
        assert!(config.contains(r#""it's \\ on""#), "{config}");
        config
    })
    .await;
    let p = p.as_str();
    let f = &DATA_COLLECTION;
    f.row(&db, 0, odd, 600.0).await; // live, listed
    a.add(&(f.id)(0), &(f.owner)(0), "running", Some(ago(600)));
    f.row(&db, 1, odd, 600.0).await; // live, not listed: an orphan
    f.row(&db, 2, "running", 600.0).await; // live, listed
    a.add(&(f.id)(2), &(f.owner)(2), "running", Some(ago(600)));

    let once = run_async(&["once", "--dry-run", "--json", "--config", p]).await;
    let report: serde_json::Value = serde_json::from_slice(&once.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&once.stdout), text(&once.stderr)));
    assert_eq!(once.status.code(), Some(0), "{report}");
    assert_eq!(kinds(&report), [("orphaned".to_owned(), (f.id)(1))], "{report}");
    assert_eq!(report["rows_by_state"]["active"], 3, "{report}");
}

#[tokio::test]
async fn a_row_with_a_status_in_no_list_is_an_invalid_row_and_the_pass_goes_on() {
    let (db, a, _dir, p) = data_collection(|config| config).await;
    let p = p.as_str();
    let f = &DATA_COLLECTION;
    for n in 0..5 {
        f.row(&db, n, f.active, 600.0).await;
        a.add(&(f.id)(n), &(f.owner)(n), "running", Some(ago(600)));
    }
    f.row(&db, 10, "RUNNING", 600.0).await; // held by the controller, in no list
    a.add(&(f.id)(10), &(f.owner)(10), "running", Some(ago(600)));
    f.row(&db, 11, f.active, 600.0).await; // an orphan
                                           // A soft-deleted row: deleted whatever its status, so not an orphan.
    f.row(&db, 12, f.active, 600.0).await;
    db.client()
        .await
        .execute("UPDATE app.data_collection_sessions SET is_deleted = true WHERE session_id = $1", &[&(f.id)(12)])
        .await
        .expect("flag");

    let once = run_async(&["once", "--json", "--config", p]).await;
    let report: serde_json::Value = serde_json::from_slice(&once.stdout).expect("JSON");

    assert_eq!(once.status.code(), Some(0), "{report}");
    assert_eq!(report["outcome"], "ok");
    let kinds = kinds(&report);
    assert!(kinds.contains(&("invalid_row".into(), (f.id)(10))), "{kinds:?}");
    assert!(kinds.contains(&("orphaned".into(), (f.id)(11))), "{kinds:?}");
    assert_eq!(kinds.len(), 2, "nothing else, and no insert over the invalid row: {kinds:?}");
    assert_eq!(f.state(&db, 11).await.as_deref(), Some("stopped"));
    assert_eq!(f.state(&db, 10).await.as_deref(), Some("RUNNING"), "an invalid row is left alone");
    assert_eq!(f.state(&db, 12).await.as_deref(), Some("running"), "a soft-deleted row is left alone");
}

#[tokio::test]
async fn migrate_refuses_a_foreign_sessions_table_and_changes_nothing() {
    let db = TestDb::empty().await;
    db.client()
        .await
        .batch_execute("CREATE TABLE sessions (session_id text PRIMARY KEY, user_id text, status text)")
        .await
        .expect("the application's own sessions table");
    let before = table_definition(&db.url, "public.sessions");
    let a = SimController::start("ctrl-a").await.expect("controller");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "s.toml", &common::config_text(&db, &[&a], common::IMMEDIATE));

    let out = run_async(&["migrate", "--config", path.to_str().expect("utf-8")]).await;

    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("public.sessions exists and sessiond did not create it"), "{err}");
    assert!(err.contains("owner_id text"), "the difference is named: {err}");
    assert!(err.contains("sessions.table"), "and what to do: {err}");
    assert_eq!(table_definition(&db.url, "public.sessions"), before, "nothing was changed");
    let record: bool = db
        .client()
        .await
        .query_one("SELECT to_regclass('sessiond_schema_migrations') IS NOT NULL", &[])
        .await
        .expect("look")
        .get(0);
    assert!(!record, "no migration was recorded");
}

#[tokio::test]
async fn a_search_path_in_the_url_options_is_kept() {
    let db = TestDb::empty().await;
    db.client().await.batch_execute(DATA_COLLECTION.ddl).await.expect("the table");
    let a = SimController::start("ctrl-a").await.expect("controller");
    let text_cfg = DATA_COLLECTION
        .config(&db, &a)
        .replace("table = \"app.data_collection_sessions\"", "table = \"data_collection_sessions\"")
        .replace(&db.url, &format!("{}?options=-c%20search_path%3Dapp", db.url));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "s.toml", &text_cfg);
    let p = path.to_str().expect("utf-8");
    let migrated = run_async(&["migrate", "--config", p]).await;
    assert_eq!(migrated.status.code(), Some(0), "{}", text(&migrated.stderr));
    DATA_COLLECTION.row(&db, 1, "running", 600.0).await; // an orphan, found through the search path
    let out = run_async(&["once", "--config", p]).await;
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(DATA_COLLECTION.state(&db, 1).await.as_deref(), Some("stopped"));
}

/// `sessiond check` on the data-collection fixture, after `tweak` changes the
/// database or the config: (exit code, output).
async fn check_with(sql: &str, tweak: impl Fn(String, &str) -> String) -> (Option<i32>, String) {
    let db = TestDb::empty().await;
    db.client().await.batch_execute(DATA_COLLECTION.ddl).await.expect("the table");
    let a = SimController::start("ctrl-a").await.expect("controller");
    let dir = tempfile::tempdir().expect("tempdir");
    let good = DATA_COLLECTION.config(&db, &a);
    let path = write(dir.path(), "good.toml", &good);
    assert_eq!(run_async(&["migrate", "--config", path.to_str().expect("utf-8")]).await.status.code(), Some(0));
    DATA_COLLECTION.row(&db, 1, "running", 600.0).await;
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    if !sql.is_empty() {
        db.client().await.batch_execute(&sql.replace("DBNAME", &db.name)).await.expect("change the database");
    }
    let path = write(dir.path(), "s.toml", &tweak(good, &db.name));
    let out = run_async(&["check", "--config", path.to_str().expect("utf-8")]).await;
    // A role made for the check goes with its database.
    let role = format!("sessiond_check_{}", db.name);
    drop(db);
    common::admin_blocking(format!("DROP ROLE IF EXISTS {role}"));
    (out.status.code(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
}

#[tokio::test]
async fn check_passes_a_good_mapping_and_says_what_it_checked() {
    let (code, out) = check_with("", |c, _| c).await;
    assert_eq!(code, Some(0), "{out}");
    for needle in [
        "app.data_collection_sessions",
        "state status character varying(20)",
        "created_at start_time timestamp without time zone",
        "\"running\" as active (1)",
        "unpersisted: INSERT on",
        "sessiond.sessiond_lookup matches this config",
        "not counted: the table has no owner column",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
}

#[tokio::test]
async fn check_warns_when_sessiond_lookup_was_made_from_another_config_or_is_missing() {
    let warn_line = |out: &str, needle: &str| out.lines().any(|l| l.starts_with("warn") && l.contains(needle));
    let (code, out) =
        check_with("", |c, _| c.replace("[sessions]\n", "[sessions]\nid_pattern = \"^exec_[0-9a-f_]+$\"\n")).await;
    assert_eq!(code, Some(0), "a warning, not a failure: {out}");
    assert!(warn_line(&out, "was made from another mapping or id pattern: run sessiond migrate"), "{out}");

    let (code, out) = check_with("DROP FUNCTION sessiond.sessiond_lookup(text, boolean)", |c, _| c).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(warn_line(&out, "sessiond_lookup does not exist: run sessiond migrate"), "{out}");
}

#[tokio::test]
async fn check_fails_naming_a_missing_column_a_wrong_type_an_unmapped_value_or_a_missing_privilege() {
    let fail_line = |out: &str, needle: &str| out.lines().any(|l| l.starts_with("fail") && l.contains(needle));
    let (code, out) = check_with("", |c, _| c.replace("ended_at = \"end_time\"", "ended_at = \"finished_at\"")).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(fail_line(&out, "column finished_at (sessions.columns.ended_at) does not exist"), "{out}");

    let (code, out) = check_with("", |c, _| c.replace("deleted = \"is_deleted\"", "deleted = \"notes\"")).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(fail_line(&out, "column notes (sessions.columns.deleted) is text, and must be boolean"), "{out}");

    let (code, out) = check_with(
        "INSERT INTO app.data_collection_sessions (session_id, status) VALUES ('exec_20261121_095958_00000009', 'RUNNING')",
        |c, _| c,
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(fail_line(&out, "values in no list of sessions.states: \"RUNNING\" (1 rows)"), "{out}");

    let (code, out) = check_with(
        "CREATE ROLE sessiond_check_DBNAME LOGIN;
         GRANT USAGE ON SCHEMA app, sessiond TO sessiond_check_DBNAME;
         GRANT SELECT, INSERT ON app.data_collection_sessions TO sessiond_check_DBNAME;
         GRANT UPDATE (updated_at, end_time) ON app.data_collection_sessions TO sessiond_check_DBNAME;
         GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA sessiond TO sessiond_check_DBNAME;",
        |c, db| c.replace("postgres://postgres@", &format!("postgres://sessiond_check_{db}@")),
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(fail_line(&out, "orphaned: this role lacks UPDATE on status"), "{out}");
}

#[tokio::test]
async fn a_table_that_does_not_fit_stops_once_and_run_with_exit_78() {
    let db = TestDb::empty().await;
    db.client().await.batch_execute(DATA_COLLECTION.ddl).await.expect("the table");
    db.client()
        .await
        .batch_execute("ALTER TABLE app.data_collection_sessions ADD COLUMN exchange text NOT NULL")
        .await
        .expect("a NOT NULL column an insert cannot fill");
    let a = SimController::start("ctrl-a").await.expect("controller");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = DATA_COLLECTION.config(&db, &a);
    let path = write(dir.path(), "s.toml", &cfg);
    let p = path.to_str().expect("utf-8");
    let migrated = run_async(&["migrate", "--config", p]).await;
    assert_eq!(migrated.status.code(), Some(0), "{}", text(&migrated.stderr));
    assert!(text(&migrated.stdout).contains("sessiond_lookup made for"), "the lookup only reads the table");

    for cmd in ["once", "run"] {
        let out = run_async(&[cmd, "--config", p]).await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{cmd}: {err}");
        assert!(err.contains("column exchange is NOT NULL with no default and is not mapped"), "{cmd}: {err}");
    }
    // Reporting unpersisted sessions instead of inserting them needs no such column.
    let report_only =
        cfg.replace("confirmations = 1\n", "confirmations = 1\n\n[reconcile.policy]\nunpersisted = \"report\"\n");
    let path = write(dir.path(), "r.toml", &report_only);
    let out = run_async(&["once", "--config", path.to_str().expect("utf-8")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_repair_whose_state_the_table_lacks_is_refused_at_load_naming_the_kind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = "[database]\nurl = \"postgres://app@127.0.0.1:5432/app\"\n\n[[controller]]\nname = \"a\"\n\
                url = \"http://127.0.0.1:8080/internal/sessions\"\n\n[sessions]\ntable = \"jobs\"\n\n\
                [sessions.columns]\nid = \"id\"\nstate = \"status\"\ncreated_at = \"created\"\n\n[sessions.states]\n";
    let cases = [
        ("creating = [\"starting\"]\nfailed = []\n", "reconcile.policy.stuck_creating"),
        ("stopped = []\n", "reconcile.policy.orphaned"),
        ("active = []\n", "reconcile.policy.unpersisted"),
        ("active = [\"on\"]\nstopped = [\"on\"]\n", "sessions.states.stopped"),
    ];
    for (states, key) in cases {
        let path = write(dir.path(), "s.toml", &format!("{base}{states}"));
        let out = common::run(&["check-config", "--config", path.to_str().expect("utf-8")]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{states}: {err}");
        assert!(err.contains(key), "{states}: {err:?} does not name {key}");
    }
    let path = write(
        dir.path(),
        "ok.toml",
        &format!("{base}creating = [\"starting\"]\nfailed = []\n\n[reconcile.policy]\nstuck_creating = \"report\"\n"),
    );
    let out = common::run(&["check-config", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "reported only, it needs no value: {}", text(&out.stderr));
}

#[tokio::test]
async fn the_mapped_role_template_is_all_a_daemon_needs_to_repair_every_kind() {
    let role;
    let db = TestDb::empty().await;
    db.client().await.batch_execute(DATA_COLLECTION.ddl).await.expect("the table");
    let a = SimController::start("ctrl-a").await.expect("controller");
    let dir = tempfile::tempdir().expect("tempdir");
    let owner = DATA_COLLECTION.config(&db, &a);
    let path = write(dir.path(), "owner.toml", &owner);
    assert_eq!(run_async(&["migrate", "--config", path.to_str().expect("utf-8")]).await.status.code(), Some(0));
    role = common::Role::create(&db, "docs/sessiond-role-mapped.sql");
    let f = &DATA_COLLECTION;
    for n in 0..4 {
        f.row(&db, n, f.active, 600.0).await;
        a.add(&(f.id)(n), &(f.owner)(n), "running", Some(ago(600)));
    }
    f.row(&db, 10, f.active, 600.0).await; // orphan
    f.row(&db, 11, "completed", 600.0).await; // zombie
    a.add(&(f.id)(11), "u11", "running", Some(ago(700)));
    a.add(&(f.id)(12), "u12", "running", Some(ago(600))); // unpersisted
    let as_role = write(dir.path(), "role.toml", &owner.replace(&db.url, &role.url(&db.url)));
    let p = as_role.to_str().expect("utf-8");

    let checked = run_async(&["check", "--config", p]).await;
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked.stdout));
    let once = run_async(&["once", "--config", p]).await;
    assert_eq!(once.status.code(), Some(0), "{}{}", text(&once.stdout), text(&once.stderr));
    assert_eq!(f.state(&db, 10).await.as_deref(), Some("stopped"));
    assert_eq!(f.state(&db, 12).await.as_deref(), Some("running"));
    assert_eq!(a.stops(), [(f.id)(11)]);
}

#[tokio::test]
async fn migrate_without_the_mapped_table_migrates_and_says_the_lookup_waits_for_it() {
    let db = TestDb::empty().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "s.toml", &DATA_COLLECTION.config(&db, &a));
    let p = path.to_str().expect("utf-8");
    let out = run_async(&["migrate", "--config", p]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("schema is at version"), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("sessiond_lookup was not made") && err.contains("data_collection_sessions"), "{err}");

    db.client().await.batch_execute(DATA_COLLECTION.ddl).await.expect("the table, later");
    let out = run_async(&["migrate", "--config", p]).await;
    assert!(text(&out.stdout).contains("sessiond_lookup made for"), "{}{}", text(&out.stdout), text(&out.stderr));
}
