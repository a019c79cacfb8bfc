//! A private PostgreSQL server started from the installed binaries, for the test
//! harness (when no server answers) and the demo.
//!
//! PostgreSQL refuses to run as root, so when we are root the cluster directory
//! is handed to an unprivileged user (`postgres` if it exists, else `nobody`) and
//! every server command runs as that user through `runuser`.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl) found on PATH or in /usr/lib/postgresql/*/bin; \
         install them with `apt-get install postgresql` (Debian) or point PATH at them"
    )]
    NoBinaries,
    #[error("{step}: {detail}")]
    Step { step: String, detail: String },
}

/// A running private cluster. It is stopped by [`PrivateCluster::stop`] (or on drop
/// when `stop_on_drop` is set).
pub struct PrivateCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    run_as: Option<String>,
    pub stop_on_drop: bool,
    /// Serve TLS with the certificate and key copied into the cluster directory.
    tls: bool,
}

/// Finds the directory holding `initdb` and `pg_ctl`.
pub fn find_binaries() -> Result<PathBuf, ClusterError> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| ClusterError::NoBinaries)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).ok_or(ClusterError::NoBinaries)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .is_some_and(|s| s.trim() == "0")
}

fn user_exists(name: &str) -> bool {
    Command::new("id").arg("-u").arg(name).output().is_ok_and(|o| o.status.success())
}

fn run(step: &str, mut cmd: Command) -> Result<String, ClusterError> {
    let out = cmd.output().map_err(|e| ClusterError::Step { step: step.into(), detail: e.to_string() })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ClusterError::Step {
            step: step.into(),
            detail: format!(
                "{}; {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        })
    }
}

impl PrivateCluster {
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    /// Describes (without starting) a cluster in `dir` listening on `port`.
    pub fn new(dir: &Path, port: u16) -> Result<PrivateCluster, ClusterError> {
        let bin = find_binaries()?;
        let run_as = if is_root() {
            Some(if user_exists("postgres") { "postgres".to_owned() } else { "nobody".to_owned() })
        } else {
            None
        };
        Ok(PrivateCluster { dir: dir.to_owned(), port, bin, run_as, stop_on_drop: false, tls: false })
    }

    /// Serves TLS (`ssl = on`) with this certificate and key (PEM), besides
    /// plain connections.
    pub fn with_tls(mut self, cert: &Path, key: &Path) -> Result<PrivateCluster, ClusterError> {
        use std::os::unix::fs::PermissionsExt;
        let step =
            |e: std::io::Error| ClusterError::Step { step: "install the TLS files".into(), detail: e.to_string() };
        std::fs::create_dir_all(&self.dir).map_err(step)?;
        std::fs::copy(cert, self.dir.join("server.crt")).map_err(step)?;
        std::fs::copy(key, self.dir.join("server.key")).map_err(step)?;
        std::fs::set_permissions(self.dir.join("server.key"), std::fs::Permissions::from_mode(0o600)).map_err(step)?;
        self.tls = true;
        Ok(self)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Whether a server is running on this cluster's data directory.
    pub fn is_running(&self) -> bool {
        let mut c = self.command("pg_ctl");
        c.arg("status").arg("-D").arg(self.data());
        c.output().is_ok_and(|o| o.status.success())
    }

    /// Initialises the cluster if needed and starts it; waits until it accepts
    /// connections.
    pub fn start(&self) -> Result<(), ClusterError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| ClusterError::Step {
            step: format!("create {}", self.dir.display()),
            detail: e.to_string(),
        })?;
        if let Some(user) = &self.run_as {
            let mut c = Command::new("chown");
            c.arg("-R").arg(format!("{user}:")).arg(&self.dir);
            run("hand the cluster directory to the server user", c)?;
        }
        if !self.data().join("PG_VERSION").exists() {
            let mut c = self.command("initdb");
            c.arg("-D").arg(self.data()).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ]);
            run("initdb", c)?;
        }
        if self.is_running() {
            return Ok(());
        }
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        if self.tls {
            opts.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key",
                d = self.dir.display()
            ));
        }
        let mut c = self.command("pg_ctl");
        c.arg("start")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .arg("-o")
            .arg(opts)
            .args(["-w", "-t", "60"]);
        run("pg_ctl start", c).map_err(|e| {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            ClusterError::Step { step: "pg_ctl start".into(), detail: format!("{e}\nserver log:\n{log}") }
        })?;
        Ok(())
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&self) -> Result<(), ClusterError> {
        let mut c = self.command("pg_ctl");
        c.arg("stop").arg("-D").arg(self.data()).args(["-m", "fast", "-w"]);
        run("pg_ctl stop", c).map(|_| ())
    }

    /// The superuser URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.stop_on_drop {
            let _ = self.stop();
        }
    }
}
