//! The running agent: one worker per database that sleeps until its next schedule, runs one
//! backup at a time (skipping or queueing the rest), retries with backoff until a deadline,
//! applies retention, and records everything in the status and the state file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tidemark_repo::lock::{live_locks, LockGuard, LockKind, LockOptions};
use tidemark_repo::Repository;
use tokio::sync::{mpsc, watch};

use crate::config::{BackupKind, Concurrency, Config, DatabaseConfig};
use crate::http::Shared;
use crate::locations::{Reached, Repo};
use crate::notify::{Event, EventKind, Notifier};
use crate::schedule::{self, Planned};
use crate::status::{state_file, RunRecord, Running, Status, VerificationRecord};

/// The agent could not start: what failed, and the repository's own error where that was the
/// cause (so that the CLI exits with the code it uses for that error: 3 for no repository, 4
/// for a wrong password, 7 for unreachable storage).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StartError {
    /// What failed, naming the thing.
    pub message: String,
    /// The repository error behind it.
    #[source]
    pub cause: Option<tidemark_repo::Error>,
}

impl From<String> for StartError {
    fn from(message: String) -> Self {
        StartError {
            message,
            cause: None,
        }
    }
}

/// Hold the state directory: an exclusive `flock` on `agent.lock`, so that a second agent
/// with the same state directory refuses to start.
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("failed to create state directory {}: {e}", dir.display()))?;
    let path = dir.join("agent.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("failed to open {}: {e}", path.display()))?;
    if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(format!(
            "another agent (pid {}) is running with state directory {}; stop it, or give this one its own state_dir and databases",
            holder.trim(),
            dir.display()
        ));
    }
    use std::io::Write as _;
    let _ = f.set_len(0);
    let _ = (&f).write_all(std::process::id().to_string().as_bytes());
    Ok(f)
}

/// The lock operation that marks the agent protecting `db`.
fn agent_operation(db: &str) -> String {
    format!("agent:{db}")
}

/// Hold an agent lock for `db` in its repository, and refuse if another live agent holds one:
/// two agents backing up and pruning one database would fight over its retention.
async fn claim_database(repo: &Repository, db: &str) -> Result<LockGuard, String> {
    let op = agent_operation(db);
    let guard = LockGuard::acquire(repo, LockKind::Shared, &op, &LockOptions::default())
        .await
        .map_err(|e| format!("failed to lock the repository for database {db:?}: {e}"))?;
    let others: Vec<_> = live_locks(repo, LockOptions::default().skew, false)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|(_, r)| {
            r.operation == op && !(r.pid == std::process::id() && r.created == guard.created())
        })
        .collect();
    if let Some((_, r)) = others.first() {
        let holder = r.describe();
        let _ = guard.release().await;
        return Err(format!(
            "another agent already protects database {db:?} in this repository ({holder}); stop it, or remove this database from one of the two configs"
        ));
    }
    Ok(guard)
}

/// What a worker is told.
enum Told {
    Done(BackupKind, Result<RunRecord, RunRecord>),
}

struct Worker {
    notifier: crate::notify::Notifier,
    name: String,
    db: DatabaseConfig,
    repo: Repo,
    status: Shared,
    state: PathBuf,
    grace: std::time::Duration,
}

impl Worker {
    fn update(&self, f: impl FnOnce(&mut crate::status::DatabaseStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(s.databases.entry(self.name.clone()).or_default());
        if let Err(e) = s.save(&self.state) {
            tracing::error!(
                "failed to save the state file {}: {e}",
                self.state.display()
            );
        }
    }

    /// List the database's snapshots at every location: the status shows all of them, and
    /// per location how many it has and which it lacks.
    async fn refresh_snapshots(&self, reached: &Reached) {
        let mut listed = Vec::new();
        for (site, r) in reached {
            let site = site.clone();
            let r = match r {
                Ok(rp) => crate::jobs::snapshots(&self.name, rp).await,
                Err(e) => Err(e.clone()),
            };
            if let Err(e) = &r {
                tracing::warn!(database = %self.name, location = %site, "failed to list snapshots: {e}");
            }
            listed.push((site, r));
        }
        let several = self.repo.several();
        self.update(|d| {
            let mut all: BTreeMap<String, crate::status::SnapshotPoint> = BTreeMap::new();
            for (_, r) in &listed {
                for p in r.iter().flatten() {
                    all.entry(p.id.clone()).or_insert_with(|| p.clone());
                }
            }
            if listed.iter().any(|(_, r)| r.is_ok()) {
                let mut v: Vec<_> = all.values().cloned().collect();
                v.sort_by_key(|p| p.time);
                d.snapshots = v;
            }
            if !several {
                return;
            }
            for (site, r) in &listed {
                let l = d.locations.entry(site.clone()).or_default();
                match r {
                    Ok(here) => {
                        // A snapshot stays marked missing until this location has it (a
                        // copy) or no location has it any more (retention).
                        let have: BTreeSet<&str> = here.iter().map(|p| p.id.as_str()).collect();
                        l.snapshots = here.len();
                        l.missing
                            .retain(|id| !have.contains(id.as_str()) && all.contains_key(id));
                    }
                    Err(e) => {
                        l.ok = false;
                        l.last_error = Some(format!("failed to list snapshots: {e}"));
                    }
                }
            }
        });
    }

    /// The retention policy at a location: its own, or the database's.
    fn policy(&self, site: &str) -> Option<&tidemark_repo::ops::retention::RetentionPolicy> {
        self.db
            .location_retention
            .get(site)
            .or(self.db.retention.as_ref())
    }

    /// Plan retention at every location and, with `apply`, carry the plan out. The status
    /// shows each plan before it is applied; with several locations each line names its own.
    async fn retention(&self, reached: &Reached, apply: bool) {
        let several = self.repo.several();
        let mut plans = Vec::new();
        let mut done = Vec::new();
        let mut errors = Vec::new();
        for (site, r) in reached {
            let Some(policy) = self.policy(site) else {
                continue;
            };
            let prefix = |l: String| if several { format!("[{site}] {l}") } else { l };
            let rp = match r {
                Ok(rp) => rp,
                Err(e) => {
                    errors.push(prefix(e.clone()));
                    continue;
                }
            };
            let mut shown = Vec::new();
            let r = crate::jobs::retention(&self.name, policy, rp, apply, |lines| {
                shown = lines;
            })
            .await;
            plans.extend(shown.into_iter().map(prefix));
            self.update(|d| d.retention_plan = plans.clone());
            match r {
                Ok((lines, removed)) => {
                    done.extend(lines.into_iter().map(prefix));
                    // Retention here would have removed it: no longer missing here.
                    self.update(|d| {
                        if let Some(l) = d.locations.get_mut(site) {
                            l.missing.retain(|id| !removed.contains(id));
                        }
                    });
                }
                Err(e) => errors.push(prefix(e)),
            }
        }
        self.update(|d| {
            d.retention_plan = plans;
            if apply {
                d.retention = done;
            }
            d.retention_error = (!errors.is_empty()).then(|| errors.join("; "));
        });
    }

    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut planned: Vec<Planned> = self.db.schedules.iter().map(Planned::new).collect();
        let (fired, done) = {
            let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            s.databases
                .get(&self.name)
                .map(|d| (d.fired.clone(), d.done.clone()))
                .unwrap_or_default()
        };
        let missed = schedule::start(&mut planned, &fired, &done, Utc::now(), self.db.catch_up);
        let mut queue: BTreeSet<BackupKind> = missed.iter().map(|i| planned[*i].kind).collect();
        for i in &missed {
            tracing::info!(database = %self.name, schedule = %planned[*i].key, "catching up a run missed while the agent was down");
        }
        // What retention would do now (a dry run), in the status before it does anything.
        let reached = self.repo.reach_all().await;
        self.refresh_snapshots(&reached).await;
        self.retention(&reached, false).await;
        let (tx, mut rx) = mpsc::channel::<Told>(4);
        let mut running: Option<(BackupKind, tokio::task::JoinHandle<()>)> = None;
        let mut wake: Option<(usize, DateTime<Utc>)> = None;
        let verify_schedule = self
            .db
            .verification
            .as_ref()
            .map(|v| crate::cron::Schedule::parse(&v.cron).expect("validated on load"));
        let mut verify_next = verify_schedule
            .as_ref()
            .and_then(|s| s.next_after(Utc::now()));
        let mut watchdog = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut stale_alerted: Option<DateTime<Utc>> = None;
        loop {
            if running.is_none() {
                if let Some(kind) = queue.pop_first() {
                    running = Some((kind, self.start(kind, Utc::now(), tx.clone())));
                }
            }
            if wake.is_none() {
                wake = schedule::earliest(&planned)
                    .map(|(i, at)| (i, at + schedule::jitter(planned[i].jitter)));
            }
            self.update(|d| {
                for p in &planned {
                    d.kinds.entry(p.kind.as_str().into()).or_default().next_run = p.next;
                }
            });
            let sleep = wake
                .map(|(_, at)| (at - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or(std::time::Duration::from_secs(3600));
            tokio::select! {
                _ = crate::until_stopped(&mut stop) => break,
                _ = watchdog.tick() => self.check_stale(&mut stale_alerted),
                _ = sleep_until(verify_next) => {
                    // Inline: a verification restore and the database's backups take turns.
                    self.verify().await;
                    verify_next = verify_schedule.as_ref().and_then(|s| s.next_after(Utc::now()));
                }
                Some(Told::Done(kind, result)) = rx.recv() => {
                    running = None;
                    self.account(&planned, kind);
                    self.finished(kind, result).await;
                }
                _ = tokio::time::sleep(sleep) => {
                    let Some((i, _)) = wake.take() else { continue };
                    let at = planned[i].next.unwrap_or_else(Utc::now);
                    let kind = planned[i].kind;
                    let key = planned[i].key.clone();
                    let passed = schedule::advance(&mut planned[i], at, Utc::now());
                    self.update(|d| {
                        d.fired.insert(key, at);
                        d.kinds.entry(kind.as_str().into()).or_default().skipped += passed;
                    });
                    if running.is_none() || self.db.concurrency == Concurrency::Queue {
                        queue.insert(kind);
                    } else {
                        tracing::warn!(database = %self.name, kind = kind.as_str(), "skipping a scheduled backup: the previous one still runs");
                        self.update(|d| d.kinds.entry(kind.as_str().into()).or_default().skipped += 1);
                    }
                }
            }
        }
        // Shutdown: let a running backup finish within the grace period, else abandon it. An
        // abandoned backup has written no snapshot (it is written last).
        if let Some((kind, handle)) = running {
            tracing::info!(database = %self.name, "waiting up to {:?} for the running backup", self.grace);
            match tokio::time::timeout(self.grace, rx.recv()).await {
                Ok(Some(Told::Done(kind, result))) => {
                    self.account(&planned, kind);
                    self.finished(kind, result).await;
                }
                _ => {
                    handle.abort();
                    tracing::warn!(database = %self.name, kind = kind.as_str(), "abandoned the running backup at shutdown; no snapshot was written");
                }
            }
        }
        self.update(|d| d.running = None);
    }

    /// Restore the newest snapshot into the state directory's scratch space and check it;
    /// record the result, and notify a failure.
    async fn verify(&self) {
        let scratch = self
            .state
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("verify");
        tracing::info!(database = %self.name, "verification restore starting");
        let rec = match std::fs::create_dir_all(&scratch) {
            Ok(()) => {
                match crate::verify::verify(&self.name, &self.db, self.repo.primary(), &scratch)
                    .await
                {
                    Some(rec) => rec,
                    None => return,
                }
            }
            Err(e) => VerificationRecord {
                started: Utc::now(),
                error: Some(format!("failed to create {}: {e}", scratch.display())),
                ..Default::default()
            },
        };
        if rec.ok {
            tracing::info!(database = %self.name, snapshot = rec.snapshot.as_deref().unwrap_or("none"), "verification restore passed in {:.1}s", rec.rto_seconds);
        } else {
            let e = rec.error.clone().unwrap_or_default();
            tracing::error!(database = %self.name, snapshot = rec.snapshot.as_deref().unwrap_or("none"), "verification restore failed: {e}");
            let what = rec.snapshot.as_deref().unwrap_or("-");
            self.notifier.send(
                &self.db.notify,
                Event::new(
                    EventKind::VerificationFailed,
                    &self.name,
                    None,
                    format!("snapshot {what}: {e}"),
                ),
            );
        }
        self.update(|d| {
            if let Some(point) = rec.point {
                d.verified.push(crate::status::VerifiedPoint {
                    point,
                    ok: rec.ok,
                    snapshot: rec.snapshot.clone(),
                });
                let extra = d
                    .verified
                    .len()
                    .saturating_sub(crate::status::VERIFIED_POINTS);
                d.verified.drain(..extra);
            }
            d.verification = Some(rec);
        });
    }

    /// The dead man's switch: no successful backup (of any kind) for `alert_after`, counted from
    /// the agent's start when there never was one. Repeated every `alert_after` while it lasts.
    fn check_stale(&self, alerted: &mut Option<DateTime<Utc>>) {
        let Some(limit) = self.db.alert_after else {
            return;
        };
        let (last, started) = {
            let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            let last = s.databases.get(&self.name).and_then(|d| d.last_success());
            (last, s.started.unwrap_or_else(Utc::now))
        };
        let now = Utc::now();
        let since = last.unwrap_or(started);
        if now - since < limit {
            *alerted = None;
            return;
        }
        if alerted.is_some_and(|a| now - a < limit) {
            return;
        }
        *alerted = Some(now);
        let message = match last {
            Some(t) => format!(
                "the last successful backup started {} ago ({}), longer than alert_after {}",
                tidemark_repo::duration::format(now - t),
                t.to_rfc3339(),
                tidemark_repo::duration::format(limit)
            ),
            None => format!(
                "no successful backup since the agent started {} ago (alert_after {})",
                tidemark_repo::duration::format(now - started),
                tidemark_repo::duration::format(limit)
            ),
        };
        tracing::warn!(database = %self.name, "{message}");
        self.notifier.send(
            &self.db.notify,
            Event::new(EventKind::NoRecentBackup, &self.name, None, message),
        );
    }

    /// A run of `kind` finished: every time its schedules fired so far is accounted for.
    fn account(&self, planned: &[Planned], kind: BackupKind) {
        self.update(|d| {
            for p in planned.iter().filter(|p| p.kind == kind) {
                if let Some(t) = d.fired.get(&p.key).copied() {
                    d.done.insert(p.key.clone(), t);
                }
            }
        });
    }

    /// Start a backup of `kind` with its retries, as a task that reports to `tx`.
    fn start(
        &self,
        kind: BackupKind,
        scheduled: DateTime<Utc>,
        tx: mpsc::Sender<Told>,
    ) -> tokio::task::JoinHandle<()> {
        let (name, db, repo) = (self.name.clone(), self.db.clone(), self.repo.clone());
        let status = self.status.clone();
        let started = Utc::now();
        tokio::spawn(async move {
            let mut attempt = 1;
            let deadline = scheduled + db.retry.deadline();
            let result = loop {
                {
                    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                    s.databases.entry(name.clone()).or_default().running = Some(Running {
                        kind: kind.as_str().into(),
                        since: started,
                        attempt,
                    });
                }
                tracing::info!(database = %name, kind = kind.as_str(), attempt, "backup starting");
                let r = crate::jobs::backup(&name, &db, &repo, kind).await;
                match r {
                    Ok(rec) => break Ok(rec),
                    Err(e) => {
                        tracing::warn!(database = %name, kind = kind.as_str(), attempt, "backup failed: {e}");
                        let wait = schedule::backoff(db.retry.backoff(), attempt + 1);
                        if attempt >= db.retry.attempts || Utc::now() + wait > deadline {
                            break Err(e);
                        }
                        tokio::time::sleep(wait.to_std().unwrap_or_default()).await;
                        attempt += 1;
                    }
                }
            };
            let duration_seconds = (Utc::now() - started).num_milliseconds() as f64 / 1000.0;
            let result = match result {
                Ok(r) => Ok(RunRecord {
                    attempts: attempt,
                    started,
                    duration_seconds,
                    ..r
                }),
                Err(e) => Err(RunRecord {
                    attempts: attempt,
                    started,
                    duration_seconds,
                    error: Some(format!("{e} (after {attempt} attempt(s))")),
                    ..Default::default()
                }),
            };
            let _ = tx.send(Told::Done(kind, result)).await;
        })
    }

    /// Record a finished run (a failure is a record with its error), notify, then retention.
    async fn finished(&self, kind: BackupKind, result: Result<RunRecord, RunRecord>) {
        let ok = result.is_ok();
        let was_failing = {
            let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            s.databases
                .get(&self.name)
                .and_then(|d| d.kinds.get(kind.as_str()))
                .is_some_and(|k| k.failing())
        };
        let event = match &result {
            Err(r) => Some(Event::new(
                EventKind::BackupFailed,
                &self.name,
                Some(kind.as_str()),
                r.error.clone().unwrap_or_default(),
            )),
            Ok(r) if was_failing => Some(Event::new(
                EventKind::BackupRecovered,
                &self.name,
                Some(kind.as_str()),
                format!(
                    "snapshot {} saved after earlier failures",
                    r.snapshot.as_deref().unwrap_or("?")
                ),
            )),
            Ok(_) => None,
        };
        if let Some(e) = event {
            self.notifier.send(&self.db.notify, e);
        }
        for (site, run) in result.iter().flat_map(|r| &r.locations) {
            if !run.ok {
                self.notifier.send(
                    &self.db.notify,
                    Event::new(
                        EventKind::LocationFailed,
                        &self.name,
                        Some(kind.as_str()),
                        format!(
                            "location {site} missed snapshot {} (the others have it; fill it with `tidemark copy`): {}",
                            result.as_ref().ok().and_then(|r| r.snapshot.as_deref()).unwrap_or("?"),
                            run.error.as_deref().unwrap_or("")
                        ),
                    ),
                );
            }
        }
        match result {
            Ok(rec) => {
                tracing::info!(database = %self.name, kind = kind.as_str(), snapshot = rec.snapshot.as_deref().unwrap_or("none"), "backup done in {:.1}s", rec.duration_seconds);
                self.update(|d| {
                    d.running = None;
                    for (site, run) in &rec.locations {
                        let l = d.locations.entry(site.clone()).or_default();
                        l.ok = run.ok;
                        if run.ok {
                            l.last_success = Some(rec.started);
                            l.last_bytes_stored = run.bytes_stored;
                            l.last_error = None;
                        } else {
                            l.last_failure = Some(rec.started);
                            l.last_error = run.error.clone();
                            l.missing.extend(rec.snapshot.clone());
                        }
                    }
                    let k = d.kinds.entry(kind.as_str().into()).or_default();
                    k.successes += 1;
                    k.last_success = Some(rec);
                });
            }
            Err(rec) => {
                tracing::error!(database = %self.name, kind = kind.as_str(), "backup failed: {}", rec.error.as_deref().unwrap_or(""));
                self.update(|d| {
                    d.running = None;
                    let k = d.kinds.entry(kind.as_str().into()).or_default();
                    k.failures += 1;
                    k.last_failure = Some(rec);
                });
            }
        }
        // The locations reached once for what follows the backup.
        let reached = self.repo.reach_all().await;
        if ok && self.repo.several() && self.db.pitr.mode != crate::config::PitrMode::Off {
            crate::wal::copy_logs(&self.name, &self.repo, &reached, &self.status).await;
        }
        if ok && (self.db.retention.is_some() || !self.db.location_retention.is_empty()) {
            self.retention(&reached, true).await;
        }
        self.refresh_snapshots(&reached).await;
    }
}

/// Run the agent until `stop` turns true.
///
/// # Errors
/// `StartError` when it cannot start: the state directory is held by another agent, a
/// repository does not open, another agent protects one of the databases, the address is taken.
pub async fn run(config: Config, stop: watch::Receiver<bool>) -> Result<(), StartError> {
    let dir = &config.agent.state_dir;
    let _held = lock_state_dir(dir).map_err(StartError::from)?;
    let state = state_file(dir);
    crate::verify::clean_leftovers(&dir.join("verify"));
    let mut initial = Status::load(&state).map_err(StartError::from)?;
    initial.started = Some(Utc::now());
    initial.ready = false;
    initial
        .databases
        .retain(|k, _| config.databases.contains_key(k));
    let status: Shared = Arc::new(Mutex::new(initial));
    let http = crate::http::serve(config.listen(), status.clone(), stop.clone())
        .await
        .map_err(StartError::from)?;
    let mut repos: BTreeMap<String, Repo> = BTreeMap::new();
    for (name, r) in &config.repositories {
        let repo = Repo::open(name, r).await?;
        for (site, e) in repo.check_at_start().await.map_err(StartError::from)? {
            tracing::warn!(repository = %name, location = %site, "location unreachable at start; backups go to the others until it is back: {e}");
        }
        repos.insert(name.clone(), repo);
    }
    let mut claims = Vec::new();
    for (name, db) in &config.databases {
        claims.push(
            claim_database(repos[&db.repository].primary(), name)
                .await
                .map_err(StartError::from)?,
        );
    }
    let grace = config
        .agent
        .shutdown_grace
        .and_then(|g| g.to_std().ok())
        .unwrap_or(std::time::Duration::from_secs(60));
    let notifier = Notifier::start(&config).map_err(StartError::from)?;
    let mut workers = Vec::new();
    for (name, db) in &config.databases {
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            let d = s.databases.entry(name.clone()).or_default();
            d.engine = format!("{:?}", db.engine).to_lowercase();
            d.repository = db.repository.clone();
            d.running = None;
        }
        let w = Worker {
            notifier: notifier.clone(),
            name: name.clone(),
            db: db.clone(),
            repo: repos[&db.repository].clone(),
            status: status.clone(),
            state: state.clone(),
            grace,
        };
        workers.push(tokio::spawn(w.run(stop.clone())));
        workers.push(tokio::spawn(crate::wal::run(
            name.clone(),
            db.clone(),
            repos[&db.repository].clone(),
            status.clone(),
            stop.clone(),
        )));
    }
    status.lock().unwrap_or_else(|p| p.into_inner()).ready = true;
    tracing::info!("{}", started_line(&config, Utc::now()));
    for w in workers {
        let _ = w.await;
    }
    for c in claims {
        let _ = c.release().await;
    }
    let _ = http.await;
    Ok(())
}

/// The one line an agent logs once it runs: where it listens, and each database with the next
/// time each of its schedules fires (before jitter and catch-up).
fn started_line(config: &Config, now: DateTime<Utc>) -> String {
    let next = |cron: &str| {
        crate::cron::Schedule::parse(cron)
            .ok()
            .and_then(|s| s.next_after(now))
            .map_or_else(
                || "never".to_owned(),
                |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            )
    };
    let dbs: Vec<String> = config
        .databases
        .iter()
        .map(|(name, d)| {
            let mut runs: Vec<String> = d
                .schedules
                .iter()
                .map(|s| format!("{} next at {}", s.kind.as_str(), next(&s.cron)))
                .collect();
            if let Some(v) = &d.verification {
                runs.push(format!("verification next at {}", next(&v.cron)));
            }
            let engine = format!("{:?}", d.engine).to_lowercase();
            if runs.is_empty() {
                format!("{name} ({engine}, no schedules)")
            } else {
                format!("{name} ({engine}: {})", runs.join(", "))
            }
        })
        .collect();
    format!(
        "agent running, listening on {}; {}",
        config.listen(),
        dbs.join("; ")
    )
}

/// Sleep until `t`; forever when there is none.
async fn sleep_until(t: Option<DateTime<Utc>>) {
    match t {
        Some(t) => tokio::time::sleep((t - Utc::now()).to_std().unwrap_or_default()).await,
        None => std::future::pending().await,
    }
}
