//! Several replicas (`[ha] enabled`), as real `sessiond run` processes on a
//! real PostgreSQL, directly and through PgBouncer in transaction pooling
//! mode: one leader at a time, followers that fetch and repair nothing, a
//! failover when the leader is killed, and a leader paused past its lease that
//! writes nothing and sends no stop when it wakes. A fault injector keeps the
//! replicas busy throughout; every fault must be repaired exactly once.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{ago, sessiond, signal, text, write, Bouncer, Guarded, TestDb};
use sessiond::simctl::SimController;

const LEASE: Duration = Duration::from_secs(3);
const INTERVAL: Duration = Duration::from_secs(1);

/// One `sessiond run` replica, its log kept in a file.
struct Replica {
    process: Guarded,
    pid: u32,
    port: u16,
    dir: tempfile::TempDir,
}

impl Replica {
    async fn start(config: &str) -> Replica {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "[daemon]\ninterval = \"{}\"\nlisten = \"127.0.0.1:0\"\n\n{config}",
            humantime::format_duration(INTERVAL)
        );
        let path = write(dir.path(), "sessiond.toml", &text);
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let child = sessiond(&["run", "--config"])
            .arg(&path)
            .env("SESSIOND_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sessiond run");
        let pid = child.id();
        let process = Guarded(Some(child));
        let port = common::listen_port_from_log(&dir.path().join("stderr.log")).await;
        Replica { process, pid, port, dir }
    }

    /// The actor its audit rows and stop requests carry contains this.
    fn marker(&self) -> String {
        format!("/{}/", self.pid)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = common::http()
            .get(format!("http://127.0.0.1:{}{path}", self.port))
            .timeout(Duration::from_millis(700))
            .send()
            .await
            .ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.text().await.ok()?))
    }

    /// (leader, term) as its metrics say, or None if it does not answer.
    async fn leadership(&self) -> Option<(bool, i64)> {
        let (_, body) = self.get("/metrics").await?;
        let value = |name: &str| -> Option<i64> {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
                .map(|v| v as i64)
        };
        Some((value("sessiond_leader")? == 1, value("sessiond_leader_term")?))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.process.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ha_config(url: &str, a: &SimController) -> String {
    format!(
        "[database]\nurl = \"{url}\"\nstatement_timeout = \"3s\"\n\n{}[reconcile]\ngrace = \"1s\"\nconfirmations = 2\n\n\
         [ha]\nenabled = true\nlease = \"{}\"\n",
        a.controller_toml("2s"),
        humantime::format_duration(LEASE)
    )
}

/// Which replicas say they lead, polled every replica; panics if two ever do.
async fn leaders(replicas: &[Replica]) -> Vec<(usize, i64)> {
    let mut out = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        if let Some((true, term)) = r.leadership().await {
            out.push((i, term));
        }
    }
    out
}

/// Waits until exactly one replica among `among` leads; returns it and its term.
async fn wait_leader(replicas: &[Replica], among: &[usize], within: Duration) -> (usize, i64) {
    let until = Instant::now() + within;
    loop {
        let l: Vec<(usize, i64)> = leaders(replicas).await.into_iter().filter(|(i, _)| among.contains(i)).collect();
        if let [one] = l.as_slice() {
            return *one;
        }
        assert!(Instant::now() < until, "no single leader among {among:?} within {within:?}: {l:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Orphan,
    Zombie,
    Unpersisted,
    Stuck,
}

/// Injects faults of every kind, each on its own session and owner.
struct Injector {
    n: u32,
    faults: BTreeMap<String, Kind>,
}

impl Injector {
    fn id(n: u32) -> String {
        format!("exec_20261122_000000_{n:08x}")
    }

    async fn inject(&mut self, db: &TestDb, a: &SimController, kind: Kind) -> String {
        self.n += 1;
        let id = Self::id(self.n);
        let owner = format!("chaos-{}", self.n);
        match kind {
            Kind::Orphan => db.insert(&id, &owner, "ctrl-a", "active", ago(3600)).await,
            Kind::Zombie => {
                db.insert(&id, &owner, "ctrl-a", "stopped", ago(3600)).await;
                a.add(&id, &owner, "running", Some(ago(3600)));
            }
            Kind::Unpersisted => a.add(&id, &owner, "running", Some(ago(3600))),
            Kind::Stuck => db.insert(&id, &owner, "ctrl-a", "creating", ago(3600)).await,
        }
        self.faults.insert(id.clone(), kind);
        id
    }

    /// Whether the fault on `id` is repaired, as the row and the controller show.
    async fn repaired(db: &TestDb, a: &SimController, id: &str, kind: Kind) -> bool {
        let state = db.state(id).await;
        match kind {
            Kind::Orphan => state.as_deref() == Some("stopped"),
            Kind::Zombie => !a.holds(id),
            Kind::Unpersisted => state.is_some(),
            Kind::Stuck => state.as_deref() == Some("failed"),
        }
    }
}

async fn audit_rows(db: &TestDb) -> Vec<(String, String, Option<i64>)> {
    db.client()
        .await
        .query(
            "SELECT session_id, actor, (details->>'term')::bigint FROM session_audit WHERE trigger = 'reconciler'",
            &[],
        )
        .await
        .expect("read the audit")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Logs every row written to the sessions table and sessiond's own tables
/// (not the lease), with the writing process's `application_name` and the
/// time of the statement: what a replica wrote, and when.
async fn log_writes(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE chaos_writes (tbl text, app text, at timestamptz);
             CREATE FUNCTION chaos_log() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO chaos_writes VALUES (TG_TABLE_NAME, current_setting('application_name'), clock_timestamp());
                 RETURN NULL;
             END $$;
             CREATE TRIGGER chaos_log AFTER INSERT OR UPDATE OR DELETE ON sessions
                 FOR EACH ROW EXECUTE FUNCTION chaos_log();
             CREATE TRIGGER chaos_log AFTER INSERT OR UPDATE OR DELETE ON session_audit
                 FOR EACH ROW EXECUTE FUNCTION chaos_log();
             CREATE TRIGGER chaos_log AFTER INSERT OR UPDATE OR DELETE ON sessiond_stop_intents
                 FOR EACH ROW EXECUTE FUNCTION chaos_log();
             CREATE TRIGGER chaos_log AFTER INSERT OR UPDATE OR DELETE ON sessiond_instance_state
                 FOR EACH ROW EXECUTE FUNCTION chaos_log();
             CREATE TABLE chaos_terms (holder text, term bigint, at timestamptz);
             CREATE FUNCTION chaos_term() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF TG_OP = 'INSERT' OR NEW.term <> OLD.term THEN
                     INSERT INTO chaos_terms VALUES (NEW.holder, NEW.term, clock_timestamp());
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER chaos_term AFTER INSERT OR UPDATE ON sessiond_leases
                 FOR EACH ROW EXECUTE FUNCTION chaos_term();",
        )
        .await
        .expect("install the write log");
}

/// Rows `pid` wrote at or after `since` and before it next took the lease
/// (a term after `term`), by table.
async fn writes_since(db: &TestDb, pid: u32, term: i64, since: DateTime<Utc>) -> Vec<(String, i64)> {
    db.client()
        .await
        .query(
            "SELECT tbl, count(*) FROM chaos_writes
              WHERE app = $1 AND at >= $2
                AND at < coalesce((SELECT min(at) FROM chaos_terms WHERE holder LIKE $3 AND term > $4), 'infinity')
              GROUP BY tbl ORDER BY tbl",
            &[&format!("sessiond/{pid}"), &since, &format!("%/{pid}/%"), &term],
        )
        .await
        .expect("read the write log")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// How many kill-and-pause rounds a chaos run has (`SESSIOND_CHAOS_ROUNDS`,
/// default 3): more for a longer soak.
fn rounds() -> usize {
    std::env::var("SESSIOND_CHAOS_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3)
}

/// A leader that was paused past its lease, and when it woke.
struct Paused {
    pid: u32,
    term: i64,
    woke_at: DateTime<Utc>,
    audit_before_wake: usize,
}

/// The chaos run against `url` (direct, or through PgBouncer): three replicas,
/// a stream of faults, and rounds of killing the leader (systemd starts a new
/// process) and pausing the leader past its lease.
async fn chaos(db: &TestDb, url: &str) {
    log_writes(db).await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    // Stops take a while to answer, so some are always in flight.
    a.set_stop_delay(Duration::from_millis(300));
    // Healthy sessions that no replica may ever touch.
    let mut healthy = Vec::new();
    for n in 0..20u32 {
        let id = format!("exec_20261122_111111_{n:08x}");
        db.insert(&id, &format!("base-{n}"), "ctrl-a", "active", ago(3600)).await;
        a.add(&id, &format!("base-{n}"), "running", Some(ago(3600)));
        healthy.push(id);
    }
    let config = ha_config(url, &a);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(&config).await);
    }
    let all = [0, 1, 2];
    let (mut leader, mut term) = wait_leader(&replicas, &all, Duration::from_secs(20)).await;
    let mut terms = vec![term];
    for r in &replicas {
        for _ in 0..40 {
            if matches!(r.get("/readyz").await, Some((200, _))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(matches!(r.get("/readyz").await, Some((200, _))), "every replica is ready:\n{}", r.log());
    }

    let mut inj = Injector { n: 0, faults: BTreeMap::new() };
    let kinds = [Kind::Orphan, Kind::Zombie, Kind::Unpersisted, Kind::Stuck];
    let mut several_leaders = Vec::new();
    let mut failovers = Vec::new();
    let mut paused_leaders: Vec<Paused> = Vec::new();
    let mut tick = 0usize;
    let mut next_kind = || {
        tick += 1;
        kinds[tick % kinds.len()]
    };

    for round in 0..rounds() {
        // A steady stream of faults under the current leader.
        for _ in 0..10 {
            let k = next_kind();
            inj.inject(db, &a, k).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
            let l = leaders(&replicas).await;
            if l.len() > 1 {
                several_leaders.push(l);
            }
        }

        // SIGKILL the leader; a fault injected right after is repaired by a new
        // leader within the lease and an interval (and two passes' time).
        replicas[leader].kill();
        let killed = Instant::now();
        let marker = inj.inject(db, &a, Kind::Orphan).await;
        let others: Vec<usize> = all.iter().copied().filter(|i| *i != leader).collect();
        let (next, next_term) = wait_leader(&replicas, &others, LEASE * 3).await;
        let took_over = killed.elapsed();
        while !Injector::repaired(db, &a, &marker, Kind::Orphan).await {
            assert!(killed.elapsed() < LEASE * 4, "round {round}: the new leader never repaired the marker fault");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let failover = killed.elapsed();
        eprintln!(
            "round {round}: new leader {:.2}s after the kill, marker repaired after {:.2}s (lease {:?} + interval {:?})",
            took_over.as_secs_f64(),
            failover.as_secs_f64(),
            LEASE,
            INTERVAL
        );
        assert!(next_term > term, "a takeover is a new term: {term} → {next_term}");
        failovers.push(failover);
        // systemd starts the killed replica again.
        replicas[leader] = Replica::start(&config).await;
        (leader, term) = (next, next_term);
        terms.push(term);

        // A burst of zombies, then pause the leader (SIGSTOP) while its stops
        // are in flight, for longer than its lease.
        for _ in 0..24 {
            inj.inject(db, &a, Kind::Zombie).await;
        }
        let marker = replicas[leader].marker();
        for _ in 0..300 {
            if a.stop_requests().iter().any(|r| r.actor.as_deref().is_some_and(|x| x.contains(&marker))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        signal(replicas[leader].pid, "STOP");
        let paused = Instant::now();
        let rest: Vec<usize> = all.iter().copied().filter(|i| *i != leader).collect();
        let (next, next_term) = wait_leader(&replicas, &rest, LEASE * 4).await;
        assert!(next_term > term);
        // What the paused leader wrote under its term, now that another leads.
        let audit_before_wake = audit_rows(db).await.iter().filter(|r| r.2 == Some(term)).count();
        // Keep it paused past its lease, with faults still arriving.
        while paused.elapsed() < LEASE + Duration::from_secs(2) {
            let k = next_kind();
            inj.inject(db, &a, k).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        let woke_at = Utc::now();
        signal(replicas[leader].pid, "CONT");
        paused_leaders.push(Paused { pid: replicas[leader].pid, term, woke_at, audit_before_wake });
        (leader, term) = (next, next_term);
        terms.push(term);
    }

    // More faults while the last woken replica finds out it lost the lease.
    for _ in 0..10 {
        let k = next_kind();
        inj.inject(db, &a, k).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let l = leaders(&replicas).await;
        if l.len() > 1 {
            several_leaders.push(l);
        }
    }

    // Quiescence: every fault repaired (abandoned stop intents expire first).
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let mut open = Vec::new();
        for (id, kind) in &inj.faults {
            if !Injector::repaired(db, &a, id, *kind).await {
                open.push((id.clone(), *kind));
            }
        }
        let intents: i64 = db
            .client()
            .await
            .query_one("SELECT count(*) FROM sessiond_stop_intents WHERE settled_at IS NULL", &[])
            .await
            .expect("intents")
            .get(0);
        if open.is_empty() && intents == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "not repaired after a minute: {open:?}, {intents} open intents\n--- leader log:\n{}",
            replicas[leader].log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(INTERVAL * 3).await;

    // Exactly once: one audit row per fault, one stop request per zombie, and
    // the healthy sessions untouched.
    let rows = audit_rows(db).await;
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rows {
        *per_id.entry(r.0.as_str()).or_default() += 1;
    }
    let requests = a.stop_requests();
    let mut stops: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &requests {
        *stops.entry(r.session_id.as_str()).or_default() += 1;
    }
    for (id, kind) in &inj.faults {
        assert_eq!(per_id.get(id.as_str()).copied().unwrap_or(0), 1, "{kind:?} {id}: one audit row");
        if *kind == Kind::Zombie {
            assert_eq!(stops.get(id.as_str()).copied().unwrap_or(0), 1, "zombie {id}: one stop request");
        }
    }
    for id in &healthy {
        assert!(a.holds(id), "healthy {id} was stopped");
        assert_eq!(db.state(id).await.as_deref(), Some("active"), "healthy {id}");
        assert!(!per_id.contains_key(id.as_str()), "healthy {id} was audited");
    }
    assert_eq!(rows.len(), inj.faults.len(), "no audit row beyond the faults");
    assert_eq!(requests.len(), stops.len(), "no stop request twice");
    // Every audit row of the run names the term of the leader that wrote it.
    assert!(rows.iter().all(|r| r.2.is_some()), "an audit row without a term");

    // Each paused leader wrote nothing and sent no stop once it had lost the lease.
    for p in &paused_leaders {
        let after = rows.iter().filter(|r| r.2 == Some(p.term)).count();
        assert_eq!(after, p.audit_before_wake, "the leader of term {} audited after losing the lease", p.term);
        let late: Vec<_> = requests
            .iter()
            .filter(|r| {
                r.actor.as_deref().is_some_and(|x| x.contains(&format!("/{}/", p.pid)))
                    && r.term == Some(p.term)
                    && r.received_at >= p.woke_at
            })
            .collect();
        assert!(late.is_empty(), "the paused ex-leader of term {} sent stops after it woke: {late:?}", p.term);
        let late_writes = writes_since(db, p.pid, p.term, p.woke_at).await;
        assert!(late_writes.is_empty(), "the paused ex-leader of term {} wrote after it woke: {late_writes:?}", p.term);
        let all_writes = writes_since(db, p.pid, p.term, Utc::now() - chrono::Duration::days(1)).await;
        assert!(!all_writes.is_empty(), "the leader of term {} did write while it led", p.term);
    }
    assert!(several_leaders.is_empty(), "two replicas said they led at once: {several_leaders:?}");
    assert!(terms.windows(2).all(|w| w[0] < w[1]), "terms only grow: {terms:?}");
    let slowest = failovers.iter().max().copied().unwrap_or_default();
    eprintln!(
        "chaos: {} rounds, {} faults, {} audit rows, {} stop requests, terms {terms:?}, slowest failover {:.2}s",
        rounds(),
        inj.faults.len(),
        rows.len(),
        requests.len(),
        slowest.as_secs_f64()
    );
    assert!(
        slowest <= LEASE + INTERVAL + Duration::from_millis(2500),
        "a fault waited {slowest:?} after a kill: more than lease + interval (+ two passes' slack)"
    );
    for (i, r) in replicas.iter().enumerate() {
        if i != leader {
            assert_eq!(r.leadership().await.map(|s| s.0), Some(false), "replica {i} follows");
        }
    }
    let woken = paused_leaders.last().map(|p| p.pid);
    let woken = replicas.iter().find(|r| Some(r.pid) == woken).expect("the last paused replica runs");
    assert!(woken.log().contains("lost the lease"), "it says why it stopped:\n{}", woken.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_three_replicas_kill_and_pause_the_leader() {
    let db = TestDb::migrated().await;
    chaos(&db, &db.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_three_replicas_through_pgbouncer_in_transaction_mode() {
    let db = TestDb::migrated().await;
    let bouncer = Bouncer::start().await;
    chaos(&db, &bouncer.url(&db)).await;
    drop(bouncer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_fetch_nothing_repair_nothing_and_are_ready() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let config = ha_config(&db.url, &a);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(&config).await);
    }
    let (leader, term) = wait_leader(&replicas, &[0, 1, 2], Duration::from_secs(20)).await;
    tokio::time::sleep(INTERVAL * 3).await;
    for (i, r) in replicas.iter().enumerate() {
        let (_, metrics) = r.get("/metrics").await.expect("metrics");
        let passes: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("sessiond_reconcile_passes_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let (_, status) = r.get("/status").await.expect("status");
        let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
        assert_eq!(r.get("/readyz").await.map(|s| s.0), Some(200), "replica {i} is ready");
        assert!(metrics.contains(&format!("sessiond_leader_term {term}")), "replica {i} knows the term");
        if i == leader {
            assert!(passes >= 2.0, "the leader runs passes");
            assert!(metrics.contains("sessiond_leader 1"));
            assert!(metrics.contains("sessiond_controller_up{controller=\"ctrl-a\"} 1"));
            assert_eq!(status["last_pass"]["role"]["kind"], "leader");
        } else {
            assert_eq!(passes, 0.0, "a follower counts no pass:\n{metrics}");
            assert!(metrics.contains("sessiond_leader 0"));
            assert!(!metrics.contains("sessiond_controller_up{"), "a follower exports no view of the fleet");
            assert!(!metrics.contains("sessiond_discrepancies{"), "nor discrepancies");
            assert_eq!(status["last_pass"]["role"]["kind"], "follower");
            assert!(status["last_pass"]["role"]["leader"]
                .as_str()
                .is_some_and(|l| l.contains(&format!("/{}/", replicas[leader].pid))));
        }
    }

    // While a replica leads, `once` does not repair behind its back; a dry run looks.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "once.toml", &config);
    let p = path.to_str().expect("utf-8").to_owned();
    let q = p.clone();
    let out = tokio::task::spawn_blocking(move || common::run(&["once", "--config", &q])).await.expect("join");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("another replica leads") && err.contains("--dry-run"), "{err}");
    let out =
        tokio::task::spawn_blocking(move || common::run(&["once", "--dry-run", "--config", &p])).await.expect("join");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // SIGTERM releases the lease: another replica leads well within a lease.
    signal(replicas[leader].pid, "TERM");
    let stopped = Instant::now();
    let rest: Vec<usize> = [0, 1, 2].into_iter().filter(|i| *i != leader).collect();
    let (_, next_term) = wait_leader(&replicas, &rest, LEASE * 2).await;
    assert!(next_term > term);
    // Within a follower's next attempt, a third of the lease (plus polling).
    assert!(
        stopped.elapsed() < LEASE / 3 + Duration::from_secs(1),
        "released on shutdown: took {:?}",
        stopped.elapsed()
    );
}

#[tokio::test]
async fn migrate_refuses_a_pooler_and_says_how_to_proceed_while_run_and_once_work_through_it() {
    let db = TestDb::empty().await;
    let bouncer = Bouncer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let through = bouncer.url(&db);
    let a = SimController::start("ctrl-a").await.expect("controller");
    let cfg = format!(
        "[database]\nurl = \"{through}\"\n\n{}[reconcile]\ngrace = \"0s\"\nconfirmations = 1\n",
        a.controller_toml("2s")
    );
    let path: PathBuf = write(dir.path(), "sessiond.toml", &cfg);
    let p = path.to_str().expect("utf-8").to_owned();

    let out = common::run(&["migrate", "--config", &p]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("pooler or proxy") && err.contains("direct connection") && err.contains("--allow-proxy"),
        "{err}"
    );
    let tables: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(tables, 0, "a refused migrate creates nothing");

    // A direct URL migrates; `check` through the pooler warns and passes.
    let direct = write(dir.path(), "direct.toml", &cfg.replace(&through, &db.url));
    let out = common::run(&["migrate", "--config", direct.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = common::run(&["check", "--config", &p]);
    let lines = text(&out.stdout);
    assert!(lines.lines().any(|l| l.starts_with("warn") && l.contains("pooler")), "{lines}");

    // Through the pooler, `once` reads and repairs.
    db.insert(&common::sid(1), "u1", "ctrl-a", "active", ago(600)).await;
    let q = p.clone();
    let out = tokio::task::spawn_blocking(move || common::run(&["once", "--config", &q])).await.expect("join");
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(db.state(&common::sid(1)).await.as_deref(), Some("stopped"));

    // --allow-proxy is the way through for a proxy that keeps sessions.
    let out = common::run(&["migrate", "--allow-proxy", "--config", &p]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("up to date"));
    drop(bouncer);
}

#[tokio::test]
async fn the_fence_never_makes_an_application_write_wait() {
    // A fenced repair holds the lease row and the rows it changes for one
    // statement only; the application's writes to those rows never wait on it.
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    for n in 0..30u32 {
        db.insert(&common::sid(n), &format!("u{n}"), "ctrl-a", "active", ago(600)).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = format!(
        "[database]\nurl = \"{}\"\n\n{}[reconcile]\ngrace = \"0s\"\nconfirmations = 1\nguard_min_orphans = 1000\n\n\
         [ha]\nenabled = true\nlease = \"5s\"\n",
        db.url,
        a.controller_toml("2s")
    );
    let path = write(dir.path(), "sessiond.toml", &cfg);
    let p = path.to_str().expect("utf-8").to_owned();
    let app = db.client().await;
    let child = tokio::task::spawn_blocking(move || common::run(&["once", "--json", "--config", &p]));
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while !child.is_finished() && started.elapsed() < Duration::from_secs(20) {
        // The application writes the even rows; the odd ones are repaired.
        for n in (0..30u32).step_by(2) {
            let t = Instant::now();
            app.execute("UPDATE sessions SET updated_at = now() WHERE session_id = $1", &[&common::sid(n)])
                .await
                .expect("application write");
            slowest = slowest.max(t.elapsed());
        }
    }
    let out = child.await.expect("join");
    assert!(out.status.success() || out.status.code() == Some(1), "{}", text(&out.stderr));
    assert!(slowest < Duration::from_millis(500), "an application write waited {slowest:?}");
    let term_rows: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM session_audit WHERE details->>'term' = '1'", &[])
        .await
        .expect("count")
        .get(0);
    assert!(term_rows >= 15, "the once pass led with term 1 and audited under it: {term_rows}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_cannot_change_on_reload_and_the_running_config_stays() {
    let db = TestDb::migrated().await;
    let a = SimController::start("ctrl-a").await.expect("controller");
    let config = ha_config(&db.url, &a);
    let replicas = vec![Replica::start(&config).await];
    let (_, term) = wait_leader(&replicas, &[0], Duration::from_secs(20)).await;
    let path = replicas[0].dir.path().join("sessiond.toml");
    let text = std::fs::read_to_string(&path).expect("read the config");
    std::fs::write(&path, text.replace("enabled = true", "enabled = false")).expect("rewrite the config");
    signal(replicas[0].pid, "HUP");
    let until = Instant::now() + Duration::from_secs(10);
    while !replicas[0].log().contains("cannot change on reload") {
        assert!(Instant::now() < until, "the reload was not rejected:\n{}", replicas[0].log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(INTERVAL * 2).await;
    assert_eq!(replicas[0].leadership().await, Some((true, term)), "it still leads, under the same term");
}
