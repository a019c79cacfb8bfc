//! The store at the edges: the one-live-session-per-owner index refusing a
//! repair is a conflict for that row only, never a failed batch; and the read
//! looks up each listed id without a live row once, with its last audit row.

mod common;

use std::time::Duration;

use common::{ago, config, sid, TestDb, IMMEDIATE};
use sessiond::config::DatabaseConfig;
use sessiond::model::{RowState, SessionId};
use sessiond::reconcile::{PassRequest, Reconciler};
use sessiond::simctl::SimController;
use sessiond::store::{AuditContext, RowResult, RowUpdate, Store};

async fn store(db: &TestDb) -> Store {
    store_at(&db.url).await
}

async fn store_at(url: &str) -> Store {
    let cfg = DatabaseConfig { statement_timeout: Duration::from_secs(5), ..DatabaseConfig::for_url(url) };
    let mut store = Store::connect(&cfg).await.expect("connect");
    let sessions = sessiond::config::SessionsConfig::reference(&cfg.schema);
    store.bind_table(&sessions, &Default::default()).await.expect("bind the reference table");
    store
}

async fn version(db: &TestDb, id: &str) -> String {
    db.client()
        .await
        .query_one("SELECT xmin::text FROM sessions WHERE session_id = $1", &[&id])
        .await
        .expect("read xmin")
        .get(0)
}

#[tokio::test]
async fn an_owner_change_onto_an_owner_with_a_live_row_is_a_conflict_and_the_rest_of_the_batch_applies() {
    let db = TestDb::migrated().await;
    db.insert(&sid(1), "u1", "a", "active", ago(600)).await;
    db.insert(&sid(2), "u2", "a", "active", ago(600)).await;
    db.insert(&sid(3), "u3", "a", "active", ago(600)).await;
    let update = |id: u32, v: String, owner: Option<&str>, to: RowState| RowUpdate {
        id: SessionId::from_row(sid(id)),
        version: v,
        from: RowState::Active,
        to,
        owner_id: owner.map(str::to_owned),
        controller_instance: None,
        end_reason: None,
        reason: "drift",
        details: serde_json::json!({}),
    };
    let batch = vec![
        update(1, version(&db, &sid(1)).await, Some("u2"), RowState::Active), // u2 already has a live row
        update(3, version(&db, &sid(3)).await, None, RowState::Paused),
    ];
    let audit = AuditContext { actor: "test".into(), pass_id: "p".into(), term: None };

    let outcomes = store(&db).await.update_rows(&batch, &audit).await.expect("no error for a unique violation");

    assert_eq!(outcomes, [RowResult::Conflict, RowResult::Done]);
    assert_eq!(db.state(&sid(3)).await.as_deref(), Some("paused"));
    assert_eq!(db.audit(&sid(1)).await, []);
    assert_eq!(db.audit(&sid(3)).await.len(), 1);
}

#[tokio::test]
async fn a_backfill_racing_the_applications_own_insert_for_that_owner_is_a_conflict() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    a.add(&sid(1), "u1", "running", Some(ago(600)));
    let cfg = config(&db, &[&a], IMMEDIATE);

    // The application inserts a live row for the same owner and has not committed yet.
    let mut app = db.client().await;
    let tx = app.transaction().await.expect("begin");
    tx.execute(
        "INSERT INTO sessions (session_id, owner_id, controller_instance, state) VALUES ($1, 'u1', 'ctrl-a', 'active')",
        &[&sid(2)],
    )
    .await
    .expect("the application's insert");
    let pass = tokio::spawn(async move { Reconciler::new(cfg).expect("reconciler").pass(PassRequest::once()).await });
    let blocked = common::wait_for_blocked_sessiond(&db, 1).await;
    assert!(blocked, "the backfill waited on the application's insert");
    tx.commit().await.expect("commit");
    let rep = pass.await.expect("the pass");

    assert_eq!(common::outcomes(&rep), ["unpersisted.conflict=1"]);
    assert_eq!(db.state(&sid(1)).await, None);
    assert_eq!(db.state(&sid(2)).await.as_deref(), Some("active"), "the application's row stands");
}

#[tokio::test]
async fn a_repair_of_a_row_written_since_it_was_read_is_a_conflict_and_the_write_stands() {
    let db = TestDb::migrated().await;
    db.insert(&sid(1), "u1", "a", "active", ago(600)).await;
    let read = version(&db, &sid(1)).await;
    // The application writes the row after sessiond read it.
    db.client()
        .await
        .execute("UPDATE sessions SET updated_at = now() WHERE session_id = $1", &[&sid(1)])
        .await
        .expect("the application's write");
    let batch = vec![RowUpdate {
        id: SessionId::from_row(sid(1)),
        version: read,
        from: RowState::Active,
        to: RowState::Stopped,
        owner_id: None,
        controller_instance: None,
        end_reason: Some("orphaned"),
        reason: "orphaned",
        details: serde_json::json!({}),
    }];
    let audit = AuditContext { actor: "test".into(), pass_id: "p".into(), term: None };

    let outcomes = store(&db).await.update_rows(&batch, &audit).await.expect("a conflict is not an error");

    assert_eq!(outcomes, [RowResult::Conflict]);
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"));
    assert_eq!(db.audit(&sid(1)).await, []);
}

#[tokio::test]
async fn the_read_looks_up_each_listed_id_without_a_live_row_once_and_finds_the_last_audit_row_of_a_deleted_one() {
    let db = TestDb::migrated().await;
    db.insert(&sid(1), "u1", "a", "active", ago(600)).await;
    db.insert(&sid(2), "u2", "a", "stopped", ago(600)).await;
    // sid(3)'s row is gone (a mapped table may delete rows); its audit
    // trail says it was made and deleted, the delete last.
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO session_audit (session_id, old_state, new_state, trigger, actor)
             VALUES ($1, NULL, 'active', 'app', 'app'), ($1, 'active', NULL, 'app', 'app')",
            &[&sid(3)],
        )
        .await
        .expect("write the audit trail");

    // Two lists hold sid(2) and sid(3); sid(4) was never anywhere.
    let mut listed = [sid(1), sid(2), sid(2), sid(3), sid(3), sid(4)];
    listed.sort();
    let mut store = store(&db).await;
    let snapshot =
        store.snapshot(listed.iter().map(String::as_str), listed.len(), None).await.expect("read the snapshot");

    let mut ids: Vec<&str> = snapshot.rows.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [sid(1), sid(2)], "every row once, the live one and the stopped one");
    let gone: Vec<(&str, Option<&str>, Option<&str>)> =
        snapshot.gone.iter().map(|g| (g.id.as_str(), g.old_state.as_deref(), g.new_state.as_deref())).collect();
    assert_eq!(gone, [(sid(3).as_str(), Some("active"), None)], "the deleted row's last change is its delete");
}

/// Two passes stop the same zombie. The second recorded its intent while the
/// first was settling: its statement held the row (FOR SHARE) so the first
/// could not touch it, then its insert waited for the first's settle and
/// found no open intent. Its evidence is older than the first's stop, so its
/// intent is refused: one stop, one audit row.
#[tokio::test]
async fn a_stop_recorded_while_another_pass_settles_the_same_session_is_a_conflict() {
    let db = TestDb::migrated().await;
    db.insert(&sid(1), "u1", "ctrl-a", "stopped", ago(600)).await;
    let v = version(&db, &sid(1)).await;
    let stop = || sessiond::store::StopIntent {
        id: SessionId::from_row(sid(1)),
        controller: "ctrl-a".into(),
        version: v.clone(),
        state: RowState::Stopped,
        end_row: false,
        reason: "zombie",
        details: serde_json::json!({}),
    };
    let audit = |pass: &str| AuditContext { actor: "test".into(), pass_id: pass.into(), term: None };
    // Both passes gathered their evidence before either stopped anything.
    let evidence = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut a = store(&db).await;
    let opened = a.open_stops(&[stop()], &audit("a"), Duration::from_secs(60), evidence).await.expect("open a");
    let Some(intent) = opened[0] else { panic!("the first pass records its intent") };

    // Hold the second pass's intent insert (after its row lock) for a while.
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION slow_second_intent() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.pass_id = 'b' THEN PERFORM pg_sleep(1.5); END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER slow_second_intent BEFORE INSERT ON sessiond_stop_intents
                 FOR EACH ROW EXECUTE FUNCTION slow_second_intent();",
        )
        .await
        .expect("the trigger");
    let second = {
        let mut b = store(&db).await;
        let stop = stop();
        tokio::spawn(async move { b.open_stops(&[stop], &audit("b"), Duration::from_secs(60), evidence).await })
    };
    // The second pass holds the row now; the first settles its stop.
    let mut held = false;
    for _ in 0..100 {
        let sleeping =
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'";
        if db.scalar(sleeping).await == 1 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held, "the second pass reached its insert");
    let settle = sessiond::store::Settle {
        intent,
        outcome: sessiond::model::StopOutcome::Stopped,
        details: serde_json::json!({}),
    };
    a.settle_stops(&[settle], &audit("a")).await.expect("settle a");
    let second = second.await.expect("join").expect("open b");

    assert_eq!(second, [None], "the second pass's evidence predates the first's stop");
    assert_eq!(db.audit(&sid(1)).await.len(), 1, "one audit row");
    let outcomes: Vec<(String, Option<String>)> = db
        .client()
        .await
        .query("SELECT pass_id, outcome FROM sessiond_stop_intents ORDER BY id", &[])
        .await
        .expect("intents")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let settled = |pass: &str, outcome: &str| (pass.to_owned(), Some(outcome.to_owned()));
    assert_eq!(outcomes, [settled("a", "stopped"), settled("b", "not_sent")], "the refusal is on record");

    // A pass whose evidence is newer than that stop may stop the session again
    // (the controller runs it still): the refusal is about stale evidence.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fresh = chrono::Utc::now();
    let again = sessiond::store::StopIntent { version: version(&db, &sid(1)).await, ..stop() };
    let reopened = a.open_stops(&[again], &audit("c"), Duration::from_secs(60), fresh).await.expect("open c");
    assert!(reopened[0].is_some(), "a stop on fresh evidence is recorded");
}

/// A table large enough is read on two connections, each streaming half of
/// its pages. Both read one snapshot: what commits between the first
/// connection's snapshot and the second's start is seen by neither half.
#[tokio::test]
async fn a_table_read_on_two_connections_is_read_on_one_snapshot_every_row_once() {
    let db = TestDb::migrated().await;
    read_on_two_connections(&db, &db.url).await;
}

/// The same through PgBouncer in transaction mode: the two transactions run
/// on two server connections, and the snapshot passes between them.
#[tokio::test]
async fn a_table_read_on_two_connections_through_pgbouncer_is_read_on_one_snapshot() {
    let db = TestDb::migrated().await;
    let bouncer = common::Bouncer::start().await;
    read_on_two_connections(&db, &bouncer.url(&db)).await;
    drop(bouncer);
}

/// On two connections the lookups by id are split too, each half of the
/// ids on its own connection: both in the read's snapshot. A row changed
/// and an audit row written after the snapshot, for ids in the half the
/// second connection looks up, are seen as they were.
#[tokio::test]
async fn lookups_by_id_on_two_connections_see_the_read_snapshot() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    load_3000(&db).await;
    // Listed ids without a live row, in id order, the two kinds alternating
    // so that each connection gets some of both: ended rows, and ids with no
    // row, the first ten of them known to the audit trail.
    let ended = |k: u32| sid(10_000 + 2 * k);
    let unknown = |k: u32| sid(10_000 + 2 * k + 1);
    for k in 0..20 {
        client
            .execute(
                "INSERT INTO sessions (session_id, owner_id, controller_instance, state, ended_at)
                 VALUES ($1, $1, 'a', 'stopped', now())",
                &[&ended(k)],
            )
            .await
            .expect("an ended row");
        if k < 10 {
            audit_row(&client, &unknown(k), "ended").await;
        }
    }
    let mut listed: Vec<String> = (0..3000).map(sid).chain((0..20).flat_map(|k| [ended(k), unknown(k)])).collect();
    listed.sort_unstable();

    let mut store = store(&db).await;
    let (exported, resume) = hold_at_export(&mut store);
    let before = store.round_trips();
    let read = tokio::spawn(async move {
        let count = listed.len();
        let snapshot = store.snapshot(listed.iter().map(String::as_str), count, None).await;
        (snapshot, store.round_trips() - before)
    });
    exported.await.expect("the read exports its snapshot for the second connection");
    // After the snapshot, for the last ids (the second connection's half):
    // ended rows made live again, and audit rows for ids that had none.
    for k in 15..20 {
        client
            .execute("UPDATE sessions SET state = 'active', ended_at = NULL WHERE session_id = $1", &[&ended(k)])
            .await
            .expect("re-activate");
        audit_row(&client, &unknown(k), "late").await;
    }
    resume.send(()).expect("the read waits");
    let (snapshot, round_trips) = read.await.expect("join");
    let snapshot = snapshot.expect("read the snapshot");

    let first_ended = ended(0);
    let mut by_id: Vec<(&str, RowState)> =
        snapshot.rows.iter().filter(|r| r.id >= first_ended.as_str()).map(|r| (r.id, r.state)).collect();
    by_id.sort_unstable();
    let ended_ids: Vec<String> = (0..20).map(ended).collect();
    let expected: Vec<(&str, RowState)> = ended_ids.iter().map(|id| (id.as_str(), RowState::Stopped)).collect();
    assert_eq!(by_id, expected, "every ended row, as the snapshot saw it");
    let mut gone: Vec<&str> = snapshot.gone.iter().map(|g| g.id.as_str()).collect();
    gone.sort_unstable();
    let known: Vec<String> = (0..10).map(unknown).collect();
    assert_eq!(gone, known, "the audit trail as the snapshot saw it");
    // One connection: BEGIN, its settings, the clock, the COPY, half of the
    // lookups (rows, then audit), the intents, COMMIT; the second: its BEGIN
    // (with its settings), COPY, its half of the lookups, COMMIT.
    assert_eq!(round_trips, 8 + 5, "the lookups were split between the two connections");
}

/// Makes `store` read on two connections from two pages on, and hold its
/// read once it has exported its snapshot: the receiver hears of it then,
/// and the read goes on when the sender is sent to.
fn hold_at_export(store: &mut Store) -> (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Sender<()>) {
    store.set_split_read_min_pages(2);
    let (exported_tx, exported) = tokio::sync::oneshot::channel();
    let (resume, resume_rx) = tokio::sync::oneshot::channel();
    store.hold_split_read(sessiond::store::SplitGate { exported: exported_tx, resume: resume_rx });
    (exported, resume)
}

/// An audit row for `id`: the application ended it.
async fn audit_row(client: &tokio_postgres::Client, id: &str, reason: &str) {
    client
        .execute(
            "INSERT INTO session_audit (session_id, old_state, new_state, trigger, actor, reason)
             VALUES ($1, 'active', 'stopped', 'app', 'app', $2)",
            &[&id, &reason],
        )
        .await
        .expect("an audit row");
}

/// 3 000 live rows, `sid(0)` to `sid(2999)`, over some 40 pages, inserted
/// out of id order.
async fn load_3000(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "INSERT INTO sessions (session_id, owner_id, controller_instance, state, created_at, updated_at)
             SELECT 'exec_20261121_095958_' || lpad(to_hex((i * 7919) % 3000), 8, '0'), 'u' || i, 'a', 'active',
                    now() - interval '10 minutes', now() - interval '10 minutes'
               FROM generate_series(0, 2999) i",
        )
        .await
        .expect("load the rows");
}

/// The role `docs/sessiond-role.sql` makes reads on two connections. With the
/// second connection refused (the role's connection limit), the read goes on,
/// on one: every row, no error.
#[tokio::test]
async fn a_read_whose_second_connection_is_refused_goes_on_on_one() {
    let db = TestDb::migrated().await;
    let role = common::Role::create(&db, "docs/sessiond-role.sql");
    load_3000(&db).await;
    {
        let mut store = store_at(&role.url(&db.url)).await;
        store.set_split_read_min_pages(2);
        let before = store.round_trips();
        let snapshot = store.snapshot(std::iter::empty(), 0, None).await.expect("read on two connections");
        let round_trips = store.round_trips() - before;
        assert_eq!((snapshot.rows.len(), round_trips), (3000, 6 + 3), "the role reads on two connections");
    }
    db.client()
        .await
        .batch_execute(&format!("ALTER ROLE {} CONNECTION LIMIT 1", role.name))
        .await
        .expect("limit the role to one connection");
    let mut store = store_at(&role.url(&db.url)).await;
    store.set_split_read_min_pages(2);
    let before = store.round_trips();
    let snapshot = store.snapshot(std::iter::empty(), 0, None).await.expect("the read goes on, on one connection");
    assert_eq!(snapshot.rows.len(), 3000, "every row");
    assert_eq!(store.round_trips() - before, 6, "one connection's round trips only");
    drop(store);
    drop(db);
}

/// Through PgBouncer with one server connection per database and user, the
/// first transaction holds it and the second connection's would wait for it
/// for good: the read goes on, on one, within seconds.
#[tokio::test]
async fn a_read_whose_second_connection_gets_no_server_connection_goes_on_on_one() {
    let db = TestDb::migrated().await;
    load_3000(&db).await;
    let bouncer = common::Bouncer::start_with_pool(1).await;
    let mut store = store_at(&bouncer.url(&db)).await;
    store.set_split_read_min_pages(2);
    let before = store.round_trips();
    let started = std::time::Instant::now();
    let snapshot = store.snapshot(std::iter::empty(), 0, None).await.expect("the read goes on, on one connection");
    let took = started.elapsed();
    assert_eq!(snapshot.rows.len(), 3000, "every row");
    // One connection's 6, and the second's BEGIN that never got an answer.
    assert_eq!(store.round_trips() - before, 6 + 1, "the rows were read on one connection");
    assert!(took < Duration::from_secs(4), "the read waited {took:?} for a server connection");
    drop(store);
    drop(bouncer);
}

async fn read_on_two_connections(db: &TestDb, url: &str) {
    let client = db.client().await;
    load_3000(db).await;
    let last = client
        .query_one("SELECT session_id, xmin::text FROM sessions ORDER BY ctid DESC LIMIT 1", &[])
        .await
        .expect("the last row in the table");
    let (last_id, last_version): (String, String) = (last.get(0), last.get(1));

    let mut store = store_at(url).await;
    let (exported, resume) = hold_at_export(&mut store);
    let before = store.round_trips();
    let read = tokio::spawn(async move {
        let snapshot = store.snapshot(std::iter::empty(), 0, None).await;
        (snapshot, store.round_trips() - before)
    });
    exported.await.expect("the read exports its snapshot for the second connection");
    // Between the two: a new row, and the row in the table's last page ended
    // (its new version lands in the second half's pages too).
    client
        .batch_execute(&format!(
            "INSERT INTO sessions (session_id, owner_id, controller_instance, state) VALUES ('{}', 'late', 'a', 'active');
             UPDATE sessions SET state = 'stopped', ended_at = now() WHERE session_id = '{last_id}';",
            sid(99_999)
        ))
        .await
        .expect("the concurrent writes");
    resume.send(()).expect("the read waits");
    let (snapshot, round_trips) = read.await.expect("join");
    let snapshot = snapshot.expect("read the snapshot");

    let mut ids: Vec<&str> = snapshot.rows.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    let read = ids.len();
    ids.dedup();
    assert_eq!(read, ids.len(), "no row read twice");
    let expected: std::collections::BTreeSet<String> = (0..3000).map(sid).collect();
    let extra: Vec<&&str> = ids.iter().filter(|id| !expected.contains(**id)).collect();
    assert_eq!(extra, Vec::<&&str>::new(), "a row committed after the snapshot was read");
    assert_eq!(ids.len(), 3000, "every row of the snapshot");
    let row = snapshot.rows.iter().find(|r| r.id == last_id).expect("the last row");
    assert_eq!((row.state, row.version), (RowState::Active, last_version.as_str()), "the row as the snapshot saw it");
    // One connection: BEGIN, its settings, the clock, the COPY, the intents,
    // COMMIT; the second adds its BEGIN (with its settings), COPY and COMMIT.
    assert_eq!(round_trips, 6 + 3, "the halves were read on two connections");
}
