//! Verification restores of PostgreSQL physical backups: the base backup restored into a
//! throwaway server's directory (every file checked against the manifest), the archived WAL
//! after it fetched into its `pg_wal` (verified, by the agent: the scratch server is given no
//! secret and no restore_command), recovery to the end of the archive and promotion, then the
//! point reached compared with the archive's end, every table read, and the user's queries.

use std::sync::Arc;

use tidemark_engine::census;
use tidemark_engine::postgres::archive::{self, FetchOptions, Fetched};
use tidemark_engine::postgres::physical::{self, RestoreOptions};
use tidemark_engine::postgres::scratch::{Scratch, ScratchOptions};
use tidemark_engine::postgres::wal::{self, SegmentName, WalFile};
use tidemark_repo::id::SnapshotId;
use tidemark_repo::snapshot::Snapshot;
use tidemark_repo::Repository;

use crate::config::DatabaseConfig;
use crate::status::VerificationRecord;

/// Restore `snap` and the WAL after it into a scratch server, recover to the end, and check.
pub(crate) async fn physical(
    db: &DatabaseConfig,
    repo: &Repository,
    o: ScratchOptions,
    id: SnapshotId,
    snap: &Snapshot,
    rec: &mut VerificationRecord,
) -> Result<(), String> {
    let mut slot = Some(Scratch::empty(&o).map_err(|e| e.to_string())?);
    let r = run(db, repo, &mut slot, id, snap, rec).await;
    if let Some(server) = slot {
        let _ = tokio::task::spawn_blocking(move || drop(server)).await;
    }
    r
}

async fn run(
    db: &DatabaseConfig,
    repo: &Repository,
    slot: &mut Option<Scratch>,
    id: SnapshotId,
    snap: &Snapshot,
    rec: &mut VerificationRecord,
) -> Result<(), String> {
    let mut server = slot.take().expect("a server");
    let last = match prepare(repo, &server, id, snap, rec).await {
        Ok(l) => l,
        Err(e) => {
            *slot = Some(server);
            return Err(e);
        }
    };
    // Starting and following recovery blocks: off the async workers.
    let (server, started) = tokio::task::spawn_blocking(move || {
        let r = server.start_recovery();
        (server, r)
    })
    .await
    .map_err(|e| format!("the scratch server task failed: {e}"))?;
    let server = slot.insert(server);
    let started = started.map_err(|e| format!("recovery failed: {e}"))?;
    check(db, server, snap, last, started, rec).await
}

/// Restore the base backup (manifest-verified) and the WAL after it; configure recovery to
/// the end. Returns the last archived segment.
async fn prepare(
    repo: &Repository,
    server: &Scratch,
    id: SnapshotId,
    snap: &Snapshot,
    rec: &mut VerificationRecord,
) -> Result<Option<SegmentName>, String> {
    let data = server.data_dir().to_path_buf();
    // Every tablespace into the scratch directory: never back where it was.
    let map = physical::tablespace_places(snap, &[])?
        .into_iter()
        .map(|p| {
            (
                p.oid.clone(),
                server.dir().join(format!("tablespace-{}", p.oid)),
            )
        })
        .collect();
    let report = physical::restore(
        repo,
        &id.short(),
        snap,
        &data,
        &RestoreOptions {
            tablespace_map: map,
            delta: false,
        },
        Arc::new(Default::default()),
    )
    .await
    .map_err(|e| format!("the restore failed: {e}"))?;
    rec.checks.extend(report.verified);

    let system_id: u64 = snap
        .database
        .system_id
        .as_deref()
        .and_then(|s| s.parse().ok())
        .ok_or("the snapshot does not name its cluster (no system identifier)")?;
    let start = snap
        .positions
        .get("pg.start_wal")
        .and_then(|v| v.as_str())
        .and_then(SegmentName::parse)
        .ok_or("the snapshot does not name its first WAL segment")?;
    let (fetched, last) = fetch_wal(repo, system_id, start, &data).await?;
    rec.checks.push(format!(
        "{fetched} archived WAL file(s) from {start} fetched and verified"
    ));

    let _ = std::fs::remove_file(data.join("standby.signal"));
    let conf = data.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
    // The WAL is in pg_wal already; nothing is fetched by the server itself.
    text.push_str(
        "\n# tidemark verification: recover everything in pg_wal, then promote\n\
         restore_command = 'false'\nrecovery_target_timeline = 'latest'\n\
         recovery_target = ''\nrecovery_target_time = ''\nrecovery_target_lsn = ''\n\
         recovery_target_xid = ''\nrecovery_target_name = ''\n",
    );
    std::fs::write(&conf, text).map_err(|e| format!("failed to write {}: {e}", conf.display()))?;
    std::fs::write(data.join("recovery.signal"), "")
        .map_err(|e| format!("failed to write recovery.signal: {e}"))?;
    Ok(last)
}

/// Recovery promoted at the end of the archive; then every table read and the queries run.
async fn check(
    db: &DatabaseConfig,
    server: &Scratch,
    snap: &Snapshot,
    last: Option<SegmentName>,
    started: tidemark_engine::postgres::start::StartReport,
    rec: &mut VerificationRecord,
) -> Result<(), String> {
    let seg_size = snap
        .positions
        .get("pg.seg_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(16 << 20);
    if started.outcome != "promoted" {
        return Err(format!(
            "recovery ended {} instead of promoting: {}",
            started.outcome,
            started.recovery_log.join(" | ")
        ));
    }
    // Where recovery got to, against where the archive ends: a shortfall is a gap.
    let redo = started
        .recovery_log
        .iter()
        .find_map(|l| l.split("redo done at ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(wal::parse_lsn);
    match (redo, last) {
        (Some(redo), Some(last)) if redo < last.start_lsn(seg_size) => {
            return Err(format!(
                "recovery stopped at {} but the archive holds WAL up to segment {last}: a segment between is missing or unreadable",
                wal::lsn_string(redo)
            ));
        }
        // Not claimed when it cannot be told.
        (None, Some(_)) => {
            return Err(format!(
                "the server log does not say where recovery ended, so whether it reached the archive's end is unknown: {}",
                started.recovery_log.join(" | ")
            ));
        }
        _ => {}
    }
    if let Some(t) = started
        .recovery_log
        .iter()
        .find_map(|l| {
            l.split("last completed transaction was at log time ")
                .nth(1)
        })
        .and_then(|t| chrono::DateTime::parse_from_str(t.trim(), "%Y-%m-%d %H:%M:%S%.f%#z").ok())
    {
        rec.point = Some(t.with_timezone(&chrono::Utc));
    }
    rec.checks.push(format!(
        "recovered to the end of the archived WAL{} and promoted in {:.1}s",
        redo.map(|r| format!(" ({})", wal::lsn_string(r)))
            .unwrap_or_default(),
        started.recovery_seconds
    ));

    // Read every table of the connection's database as the configured user: the restored
    // cluster has the original roles and pg_hba.conf.
    let mut pg = db.postgres.as_ref().expect("validated").engine()?;
    pg.conn.host = "127.0.0.1".into();
    pg.conn.port = server.port();
    pg.conn.sslmode = tidemark_engine::postgres::conn::SslMode::Prefer;
    let queries = db
        .verification
        .as_ref()
        .map(|v| v.queries.clone())
        .unwrap_or_default();
    let mut c = match pg.connect().await {
        Ok(c) => c,
        Err(e) if queries.is_empty() => {
            rec.checks.push(format!(
                "tables not read: cannot log in to the restored server: {e}"
            ));
            return Ok(());
        }
        Err(e) => {
            return Err(format!(
                "cannot log in to the restored server for the queries: {e}"
            ))
        }
    };
    let r = async {
        c.query("BEGIN").await.map_err(|e| e.to_string())?;
        let tables = census::postgres(&mut c, "")
            .await
            .map_err(|e| format!("failed to read the restored tables: {e}"))?;
        c.query("COMMIT").await.map_err(|e| e.to_string())?;
        let rows: u64 = tables.values().map(|t| t.rows).sum();
        let mut checks = vec![format!(
            "{} tables, {rows} rows of database {:?} read in full",
            tables.len(),
            pg.conn.dbname
        )];
        checks.extend(crate::verify::pg_queries(&mut c, &queries).await?);
        Ok::<_, String>(checks)
    }
    .await;
    c.close().await;
    rec.checks.extend(r?);
    Ok(())
}

/// Fetch every archived WAL file from `start` on (any timeline) and every history file into
/// `data/pg_wal`, verified; returns how many, and the last segment.
async fn fetch_wal(
    repo: &Repository,
    system_id: u64,
    start: SegmentName,
    data: &std::path::Path,
) -> Result<(usize, Option<SegmentName>), String> {
    let names = tidemark_repo::log::list_segments(repo, &wal::stream(system_id))
        .await
        .map_err(|e| format!("failed to list the archived WAL: {e}"))?;
    let mut wanted: Vec<String> = Vec::new();
    let mut last: Option<SegmentName> = None;
    let position = |s: &SegmentName| (s.log, s.seg);
    for n in &names {
        let seg = match WalFile::parse(n) {
            Some(WalFile::History(_)) => {
                wanted.push(n.clone());
                continue;
            }
            Some(WalFile::Segment(s)) => s,
            // A segment still being streamed: its pieces make it.
            _ => match wal::parse_piece(n) {
                Some((s, _)) => s,
                None => continue,
            },
        };
        if seg.timeline < start.timeline || position(&seg) < position(&start) {
            continue;
        }
        let name = seg.to_string();
        if !wanted.contains(&name) {
            wanted.push(name);
        }
        if last.is_none_or(|l| (l.timeline, position(&l)) < (seg.timeline, position(&seg))) {
            last = Some(seg);
        }
    }
    let o = FetchOptions {
        system_id: Some(system_id),
        data_dir: data.to_path_buf(),
        prefetch: 0,
    };
    let mut n = 0;
    for name in &wanted {
        match archive::fetch(repo, name, &data.join("pg_wal").join(name), &o).await {
            Ok(Fetched::Restored(_)) => n += 1,
            Ok(Fetched::NotFound) => {}
            Err(e) => return Err(format!("failed to fetch WAL file {name}: {e}")),
        }
    }
    Ok((n, last))
}
