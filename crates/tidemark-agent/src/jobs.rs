//! The work a schedule starts: one backup of one database into its repository, then retention,
//! then a fresh list of the database's snapshots for the status.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;
use tidemark_engine::postgres::physical::PhysicalOptions;
use tidemark_engine::Engine;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::backup::{Backup, BackupOptions};
use tidemark_repo::ops::retention::RetentionPolicy;
use tidemark_repo::progress::Progress;
use tidemark_repo::Repository;

use crate::config::{BackupKind, DatabaseConfig, EngineKind};
use crate::locations::{Reached, Repo};
use crate::status::{LocationRun, RunRecord, SnapshotPoint};

/// The tag every snapshot of a database gets from the agent: how retention and the status
/// find the database's own snapshots in a shared repository.
pub fn db_tag(name: &str) -> String {
    format!("tidemark.db={name}")
}

/// The engine for a database, set up for `kind`.
///
/// # Errors
/// A message for connection settings that do not resolve.
pub fn engine(db: &DatabaseConfig, kind: BackupKind) -> Result<Box<dyn Engine>, String> {
    match db.engine {
        EngineKind::Sqlite => {
            let path = &db.sqlite.as_ref().expect("validated").path;
            Ok(Box::new(tidemark_engine::sqlite::Sqlite::new(path)))
        }
        EngineKind::Postgres => {
            let mut pg = db.postgres.as_ref().expect("validated").engine()?;
            // Verification compares a restore with the census taken in the dump's snapshot.
            pg.logical.census = db.verification.is_some();
            if kind != BackupKind::Logical {
                pg.physical = Some(PhysicalOptions::default());
            }
            Ok(Box::new(pg))
        }
    }
}

/// Take one backup, written from one read to every location of the repository that can be
/// reached and locked. The snapshot exists only where this reports it (the repository writes
/// it last); a failure or an abandoned future leaves at most unreferenced packs for prune.
///
/// # Errors
/// A one-line message naming what failed: the source, or every location.
pub async fn backup(
    name: &str,
    db: &DatabaseConfig,
    repo: &Repo,
    kind: BackupKind,
) -> Result<RunRecord, String> {
    let started = Utc::now();
    let engine = engine(db, kind)?;
    let mut locations: BTreeMap<String, LocationRun> = BTreeMap::new();
    let mut reached = Vec::new();
    let mut locks = Vec::new();
    for (site, r) in repo.reach_all().await {
        let lock = match r {
            Ok(rp) => LockGuard::acquire(&rp, LockKind::Shared, "backup", &LockOptions::default())
                .await
                .map(|l| (rp, l))
                .map_err(|e| format!("failed to lock the repository: {e}")),
            Err(e) => Err(e),
        };
        match lock {
            Ok((rp, l)) => {
                reached.push((site, rp));
                locks.push(l);
            }
            Err(e) => {
                tracing::warn!(database = %name, location = %site, "location left out of the backup: {e}");
                locations.insert(site, missed(e));
            }
        }
    }
    if reached.is_empty() {
        return Err(format!(
            "no location of repository {:?} could be reached: {}",
            repo.name(),
            describe_missing(&locations)
        ));
    }
    let mut tags = db.tags.clone();
    tags.push(db_tag(name));
    let opts = BackupOptions {
        engine: engine.name().into(),
        tags,
        ..Default::default()
    };
    let targets = reached
        .iter()
        .map(|(_, rp)| rp.clone())
        .zip(locks.iter())
        .collect();
    let result = async {
        let b = Backup::start_at(targets, opts, Arc::new(Progress::default()))
            .await
            .map_err(|e| e.to_string())?;
        tidemark_engine::run_backup(engine.as_ref(), b)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    for l in locks {
        let _ = l.release().await;
    }
    let f = result?;
    for ((site, _), outcome) in reached.into_iter().zip(&f.locations) {
        let run = match &outcome.error {
            None => LocationRun {
                ok: true,
                bytes_stored: outcome.new_stored_bytes,
                error: None,
            },
            Some(e) => missed(e.clone()),
        };
        locations.insert(site, run);
    }
    if let Some(pages) = f
        .snapshot
        .positions
        .get(tidemark_engine::postgres::physical::CHECKSUM_FAILURES)
    {
        return Err(format!(
            "{pages} page(s) failed their checksums while read; snapshot {} holds them as read and is not a base for the protected chain",
            f.id.short()
        ));
    }
    Ok(RunRecord {
        started,
        duration_seconds: (Utc::now() - started).num_milliseconds() as f64 / 1000.0,
        attempts: 1,
        snapshot: Some(f.id.short()),
        bytes_read: f.snapshot.summary.raw_bytes,
        bytes_stored: f.snapshot.summary.new_stored_bytes,
        error: None,
        locations: if repo.several() {
            locations
        } else {
            BTreeMap::new()
        },
    })
}

fn missed(error: String) -> LocationRun {
    LocationRun {
        ok: false,
        bytes_stored: 0,
        error: Some(error),
    }
}

fn describe_missing(locations: &BTreeMap<String, LocationRun>) -> String {
    locations
        .iter()
        .map(|(l, r)| format!("{l}: {}", r.error.as_deref().unwrap_or("?")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Copy the log segments the first location holds to each other location that lacks them
/// (the archiver writes the first; format §9a). Streamed pieces are left out: the whole
/// segment follows once it is complete. Returns, per other location, the segments copied or
/// why it failed.
pub async fn copy_logs(repo: &Repo, reached: &Reached) -> Vec<(String, Result<u64, String>)> {
    let mut out = Vec::new();
    for (site, r) in reached.iter().skip(1) {
        let r = match r {
            Ok(to) => tidemark_repo::ops::copy::copy_segments(repo.primary(), to, |_, n| {
                tidemark_engine::postgres::wal::parse_piece(n).is_none()
            })
            .await
            .map(|c| c.segments)
            .map_err(|e| format!("failed to copy log segments: {e}")),
            Err(e) => Err(e.clone()),
        };
        out.push((site.clone(), r));
    }
    out
}

/// Plan the database's retention on its own snapshots (and the log they need), hand the plan to
/// `publish` (what is kept and why, what would go, the PITR windows) and, with `apply`, carry
/// out that same plan. One listing and one plan under one lock: what is shown is what is done.
/// Returns what was removed, as lines, and the short ids of the snapshots removed.
///
/// # Errors
/// A message naming what failed.
pub async fn retention(
    name: &str,
    policy: &RetentionPolicy,
    repo: &Repository,
    apply: bool,
    publish: impl FnOnce(Vec<String>),
) -> Result<(Vec<String>, Vec<String>), String> {
    let mut policy = policy.clone();
    policy.keep.tags.push(db_tag(name));
    let lock = LockGuard::acquire(repo, LockKind::Shared, "forget", &LockOptions::default())
        .await
        .map_err(|e| format!("failed to lock the repository: {e}"))?;
    let result = async {
        let (facts, segments) = tidemark_engine::retention::facts(repo)
            .await
            .map_err(|e| e.to_string())?;
        let plan = tidemark_repo::ops::retention::plan(&facts, &segments, &policy);
        publish(plan_lines(&plan));
        if !apply {
            return Ok((Vec::new(), Vec::new()));
        }
        tidemark_repo::ops::retention::apply(repo, &plan)
            .await
            .map_err(|e| e.to_string())?;
        let mut done: Vec<String> = plan
            .removed()
            .map(|d| {
                format!(
                    "removed snapshot {} of {}",
                    d.id.short(),
                    d.time.to_rfc3339()
                )
            })
            .collect();
        if !plan.delete_segments.is_empty() {
            done.push(format!(
                "removed {} log segment(s)",
                plan.delete_segments.len()
            ));
        }
        Ok((done, plan.removed().map(|d| d.id.short()).collect()))
    }
    .await;
    let _ = lock.release().await;
    result
}

/// The plan as lines, for this database's snapshots only (the others were kept as "not matched
/// by the tag filter").
fn plan_lines(plan: &tidemark_repo::ops::retention::RetentionPlan) -> Vec<String> {
    let mut lines = Vec::new();
    for d in plan
        .snapshots
        .iter()
        .filter(|d| !d.reasons.iter().any(|r| r.contains("tag filter")))
    {
        if d.keep {
            lines.push(format!(
                "keep snapshot {} of {}: {}",
                d.id.short(),
                d.time.to_rfc3339(),
                d.reasons.join(", ")
            ));
        } else {
            lines.push(format!(
                "would remove snapshot {} of {}",
                d.id.short(),
                d.time.to_rfc3339()
            ));
        }
    }
    if !plan.delete_segments.is_empty() {
        lines.push(format!(
            "would remove {} log segment(s)",
            plan.delete_segments.len()
        ));
    }
    for w in &plan.windows {
        lines.push(format!(
            "pitr window of {}: {} to {}",
            w.group,
            w.covered_from.to_rfc3339(),
            w.until.to_rfc3339()
        ));
    }
    lines
}

/// The database's snapshots, oldest first.
///
/// # Errors
/// A message naming what failed.
pub async fn snapshots(name: &str, repo: &Repository) -> Result<Vec<SnapshotPoint>, String> {
    let tag = [db_tag(name)];
    let mut v: Vec<SnapshotPoint> = repo
        .snapshots()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|(_, s)| s.has_tags(&tag))
        .map(|(id, s)| SnapshotPoint {
            id: id.short(),
            kind: serde_json::to_value(s.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            time: s.time,
            time_end: s.time_end,
        })
        .collect();
    v.sort_by_key(|s| s.time);
    Ok(v)
}
