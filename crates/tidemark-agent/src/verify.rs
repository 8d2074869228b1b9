//! Verification restores: restore a recent backup into scratch space and prove the data came
//! back, table by table, against the census the backup recorded (design/agent.md §6b).

use std::sync::Arc;

use chrono::Utc;
use tidemark_engine::census::{self, Census};
use tidemark_engine::postgres::logical::{self, RestoreOptions};
use tidemark_engine::postgres::scratch::{Scratch, ScratchOptions};
use tidemark_repo::id::SnapshotId;
use tidemark_repo::snapshot::{Snapshot, SnapshotKind};
use tidemark_repo::Repository;

use crate::config::{BackupKind, DatabaseConfig, EngineKind};
use crate::jobs::{db_tag, engine};
use crate::status::VerificationRecord;

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
) -> Option<VerificationRecord> {
    let started = Utc::now();
    let mut rec = VerificationRecord {
        started,
        ..Default::default()
    };
    let r = verify_inner(name, db, repo, scratch, &mut rec).await;
    rec.rto_seconds = (Utc::now() - started).num_milliseconds() as f64 / 1000.0;
    match r {
        Ok(true) => rec.ok = true,
        // Nothing to verify yet: no record, no alarm (the dead man's switch covers a
        // database whose backups never succeed).
        Ok(false) => return None,
        Err(e) => rec.error = Some(e),
    }
    Some(rec)
}

async fn verify_inner(
    name: &str,
    db: &DatabaseConfig,
    repo: &Repository,
    scratch: &std::path::Path,
    rec: &mut VerificationRecord,
) -> Result<bool, String> {
    let tag = [db_tag(name)];
    // A physical base backup that read damaged pages is not a base to trust.
    let wanted = |s: &Snapshot| {
        !s.positions
            .contains_key(tidemark_engine::postgres::physical::CHECKSUM_FAILURES)
    };
    let newest = repo
        .snapshots()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|(_, s)| s.has_tags(&tag) && wanted(s))
        .max_by_key(|(_, s)| s.time);
    let Some((id, snap)) = newest else {
        tracing::info!(database = %name, "nothing to verify yet: no backup of the database");
        return Ok(false);
    };
    rec.snapshot = Some(id.short());
    rec.point = Some(snap.time_end);
    if db.engine == EngineKind::Postgres {
        return verify_postgres(db, repo, scratch, id, &snap, rec)
            .await
            .map(|()| true);
    }
    let target = scratch.join(format!("verify-{}.db", id.short()));
    tidemark_engine::sqlite::remove_database(&target);
    let engine = engine(db, BackupKind::Physical)?;
    let report = engine
        .restore(repo, &id.short(), &snap, &target)
        .await
        .map_err(|e| format!("the restore failed: {e}"))?;
    rec.checks.extend(report.verified);
    let result = check_restored(&snap, &target, db);
    // The scratch space as it was: the database and anything SQLite put beside it.
    tidemark_engine::sqlite::remove_database(&target);
    rec.checks.extend(result?);
    Ok(true)
}

/// Stop and remove scratch servers a verification left behind when the agent was killed in
/// the middle of one: a `tidemark-verify-*` directory under `scratch`, whose postmaster (if it
/// still runs from that very data directory) gets an immediate shutdown.
pub fn clean_leftovers(scratch: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return;
    };
    for e in entries.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .starts_with("tidemark-verify-")
        {
            continue;
        }
        let dir = e.path();
        let data = dir.join("data");
        let pid = std::fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid {
            // Only a postmaster running in this data directory (not a reused pid).
            let ours = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
                == std::fs::canonicalize(&data).ok();
            if let (true, Some(p)) = (ours, rustix::process::Pid::from_raw(pid)) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::QUIT);
                let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while std::path::Path::new(&format!("/proc/{pid}")).exists()
                    && std::time::Instant::now() < end
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::warn!(
                "removed {}, a verification's scratch server left by an agent that stopped abruptly",
                dir.display()
            ),
            Err(err) => tracing::error!("failed to remove {}: {err}", dir.display()),
        }
    }
}

/// A user's query against what it returned: the line for the record, or why it failed.
pub(crate) fn check_query(
    q: &crate::config::CheckQuery,
    got: Result<String, String>,
) -> Result<String, String> {
    let got = got.map_err(|e| format!("query {:?} failed: {e}", q.sql))?;
    if got != q.expect {
        return Err(format!(
            "query {:?} returned {got:?}, expected {:?}",
            q.sql, q.expect
        ));
    }
    Ok(format!("query {:?} returned {got:?}", q.sql))
}

/// Run the user's queries on a PostgreSQL connection: a line each, or the first failure.
pub(crate) async fn pg_queries(
    c: &mut tidemark_engine::postgres::wire::Connection,
    queries: &[crate::config::CheckQuery],
) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for q in queries {
        let got = c
            .query(&q.sql)
            .await
            .map_err(|e| e.to_string())
            .map(|rows| {
                rows.first()
                    .and_then(|r| r.first().cloned().flatten())
                    .unwrap_or_default()
            });
        lines.push(check_query(q, got)?);
    }
    Ok(lines)
}

/// Compare the census the backup recorded with the restored tables': a line for the record.
pub(crate) fn compare_census(
    snap: &Snapshot,
    restored: impl FnOnce() -> Result<Census, String>,
) -> Result<String, String> {
    let Some(v) = snap.positions.get(census::POSITION) else {
        return Ok("no census recorded by this backup: counts not compared".into());
    };
    let recorded: Census = serde_json::from_value(v.clone())
        .map_err(|e| format!("the snapshot's census is unreadable: {e}"))?;
    let restored = restored()?;
    let diff = census::compare(&recorded, &restored);
    if !diff.is_empty() {
        return Err(format!(
            "the restored data differs from the backup: {}",
            diff.join("; ")
        ));
    }
    let rows: u64 = recorded.values().map(|t| t.rows).sum();
    Ok(format!(
        "{} tables, {rows} rows: counts and checksums match the backup",
        recorded.len()
    ))
}

fn check_restored(
    snap: &Snapshot,
    target: &std::path::Path,
    db: &DatabaseConfig,
) -> Result<Vec<String>, String> {
    let mut checks = vec![compare_census(snap, || {
        census::sqlite(target).map_err(|e| format!("failed to read the restored tables: {e}"))
    })?];
    if let Some(v) = &db.verification {
        if !v.queries.is_empty() {
            let c = tidemark_engine::sqlite::ReadOnly::open(target)
                .map_err(|e| format!("failed to open the restored database: {e}"))?;
            for q in &v.queries {
                checks.push(check_query(
                    q,
                    c.query_text(&q.sql).map_err(|e| e.to_string()),
                )?);
            }
        }
    }
    Ok(checks)
}

/// Restore a logical PostgreSQL backup into a throwaway server (a new cluster in the scratch
/// space), compare every table with the census taken in the dump's own snapshot, and run the
/// user's queries against the connection's database.
async fn verify_postgres(
    db: &DatabaseConfig,
    repo: &Repository,
    scratch: &std::path::Path,
    id: SnapshotId,
    snap: &Snapshot,
    rec: &mut VerificationRecord,
) -> Result<(), String> {
    let o = scratch_options(db, snap, scratch)?;
    if snap.kind == SnapshotKind::Physical {
        return crate::verify_pg::physical(db, repo, o, id, snap, rec).await;
    }
    let server = tokio::task::spawn_blocking(move || Scratch::init(&o))
        .await
        .map_err(|e| format!("the scratch server task failed: {e}"))?
        .map_err(|e| format!("failed to start a scratch server: {e}"))?;
    let result = restore_and_check(db, repo, &server, id, snap, rec).await;
    // Stopping runs pg_ctl: off the async workers.
    let _ = tokio::task::spawn_blocking(move || drop(server)).await;
    result
}

/// Where and as whom a scratch server of the backup's major version runs.
fn scratch_options(
    db: &DatabaseConfig,
    snap: &Snapshot,
    scratch: &std::path::Path,
) -> Result<ScratchOptions, String> {
    let live = db.postgres.as_ref().expect("validated").engine()?;
    let version = snap.database.version.clone().unwrap_or_default();
    let initdb = live.program(
        "initdb",
        tidemark_engine::postgres::major_version_num(&version),
    );
    let bin_dir = initdb
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| {
            format!("the initdb of PostgreSQL {version:?} was not found; set postgres.pg_bin")
        })?
        .to_path_buf();
    Ok(ScratchOptions {
        bin_dir,
        os_user: tidemark_engine::postgres::start::server_os_user(
            db.verification.as_ref().and_then(|v| v.os_user.clone()),
        ),
        parent: scratch.to_path_buf(),
        timeout: std::time::Duration::from_secs(600),
    })
}

async fn restore_and_check(
    db: &DatabaseConfig,
    repo: &Repository,
    server: &Scratch,
    id: SnapshotId,
    snap: &Snapshot,
    rec: &mut VerificationRecord,
) -> Result<(), String> {
    let spg = server.postgres();
    let databases: Vec<String> = snap
        .streams
        .iter()
        .filter_map(|s| logical::stream_database(&s.name))
        .collect();
    for d in &databases {
        let o = RestoreOptions {
            source: Some(d.clone()),
            target: Some(d.clone()),
            // A new cluster has the database `postgres` already; the original roles are absent.
            clean: true,
            no_owner: true,
            no_privileges: true,
            ..Default::default()
        };
        logical::restore(
            &spg,
            repo,
            &id.short(),
            snap,
            &o,
            Arc::new(Default::default()),
        )
        .await
        .map_err(|e| format!("the restore of database {d:?} failed: {e}"))?;
    }
    rec.checks.push(format!(
        "pg_restore of {} into a scratch server completed with --exit-on-error",
        databases.join(", ")
    ));
    let mut restored = Census::new();
    for d in &databases {
        let mut on = spg.clone();
        on.conn.dbname = d.clone();
        let mut c = on.connect().await.map_err(|e| e.to_string())?;
        let r = async {
            c.query("BEGIN").await.map_err(|e| e.to_string())?;
            census::postgres(&mut c, &format!("{d}/")).await
        }
        .await;
        c.close().await;
        restored
            .extend(r.map_err(|e| format!("failed to read the restored tables of {d:?}: {e}"))?);
    }
    rec.checks.push(compare_census(snap, || Ok(restored))?);
    let queries = db
        .verification
        .as_ref()
        .map(|v| v.queries.clone())
        .unwrap_or_default();
    if !queries.is_empty() {
        let mut on = spg.clone();
        on.conn.dbname = db
            .postgres
            .as_ref()
            .map(|p| p.engine().map(|e| e.conn.dbname))
            .transpose()?
            .unwrap_or_else(|| "postgres".into());
        let mut c = on.connect().await.map_err(|e| e.to_string())?;
        let result = pg_queries(&mut c, &queries).await;
        c.close().await;
        rec.checks.extend(result?);
    }
    Ok(())
}
