//! `sessiond-bench`: how a pass scales, against the physical floor and a naive peer.
//!
//! For each size N it loads N sessions into a fresh database, spread over four
//! controller instances (1% orphans, 1% zombies, 1% unpersisted), serves the
//! matching live lists from four HTTP servers, and measures:
//!
//! - **floor**: streaming the live rows out with `COPY … TO STDOUT`, plus fetching
//!   and parsing the four lists with a minimal reader — the least any
//!   reconciler must spend to see both sides;
//! - **sessiond**: a full pass (classification and every repair), and a
//!   read-only pass, each in a fresh child process so its peak memory is its own;
//! - **naive**: a query per session, as the incidents' services did, run for a
//!   sample and extrapolated;
//! - the pass's peak memory per session, its database round trips, and the
//!   latency of `/metrics` scrapes while it runs.
//!
//! ```text
//! cargo run --release --bin sessiond-bench -- --sessions 10000,100000,1000000
//! ```

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use tokio_postgres::NoTls;

const INSTANCES: usize = 4;

#[derive(Parser)]
#[command(name = "sessiond-bench", about = "Measures a sessiond pass against the physical floor and a naive peer")]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Session counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    sessions: Vec<usize>,
    /// The server to create the throw-away databases on.
    #[arg(long, env = "SESSIOND_BENCH_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// Point queries the naive reconciler runs before its time is extrapolated.
    #[arg(long, default_value_t = 20_000)]
    naive_sample: usize,
    /// Read-only passes per size, each paired with a floor measured just
    /// before it; the ratio reported is their median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The shape of the session ids: `exec` (the default `id_pattern`'s
    /// executor ids, in id order second by second) or `uuid` (random order).
    #[arg(long, value_enum, default_value_t = IdShape::Exec)]
    ids: IdShape,
}

#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
enum IdShape {
    #[default]
    Exec,
    Uuid,
}

/// Set once from the command line, before any id is made.
static ID_SHAPE: std::sync::OnceLock<IdShape> = std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Mode {
    /// (internal) Run one pass in this fresh process and print its figures as JSON.
    Pass {
        #[arg(long)]
        config: std::path::PathBuf,
        #[arg(long)]
        dry_run: bool,
    },
}

/// What the child process reports about its pass.
#[derive(Serialize, Deserialize, Debug)]
struct PassFigures {
    seconds: f64,
    outcome: String,
    rss_before: u64,
    peak_rss: u64,
    round_trips: u64,
    repaired: u64,
    findings: u64,
    scrapes: usize,
    scrape_p50_ms: f64,
    scrape_p99_ms: f64,
    scrape_max_ms: f64,
    stages: [f64; 4],
    /// `GET /findings?limit=100` and `GET /sessions/{id}` while the pass
    /// runs, after an earlier pass has left its findings (read-only runs).
    api_findings_ms: [f64; 3],
    api_session_ms: [f64; 3],
    api_counts: [usize; 2],
    api_session_idle_ms: [f64; 3],
}

fn proc_status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The child: one pass, with /metrics scraped in a loop while it runs.
async fn child_pass(config: &std::path::Path, dry_run: bool) -> anyhow::Result<PassFigures> {
    let cfg = sessiond::config::Config::load(config, &sessiond::config::Overrides::default())?;
    let shared = sessiond::http::Shared::new(&cfg, sessiond::web::WebConfig::plain())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sessiond::http::serve(listener, Arc::clone(&shared), stop.clone()));
    let mut reconciler = sessiond::reconcile::Reconciler::new(Arc::new(cfg))?;
    if dry_run {
        // An earlier pass leaves findings for the API to answer from while
        // the measured one runs.
        let earlier = reconciler.pass(sessiond::reconcile::PassRequest::once().dry_run(true)).await;
        shared.record(&earlier);
        // The API's own connection is made on its first request, once per
        // process: not what is measured.
        let _ = reqwest::get(format!("http://{addr}/sessions/{}", sid(0))).await;
    }

    let scraping = stop.clone();
    let api = dry_run;
    let scraper = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let urls = [
            format!("http://{addr}/metrics"),
            format!("http://{addr}/findings?limit=100"),
            format!("http://{addr}/sessions/{}", sid(0)),
        ];
        let mut latencies: [Vec<f64>; 3] = Default::default();
        let mut turn = 0usize;
        while !scraping.is_cancelled() {
            let which = if api { turn % 3 } else { 0 };
            turn += 1;
            let t = Instant::now();
            if let Ok(resp) = client.get(&urls[which]).send().await {
                let ok = resp.status().is_success();
                let _ = resp.bytes().await;
                if ok {
                    latencies[which].push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies
    });

    // The peak is measured from here: the pass, not the process start-up.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = proc_status_kb("VmRSS:") * 1024;
    let t = Instant::now();
    let report = reconciler.pass(sessiond::reconcile::PassRequest::once().dry_run(dry_run)).await;
    let seconds = t.elapsed().as_secs_f64();
    let peak_rss = proc_status_kb("VmHWM:") * 1024;
    // The same request with no pass running, for comparison.
    let mut idle_ms = Vec::new();
    if dry_run {
        let client = reqwest::Client::new();
        for _ in 0..20 {
            let t = Instant::now();
            if let Ok(resp) = client.get(format!("http://{addr}/sessions/{}", sid(0))).send().await {
                let _ = resp.bytes().await;
                idle_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        idle_ms.sort_by(f64::total_cmp);
    }
    stop.cancel();
    let [mut latencies, mut findings_ms, mut session_ms] = scraper.await.unwrap_or_default();
    for l in [&mut latencies, &mut findings_ms, &mut session_ms] {
        l.sort_by(f64::total_cmp);
    }
    let figures = |l: &[f64]| [percentile(l, 0.5), percentile(l, 0.99), l.last().copied().unwrap_or(0.0)];
    if report.outcome != sessiond::reconcile::PassOutcome::Ok {
        bail!("the pass was {:?}: {:?}", report.outcome, report.error);
    }
    let repaired = report
        .outcomes_by_kind()
        .iter()
        .filter(|((_, o), _)| *o == sessiond::model::RepairResult::Repaired)
        .map(|(_, n)| *n)
        .sum();
    Ok(PassFigures {
        seconds,
        outcome: report.outcome.as_str().into(),
        rss_before,
        peak_rss,
        round_trips: report.db_round_trips,
        repaired,
        findings: report.findings.len() as u64,
        scrapes: latencies.len(),
        scrape_p50_ms: percentile(&latencies, 0.5),
        scrape_p99_ms: percentile(&latencies, 0.99),
        scrape_max_ms: latencies.last().copied().unwrap_or(0.0),
        stages: [report.stages.fetch, report.stages.read, report.stages.classify, report.stages.apply],
        api_findings_ms: figures(&findings_ms),
        api_session_ms: figures(&session_ms),
        api_counts: [findings_ms.len(), session_ms.len()],
        api_session_idle_ms: figures(&idle_ms),
    })
}

/// Session `i`'s id, in the shape of the default `id_pattern`'s executor
/// ids: the second it was created (100 sessions a second, from 00:00:00),
/// then 8 hex digits that are random-looking but unique (an odd multiplier is
/// a bijection modulo 2^32). Sessions are listed and loaded in creation
/// order, so, as in production, a list and the table's heap order are in id
/// order only second by second.
fn sid(i: usize) -> String {
    if let IdShape::Uuid = ID_SHAPE.get().copied().unwrap_or_default() {
        // A random-looking high half (splitmix64's finaliser) and `i` in the
        // low half, so ids are unique and in no order.
        let mut z = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        return uuid::Uuid::from_u64_pair(z, i as u64).hyphenated().to_string();
    }
    let second = i / 100;
    let (h, m, s) = (second / 3600, second / 60 % 60, second % 60);
    let tail = (i as u32).wrapping_mul(0x9E37_79B1) ^ 0x5BD1_E995;
    format!("exec_20261121_{h:02}{m:02}{s:02}_{tail:08x}")
}

/// What session `i` is: 0 orphan, 1 zombie, 2 unpersisted, else consistent.
fn category(i: usize) -> usize {
    i % 100
}

/// A static HTTP server: GET answers `body`, POST (a stop) answers 200.
async fn serve_static(body: Bytes, stops: Arc<AtomicU64>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (body, stops) = (body.clone(), Arc::clone(&stops));
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let reply = if req.method() == hyper::Method::POST {
                        stops.fetch_add(1, Ordering::Relaxed);
                        Bytes::from_static(b"{}")
                    } else {
                        body.clone()
                    };
                    async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(reply))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn list_bodies(n: usize) -> Vec<Bytes> {
    let mut bodies: Vec<String> = (0..INSTANCES)
        .map(|j| format!("{{\"instance\":\"ctrl-{j}\",\"boot_id\":\"bench\",\"generated_at\":\"2026-11-21T10:00:00Z\",\"sessions\":["))
        .collect();
    let mut first = [true; INSTANCES];
    for i in (0..n).filter(|i| category(*i) != 0) {
        let j = i % INSTANCES;
        if !first[j] {
            bodies[j].push(',');
        }
        first[j] = false;
        bodies[j].push_str(&format!(
            "{{\"session_id\":\"{}\",\"owner_id\":\"u{i}\",\"state\":\"running\",\"started_at\":\"2026-11-21T09:00:00Z\"}}",
            sid(i)
        ));
    }
    bodies
        .into_iter()
        .map(|mut b| {
            b.push_str("]}");
            Bytes::from(b)
        })
        .collect()
}

async fn load(client: &tokio_postgres::Client, n: usize) -> anyhow::Result<()> {
    let sink = client
        .copy_in(
            "COPY sessions (session_id, owner_id, controller_instance, state, created_at, updated_at, ended_at) FROM STDIN",
        )
        .await?;
    futures_util::pin_mut!(sink);
    let mut buf = String::with_capacity(1 << 20);
    for i in (0..n).filter(|i| category(*i) != 2) {
        let (state, ended) = if category(i) == 1 { ("stopped", "2026-11-21 09:30:00+00") } else { ("active", "\\N") };
        buf.push_str(&format!(
            "{}\tu{i}\tctrl-{}\t{state}\t2026-11-21 09:00:00+00\t2026-11-21 09:00:00+00\t{ended}\n",
            sid(i),
            i % INSTANCES
        ));
        if buf.len() > (1 << 20) {
            sink.send(Bytes::from(std::mem::take(&mut buf))).await?;
        }
    }
    sink.send(Bytes::from(buf)).await?;
    sink.finish().await?;
    client.batch_execute("ANALYZE sessions").await?;
    Ok(())
}

#[derive(Deserialize)]
struct MinList<'a> {
    #[serde(borrow)]
    sessions: Vec<MinSession<'a>>,
}

#[derive(Deserialize)]
struct MinSession<'a> {
    #[serde(borrow)]
    session_id: &'a str,
    #[serde(borrow)]
    owner_id: &'a str,
    #[serde(borrow)]
    state: &'a str,
}

struct Figures {
    n: usize,
    load_s: f64,
    /// The floor measured just before the full pass.
    floor: Floor,
    full: PassFigures,
    /// The read-only passes, each with the floor measured just before it.
    reads: Vec<(Floor, PassFigures)>,
    naive_s: f64,
    naive_sample: usize,
}

impl Figures {
    fn floor_s(&self) -> f64 {
        self.floor.seconds()
    }

    /// The median read-only round, by its ratio to its own floor.
    fn read(&self) -> (f64, &PassFigures) {
        let mut rounds: Vec<(f64, &PassFigures)> =
            self.reads.iter().map(|(floor, pass)| (pass.seconds / floor.seconds(), pass)).collect();
        rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        rounds[rounds.len() / 2]
    }
}

/// The least any reconciler spends to see both sides.
#[derive(Clone, Copy)]
struct Floor {
    copy_s: f64,
    fetch_s: f64,
}

impl Floor {
    fn seconds(&self) -> f64 {
        self.copy_s + self.fetch_s
    }
}

/// Streams the live rows out with `COPY`, then fetches the four lists and
/// parses them with a minimal borrowed reader.
async fn floor(client: &tokio_postgres::Client, addrs: &[SocketAddr], n: usize) -> anyhow::Result<Floor> {
    let t = Instant::now();
    let stream = client
        .copy_out(
            "COPY (SELECT session_id, owner_id, controller_instance, state, created_at, updated_at
                     FROM sessions WHERE state IN ('creating', 'active', 'paused')) TO STDOUT",
        )
        .await?;
    futures_util::pin_mut!(stream);
    let mut copied = 0usize;
    while let Some(chunk) = stream.next().await {
        copied += chunk?.len();
    }
    let copy_s = t.elapsed().as_secs_f64();

    let http = reqwest::Client::new();
    let t = Instant::now();
    let fetches = addrs.iter().map(|a| {
        let http = http.clone();
        async move {
            let body = http.get(format!("http://{a}/internal/sessions")).send().await?.bytes().await?;
            let list: MinList<'_> = serde_json::from_slice(&body)?;
            // Touch what a reconciler needs from each entry.
            let usable = list
                .sessions
                .iter()
                .filter(|s| !s.session_id.is_empty() && !s.owner_id.is_empty() && !s.state.is_empty())
                .count();
            Ok::<_, anyhow::Error>(usable)
        }
    });
    let counts = futures_util::future::join_all(fetches).await;
    let fetch_s = t.elapsed().as_secs_f64();
    let listed: usize = counts.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().sum();
    println!("N={n} floor_copy_s={copy_s:.3} bytes={copied} floor_fetch_s={fetch_s:.3} live_sessions={listed}");
    Ok(Floor { copy_s, fetch_s })
}

fn run_child(config: &std::path::Path, dry_run: bool) -> anyhow::Result<PassFigures> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["pass", "--config"]).arg(config).env("SESSIOND_LOG", "error");
    if dry_run {
        cmd.arg("--dry-run");
    }
    let out = cmd.output().context("run the pass in a child process")?;
    if !out.status.success() {
        bail!("the child pass failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("read the child's figures")
}

async fn measure(base_url: &str, n: usize, naive_sample: usize, rounds: usize) -> anyhow::Result<Figures> {
    let name = format!("sessiond_bench_{}", uuid::Uuid::new_v4().simple());
    let (admin, conn) = tokio_postgres::connect(base_url, NoTls).await.context("connect to the bench server")?;
    tokio::spawn(conn);
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    let result = measure_in(base_url, &name, n, naive_sample, rounds).await;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
    result
}

async fn measure_in(
    base_url: &str,
    name: &str,
    n: usize,
    naive_sample: usize,
    rounds: usize,
) -> anyhow::Result<Figures> {
    let mut url = reqwest::Url::parse(base_url)?;
    url.set_path(&format!("/{name}"));
    // The floor reads over a plain connection (the bench connects without
    // TLS), and the pass must use the same transport, or the ratio would count
    // TLS as sessiond's overhead: with the libpq default, sslmode=prefer, a
    // server with TLS on encrypts every row of the pass's COPY and none of the
    // floor's.
    if !url.query_pairs().any(|(k, _)| k == "sslmode") {
        url.query_pairs_mut().append_pair("sslmode", "disable");
    }
    let db_url = url.to_string();
    let dbcfg = sessiond::config::DatabaseConfig {
        statement_timeout: Duration::from_secs(600),
        ..sessiond::config::DatabaseConfig::for_url(&db_url)
    };
    let sessions = sessiond::config::SessionsConfig::reference(&dbcfg.schema);
    sessiond::store::Store::connect(&dbcfg).await?.migrate(&sessions).await?;
    let (client, conn) = tokio_postgres::connect(&db_url, NoTls).await?;
    tokio::spawn(conn);

    let t = Instant::now();
    load(&client, n).await.context("load the sessions")?;
    let load_s = t.elapsed().as_secs_f64();
    println!("N={n} load_s={load_s:.2}");

    let stops = Arc::new(AtomicU64::new(0));
    let mut addrs = Vec::new();
    for body in list_bodies(n) {
        addrs.push(serve_static(body, Arc::clone(&stops)).await?);
    }

    let first = floor(&client, &addrs, n).await?;
    let listed = (0..n).filter(|i| category(*i) != 0).count();

    // Naive: a query per live controller session, sampled and extrapolated.
    let stmt = client.prepare("SELECT state, xmin::text FROM sessions WHERE session_id = $1").await?;
    let sample: Vec<String> = (0..n).filter(|i| category(*i) != 0).take(naive_sample).map(sid).collect();
    let t = Instant::now();
    for id in &sample {
        let _ = client.query_opt(&stmt, &[id]).await?;
    }
    let per_query = t.elapsed().as_secs_f64() / sample.len().max(1) as f64;
    let naive_s = first.seconds() + per_query * listed as f64;
    println!(
        "N={n} naive_s={naive_s:.2} (extrapolated: {} point queries at {:.1} us each, measured on {})",
        listed,
        per_query * 1e6,
        sample.len()
    );

    // The config the child passes run with.
    let dir = std::env::temp_dir().join(format!("{name}-cfg"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("sessiond.toml");
    let mut text = format!(
        "[database]\nurl = \"{db_url}\"\nstatement_timeout = \"600s\"\n\n\
         [reconcile]\ngrace = \"0s\"\nconfirmations = 1\nmax_repairs_per_pass = {}\n\n",
        n.max(1)
    );
    for (j, a) in addrs.iter().enumerate() {
        text.push_str(&format!(
            "[[controller]]\nname = \"ctrl-{j}\"\nurl = \"http://{a}/internal/sessions\"\n\
             stop_url = \"http://{a}/internal/sessions/{{session_id}}/stop\"\ntimeout = \"600s\"\nmax_body_bytes = 4294967296\n\n"
        ));
    }
    std::fs::write(&path, text)?;

    let mut reads = Vec::new();
    for _ in 0..rounds.max(1) {
        let before = floor(&client, &addrs, n).await?;
        let read = tokio::task::spawn_blocking({
            let path = path.clone();
            move || run_child(&path, true)
        })
        .await??;
        println!(
            "N={n} sessiond_read_only_s={:.3} read_only_ratio={:.2} round_trips={} findings={} stages: fetch={:.3} read={:.3} classify={:.3}",
            read.seconds,
            read.seconds / before.seconds(),
            read.round_trips,
            read.findings,
            read.stages[0],
            read.stages[1],
            read.stages[2],
        );
        reads.push((before, read));
    }
    let read = &reads[reads.len() / 2].1;
    let [fp50, fp99, fmax] = read.api_findings_ms;
    let [sp50, sp99, smax] = read.api_session_ms;
    println!(
        "N={n} api_latency_ms_during_pass findings p50={fp50:.2} p99={fp99:.2} max={fmax:.2} \
         session p50={sp50:.2} p99={sp99:.2} max={smax:.2} (samples {}/{}, while a read-only pass runs, {:.1} s)",
        read.api_counts[0], read.api_counts[1], read.seconds
    );
    let [ip50, ip99, _] = read.api_session_idle_ms;
    println!("N={n} api_latency_ms_idle session p50={ip50:.2} p99={ip99:.2}");
    let before_full = floor(&client, &addrs, n).await?;
    let full = tokio::task::spawn_blocking({
        let path = path.clone();
        move || run_child(&path, false)
    })
    .await??;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "N={n} sessiond_s={:.3} repaired={} stops_received={} round_trips={} stages: fetch={:.3} read={:.3} classify={:.3} apply={:.3}",
        full.seconds,
        full.repaired,
        stops.load(Ordering::Relaxed),
        full.round_trips,
        full.stages[0],
        full.stages[1],
        full.stages[2],
        full.stages[3]
    );
    let expected = (0..n).filter(|i| category(*i) < 3).count() as u64;
    if full.repaired != expected {
        bail!("expected {expected} repairs (1% each of orphans, zombies, unpersisted), got {}", full.repaired);
    }
    Ok(Figures { n, load_s, floor: before_full, full, reads, naive_s, naive_sample: sample.len() })
}

fn print(f: &Figures) {
    let n = f.n;
    let peak = f.full.peak_rss.saturating_sub(f.full.rss_before);
    let bps = peak as f64 / n as f64;
    println!("N={n} peak_pass_memory_bytes={peak} bytes_per_session={bps:.0}");
    println!(
        "N={n} scrape_latency_ms p50={:.2} p99={:.2} max={:.2} (scrapes={})",
        f.full.scrape_p50_ms, f.full.scrape_p99_ms, f.full.scrape_max_ms, f.full.scrapes
    );
    println!(
        "N={n} sessiond_s={:.3} floor_s={:.3} ratio={:.2} read_only_ratio={:.2} naive_ratio={:.1} bytes_per_session={bps:.0} round_trips={} read_round_trips={} scrape_p99_ms={:.2} naive_sample={} load_s={:.1} ids={}",
        f.full.seconds,
        f.floor_s(),
        f.full.seconds / f.floor_s(),
        f.read().0,
        f.naive_s / f.floor_s(),
        f.full.round_trips,
        f.read().1.round_trips,
        f.full.scrape_p99_ms,
        f.naive_sample,
        f.load_s,
        match ID_SHAPE.get().copied().unwrap_or_default() {
            IdShape::Exec => "exec",
            IdShape::Uuid => "uuid",
        },
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = ID_SHAPE.set(cli.ids);
    sessiond::tls::install_default_provider();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sessiond-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Mode::Pass { config, dry_run }) = cli.mode {
        sessiond::logging::init(sessiond::logging::LogFormat::Text);
        return match rt.block_on(child_pass(&config, dry_run)) {
            Ok(f) => {
                println!("{}", serde_json::to_string(&f).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sessiond-bench pass: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let mut all = Vec::new();
    for &n in &cli.sessions {
        match rt.block_on(measure(&cli.database_url, n, cli.naive_sample, cli.rounds)) {
            Ok(f) => {
                print(&f);
                all.push(f);
            }
            Err(e) => {
                eprintln!("sessiond-bench: N={n}: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    if all.len() > 1 {
        println!("\ngrowth with N:");
        println!(
            "{:>9} {:>10} {:>9} {:>7} {:>9} {:>13} {:>12}",
            "N", "sessiond_s", "floor_s", "ratio", "naive_s", "bytes/session", "round_trips"
        );
        for f in &all {
            let peak = f.full.peak_rss.saturating_sub(f.full.rss_before);
            println!(
                "{:>9} {:>10.3} {:>9.3} {:>7.2} {:>9.1} {:>13.0} {:>12}",
                f.n,
                f.full.seconds,
                f.floor_s(),
                f.full.seconds / f.floor_s(),
                f.naive_s,
                peak as f64 / f.n as f64,
                f.full.round_trips
            );
        }
    }
    ExitCode::SUCCESS
}
