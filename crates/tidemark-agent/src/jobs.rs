//! The work a schedule starts: one backup of one database into its repository, then retention,
//! then a fresh list of the database's snapshots for the status.

use std::sync::Arc;

use chrono::Utc;
use tidemark_engine::postgres::physical::PhysicalOptions;
use tidemark_engine::Engine;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::backup::{Backup, BackupOptions};
use tidemark_repo::progress::Progress;
use tidemark_repo::Repository;

use crate::config::{BackupKind, DatabaseConfig, EngineKind};
use crate::status::{RunRecord, SnapshotPoint, VerificationRecord};

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
            if kind != BackupKind::Logical {
                pg.physical = Some(PhysicalOptions::default());
            }
            Ok(Box::new(pg))
        }
    }
}

/// Take one backup. The snapshot exists only if this returns Ok (the repository writes it
/// last); a failure or an abandoned future leaves at most unreferenced packs for prune.
///
/// # Errors
/// A one-line message naming what failed.
pub async fn backup(
    name: &str,
    db: &DatabaseConfig,
    repo: &Repository,
    kind: BackupKind,
) -> Result<RunRecord, String> {
    let started = Utc::now();
    let engine = engine(db, kind)?;
    let lock = LockGuard::acquire(repo, LockKind::Shared, "backup", &LockOptions::default())
        .await
        .map_err(|e| format!("failed to lock the repository: {e}"))?;
    let mut tags = db.tags.clone();
    tags.push(db_tag(name));
    let opts = BackupOptions {
        engine: engine.name().into(),
        tags,
        ..Default::default()
    };
    let result = async {
        let b = Backup::start(repo, &lock, opts, Arc::new(Progress::default()))
            .await
            .map_err(|e| e.to_string())?;
        tidemark_engine::run_backup(engine.as_ref(), b)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    let _ = lock.release().await;
    let (id, snap) = result?;
    if let Some(pages) = snap
        .positions
        .get(tidemark_engine::postgres::physical::CHECKSUM_FAILURES)
    {
        return Err(format!(
            "{pages} page(s) failed their checksums while read; snapshot {} holds them as read and is not a base for the protected chain",
            id.short()
        ));
    }
    Ok(RunRecord {
        started,
        duration_seconds: (Utc::now() - started).num_milliseconds() as f64 / 1000.0,
        attempts: 1,
        snapshot: Some(id.short()),
        bytes_read: snap.summary.raw_bytes,
        bytes_stored: snap.summary.new_stored_bytes,
        error: None,
    })
}

/// Plan the database's retention on its own snapshots (and the log they need), hand the plan to
/// `publish` (what is kept and why, what would go, the PITR windows) and, with `apply`, carry
/// out that same plan. One listing and one plan under one lock: what is shown is what is done.
/// Returns what was removed.
///
/// # Errors
/// A message naming what failed.
pub async fn retention(
    name: &str,
    db: &DatabaseConfig,
    repo: &Repository,
    apply: bool,
    publish: impl FnOnce(Vec<String>),
) -> Result<Vec<String>, String> {
    let Some(policy) = &db.retention else {
        return Ok(Vec::new());
    };
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
            return Ok(Vec::new());
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
        Ok(done)
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
                "remove snapshot {} of {}",
                d.id.short(),
                d.time.to_rfc3339()
            ));
        }
    }
    if !plan.delete_segments.is_empty() {
        lines.push(format!(
            "remove {} log segment(s)",
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

/// Restore the database's newest snapshot into `scratch` and prove the data came back: the
/// engine's own check, then each table's row count and checksum against the census the backup
/// recorded, then the user's queries. The duration is the measured RTO.
///
/// # Errors
/// Never: a failure is a record with `ok: false` and the reason.
pub async fn verify(
    name: &str,
    db: &DatabaseConfig,
    repo: &Repository,
    scratch: &std::path::Path,
) -> VerificationRecord {
    let started = Utc::now();
    let mut rec = VerificationRecord {
        started,
        ..Default::default()
    };
    let r = verify_inner(name, db, repo, scratch, &mut rec).await;
    rec.rto_seconds = (Utc::now() - started).num_milliseconds() as f64 / 1000.0;
    match r {
        Ok(()) => rec.ok = true,
        Err(e) => rec.error = Some(e),
    }
    rec
}

async fn verify_inner(
    name: &str,
    db: &DatabaseConfig,
    repo: &Repository,
    scratch: &std::path::Path,
    rec: &mut VerificationRecord,
) -> Result<(), String> {
    if db.engine != EngineKind::Sqlite {
        return Err("verification restores of this engine are not built yet".into());
    }
    let tag = [db_tag(name)];
    let (id, snap) = repo
        .snapshots()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|(_, s)| s.has_tags(&tag))
        .max_by_key(|(_, s)| s.time)
        .ok_or("the database has no snapshot to verify yet")?;
    rec.snapshot = Some(id.short());
    rec.point = Some(snap.time_end);
    let target = scratch.join(format!("verify-{}.db", id.short()));
    let _ = std::fs::remove_file(&target);
    let engine = engine(db, BackupKind::Physical)?;
    let report = engine
        .restore(repo, &id.short(), &snap, &target)
        .await
        .map_err(|e| format!("the restore failed: {e}"))?;
    rec.checks.extend(report.verified);
    let result = check_restored(&snap, &target, db);
    let _ = std::fs::remove_file(&target);
    rec.checks.extend(result?);
    Ok(())
}

fn check_restored(
    snap: &tidemark_repo::snapshot::Snapshot,
    target: &std::path::Path,
    db: &DatabaseConfig,
) -> Result<Vec<String>, String> {
    use tidemark_engine::census;
    let mut checks = Vec::new();
    match snap.positions.get(census::POSITION) {
        Some(v) => {
            let recorded: census::Census = serde_json::from_value(v.clone())
                .map_err(|e| format!("the snapshot's census is unreadable: {e}"))?;
            let restored = census::sqlite(target)
                .map_err(|e| format!("failed to read the restored tables: {e}"))?;
            let diff = census::compare(&recorded, &restored);
            if !diff.is_empty() {
                return Err(format!(
                    "the restored data differs from the backup: {}",
                    diff.join("; ")
                ));
            }
            let rows: u64 = recorded.values().map(|t| t.rows).sum();
            checks.push(format!(
                "{} tables, {rows} rows: counts and checksums match the backup",
                recorded.len()
            ));
        }
        None => checks.push("no census recorded by this backup: counts not compared".into()),
    }
    if let Some(v) = &db.verification {
        if !v.queries.is_empty() {
            let c = tidemark_engine::sqlite::ReadOnly::open(target)
                .map_err(|e| format!("failed to open the restored database: {e}"))?;
            for q in &v.queries {
                let got = c
                    .query_text(&q.sql)
                    .map_err(|e| format!("query {:?} failed: {e}", q.sql))?;
                if got != q.expect {
                    return Err(format!(
                        "query {:?} returned {got:?}, expected {:?}",
                        q.sql, q.expect
                    ));
                }
                checks.push(format!("query {:?} returned {got:?}", q.sql));
            }
        }
    }
    Ok(checks)
}
