//! Leased locks with a heartbeat (format §8.1). A stale lock never blocks for longer than one
//! lease plus the clock-skew allowance.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tidemark_storage::ErrorKind;
use tokio::sync::watch;

use crate::crypto::aad;
use crate::error::{Error, Result};
use crate::key::hostname;
use crate::repository::Repository;

/// Shared (backup, restore, check, forget) or exclusive (prune, key remove).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// Compatible with other shared locks and with an exclusive lock.
    Shared,
    /// Excludes other exclusive locks; prune's safety beside shared lockers is by design (§8.3).
    Exclusive,
}

/// How locks are taken and kept.
#[derive(Debug, Clone)]
pub struct LockOptions {
    /// How long a lock stays valid without a refresh (default 120 s).
    pub lease: Duration,
    /// How often it is refreshed (default 40 s).
    pub refresh: Duration,
    /// Clock skew tolerated between hosts (default 30 s).
    pub skew: Duration,
    /// How long to wait for a conflicting lock to go away before failing (default 0).
    pub wait: Duration,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            lease: Duration::from_secs(120),
            refresh: Duration::from_secs(40),
            skew: Duration::from_secs(30),
            wait: Duration::ZERO,
        }
    }
}

/// A lock object's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// Shared or exclusive.
    pub kind: LockKind,
    /// What the holder is doing.
    pub operation: String,
    /// The holder's host.
    pub hostname: String,
    /// The holder's process id.
    pub pid: u32,
    /// When the holder first locked.
    pub created: DateTime<Utc>,
    /// When the lease ends unless refreshed.
    pub expires: DateTime<Utc>,
    /// Makes every record (and so its id) unique.
    pub nonce: String,
}

impl LockRecord {
    /// Whether the lock no longer protects anything: its lease ran out, or its process on this
    /// host is gone.
    pub fn is_stale(&self, now: DateTime<Utc>, skew: Duration) -> bool {
        let skew = chrono::Duration::from_std(skew).unwrap_or_default();
        if self.expires + skew < now {
            return true;
        }
        self.hostname == hostname()
            && self.pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    /// Who holds the lock and since when, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}) on {} pid {} since {}",
            self.operation,
            kind_name(self.kind),
            self.hostname,
            self.pid,
            self.created.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

fn kind_name(k: LockKind) -> &'static str {
    match k {
        LockKind::Shared => "shared",
        LockKind::Exclusive => "exclusive",
    }
}

/// Every lock object that is not stale (removing stale ones when `remove_stale`).
pub async fn live_locks(
    repo: &Repository,
    skew: Duration,
    remove_stale: bool,
) -> Result<Vec<(String, LockRecord)>> {
    let now = Utc::now();
    let mut live = Vec::new();
    for m in repo.list_objects("locks").await? {
        let rec: LockRecord = match repo.load_json(&m.path, aad::LOCK).await {
            Ok(r) => r,
            Err(Error::Storage(e)) if e.kind == ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!(lock = %m.path, error = %e, "ignoring an unreadable lock object");
                continue;
            }
        };
        if rec.is_stale(now, skew) {
            if remove_stale {
                tracing::warn!(lock = %m.path, holder = %rec.describe(), "removing a stale lock");
                repo.storage().delete(&m.path).await?;
            }
            continue;
        }
        live.push((m.path, rec));
    }
    Ok(live)
}

/// A held lock. Refreshed in the background until released; `check` reports a lost lease.
#[derive(Debug)]
pub struct LockGuard {
    repo: Repository,
    path: Arc<Mutex<String>>,
    record: LockRecord,
    stop: watch::Sender<bool>,
    lost: watch::Receiver<Option<String>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LockGuard {
    /// Take a lock of `kind` for `operation`.
    ///
    /// # Errors
    /// `Locked` naming the holder when a live conflicting lock remains after `opts.wait`.
    pub async fn acquire(
        repo: &Repository,
        kind: LockKind,
        operation: &str,
        opts: &LockOptions,
    ) -> Result<LockGuard> {
        let created = Utc::now();
        let deadline = tokio::time::Instant::now() + opts.wait;
        loop {
            let record = new_record(kind, operation, created, opts.lease);
            let path = format!(
                "locks/{}",
                hex::encode(repo.save_json("locks", aad::LOCK, &record).await?)
            );
            // Only exclusive lockers exclude each other; a shared locker never waits (§8.1),
            // so it need not read the other locks at all.
            let others = match kind {
                LockKind::Shared => Vec::new(),
                LockKind::Exclusive => live_locks(repo, opts.skew, true).await?,
            };
            let conflict = match kind {
                LockKind::Shared => None,
                LockKind::Exclusive => others
                    .iter()
                    .find(|(p, r)| *p != path && r.kind == LockKind::Exclusive),
            };
            match conflict {
                None => return Ok(LockGuard::start(repo.clone(), path, record, opts)),
                Some((_, holder)) => {
                    let holder = holder.describe();
                    repo.storage().delete(&path).await?;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Locked { holder });
                    }
                    tracing::info!(%holder, "waiting for a lock");
                    let jitter = Duration::from_millis(500 + rand::random::<u64>() % 1500);
                    tokio::time::sleep(jitter.min(deadline - tokio::time::Instant::now())).await;
                }
            }
        }
    }

    fn start(repo: Repository, path: String, record: LockRecord, opts: &LockOptions) -> LockGuard {
        let (stop, mut stop_rx) = watch::channel(false);
        let (lost_tx, lost) = watch::channel(None);
        let path = Arc::new(Mutex::new(path));
        let (repo2, path2, rec2, opts2) =
            (repo.clone(), path.clone(), record.clone(), opts.clone());
        let task = tokio::spawn(async move {
            let mut expires = rec2.expires;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(opts2.refresh) => {}
                    _ = stop_rx.changed() => return,
                }
                let fresh = new_record(rec2.kind, &rec2.operation, rec2.created, opts2.lease);
                match repo2.save_json("locks", aad::LOCK, &fresh).await {
                    Ok(id) => {
                        let new_path = format!("locks/{}", hex::encode(id));
                        let old = std::mem::replace(
                            &mut *path2.lock().unwrap_or_else(|p| p.into_inner()),
                            new_path,
                        );
                        expires = fresh.expires;
                        if let Err(e) = repo2.storage().delete(&old).await {
                            tracing::warn!(error = %e, "failed to remove the previous lock object");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "failed to refresh the repository lock");
                        if Utc::now()
                            + chrono::Duration::from_std(opts2.refresh).unwrap_or_default()
                            >= expires
                        {
                            let _ = lost_tx.send(Some(format!(
                                "could not refresh it before its lease ended: {e}"
                            )));
                            return;
                        }
                    }
                }
            }
        });
        LockGuard {
            repo,
            path,
            record,
            stop,
            lost,
            task: Some(task),
        }
    }

    /// Fail if the lease could not be kept; writers call this before each step.
    ///
    /// # Errors
    /// `LockLost`.
    pub fn check(&self) -> Result<()> {
        match &*self.lost.borrow() {
            Some(why) => Err(Error::LockLost(why.clone())),
            None => Ok(()),
        }
    }

    /// The time this lock was first taken.
    pub fn created(&self) -> DateTime<Utc> {
        self.record.created
    }

    /// Release the lock: stop refreshing and delete the lock object.
    ///
    /// # Errors
    /// Storage errors deleting it (the lease then expires by itself).
    pub async fn release(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let path = self.path.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.repo.storage().delete(&path).await?;
        Ok(())
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Not released (an error path): stop refreshing; the lease will expire.
        let _ = self.stop.send(true);
    }
}

fn new_record(
    kind: LockKind,
    operation: &str,
    created: DateTime<Utc>,
    lease: Duration,
) -> LockRecord {
    LockRecord {
        kind,
        operation: operation.to_owned(),
        hostname: hostname(),
        pid: std::process::id(),
        created,
        expires: Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default(),
        nonce: hex::encode(rand::random::<[u8; 8]>()),
    }
}

/// Write a lock record as is (for tests that need a stale lock from a dead holder).
///
/// # Errors
/// Storage errors.
pub async fn write_record_for_tests(repo: &Repository, record: &LockRecord) -> Result<String> {
    Ok(format!(
        "locks/{}",
        hex::encode(repo.save_json("locks", aad::LOCK, record).await?)
    ))
}
