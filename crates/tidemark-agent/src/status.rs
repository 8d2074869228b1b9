//! What the agent knows about each database: the record of its runs (persisted in the state
//! directory so that a restart knows what it missed), and the views of it: `/status` JSON and
//! `/metrics` in Prometheus's text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The outcome of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    /// When it started.
    pub started: DateTime<Utc>,
    /// How long it took, in seconds (all attempts).
    pub duration_seconds: f64,
    /// Attempts made.
    pub attempts: u32,
    /// The snapshot written, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Bytes read from the database.
    #[serde(default)]
    pub bytes_read: u64,
    /// Bytes newly stored (after dedup and compression).
    #[serde(default)]
    pub bytes_stored: u64,
    /// The error, on failure (never holding a secret: errors name things, not credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Per location of the repository, on success: whether it got the snapshot.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub locations: BTreeMap<String, LocationRun>,
}

/// How one location fared in one backup.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LocationRun {
    /// Whether the location has the snapshot.
    pub ok: bool,
    /// Bytes this location stored that it did not have.
    #[serde(default)]
    pub bytes_stored: u64,
    /// Why it missed the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One location of a database's repository.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LocationStatus {
    /// Whether the last backup, listing or log copy here worked.
    pub ok: bool,
    /// Start of the last backup this location received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<DateTime<Utc>>,
    /// Start of the last backup it missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<DateTime<Utc>>,
    /// What went wrong last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Bytes the last backup stored here.
    #[serde(default)]
    pub last_bytes_stored: u64,
    /// The database's snapshots here.
    #[serde(default)]
    pub snapshots: usize,
    /// Snapshots written elsewhere while this location failed, until it has them (`tidemark
    /// copy` fills them), its own retention removes them, or no location has them any more.
    #[serde(default)]
    pub missing: Vec<String>,
}

/// Runs of one kind of backup of one database.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KindStatus {
    /// The last successful run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<RunRecord>,
    /// The last failed run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<RunRecord>,
    /// Runs that succeeded, failed, were skipped (another backup of the database was running).
    #[serde(default)]
    pub successes: u64,
    /// See `successes`.
    #[serde(default)]
    pub failures: u64,
    /// See `successes`.
    #[serde(default)]
    pub skipped: u64,
    /// When the schedule fires next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<DateTime<Utc>>,
}

impl KindStatus {
    /// Whether the latest finished run failed.
    pub fn failing(&self) -> bool {
        match (&self.last_success, &self.last_failure) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(s), Some(f)) => f.started > s.started,
        }
    }
}

/// What is running now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Running {
    /// The kind.
    pub kind: String,
    /// Since when.
    pub since: DateTime<Utc>,
    /// Which attempt.
    pub attempt: u32,
}

/// The outcome of a verification restore.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VerificationRecord {
    /// When it started.
    pub started: DateTime<Utc>,
    /// Whether the data came back whole.
    pub ok: bool,
    /// The snapshot restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The point in time verified (the snapshot's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<DateTime<Utc>>,
    /// How long the restore and its checks took: the measured RTO.
    pub rto_seconds: f64,
    /// What was checked.
    #[serde(default)]
    pub checks: Vec<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One snapshot as the status and the timeline page show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotPoint {
    /// Short id.
    pub id: String,
    /// logical or physical.
    pub kind: String,
    /// Start and end.
    pub time: DateTime<Utc>,
    /// See `time`.
    pub time_end: DateTime<Utc>,
}

/// Log archiving of one database.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WalStatus {
    /// archive_command or streaming.
    pub mode: String,
    /// For streaming: whether the streamer runs (false between a failure and its restart).
    pub up: bool,
    /// For streaming: restarts after failures since the agent started.
    pub restarts: u64,
    /// The streamer's last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The timeline streamed.
    #[serde(default)]
    pub timeline: u32,
    /// Where the server's WAL ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_lsn: Option<String>,
    /// Where the archive's ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_lsn: Option<String>,
    /// The difference: WAL that a disaster now would lose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    /// When that was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<DateTime<Utc>>,
    /// Segments missing from the archive between ones it holds (recovery stops at a gap),
    /// as of the last look (every minute).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<WalGap>,
}

/// A run of WAL segments missing from the archive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WalGap {
    /// The first segment missing.
    pub first_missing: String,
    /// The last segment missing.
    pub last_missing: String,
    /// When the segment before it reached the archive.
    pub after: DateTime<Utc>,
    /// When the segment after it did.
    pub before: DateTime<Utc>,
}

/// A point a verification restore reached, and whether the data came back whole.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifiedPoint {
    /// The point in time restored and checked.
    pub point: DateTime<Utc>,
    /// Whether the checks passed.
    pub ok: bool,
    /// The snapshot restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// Verified points kept per database for the timeline.
pub const VERIFIED_POINTS: usize = 50;

/// One database.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DatabaseStatus {
    /// postgres or sqlite.
    pub engine: String,
    /// The repository's name.
    pub repository: String,
    /// Per kind of backup (`logical`, `physical`, `incremental`).
    pub kinds: BTreeMap<String, KindStatus>,
    /// The run in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<Running>,
    /// The snapshots of this database in the repository, oldest first (after the last
    /// retention run).
    #[serde(default)]
    pub snapshots: Vec<SnapshotPoint>,
    /// The retention plan as of the last dry run (at start and before each retention run):
    /// what is kept and why, what would go, the PITR windows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retention_plan: Vec<String>,
    /// What the last retention run did, as lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retention: Vec<String>,
    /// The last retention error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_error: Option<String>,
    /// When each schedule (by `kind@cron`) last fired.
    #[serde(default)]
    pub fired: BTreeMap<String, DateTime<Utc>>,
    /// The last verification restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationRecord>,
    /// The points recent verification restores reached, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verified: Vec<VerifiedPoint>,
    /// Log archiving, for databases that archive a log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalStatus>,
    /// Per location of the repository.
    #[serde(default)]
    pub locations: BTreeMap<String, LocationStatus>,
    /// Per schedule, the latest scheduled time accounted for by a finished run (itself, or
    /// skipped while it ran). A run killed with the agent leaves this behind `fired`.
    #[serde(default)]
    pub done: BTreeMap<String, DateTime<Utc>>,
}

impl DatabaseStatus {
    /// The first and last recoverable points: the oldest snapshot's end and the newest's.
    pub fn recoverable(&self) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let first = self.snapshots.iter().map(|s| s.time_end).min()?;
        let last = self.snapshots.iter().map(|s| s.time_end).max()?;
        Some((first, last))
    }

    /// The newest successful backup of any kind.
    pub fn last_success(&self) -> Option<DateTime<Utc>> {
        self.kinds
            .values()
            .filter_map(|k| k.last_success.as_ref().map(|r| r.started))
            .max()
    }
}

/// The agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// When this process started.
    pub started: Option<DateTime<Utc>>,
    /// Whether every database's repository opened and the schedules run.
    pub ready: bool,
    /// Per database.
    pub databases: BTreeMap<String, DatabaseStatus>,
}

impl Status {
    /// Read the persisted state, or an empty one when there is none yet.
    ///
    /// # Errors
    /// A message naming the file when it exists but cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Status, String> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                format!(
                    "state file {} is damaged ({e}); move it away to start afresh (missed runs are then not caught up)",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Status::default()),
            Err(e) => Err(format!("failed to read state file {}: {e}", path.display())),
        }
    }

    /// Write the state: to a temporary file, fsync, rename, fsync the directory, so that a
    /// crash leaves the old state or the new, never half of one.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(&serde_json::to_vec_pretty(self).expect("status serializes"))?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

/// The state file in a state directory.
pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        if l.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{}}} {value}", l.join(","));
        }
    }
}

fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// Render `/metrics` (Prometheus text format 0.0.4). Each family is written once with all its
/// samples, as the format requires.
pub fn metrics(s: &Status) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    f.head(
        "tidemark_agent_ready",
        "gauge",
        "1 when every database's schedules are running.",
    );
    f.sample("tidemark_agent_ready", &[], if s.ready { 1.0 } else { 0.0 });
    if let Some(t) = s.started {
        f.head(
            "tidemark_agent_start_time_seconds",
            "gauge",
            "When the agent started.",
        );
        f.sample("tidemark_agent_start_time_seconds", &[], ts(t));
    }
    type Get = fn(&KindStatus) -> Option<f64>;
    let per_kind: [(&str, &str, &str, Get); 9] = [
        (
            "tidemark_backup_last_success_timestamp_seconds",
            "gauge",
            "Start of the last successful backup.",
            |k| k.last_success.as_ref().map(|r| ts(r.started)),
        ),
        (
            "tidemark_backup_last_failure_timestamp_seconds",
            "gauge",
            "Start of the last failed backup.",
            |k| k.last_failure.as_ref().map(|r| ts(r.started)),
        ),
        (
            "tidemark_backup_last_duration_seconds",
            "gauge",
            "Duration of the last successful backup.",
            |k| k.last_success.as_ref().map(|r| r.duration_seconds),
        ),
        (
            "tidemark_backup_last_read_bytes",
            "gauge",
            "Bytes read from the database by the last successful backup.",
            |k| k.last_success.as_ref().map(|r| r.bytes_read as f64),
        ),
        (
            "tidemark_backup_last_stored_bytes",
            "gauge",
            "Bytes newly stored by the last successful backup.",
            |k| k.last_success.as_ref().map(|r| r.bytes_stored as f64),
        ),
        (
            "tidemark_backup_success_total",
            "counter",
            "Successful backups.",
            |k| Some(k.successes as f64),
        ),
        (
            "tidemark_backup_failure_total",
            "counter",
            "Failed backups (after all retries).",
            |k| Some(k.failures as f64),
        ),
        (
            "tidemark_backup_skipped_total",
            "counter",
            "Scheduled backups skipped because another backup of the database was running.",
            |k| Some(k.skipped as f64),
        ),
        (
            "tidemark_backup_next_run_timestamp_seconds",
            "gauge",
            "When the schedule fires next.",
            |k| k.next_run.map(ts),
        ),
    ];
    for (name, kind, help, get) in per_kind {
        f.head(name, kind, help);
        for (db, d) in &s.databases {
            for (k, ks) in &d.kinds {
                if let Some(v) = get(ks) {
                    f.sample(name, &[("database", db), ("kind", k)], v);
                }
            }
        }
    }
    type DbGet = fn(&DatabaseStatus) -> Option<f64>;
    let per_db: [(&str, &str, DbGet); 4] = [
        (
            "tidemark_backup_running",
            "1 while a backup of the database runs.",
            |d| Some(if d.running.is_some() { 1.0 } else { 0.0 }),
        ),
        (
            "tidemark_recoverable_first_timestamp_seconds",
            "The oldest point the repository can restore.",
            |d| d.recoverable().map(|r| ts(r.0)),
        ),
        (
            "tidemark_recoverable_last_timestamp_seconds",
            "The newest point the repository can restore.",
            |d| d.recoverable().map(|r| ts(r.1)),
        ),
        (
            "tidemark_snapshots",
            "Snapshots of the database in the repository.",
            |d| Some(d.snapshots.len() as f64),
        ),
    ];
    type WalGet = fn(&WalStatus) -> Option<f64>;
    let per_wal: [(&str, &str, &str, WalGet); 3] = [
        (
            "tidemark_wal_archive_lag_bytes",
            "gauge",
            "WAL the server has written that the archive does not hold yet.",
            |w| w.lag_bytes.map(|b| b as f64),
        ),
        (
            "tidemark_wal_streamer_up",
            "gauge",
            "1 while the WAL streamer runs (streaming mode).",
            |w| (w.mode == "streaming").then_some(if w.up { 1.0 } else { 0.0 }),
        ),
        (
            "tidemark_wal_streamer_restarts_total",
            "counter",
            "Restarts of the WAL streamer after failures.",
            |w| (w.mode == "streaming").then_some(w.restarts as f64),
        ),
    ];
    for (name, kind, help, get) in per_wal {
        f.head(name, kind, help);
        for (db, d) in &s.databases {
            if let Some(v) = d.wal.as_ref().and_then(get) {
                f.sample(
                    name,
                    &[("database", db), ("mode", &d.wal.as_ref().unwrap().mode)],
                    v,
                );
            }
        }
    }
    type VerGet = fn(&VerificationRecord) -> f64;
    let per_ver: [(&str, &str, VerGet); 3] = [
        (
            "tidemark_verification_last_timestamp_seconds",
            "When the last verification restore started.",
            |v| ts(v.started),
        ),
        (
            "tidemark_verification_success",
            "1 when the last verification restore brought the data back whole.",
            |v| if v.ok { 1.0 } else { 0.0 },
        ),
        (
            "tidemark_verification_rto_seconds",
            "How long the last verification restore and its checks took.",
            |v| v.rto_seconds,
        ),
    ];
    for (name, help, get) in per_ver {
        f.head(name, "gauge", help);
        for (db, d) in &s.databases {
            if let Some(v) = &d.verification {
                f.sample(name, &[("database", db)], get(v));
            }
        }
    }
    type LocGet = fn(&LocationStatus) -> Option<f64>;
    let per_location: [(&str, &str, LocGet); 5] = [
        (
            "tidemark_location_up",
            "1 when the last backup, listing or log copy at the location worked.",
            |l| Some(if l.ok { 1.0 } else { 0.0 }),
        ),
        (
            "tidemark_location_last_success_timestamp_seconds",
            "Start of the last backup the location received.",
            |l| l.last_success.map(ts),
        ),
        (
            "tidemark_location_last_stored_bytes",
            "Bytes the last backup stored at the location.",
            |l| Some(l.last_bytes_stored as f64),
        ),
        (
            "tidemark_location_snapshots",
            "Snapshots of the database at the location.",
            |l| Some(l.snapshots as f64),
        ),
        (
            "tidemark_location_snapshots_missing",
            "Snapshots written elsewhere while the location failed, not copied here yet.",
            |l| Some(l.missing.len() as f64),
        ),
    ];
    for (name, help, get) in per_location {
        f.head(name, "gauge", help);
        for (db, d) in &s.databases {
            for (loc, l) in &d.locations {
                if let Some(v) = get(l) {
                    f.sample(
                        name,
                        &[
                            ("database", db),
                            ("repository", &d.repository),
                            ("location", loc),
                        ],
                        v,
                    );
                }
            }
        }
    }
    for (name, help, get) in per_db {
        f.head(name, "gauge", help);
        for (db, d) in &s.databases {
            if let Some(v) = get(d) {
                f.sample(name, &[("database", db), ("engine", &d.engine)], v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_survives_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Status::default();
        s.databases.entry("app".into()).or_default().kinds.insert(
            "physical".into(),
            KindStatus {
                successes: 2,
                ..Default::default()
            },
        );
        let p = state_file(dir.path());
        s.save(&p).unwrap();
        assert_eq!(Status::load(&p).unwrap(), s);
        std::fs::write(&p, b"{").unwrap();
        assert!(Status::load(&p).unwrap_err().contains("is damaged"));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = Status::default();
        s.databases.insert(
            "a\"b".into(),
            DatabaseStatus {
                engine: "sqlite".into(),
                ..Default::default()
            },
        );
        let m = metrics(&s);
        assert!(
            m.contains("tidemark_snapshots{database=\"a\\\"b\",engine=\"sqlite\"} 0"),
            "{m}"
        );
    }
}
