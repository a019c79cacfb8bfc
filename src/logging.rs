//! Log set-up. Under systemd, when `JOURNAL_STREAM` says stderr is the journal,
//! events go to journald with their fields as journal fields (`PASS_ID=`,
//! `OUTCOME=`, …) so `journalctl -o verbose` and field matches work. Otherwise
//! human text or JSON lines on stderr. `SESSIOND_LOG` filters (an `EnvFilter`
//! directive, default `info`).

use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The log line format on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_env("SESSIOND_LOG").unwrap_or_else(|_| EnvFilter::new(default))
}

/// Whether `JOURNAL_STREAM` (`device:inode`) names the file stderr is connected to.
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.split_once(':') else { return false };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

/// Whether log lines go to a structured sink (JSON, or the journal), where a
/// count is better as a field of its own than inside a sentence.
static STRUCTURED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn structured() -> bool {
    STRUCTURED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the global subscriber at `info` (unless `SESSIOND_LOG` says otherwise).
pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// Installs the global subscriber, with `default` as the filter when
/// `SESSIOND_LOG` is not set. Calling it twice is harmless (tests do).
pub fn init_with_default(format: LogFormat, default: &str) {
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journal) => {
                let installed = tracing_subscriber::registry()
                    .with(filter(default))
                    .with(journal.with_syslog_identifier("sessiond".into()))
                    .try_init();
                if installed.is_ok() {
                    STRUCTURED.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                return;
            }
            Err(e) => {
                eprintln!("sessiond: JOURNAL_STREAM is set but the journal cannot be reached ({e}); logging to stderr")
            }
        }
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter(default)).with_writer(std::io::stderr);
    let _ = match format {
        // Colour only for a person at a terminal: never in a file, a pipe or
        // a log collector.
        LogFormat::Text => {
            builder.with_target(false).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init()
        }
        LogFormat::Json => {
            let installed = builder.json().flatten_event(true).with_current_span(false).try_init();
            if installed.is_ok() {
                STRUCTURED.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            installed
        }
    };
}
