//! Copy: fill a location of a repository from another location of the same repository (format
//! §9a). A snapshot is copied with what it needs that the target lacks, in the write order of
//! §8.2 (dictionaries and packs, then an index, then the snapshot), so an interrupted copy
//! leaves nothing half-visible. Log segments are copied by name. Every object is verified
//! before it is written: a damaged object at the source fails the copy instead of spreading.

use std::collections::{BTreeMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tidemark_storage::ErrorKind;

use crate::error::{Error, Result};
use crate::id::{PackId, SnapshotId};
use crate::index::{IndexFile, IndexPack};
use crate::lock::LockGuard;
use crate::log;
use crate::repository::{copy_object, Repository};

/// Objects copied at once.
const CONCURRENCY: usize = 4;

/// What a copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    /// Snapshots copied.
    pub snapshots: Vec<String>,
    /// Snapshots the target had already.
    pub already_present: Vec<String>,
    /// Packs copied.
    pub packs: u64,
    /// Dictionary objects copied.
    pub dictionaries: u64,
    /// Log segments copied.
    pub segments: u64,
    /// Bytes written to the target.
    pub bytes: u64,
}

fn same(from: &Repository, to: &Repository) -> Result<()> {
    if from.same_repository(to) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{:?} and {:?} hold different repositories: copy works between locations of one repository (add one with `tidemark init --copy-from`)",
            from.location(),
            to.location()
        )))
    }
}

/// Copy snapshots from `from` to `to`, with the packs and dictionaries they need that `to`
/// does not have. `to_lock` is a shared lock at `to`, held throughout.
///
/// # Errors
/// `Invalid` for different repositories, `Corrupt` for a damaged source object,
/// `MissingChunk` when the source lacks a chunk, storage errors, `LockLost`.
pub async fn copy_snapshots(
    from: &Repository,
    to: &Repository,
    to_lock: &LockGuard,
    ids: &[SnapshotId],
) -> Result<CopyReport> {
    same(from, to)?;
    to_lock.check()?;
    let mut report = CopyReport::default();
    let mut wanted = Vec::new();
    for id in ids {
        match to.storage().head(&format!("snapshots/{id}")).await {
            Ok(_) => report.already_present.push(id.to_string()),
            Err(e) if e.kind == ErrorKind::NotFound => wanted.push(*id),
            Err(e) => return Err(e.into()),
        }
    }
    if wanted.is_empty() {
        return Ok(report);
    }
    let (source, target) = futures::try_join!(from.load_index(), to.load_index())?;
    // The packs holding chunks the target cannot use yet, with their index records.
    let mut packs: BTreeMap<PackId, IndexPack> = BTreeMap::new();
    for id in &wanted {
        // Loading verifies the snapshot object.
        let snap = from.load_snapshot(*id).await?;
        for stream in &snap.streams {
            for chunk in &stream.chunks {
                if target.has_for_dedup(chunk) {
                    continue;
                }
                let Some((pack, _)) = source.get(chunk) else {
                    return Err(Error::MissingChunk {
                        chunk: chunk.to_string(),
                        stream: format!("{} of snapshot {id} at {}", stream.name, from.location()),
                    });
                };
                packs.entry(pack.id).or_insert_with(|| IndexPack {
                    id: pack.id,
                    size: pack.size,
                    delete_marked: None,
                    chunks: pack.chunks.clone(),
                });
            }
        }
    }
    report.dictionaries = copy_missing(from, to, "dicts", &mut report.bytes).await?;
    let copied: Vec<u64> = futures::stream::iter(packs.keys())
        .map(|p| async move { copy_object(&**from.storage(), &**to.storage(), &p.path()).await })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    report.packs = packs.len() as u64;
    report.bytes += copied.iter().sum::<u64>();
    to_lock.check()?;
    if !packs.is_empty() {
        to.save_index(&IndexFile {
            version: 1,
            supersedes: Vec::new(),
            packs: packs.into_values().collect(),
        })
        .await?;
    }
    to_lock.check()?;
    for id in wanted {
        report.bytes += copy_object(
            &**from.storage(),
            &**to.storage(),
            &format!("snapshots/{id}"),
        )
        .await?;
        report.snapshots.push(id.to_string());
    }
    Ok(report)
}

/// Copy the content-named objects under `dir/` that `to` lacks; returns how many.
async fn copy_missing(
    from: &Repository,
    to: &Repository,
    dir: &str,
    bytes: &mut u64,
) -> Result<u64> {
    let have: HashSet<String> = to
        .list_objects(dir)
        .await?
        .into_iter()
        .map(|m| m.path)
        .collect();
    let mut n = 0;
    for m in from.list_objects(dir).await? {
        if !have.contains(&m.path) {
            *bytes += copy_object(&**from.storage(), &**to.storage(), &m.path).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// Copy every log segment `to` lacks, stream by stream, that `wanted(stream, name)` accepts
/// (an engine leaves out pieces it will replace). Each segment is read whole and verified at
/// `from`, then written at `to` (sealed afresh; the same content).
///
/// # Errors
/// `Corrupt` for a damaged source segment (naming it), storage errors.
pub async fn copy_segments(
    from: &Repository,
    to: &Repository,
    wanted: impl Fn(&str, &str) -> bool,
) -> Result<CopyReport> {
    same(from, to)?;
    let mut report = CopyReport::default();
    let names = |r: &Repository| {
        let r = r.clone();
        async move {
            let listed = r.storage().list("logs/").await?;
            Ok::<_, Error>(
                listed
                    .into_iter()
                    .filter_map(|m| m.path.strip_prefix("logs/").map(str::to_owned))
                    .collect::<Vec<String>>(),
            )
        }
    };
    let (source, target) = futures::try_join!(names(from), names(to))?;
    let target: HashSet<String> = target.into_iter().collect();
    let missing: Vec<(String, String)> = source
        .into_iter()
        .filter(|p| !target.contains(p))
        .filter_map(|p| {
            p.rsplit_once('/')
                .map(|(s, n)| (s.to_owned(), n.to_owned()))
        })
        .filter(|(s, n)| wanted(s, n))
        .collect();
    let sizes: Vec<u64> = futures::stream::iter(missing)
        .map(|(stream, name)| async move {
            let (info, data) = log::read_segment_whole(from, &stream, &name).await?;
            let n = data.len() as u64;
            log::write_segment(to, &stream, &name, data, info.meta).await?;
            Ok::<_, Error>(n)
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    report.segments = sizes.len() as u64;
    report.bytes = sizes.iter().sum();
    Ok(report)
}
