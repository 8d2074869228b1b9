//! Start a restored data directory and follow its recovery to the end (pitr.md §8, step 5):
//! `pg_ctl start` with untranslated messages, then the server log tells when recovery became
//! consistent, where it stopped, and whether the server promoted, paused or shut down, or
//! failed; `postmaster.pid` tells whether it still runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How to start the server.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// `pg_ctl` to use.
    pub pg_ctl: PathBuf,
    /// Run it as this operating-system user (needed when tidemark runs as root, which
    /// PostgreSQL refuses): the data directory is given to the user, and `pg_ctl` runs through
    /// `runuser`.
    pub os_user: Option<String>,
    /// Give up after this long.
    pub timeout: Duration,
}

/// What happened after the start.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StartReport {
    /// `promoted`, `paused` (at the target, read-only) or `shut down` (at the target).
    pub outcome: &'static str,
    /// Seconds until the server accepted read-only connections (consistent), if it did.
    pub consistent_seconds: Option<f64>,
    /// Seconds until the outcome.
    pub recovery_seconds: f64,
    /// The server log file.
    pub log: PathBuf,
    /// The server's own lines about where recovery stopped.
    pub recovery_log: Vec<String>,
}

/// The operating-system user a server started by tidemark runs as: `explicit`, else
/// `postgres` when tidemark runs as root (which PostgreSQL refuses), else the current user.
pub fn server_os_user(explicit: Option<String>) -> Option<String> {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    explicit.or_else(|| root.then(|| "postgres".to_owned()))
}

fn fail(data: &Path, reason: String) -> Error {
    Error::Database {
        action: "start the restored server in",
        database: data.display().to_string(),
        reason,
    }
}

fn pid_alive(data: &Path) -> bool {
    crate::postgres::archive::postmaster_alive(data)
}

/// Lines of the server log that say where recovery went.
fn recovery_lines(log: &str) -> Vec<String> {
    const KEYS: [&str; 9] = [
        "starting point-in-time recovery",
        "consistent recovery state reached",
        "recovery stopping",
        "redo done at",
        "last completed transaction",
        "selected new timeline",
        "archive recovery complete",
        "pausing at the end of recovery",
        "recovery ended before configured recovery target",
    ];
    log.lines()
        .filter(|l| KEYS.iter().any(|k| l.contains(k)))
        .map(|l| l.trim().to_owned())
        .collect()
}

fn command(o: &StartOptions, program: &Path) -> Command {
    match &o.os_user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Start the server in `data` (already restored, with recovery configured) and wait until
/// recovery reached its end: promoted, paused at the target, or shut down at the target.
///
/// # Errors
/// `Database` when the server does not start, stops without reaching the target (PostgreSQL's
/// "recovery ended before configured recovery target was reached"), or the time runs out; the
/// message carries the end of the server log.
pub fn start_and_wait(data: &Path, o: &StartOptions) -> Result<StartReport> {
    let log = data.join("log").join("tidemark-start.log");
    std::fs::create_dir_all(data.join("log")).map_err(|e| Error::Io {
        action: "create",
        path: data.join("log").display().to_string(),
        source: e,
    })?;
    if let Some(u) = &o.os_user {
        // The data directory and the tablespaces its pg_tblspc links lead to (chown -R does
        // not follow links).
        let tablespaces: Vec<PathBuf> = std::fs::read_dir(data.join("pg_tblspc"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_symlink()))
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .collect();
        let out = Command::new("chown")
            .arg("-R")
            .arg(format!("{u}:"))
            .arg(data)
            .args(&tablespaces)
            .output()
            .map_err(|e| fail(data, format!("cannot run chown: {e}")))?;
        if !out.status.success() {
            return Err(fail(
                data,
                format!(
                    "cannot give the data directory to {u:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
    }
    let started = Instant::now();
    let out = command(o, &o.pg_ctl)
        .arg("-D")
        .arg(data)
        .arg("-l")
        .arg(&log)
        // The log is how recovery is followed; its messages must not be translated.
        .args(["-o", "-c lc_messages=C", "-W", "start"])
        .output()
        .map_err(|e| fail(data, format!("cannot run {}: {e}", o.pg_ctl.display())))?;
    if !out.status.success() {
        return Err(fail(
            data,
            format!(
                "pg_ctl start failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let tail = |text: &str| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(12)..].join("\n")
    };
    let mut consistent = None;
    let mut seen_pid = false;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let alive = pid_alive(data);
        seen_pid |= alive;
        let text = read_log();
        if consistent.is_none() && text.contains("consistent recovery state reached") {
            consistent = Some(started.elapsed().as_secs_f64());
        }
        let outcome = if text.contains("recovery ended before configured recovery target") {
            return Err(fail(
                data,
                format!(
                    "recovery ended before the target was reached: the archive lacks WAL up to it; \
                     server log {}:\n{}",
                    log.display(),
                    tail(&text)
                ),
            ));
        } else if text.contains("database system is ready to accept connections")
            && !data.join("recovery.signal").exists()
        {
            Some("promoted")
        } else if text.contains("pausing at the end of recovery")
            || text.contains("recovery has paused")
        {
            Some("paused")
        } else if !alive && seen_pid && text.contains("recovery stopping") {
            Some("shut down")
        } else {
            None
        };
        if let Some(outcome) = outcome {
            return Ok(StartReport {
                outcome,
                consistent_seconds: consistent,
                recovery_seconds: started.elapsed().as_secs_f64(),
                recovery_log: recovery_lines(&text),
                log,
            });
        }
        let gone = !alive && (seen_pid || started.elapsed() > Duration::from_secs(10));
        if gone {
            return Err(fail(
                data,
                format!(
                    "the server stopped during recovery; server log {}:\n{}",
                    log.display(),
                    tail(&text)
                ),
            ));
        }
        if started.elapsed() > o.timeout {
            return Err(fail(
                data,
                format!(
                    "recovery did not finish within {}s (the server is still running); server log {}:\n{}",
                    o.timeout.as_secs(),
                    log.display(),
                    tail(&text)
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recovery_lines_are_picked_from_the_log() {
        let log = "2026-12-02 LOG:  starting point-in-time recovery to 2026-12-02 10:00:00+00\n\
                   2026-12-02 LOG:  restored log file \"000000010000000000000003\" from archive\n\
                   2026-12-02 LOG:  recovery stopping before commit of transaction 745, time 2026-12-02 10:00:00.1+00\n\
                   2026-12-02 LOG:  selected new timeline ID: 2\n";
        let l = recovery_lines(log);
        assert_eq!(l.len(), 3, "{l:?}");
        assert!(l[1].contains("transaction 745"));
    }
}
