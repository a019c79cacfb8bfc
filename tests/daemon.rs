//! The daemon loop's timing rules.

#[test]
fn repeated_failed_passes_back_off_doubling_up_to_a_cap() {
    use sessiond::daemon::next_delay;
    let s = std::time::Duration::from_secs;
    assert_eq!(next_delay(s(15), 0), s(15));
    assert_eq!(next_delay(s(15), 1), s(30));
    assert_eq!(next_delay(s(15), 3), s(30), "capped at two intervals");
    assert_eq!(next_delay(s(5), 1), s(10));
    assert_eq!(next_delay(s(5), 2), s(15), "or 15 s, whichever is longer");
    assert_eq!(next_delay(s(5), 30), s(15), "so a recovery is seen within 15 s");
    assert_eq!(next_delay(s(1), 30), s(15));
    assert_eq!(next_delay(s(600), 2), s(1200));
}

// The loop itself, in process on paused time: a stand-in for the reconciler
// answers each pass as scripted and notes when it was asked.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sessiond::config::{Config, Overrides};
use sessiond::daemon::{run, PassObserver, Passes, ReloadSource, RunEnd};
use sessiond::progress::Progress;
use sessiond::reconcile::{PassOutcome, PassReport, PassRequest, Role};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn config_with_interval(interval: &str) -> String {
    format!(
        "[daemon]\ninterval = \"{interval}\"\n\n[database]\nurl = \"postgres://u@127.0.0.1:1/db\"\n\n\
         [[controller]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/internal/sessions\"\n"
    )
}

fn config(interval: &str) -> Arc<Config> {
    let text = config_with_interval(interval);
    Arc::new(Config::from_toml(Path::new("t.toml"), &text, &Overrides::default()).expect("a valid config"))
}

/// Pass outcomes in order (then `Ok`), and when each pass started.
struct Scripted {
    cfg: Arc<Config>,
    script: VecDeque<Result<PassOutcome, String>>,
    at: Arc<Mutex<Vec<(Instant, Duration)>>>,
}

impl Passes for Scripted {
    fn pass(&mut self, _req: PassRequest) -> impl std::future::Future<Output = PassReport> + Send {
        self.at.lock().expect("lock").push((Instant::now(), self.cfg.daemon.interval));
        let mut r = PassReport::new(Role::Single, self.cfg.daemon.mode, chrono::Utc::now());
        match self.script.pop_front() {
            Some(Ok(outcome)) => r.outcome = outcome,
            Some(Err(config_error)) => r.config_error = Some(config_error),
            None => {}
        }
        if r.outcome == PassOutcome::Failed {
            r.error = Some("the database is down".into());
        }
        async move { r }
    }
    fn config(&self) -> &Arc<Config> {
        &self.cfg
    }
    fn set_config(&mut self, config: Arc<Config>) {
        self.cfg = config;
    }
    fn lease(&self) -> Option<&sessiond::lease::Lease> {
        None
    }
    fn set_progress(&mut self, _progress: Progress) {}
    fn release_guard(&mut self, _controller: &str) {}
}

/// Stops the loop after `stop_after` passes; notes reloads.
struct Watch {
    passes: usize,
    stop_after: usize,
    shutdown: CancellationToken,
    reloaded: Vec<Duration>,
    rejected: Vec<String>,
}

impl PassObserver for Watch {
    fn pass_finished(&mut self, _report: &PassReport) {
        self.passes += 1;
        if self.passes == self.stop_after {
            self.shutdown.cancel();
        }
    }
    fn config_reloaded(&mut self, config: &Arc<Config>) {
        self.reloaded.push(config.daemon.interval);
    }
    fn reload_rejected(&mut self, error: &str) {
        self.rejected.push(error.to_owned());
    }
}

struct Run {
    end: RunEnd,
    gaps: Vec<Duration>,
    watch: Watch,
}

async fn run_scripted(
    interval: &str,
    script: Vec<Result<PassOutcome, String>>,
    stop_after: usize,
    reload_file: PathBuf,
    reload_at: Vec<(Duration, String)>,
) -> Run {
    let at = Arc::new(Mutex::new(Vec::new()));
    let passes = Scripted { cfg: config(interval), script: script.into(), at: Arc::clone(&at) };
    let shutdown = CancellationToken::new();
    let mut watch =
        Watch { passes: 0, stop_after, shutdown: shutdown.clone(), reloaded: Vec::new(), rejected: Vec::new() };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let file = reload_file.clone();
    tokio::spawn(async move {
        let start = Instant::now();
        for (when, text) in reload_at {
            tokio::time::sleep_until(start + when).await;
            std::fs::write(&file, text).expect("write the config");
            let _ = tx.send(()).await;
        }
        std::future::pending::<()>().await;
    });
    let source = ReloadSource { path: reload_file, overrides: Overrides::default() };
    let end = run(passes, shutdown, rx, source, &mut watch, Progress::new()).await;
    let starts: Vec<Instant> = at.lock().expect("lock").iter().map(|(i, _)| *i).collect();
    let gaps = starts.windows(2).map(|w| w[1] - w[0]).collect();
    Run { end, gaps, watch }
}

#[tokio::test(start_paused = true)]
async fn failed_passes_back_off_and_the_first_success_restores_the_interval() {
    use PassOutcome::{Failed, Ok as Good};
    let dir = tempfile::tempdir().expect("tempdir");
    let script = vec![Ok(Failed), Ok(Failed), Ok(Failed), Ok(Failed), Ok(Failed), Ok(Good), Ok(Good)];
    let r = run_scripted("1s", script, 7, dir.path().join("s.toml"), vec![]).await;
    assert_eq!(r.end, RunEnd::Shutdown);
    let s = Duration::from_secs;
    assert_eq!(r.gaps, [s(2), s(4), s(8), s(15), s(15), s(1)], "doubling, capped at 15 s, then the interval");
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_the_wait_at_once_and_starts_no_other_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at = Arc::new(Mutex::new(Vec::new()));
    let passes = Scripted { cfg: config("1h"), script: VecDeque::new(), at: Arc::clone(&at) };
    let shutdown = CancellationToken::new();
    let mut watch =
        Watch { passes: 0, stop_after: 0, shutdown: shutdown.clone(), reloaded: Vec::new(), rejected: Vec::new() };
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let token = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        token.cancel();
    });
    let started = Instant::now();
    let source = ReloadSource { path: dir.path().join("s.toml"), overrides: Overrides::default() };
    let end = run(passes, shutdown, rx, source, &mut watch, Progress::new()).await;
    assert_eq!(end, RunEnd::Shutdown);
    assert_eq!(started.elapsed(), Duration::from_secs(10), "it stopped when told, not after the interval");
    assert_eq!(at.lock().expect("lock").len(), 1, "no pass after the shutdown");
}

#[tokio::test(start_paused = true)]
async fn a_reload_takes_effect_at_the_next_pass_and_a_bad_one_keeps_the_running_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Duration::from_secs;
    let reloads = vec![
        (s(5), config_with_interval("20s")),
        // A bad one between the second and the third pass.
        (s(65), "[daemon]\ninterval = \"soon\"\n".to_owned()),
    ];
    let r = run_scripted("60s", vec![], 4, dir.path().join("s.toml"), reloads).await;
    assert_eq!(r.end, RunEnd::Shutdown);
    assert_eq!(r.watch.reloaded, [s(20)], "the good reload was applied");
    assert_eq!(r.watch.rejected.len(), 1, "the bad one was rejected: {:?}", r.watch.rejected);
    assert!(r.watch.rejected[0].contains("daemon.interval"), "{:?}", r.watch.rejected);
    // The first wait was planned with the old interval; the next ones use the
    // reloaded one, and the rejected reload changed nothing.
    assert_eq!(r.gaps, [s(60), s(20), s(20)]);
}

#[tokio::test(start_paused = true)]
async fn a_config_that_cannot_work_ends_the_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = vec![Ok(PassOutcome::Ok), Err("the sessions table has no owner column".to_owned())];
    let r = run_scripted("1s", script, 100, dir.path().join("s.toml"), vec![]).await;
    assert_eq!(r.end, RunEnd::BadConfig("the sessions table has no owner column".into()));
    assert_eq!(r.watch.passes, 2);
}
