//! The operator's view: draining a backlog at a bounded rate, explaining one
//! session, the findings of the last pass, and the admin endpoints.

mod common;

use common::{ago, config, TestDb};
use sessiond::reconcile::{PassRequest, Reconciler};
use sessiond::simctl::SimController;

/// (stopped rows, the youngest stopped row's age, the oldest live row's age), in seconds.
async fn drained(db: &TestDb) -> (i64, Option<f64>, Option<f64>) {
    let r = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'stopped'),
                    min(extract(epoch FROM now() - created_at)::float8) FILTER (WHERE state = 'stopped'),
                    max(extract(epoch FROM now() - created_at)::float8) FILTER (WHERE state = 'active')
               FROM sessions",
            &[],
        )
        .await
        .expect("count");
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test]
async fn a_backlog_three_times_the_limit_drains_in_three_daemon_passes_oldest_first() {
    const N: u32 = 3000;
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO sessions (session_id, owner_id, controller_instance, state, created_at, updated_at)
             SELECT 'exec_20260101_000000_' || lpad(to_hex(n), 8, '0'), 'u' || n, 'ctrl-a', 'active',
                    now() - make_interval(secs => 600 + n), now() - make_interval(secs => 600 + n)
               FROM generate_series(1, {N}) n"
        ))
        .await
        .expect("rows");
    for n in 1..=N {
        a.add(&format!("exec_20260101_000000_{n:08x}"), &format!("u{n}"), "running", Some(ago(600 + i64::from(n))));
    }
    let cfg = config(&db, &[&a], "grace = \"0s\"\nconfirmations = 1\nmax_repairs_per_pass = 1000");
    let mut r = Reconciler::new(cfg).expect("reconciler");
    assert!(r.pass(PassRequest::daemon()).await.findings.is_empty(), "the first pass records the boot id");
    a.restart(); // memory lost: 3,000 orphans, explained by the restart

    let mut youngest_repaired = f64::MAX;
    for pass in 1..=3_i64 {
        let rep = r.pass(PassRequest::daemon()).await;
        let outcomes = common::outcomes(&rep);
        let deferred = 3000 - pass * 1000;
        let want: Vec<String> = if deferred > 0 {
            vec![format!("orphaned.deferred={deferred}"), "orphaned.repaired=1000".into()]
        } else {
            vec!["orphaned.repaired=1000".into()]
        };
        assert_eq!(outcomes, want, "pass {pass}");
        assert!(rep.guard_tripped.is_empty(), "a backlog is not a mass disappearance");
        let (stopped, youngest_stopped, oldest_live) = drained(&db).await;
        assert_eq!(stopped, pass * 1000, "pass {pass}");
        let youngest_stopped = youngest_stopped.expect("some stopped");
        if let Some(oldest_live) = oldest_live {
            assert!(oldest_live < youngest_stopped, "pass {pass} repaired the oldest first");
        }
        assert!(youngest_stopped < youngest_repaired, "each pass takes the next oldest");
        youngest_repaired = youngest_stopped;
    }
    assert!(r.pass(PassRequest::daemon()).await.findings.is_empty(), "drained");
    assert_eq!(db.audit_count().await, i64::from(N), "one audit row per repair");
}
