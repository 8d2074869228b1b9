//! The agent's configuration file (YAML), validated on load: every problem is reported with the
//! path of the field and what to do, all at once. The option structs are the ones the CLI uses
//! (`ConnSpec`, `RetentionPolicy`). The full example is in docs/agent.md.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use chrono::Duration;
use serde::{Deserialize, Serialize};
use tidemark_engine::postgres::ConnSpec;
use tidemark_engine::Engine;
use tidemark_repo::ops::retention::RetentionPolicy;

use crate::cron::Schedule;

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The agent process itself.
    pub agent: AgentSettings,
    /// Repositories by name.
    pub repositories: BTreeMap<String, RepositoryConfig>,
    /// Protected databases by name (the name is used in metrics, status and notifications).
    pub databases: BTreeMap<String, DatabaseConfig>,
    /// Notification channels by name.
    #[serde(default)]
    pub notifications: BTreeMap<String, NotifierConfig>,
}

fn default_listen() -> String {
    "127.0.0.1:9187".into()
}

fn default_grace() -> Option<Duration> {
    Some(Duration::seconds(60))
}

/// Settings of the agent process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Where `/metrics`, `/status`, `/healthz`, `/readyz` and the timeline page are served
    /// (default 127.0.0.1:9187). Listen on a routable address only behind a network policy.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// A directory of the agent's own: its lock file and its record of runs (when each schedule
    /// last fired, results), so that a restart knows what it missed.
    pub state_dir: PathBuf,
    /// How long a shutdown waits for running backups to finish before abandoning them
    /// (default 60s). An abandoned backup leaves no snapshot.
    #[serde(default = "default_grace", with = "tidemark_repo::duration::opt_serde")]
    pub shutdown_grace: Option<Duration>,
}

/// A repository and where it is stored.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// One or more locations holding the same repository.
    pub locations: Vec<LocationConfig>,
    /// File whose first line is the repository password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// File holding a raw key instead (at least 32 bytes, or hex).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// One storage location of a repository.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocationConfig {
    /// A short name for status and metrics (`local`, `s3-eu`).
    pub name: String,
    /// A path, file:///…, s3://bucket/prefix, gs://…, az://…; no credentials in it.
    pub url: String,
    /// Storage options (region, endpoint, …), as for the CLI's config file.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Upload limit in bytes per second (suffixes K, M, G), as `--limit-upload`.
    #[serde(default)]
    pub limit_upload: Option<String>,
}

/// Which engine protects a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// PostgreSQL.
    Postgres,
    /// An SQLite database file.
    Sqlite,
}

/// The kinds of scheduled backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// A logical dump.
    Logical,
    /// A physical full backup.
    Physical,
    /// "Incremental": with content-defined dedup every backup is a full one that stores only
    /// what changed, so this is a physical backup on its own schedule.
    Incremental,
}

impl BackupKind {
    /// The name used in metrics and status.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupKind::Logical => "logical",
            BackupKind::Physical => "physical",
            BackupKind::Incremental => "incremental",
        }
    }
}

/// One schedule of a database.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// What to take.
    pub kind: BackupKind,
    /// When: five cron fields (UTC), six with seconds first, `@daily`-style, or `@every 6h`.
    pub cron: String,
    /// Start up to this much later than scheduled, at random, so that many agents do not
    /// start at once (default none).
    #[serde(default, with = "tidemark_repo::duration::opt_serde")]
    pub jitter: Option<Duration>,
}

/// How WAL (or another log) is archived for point-in-time recovery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PitrMode {
    /// No log archiving.
    #[default]
    Off,
    /// The server's archive_command runs `tidemark wal-push`; the agent only watches the lag.
    ArchiveCommand,
    /// The agent runs the streaming archiver (`pg receive`) and restarts it when it fails.
    Streaming,
}

/// Point-in-time recovery settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PitrConfig {
    /// off, archive_command or streaming.
    #[serde(default)]
    pub mode: PitrMode,
    /// The replication slot for streaming (default `tidemark`).
    #[serde(default)]
    pub slot: Option<String>,
}

/// What happens when a schedule fires while the database's previous backup still runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Concurrency {
    /// Skip this run (recorded as skipped).
    #[default]
    Skip,
    /// Run it when the current one ends (one waiting run per kind at most).
    Queue,
}

/// What happens to runs missed while the agent was down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Run once at start for each schedule that missed one or more runs.
    #[default]
    Once,
    /// Wait for the next scheduled time.
    Skip,
}

fn default_attempts() -> u32 {
    3
}

/// Retries of a failed backup.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, including the first (default 3).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Wait before the first retry; doubled for each later one (default 30s).
    #[serde(default, with = "tidemark_repo::duration::opt_serde")]
    pub backoff: Option<Duration>,
    /// No attempt starts later than this after the scheduled time (default 2h).
    #[serde(default, with = "tidemark_repo::duration::opt_serde")]
    pub deadline: Option<Duration>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: default_attempts(),
            backoff: None,
            deadline: None,
        }
    }
}

impl RetryConfig {
    /// The first backoff.
    pub fn backoff(&self) -> Duration {
        self.backoff.unwrap_or(Duration::seconds(30))
    }

    /// The deadline.
    pub fn deadline(&self) -> Duration {
        self.deadline.unwrap_or(Duration::hours(2))
    }
}

/// A user query run against a verification restore, with the text it must return.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckQuery {
    /// One SQL statement returning one value.
    pub sql: String,
    /// The value, as text.
    pub expect: String,
}

/// Scheduled verification restores.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationConfig {
    /// When (as for schedules).
    pub cron: String,
    /// Extra queries with expected results (the first column of the first row, as text).
    #[serde(default)]
    pub queries: Vec<CheckQuery>,
    /// PostgreSQL: the operating-system user that runs the scratch server (default `postgres`
    /// when the agent runs as root, which PostgreSQL refuses; else the agent's own user).
    #[serde(default)]
    pub os_user: Option<String>,
}

/// An SQLite database.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file.
    pub path: PathBuf,
}

/// One protected database.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// postgres or sqlite.
    pub engine: EngineKind,
    /// The name of the repository its backups go to.
    pub repository: String,
    /// For postgres: how to connect (the same settings as `tidemark pg --url/--host/…`).
    #[serde(default)]
    pub postgres: Option<ConnSpec>,
    /// For sqlite: the file.
    #[serde(default)]
    pub sqlite: Option<SqliteConfig>,
    /// Backup schedules.
    #[serde(default)]
    pub schedules: Vec<ScheduleConfig>,
    /// Log archiving for point-in-time recovery.
    #[serde(default)]
    pub pitr: PitrConfig,
    /// skip or queue.
    #[serde(default)]
    pub concurrency: Concurrency,
    /// once or skip.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// Retries of failed backups.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Retention, applied after each successful backup at every location of the repository.
    /// None keeps everything.
    #[serde(default)]
    pub retention: Option<RetentionPolicy>,
    /// Retention for named locations of the repository, instead of `retention` (for example a
    /// longer history offsite).
    #[serde(default)]
    pub location_retention: BTreeMap<String, RetentionPolicy>,
    /// Verification restores.
    #[serde(default)]
    pub verification: Option<VerificationConfig>,
    /// Names of notification channels for this database.
    #[serde(default)]
    pub notify: Vec<String>,
    /// The dead man's switch: notify when no backup succeeded for this long.
    #[serde(default, with = "tidemark_repo::duration::opt_serde")]
    pub alert_after: Option<Duration>,
    /// Tags added to every snapshot.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// The format of a notification channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifierKind {
    /// A JSON document of the event, POSTed.
    Webhook,
    /// Slack's incoming-webhook format.
    Slack,
}

/// A notification channel. Its URL is a secret (it grants posting) and is read from a file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierConfig {
    /// webhook or slack.
    pub kind: NotifierKind,
    /// File whose first line is the URL.
    pub url_file: PathBuf,
    /// At most one message per database and event kind in this interval (default 15m); a
    /// repeat of the same message is dropped until it changes or the interval passes.
    #[serde(default, with = "tidemark_repo::duration::opt_serde")]
    pub min_interval: Option<Duration>,
}

/// The file could not be used. Each problem names its field.
#[derive(Debug, thiserror::Error)]
#[error("config file {file} is invalid:\n  {}", problems.join("\n  "))]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// One line per problem: `field.path: what is wrong; what to do`.
    pub problems: Vec<String>,
}

impl Config {
    /// Read, parse and validate `path`.
    ///
    /// # Errors
    /// `ConfigError` listing every problem found.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |problems| ConfigError {
            file: path.display().to_string(),
            problems,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| err(vec![format!("cannot be read: {e}")]))?;
        let config = Config::parse(&text).map_err(err)?;
        Ok(config)
    }

    /// Parse and validate YAML text.
    ///
    /// # Errors
    /// One line per problem.
    pub fn parse(text: &str) -> Result<Config, Vec<String>> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| vec![e.to_string()])?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// The address to listen on.
    pub fn listen(&self) -> SocketAddr {
        self.agent.listen.parse().expect("validated on load")
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.agent.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "agent.listen: {:?} is not an address like 127.0.0.1:9187",
                self.agent.listen
            ));
        }
        if !self.agent.state_dir.is_absolute() {
            p.push("agent.state_dir: must be an absolute path".into());
        }
        if self.repositories.is_empty() {
            p.push("repositories: none defined; add at least one".into());
        }
        for (name, r) in &self.repositories {
            let at = format!("repositories.{name}");
            if r.locations.is_empty() {
                p.push(format!("{at}.locations: none given; add at least one"));
            }
            let mut names = BTreeSet::new();
            for (i, l) in r.locations.iter().enumerate() {
                if !names.insert(&l.name) {
                    p.push(format!(
                        "{at}.locations[{i}].name: {:?} is used twice",
                        l.name
                    ));
                }
                if let Err(e) = tidemark_storage::Location::parse(&l.url) {
                    p.push(format!("{at}.locations[{i}].url: {e}"));
                }
                if let Some(Err(e)) = l.limit_upload.as_deref().map(tidemark_storage::parse_rate) {
                    p.push(format!("{at}.locations[{i}].limit_upload: {e}"));
                }
            }
            if r.locations.len() > tidemark_repo::ops::backup::MAX_LOCATIONS {
                p.push(format!(
                    "{at}.locations: {} given; at most {} are supported",
                    r.locations.len(),
                    tidemark_repo::ops::backup::MAX_LOCATIONS
                ));
            }
            match (&r.password_file, &r.key_file) {
                (None, None) => p.push(format!(
                    "{at}: neither password_file nor key_file is set; set one"
                )),
                (Some(_), Some(_)) => p.push(format!(
                    "{at}: both password_file and key_file are set; keep one"
                )),
                _ => {}
            }
            for f in r.password_file.iter().chain(&r.key_file) {
                if !f.is_file() {
                    p.push(format!("{at}: secret file {} does not exist", f.display()));
                }
            }
        }
        if self.databases.is_empty() {
            p.push("databases: none defined; add at least one".into());
        }
        for (name, d) in &self.databases {
            self.database_problems(name, d, &mut p);
        }
        for (name, n) in &self.notifications {
            let at = format!("notifications.{name}");
            match read_url(&n.url_file) {
                Ok(_) => {}
                Err(e) => p.push(format!("{at}.url_file: {e}")),
            }
        }
        p
    }

    fn database_problems(&self, name: &str, d: &DatabaseConfig, p: &mut Vec<String>) {
        let at = format!("databases.{name}");
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        {
            p.push(format!(
                "{at}: the name may hold only letters, digits, '_' and '-' (it is used in metrics)"
            ));
        }
        if !self.repositories.contains_key(&d.repository) {
            p.push(format!(
                "{at}.repository: no repository named {:?}; defined: {}",
                d.repository,
                list(self.repositories.keys())
            ));
        }
        let caps = match d.engine {
            EngineKind::Postgres => {
                if d.sqlite.is_some() {
                    p.push(format!(
                        "{at}.sqlite: set for a postgres database; remove it"
                    ));
                }
                match &d.postgres {
                    None => {
                        p.push(format!(
                            "{at}.postgres: missing; give at least url or host of the server"
                        ));
                        None
                    }
                    Some(c) => match c.engine() {
                        Ok(pg) => {
                            // Every file the connection names is read only when it is used:
                            // a missing one must fail --check, not the first backup at 2 a.m.
                            let files = [
                                ("pg_password_file", &c.pg_password_file),
                                ("sslrootcert", &c.sslrootcert),
                                ("sslcert", &c.sslcert),
                                ("sslkey", &c.sslkey),
                            ];
                            for (field, f) in files {
                                if let Some(f) = f.as_ref().filter(|f| !f.is_file()) {
                                    p.push(format!(
                                        "{at}.postgres.{field}: file {} does not exist",
                                        f.display()
                                    ));
                                }
                            }
                            if let Some(b) = c.pg_bin.as_ref().filter(|b| !b.is_dir()) {
                                p.push(format!(
                                    "{at}.postgres.pg_bin: directory {} does not exist",
                                    b.display()
                                ));
                            }
                            Some(pg.capabilities())
                        }
                        Err(e) => {
                            p.push(format!("{at}.postgres: {e}"));
                            None
                        }
                    },
                }
            }
            EngineKind::Sqlite => {
                if d.postgres.is_some() {
                    p.push(format!(
                        "{at}.postgres: set for an sqlite database; remove it"
                    ));
                }
                match &d.sqlite {
                    None => {
                        p.push(format!("{at}.sqlite.path: missing; give the database file"));
                        None
                    }
                    Some(s) => {
                        if !s.path.is_absolute() {
                            p.push(format!("{at}.sqlite.path: must be an absolute path"));
                        }
                        Some(tidemark_engine::sqlite::Sqlite::new(&s.path).capabilities())
                    }
                }
            }
        };
        if d.schedules.is_empty() {
            p.push(format!("{at}.schedules: none given; add at least one"));
        }
        for (i, s) in d.schedules.iter().enumerate() {
            if let Err(e) = Schedule::parse(&s.cron) {
                p.push(format!("{at}.schedules[{i}].cron: {e}"));
            }
            if let Some(c) = caps {
                let ok = match s.kind {
                    BackupKind::Logical => c.logical,
                    BackupKind::Physical | BackupKind::Incremental => c.physical,
                };
                if !ok {
                    p.push(format!(
                        "{at}.schedules[{i}].kind: the {:?} engine cannot take {} backups",
                        d.engine,
                        s.kind.as_str()
                    ));
                }
            }
        }
        if let Some(c) = caps {
            if d.pitr.mode != PitrMode::Off && !c.log_archiving {
                p.push(format!(
                    "{at}.pitr.mode: the {:?} engine has no log to archive; use off",
                    d.engine
                ));
            }
            let policies = d
                .retention
                .iter()
                .map(|r| ("retention".to_owned(), r))
                .chain(
                    d.location_retention
                        .iter()
                        .map(|(l, r)| (format!("location_retention.{l}"), r)),
                );
            for (field, r) in policies {
                if r.pitr_window.is_some() && !c.point_in_time {
                    p.push(format!(
                        "{at}.{field}.pitr_window: the {:?} engine has no point-in-time recovery; remove it",
                        d.engine
                    ));
                }
            }
        }
        if let Some(r) = self.repositories.get(&d.repository) {
            for l in d.location_retention.keys() {
                if !r.locations.iter().any(|x| &x.name == l) {
                    p.push(format!(
                        "{at}.location_retention.{l}: repository {:?} has no location {l:?}; use one of {}",
                        d.repository,
                        r.locations.iter().map(|x| format!("{:?}", x.name)).collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
        if d.pitr.slot.is_some() && d.pitr.mode != PitrMode::Streaming {
            p.push(format!("{at}.pitr.slot: only used with mode: streaming"));
        }
        if d.retry.attempts == 0 {
            p.push(format!("{at}.retry.attempts: must be at least 1"));
        }
        if let Some(v) = &d.verification {
            if let Err(e) = Schedule::parse(&v.cron) {
                p.push(format!("{at}.verification.cron: {e}"));
            }
        }
        for n in &d.notify {
            if !self.notifications.contains_key(n) {
                p.push(format!(
                    "{at}.notify: no notification channel named {n:?}; defined: {}",
                    list(self.notifications.keys())
                ));
            }
        }
        if d.alert_after.is_some() && d.notify.is_empty() {
            p.push(format!(
                "{at}.alert_after: set, but notify names no channel to alert"
            ));
        }
    }
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Read a webhook URL from its file. The error never quotes the file's content.
///
/// # Errors
/// A message for a missing, empty or non-HTTP file.
pub fn read_url(path: &Path) -> Result<zeroize::Zeroizing<String>, String> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let line = zeroize::Zeroizing::new(text.lines().next().unwrap_or("").trim().to_owned());
    if !(line.starts_with("https://") || line.starts_with("http://")) {
        return Err(format!(
            "{} does not start with an http:// or https:// URL on its first line",
            path.display()
        ));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_secret(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "secret\n").unwrap();
        std::fs::write(dir.path().join("hook"), "https://hooks.example/T000/abc\n").unwrap();
        let text = text.replace("DIR", dir.path().to_str().unwrap());
        (dir, text)
    }

    const GOOD: &str = "
agent:
  state_dir: DIR/state
repositories:
  main:
    locations: [{name: local, url: DIR/repo}]
    password_file: DIR/pw
databases:
  app:
    engine: postgres
    repository: main
    postgres: {url: 'postgresql://backup@127.0.0.1:5432/app'}
    schedules:
      - {kind: physical, cron: '0 2 * * *', jitter: 5m}
      - {kind: logical, cron: '@every 6h'}
    pitr: {mode: streaming, slot: tidemark}
    retention: {keep_last: 3, keep_daily: 7, pitr_window: 7d}
    verification: {cron: '0 6 * * *', queries: [{sql: 'select 1', expect: '1'}]}
    notify: [ops]
    alert_after: 26h
  cache:
    engine: sqlite
    repository: main
    sqlite: {path: /var/lib/cache.db}
    schedules: [{kind: physical, cron: '*/10 * * * * *'}]
notifications:
  ops: {kind: slack, url_file: DIR/hook}
";

    #[test]
    fn a_complete_file_loads() {
        let (_d, text) = with_secret(GOOD);
        let c = Config::parse(&text).unwrap();
        let app = &c.databases["app"];
        assert_eq!(app.schedules[0].jitter, Some(Duration::minutes(5)));
        let r = app.retention.as_ref().unwrap();
        assert_eq!((r.keep.last, r.keep.daily), (3, 7));
        assert_eq!(r.pitr_window, Some(Duration::days(7)));
        assert_eq!(c.listen().port(), 9187);
    }

    fn problems(edit: impl Fn(String) -> String) -> String {
        let (_d, text) = with_secret(&edit(GOOD.to_owned()));
        Config::parse(&text).unwrap_err().join("\n")
    }

    #[test]
    fn each_problem_names_its_field() {
        for (from, to, says) in [
            (
                "cron: '0 2 * * *'",
                "cron: '0 25 * * *'",
                "databases.app.schedules[0].cron: hour field \"25\": 25 is outside 0-23",
            ),
            (
                "repository: main\n    postgres",
                "repository: mian\n    postgres",
                "databases.app.repository: no repository named \"mian\"; defined: main",
            ),
            (
                "notify: [ops]",
                "notify: [pager]",
                "databases.app.notify: no notification channel named \"pager\"",
            ),
            (
                "schedules: [{kind: physical",
                "schedules: [{kind: logical",
                "databases.cache.schedules[0].kind: the Sqlite engine cannot take logical backups",
            ),
            (
                "password_file: DIR/pw",
                "password_file: DIR/nope",
                "repositories.main: secret file",
            ),
            ("jitter: 5m", "jitter: 5", "5"),
            (
                "pitr_window: 7d",
                "pitr_window: 7 days",
                "databases.app.retention: \"7 days\": unknown unit",
            ),
            (
                "state_dir: DIR/state",
                "state_dir: state",
                "agent.state_dir: must be an absolute path",
            ),
            ("keep_last: 3", "keep_lats: 3", "unknown field `keep_lats`"),
            (
                "postgres: {url: 'postgresql://backup@127.0.0.1:5432/app'}",
                "postgres: {url: 'postgresql://backup@127.0.0.1:5432/app', pg_password_file: DIR/nope}",
                "databases.app.postgres.pg_password_file: file",
            ),
            (
                "postgres: {url: 'postgresql://backup@127.0.0.1:5432/app'}",
                "postgres: {url: 'postgresql://backup@127.0.0.1:5432/app', sslrootcert: DIR/ca.pem}",
                "databases.app.postgres.sslrootcert: file",
            ),
            ("engine: sqlite", "engine: mysql", "unknown variant `mysql`"),
        ] {
            let p = problems(|t| {
                assert!(t.contains(from), "{from}");
                t.replacen(from, to, 1)
            });
            assert!(p.contains(says), "{to}: {p}");
        }
    }

    #[test]
    fn the_webhook_url_is_never_quoted_in_an_error() {
        let (d, text) = with_secret(GOOD);
        std::fs::write(d.path().join("hook"), "hooks.example/T000/very-secret\n").unwrap();
        let p = Config::parse(&text).unwrap_err().join("\n");
        assert!(p.contains("notifications.ops.url_file"), "{p}");
        assert!(!p.contains("very-secret"), "{p}");
    }
}
