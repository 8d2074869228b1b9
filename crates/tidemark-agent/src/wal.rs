//! Log archiving under the agent: with `pitr.mode: streaming` it runs the WAL streamer and
//! restarts it with backoff; in either mode it measures the archive lag, the WAL the server has
//! written that the archive does not hold yet.

use std::time::Duration;

use crate::locations::{Reached, Repo};
use chrono::Utc;
use tidemark_engine::postgres::stream::{self, Progress, StreamOptions};
use tidemark_engine::postgres::{archive, wal, Postgres};
use tokio::sync::watch;

use crate::config::{DatabaseConfig, PitrMode};
use crate::http::Shared;
use crate::status::{WalGap, WalStatus};

/// How often the lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// How often, in lag measurements, the other locations are brought level with the first.
const COPY_EVERY_TICKS: u32 = 12;

/// Bring the other locations' log segments level with the first's (where the archiver writes),
/// and record in the status a location that failed.
pub async fn copy_logs(name: &str, repo: &Repo, reached: &Reached, status: &Shared) {
    for (site, r) in crate::jobs::copy_logs(repo, reached).await {
        match r {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(database = %name, location = %site, "copied {n} log segment(s)");
                }
            }
            Err(e) => {
                tracing::warn!(database = %name, location = %site, "{e}");
                let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
                let l = s
                    .databases
                    .entry(name.to_owned())
                    .or_default()
                    .locations
                    .entry(site)
                    .or_default();
                l.ok = false;
                l.last_error = Some(e);
            }
        }
    }
}

fn update(status: &Shared, name: &str, f: impl FnOnce(&mut WalStatus)) {
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    let d = s.databases.entry(name.to_owned()).or_default();
    f(d.wal.get_or_insert_with(WalStatus::default));
}

/// Run archiving for `db` until `stop`. Returns at once for databases without a log to archive.
pub async fn run(
    name: String,
    db: DatabaseConfig,
    repo: Repo,
    status: Shared,
    stop: watch::Receiver<bool>,
) {
    let (Some(conn), mode) = (db.postgres.as_ref(), db.pitr.mode) else {
        return;
    };
    if mode == PitrMode::Off {
        return;
    }
    let Ok(pg) = conn.engine() else { return };
    update(&status, &name, |w| {
        w.mode = match mode {
            PitrMode::Streaming => "streaming",
            _ => "archive_command",
        }
        .into();
    });
    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let streamer = (mode == PitrMode::Streaming).then(|| {
        let (pg, repo, status, name, stop) = (
            pg.clone(),
            repo.primary().clone(),
            status.clone(),
            name.clone(),
            stop.clone(),
        );
        let o = StreamOptions {
            slot: db.pitr.slot.clone().unwrap_or_else(|| "tidemark".into()),
            ..Default::default()
        };
        tokio::spawn(async move {
            update(&status, &name, |w| w.up = true);
            let r = stream::supervise(&pg, &repo, &o, stop, &progress_tx, false, |e, retry_in| {
                tracing::error!(database = %name, error = %e, ?retry_in, "WAL streaming failed; restarting");
                update(&status, &name, |w| {
                    w.up = false;
                    w.restarts += 1;
                    w.last_error = Some(e.to_string());
                });
            })
            .await;
            update(&status, &name, |w| w.up = false);
            if let Err(e) = r {
                tracing::error!(database = %name, "WAL streaming stopped: {e}");
            }
        })
    });
    let mut stop = stop;
    let mut tick = tokio::time::interval(LAG_EVERY);
    let mut seen = Progress::default();
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            _ = crate::until_stopped(&mut stop) => break,
            _ = tick.tick() => {}
        }
        ticks = ticks.wrapping_add(1);
        if ticks % COPY_EVERY_TICKS == 1 {
            // At the first tick and every minute: the archive's gaps, then the other locations.
            match gaps(&pg, repo.primary()).await {
                Ok(g) => update(&status, &name, |w| w.gaps = g),
                Err(e) => {
                    tracing::warn!(database = %name, "failed to look for gaps in the WAL archive: {e}")
                }
            }
            if repo.several() {
                copy_logs(&name, &repo, &repo.reach_all().await, &status).await;
            }
        }
        let p = progress_rx.borrow().clone();
        if mode == PitrMode::Streaming && p.durable_lsn > seen.durable_lsn {
            // Storing again after a failure: the streamer is back.
            update(&status, &name, |w| w.up = true);
        }
        seen = p.clone();
        match measure(&pg, mode, &p).await {
            Ok((server, archived)) => update(&status, &name, |w| {
                w.server_lsn = Some(wal::lsn_string(server));
                w.archived_lsn = archived.map(wal::lsn_string);
                w.lag_bytes = archived.map(|a| server.saturating_sub(a));
                w.measured = Some(Utc::now());
                if mode == PitrMode::Streaming {
                    w.timeline = p.timeline;
                }
            }),
            Err(e) => {
                tracing::warn!(database = %name, "failed to measure the WAL archive lag: {e}");
                update(&status, &name, |w| w.lag_bytes = None);
            }
        }
    }
    if let Some(s) = streamer {
        let _ = s.await;
    }
}

/// The runs of segments missing from the archive between ones it holds, on every timeline.
async fn gaps(pg: &Postgres, repo: &tidemark_repo::Repository) -> Result<Vec<WalGap>, String> {
    let info = pg.server_info().await.map_err(|e| e.to_string())?;
    let mut c = pg.connect().await.map_err(|e| e.to_string())?;
    let rows = c
        .query("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")
        .await
        .map_err(|e| e.to_string());
    c.close().await;
    let seg_size: u64 = rows?
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|s| s.parse().ok())
        .unwrap_or(16 << 20);
    let system_id: u64 = info.system_id.parse().map_err(|_| "no system identifier")?;
    let summary = archive::summarize(repo, system_id, seg_size)
        .await
        .map_err(|e| e.to_string())?;
    Ok(summary
        .timelines
        .iter()
        .flat_map(|t| t.gaps.iter().zip(&t.gap_times))
        .map(|((first, last), (after, before))| WalGap {
            first_missing: first.clone(),
            last_missing: last.clone(),
            after: *after,
            before: *before,
        })
        .collect())
}

/// The server's current WAL position, and the end of what the archive holds: what the
/// streamer made durable, or the end of the last segment archive_command archived.
async fn measure(
    pg: &Postgres,
    mode: PitrMode,
    p: &Progress,
) -> Result<(u64, Option<u64>), String> {
    let mut c = pg.connect().await.map_err(|e| e.to_string())?;
    let rows = c
        .query(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END::text, \
             (SELECT last_archived_wal FROM pg_stat_archiver), \
             (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size')",
        )
        .await
        .map_err(|e| e.to_string())?;
    c.close().await;
    let row = rows.first().ok_or("no row")?;
    let get = |i: usize| row.get(i).cloned().flatten();
    let server = get(0)
        .as_deref()
        .and_then(wal::parse_lsn)
        .ok_or("the server reported no WAL position")?;
    let archived = match mode {
        PitrMode::Streaming => (p.durable_lsn > 0).then_some(p.durable_lsn),
        _ => {
            let seg_size: u64 = get(2).and_then(|s| s.parse().ok()).unwrap_or(16 << 20);
            get(1)
                .as_deref()
                .and_then(wal::SegmentName::parse)
                .map(|s| s.start_lsn(seg_size) + seg_size)
        }
    };
    Ok((server, archived))
}
