//! The leader lease and its fence, on a real PostgreSQL: one holder at a time,
//! a term that grows on every takeover, a write fenced by a lost lease that
//! writes nothing, and a local validity that ends before anyone may take over.

mod common;

use std::time::{Duration, Instant};

use common::{ago, sid, TestDb};
use sessiond::config::DatabaseConfig;
use sessiond::lease::{Lease, LEASE_NAME};
use sessiond::store::{AuditContext, Fence, RowUpdate, Store, StoreError};

async fn store(db: &TestDb) -> Store {
    let cfg = DatabaseConfig { statement_timeout: Duration::from_secs(5), ..DatabaseConfig::for_url(&db.url) };
    let mut store = Store::connect(&cfg).await.expect("connect");
    let sessions = sessiond::config::SessionsConfig::reference(&cfg.schema);
    store.bind_table(&sessions, &Default::default()).await.expect("bind the reference table");
    store
}

/// Moves the lease's expiry into the past, as if its holder had stopped renewing.
async fn expire(db: &TestDb) {
    db.client()
        .await
        .execute("UPDATE sessiond_leases SET expires_at = now() - interval '1 second'", &[])
        .await
        .expect("expire the lease");
}

#[tokio::test]
async fn one_holder_at_a_time_and_the_term_grows_on_every_takeover() {
    let db = TestDb::migrated().await;
    let mut s = store(&db).await;
    let lease = Duration::from_secs(30);

    assert_eq!(s.acquire_lease(LEASE_NAME, "a", lease).await.expect("acquire"), Some(1));
    assert_eq!(s.acquire_lease(LEASE_NAME, "b", lease).await.expect("try"), None, "a holds it");
    assert_eq!(s.acquire_lease(LEASE_NAME, "a", lease).await.expect("renew"), Some(1), "a renewal keeps the term");

    expire(&db).await;
    assert_eq!(s.acquire_lease(LEASE_NAME, "b", lease).await.expect("take over"), Some(2));
    assert_eq!(s.acquire_lease(LEASE_NAME, "a", lease).await.expect("try"), None, "b holds it now");

    // Even the same holder gets a new term once its lease has expired: its
    // writes under the old term are fenced off.
    expire(&db).await;
    assert_eq!(s.acquire_lease(LEASE_NAME, "b", lease).await.expect("re-acquire"), Some(3));

    let row = s.lease_holder(LEASE_NAME).await.expect("read").expect("a row");
    assert_eq!((row.holder.as_str(), row.term, row.valid), ("b", 3, true));
    s.release_lease(LEASE_NAME, "b", 3).await.expect("release");
    assert_eq!(s.acquire_lease(LEASE_NAME, "a", lease).await.expect("take over"), Some(4), "released: at once");
}

#[tokio::test]
async fn a_write_fenced_by_a_lost_lease_writes_nothing_and_one_still_held_writes() {
    let db = TestDb::migrated().await;
    db.insert(&sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    let update = db.orphan_update(&sid(1)).await;
    let mut old = store(&db).await;
    let term = old.acquire_lease(LEASE_NAME, "old", Duration::from_secs(30)).await.expect("acquire");
    assert_eq!(term, Some(1));
    old.set_fence(Some(Fence { name: LEASE_NAME.into(), holder: "old".into(), term: 1 }));

    // The old leader stalls; its lease expires and another takes over.
    expire(&db).await;
    let mut new = store(&db).await;
    assert_eq!(new.acquire_lease(LEASE_NAME, "new", Duration::from_secs(30)).await.expect("take over"), Some(2));

    let audit = AuditContext { actor: "old".into(), pass_id: "p".into(), term: Some(1) };
    let stale = old.update_rows(std::slice::from_ref(&update), &audit).await;
    assert!(matches!(stale, Err(StoreError::Fenced { term: 1 })), "{stale:?}");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("active"), "the fenced write changed nothing");
    assert_eq!(
        db.scalar("SELECT count(*) FROM session_audit WHERE trigger = 'reconciler'").await,
        0,
        "and audited nothing"
    );

    // An expired lease that nobody took over fences just the same.
    expire(&db).await;
    new.set_fence(Some(Fence { name: LEASE_NAME.into(), holder: "new".into(), term: 2 }));
    let expired = new.update_rows(std::slice::from_ref(&update), &audit).await;
    assert!(matches!(expired, Err(StoreError::Fenced { term: 2 })), "{expired:?}");

    // The holder of a valid lease writes, and its audit row carries the term.
    assert_eq!(new.acquire_lease(LEASE_NAME, "new", Duration::from_secs(30)).await.expect("again"), Some(3));
    new.set_fence(Some(Fence { name: LEASE_NAME.into(), holder: "new".into(), term: 3 }));
    let audit = AuditContext { actor: "new".into(), pass_id: "p".into(), term: Some(3) };
    let update = RowUpdate { details: serde_json::json!({ "term": 3 }), ..update };
    new.update_rows(&[update], &audit).await.expect("a fenced write under a valid lease");
    assert_eq!(db.state(&sid(1)).await.as_deref(), Some("stopped"));
    assert_eq!(db.scalar("SELECT count(*) FROM session_audit WHERE (details->>'term')::bigint = 3").await, 1);
}

#[tokio::test]
async fn a_replica_stops_counting_itself_leader_before_anyone_may_take_over() {
    let db = TestDb::migrated().await;
    let lease = Lease::new(Duration::from_secs(2));
    let mut s = store(&db).await;
    assert!(lease.renew(&mut s).await.expect("acquire"), "nobody held it");
    assert!(lease.is_valid_now());
    assert!(lease.fence().is_some());
    while lease.is_valid_now() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let locally_ended = Instant::now();
    // Without a renewal, local validity has ended; by the database's clock the
    // lease is still running, so no other replica can hold it yet.
    let row = s.lease_holder(LEASE_NAME).await.expect("read").expect("a row");
    assert!(row.valid, "the database's lease outlives the local one");
    assert!(row.remaining >= Duration::from_millis(50), "by a margin: {:?} left", row.remaining);
    assert_eq!(s.acquire_lease(LEASE_NAME, "other", Duration::from_secs(2)).await.expect("try"), None);
    assert!(lease.fence().is_none(), "no fence once it is no longer valid locally");
    assert!(locally_ended.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_lease_run_in_the_background_keeps_one_leader_and_hands_over_on_release() {
    let db = TestDb::migrated().await;
    let cfg = DatabaseConfig::for_url(&db.url);
    let a = Lease::new(Duration::from_secs(1));
    let b = Lease::new(Duration::from_secs(1));
    a.set_database(&cfg);
    b.set_database(&cfg);
    let stop_a = tokio_util::sync::CancellationToken::new();
    let stop_b = tokio_util::sync::CancellationToken::new();
    let task_a = tokio::spawn(a.clone().run(stop_a.clone()));
    tokio::time::timeout(Duration::from_secs(5), a.gained()).await.expect("a leads");
    let task_b = tokio::spawn(b.clone().run(stop_b.clone()));

    // Over several lease durations, a keeps renewing and b never leads.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(a.is_valid_now() && !b.is_valid_now(), "exactly a leads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.view().holder.as_deref(), Some(a.holder()), "b knows who leads");

    // a shuts down and releases: b takes over well within a lease.
    stop_a.cancel();
    task_a.await.expect("a's task");
    let released = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), b.gained()).await.expect("b takes over");
    assert!(released.elapsed() < Duration::from_millis(1500), "took {:?}", released.elapsed());
    assert_eq!(b.view().term, Some(2));
    assert!(!a.is_valid_now());
    stop_b.cancel();
    task_b.await.expect("b's task");
}
