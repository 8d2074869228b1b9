//! What retention needs to know from the engines: which log segments each snapshot needs and
//! how a segment's name orders in its log. The planning itself is the repository's
//! (`tidemark_repo::ops::retention`); this module lists the facts it plans over.

use std::collections::BTreeSet;

use tidemark_repo::ops::retention::{
    self, LogNeeds, RetentionPlan, RetentionPolicy, SegmentFacts, SnapshotFacts,
};
use tidemark_repo::snapshot::Snapshot;
use tidemark_repo::Repository;

use crate::postgres::{physical, wal};
use crate::Result;

/// What a snapshot needs of a log, as its engine recorded it; `None` for snapshots that stand
/// alone (logical dumps, SQLite copies, files).
pub fn log_needs(s: &Snapshot) -> Option<LogNeeds> {
    match s.engine.as_str() {
        "postgres" => pg_needs(s),
        _ => None,
    }
}

/// Whether a snapshot may be the base of the protected chain: not when its engine found its
/// source damaged while reading it.
pub fn restorable(s: &Snapshot) -> bool {
    !s.positions.contains_key(physical::CHECKSUM_FAILURES)
}

/// The position key of a log segment's name in `stream`, or `None` for objects retention
/// always keeps (timeline history files, names it does not know).
pub fn segment_key(stream: &str, name: &str) -> Option<String> {
    if stream.starts_with("pg/") {
        return pg_key(name);
    }
    None
}

/// PostgreSQL: a segment's log and segment number (the name's last 16 hex digits) order it
/// across timelines, whatever the segment size; the timeline is ignored, which keeps every
/// timeline's copy of a needed position.
fn pg_key(name: &str) -> Option<String> {
    let seg = match wal::WalFile::parse(name) {
        Some(wal::WalFile::Segment(s) | wal::WalFile::Partial(s)) => s,
        Some(wal::WalFile::BackupLabel(s)) => s,
        Some(wal::WalFile::History(_)) => return None,
        None => wal::parse_piece(name)?.0,
    };
    Some(format!("{:08X}{:08X}", seg.log, seg.seg))
}

fn pg_needs(s: &Snapshot) -> Option<LogNeeds> {
    let text = |k: &str| s.positions.get(k).and_then(|v| v.as_str());
    let system_id: u64 = text("pg.system_id")?.parse().ok()?;
    Some(LogNeeds {
        stream: wal::stream(system_id),
        from: pg_key(text("pg.start_wal")?)?,
        to: pg_key(text("pg.stop_wal")?)?,
    })
}

/// List the facts retention plans over: every snapshot with its needs, and every segment of
/// the log streams some snapshot needs.
///
/// # Errors
/// Storage errors and damaged snapshot objects.
pub async fn facts(repo: &Repository) -> Result<(Vec<SnapshotFacts>, Vec<SegmentFacts>)> {
    let snapshots = repo.snapshots().await?;
    let facts: Vec<SnapshotFacts> = snapshots
        .into_iter()
        .map(|(id, snapshot)| SnapshotFacts {
            id,
            needs: log_needs(&snapshot),
            restorable: restorable(&snapshot),
            snapshot,
        })
        .collect();
    let streams: BTreeSet<String> = facts
        .iter()
        .filter_map(|f| f.needs.as_ref().map(|n| n.stream.clone()))
        .collect();
    let mut segments = Vec::new();
    for stream in streams {
        for name in tidemark_repo::log::list_segments(repo, &stream).await? {
            segments.push(SegmentFacts {
                key: segment_key(&stream, &name),
                stream: stream.clone(),
                name,
            });
        }
    }
    Ok((facts, segments))
}

/// Plan retention over what the repository holds now, and carry it out unless `dry_run`.
///
/// # Errors
/// Storage errors; see `tidemark_repo::ops::retention::apply` for what a failure leaves.
pub async fn forget(
    repo: &Repository,
    policy: &RetentionPolicy,
    dry_run: bool,
) -> Result<RetentionPlan> {
    let (facts, segments) = facts(repo).await?;
    let plan = retention::plan(&facts, &segments, policy);
    if !dry_run {
        retention::apply(repo, &plan).await?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_names_order_by_position_across_timelines_and_pieces() {
        let a = pg_key("000000010000000300000004").unwrap();
        let b = pg_key("000000020000000300000005.s00001000").unwrap();
        let c = pg_key("000000010000000400000000.partial").unwrap();
        assert!(a < b && b < c);
        assert_eq!(pg_key("00000002.history"), None);
        assert_eq!(pg_key("garbage"), None);
    }
}
