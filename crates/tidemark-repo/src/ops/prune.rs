//! Prune: the only deleter of packs and index objects, in two phases with a grace period
//! (format §8.3). Safe beside running backups; killed at any step it leaves a readable repository.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::id::{ChunkId, IndexId, PackId};
use crate::index::{IndexFile, IndexPack};
use crate::lock::{live_locks, LockGuard};
use crate::pack::{open_blob, Blob, PackBuilder, PackEntry};
use crate::repository::Repository;

/// Options for prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Time a pack stays marked before it may be deleted (default 1 h).
    pub grace: Duration,
    /// Clock skew allowed for locks (default 30 s).
    pub skew: Duration,
    /// Only report what would happen.
    pub dry_run: bool,
    /// Repack a partly used pack when more than this fraction of its bytes is unused
    /// (default 0.25; above 1.0 never repacks).
    pub repack_unused: f64,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace: Duration::from_secs(3600),
            skew: Duration::from_secs(30),
            dry_run: false,
            repack_unused: 0.25,
        }
    }
}

/// What prune did (or would do).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PruneReport {
    /// Packs kept in use.
    pub packs_in_use: usize,
    /// Packs newly marked unused.
    pub packs_marked: usize,
    /// Marked packs that a snapshot needs again and were unmarked.
    pub packs_unmarked: usize,
    /// Marked packs waiting for their grace period or for older locks.
    pub packs_waiting: usize,
    /// Packs deleted.
    pub packs_deleted: usize,
    /// Bytes deleted.
    pub bytes_deleted: u64,
    /// Partly used packs whose used chunks were copied into new packs (the old ones are marked).
    pub packs_repacked: usize,
    /// Index objects replaced by the merged index.
    pub indexes_replaced: usize,
    /// Temporary files of interrupted uploads (older than the grace period) removed.
    pub temporaries_removed: u64,
    /// Packs no index listed that hold chunks snapshots need, indexed again from their headers.
    pub packs_reindexed: usize,
    /// Packs no index lists whose header is damaged, kept because snapshots need chunks found
    /// nowhere else.
    pub packs_kept_unreadable: usize,
}

/// Run prune. Takes the exclusive lock's guard so it cannot run unlocked.
///
/// # Errors
/// Storage errors, `LockLost`, `Invalid` for a shared lock.
pub async fn prune(
    repo: &Repository,
    lock: &LockGuard,
    opts: &PruneOptions,
) -> Result<PruneReport> {
    lock.check()?;
    let now = Utc::now();
    let mut report = PruneReport::default();
    let files = repo.read_index_files().await?;
    let snapshots = repo.snapshots().await?;
    let used: HashSet<ChunkId> = snapshots
        .iter()
        .flat_map(|(_, s)| s.streams.iter().flat_map(|st| st.chunks.iter().copied()))
        .collect();

    // Deletion barrier: older than the grace period and than every other live lock (§8.3).
    let grace = chrono::Duration::from_std(opts.grace).unwrap_or_default();
    let skew = chrono::Duration::from_std(opts.skew).unwrap_or_default();
    let mut barrier = now - grace;
    for (_, rec) in live_locks(repo, opts.skew, false).await? {
        let ours = rec.pid == std::process::id() && rec.created == lock.created();
        if !ours && rec.created - skew < barrier {
            barrier = rec.created - skew;
        }
    }

    let superseded: HashSet<IndexId> = files
        .iter()
        .flat_map(|(_, _, f)| f.supersedes.iter().copied())
        .collect();
    let mut packs: HashMap<PackId, IndexPack> = HashMap::new();
    for (id, meta, f) in &files {
        if superseded.contains(id) {
            continue;
        }
        for p in &f.packs {
            let mut p = p.clone();
            // A mark takes effect only once the index carrying it is visible (§8.3).
            p.delete_marked = p.delete_marked.map(|m| m.max(meta.modified));
            match packs.get_mut(&p.id) {
                Some(existing) => {
                    if p.delete_marked.is_none() {
                        existing.delete_marked = None;
                    }
                }
                None => {
                    packs.insert(p.id, p);
                }
            }
        }
    }

    let mut to_delete: Vec<(PackId, u64)> = Vec::new();
    let mut kept: Vec<IndexPack> = Vec::new();
    let mut repack: Vec<IndexPack> = Vec::new();
    // Chunks with a copy in a pack that is not marked: a marked pack holding only such chunks
    // is not needed again (a repack or a concurrent backup stored them elsewhere).
    let live_copies: HashSet<ChunkId> = packs
        .values()
        .filter(|p| p.delete_marked.is_none())
        .flat_map(|p| p.chunks.iter().map(|c| c.id))
        .collect();
    for (_, mut p) in packs {
        let needed = |c: &&crate::index::IndexChunk| {
            used.contains(&c.id) && (p.delete_marked.is_none() || !live_copies.contains(&c.id))
        };
        let in_use = p.chunks.iter().any(|c| needed(&c));
        let unused: u64 = p
            .chunks
            .iter()
            .filter(|c| !needed(c))
            .map(|c| c.length as u64)
            .sum();
        if in_use && p.size > 0 && unused as f64 / p.size as f64 > opts.repack_unused {
            repack.push(p);
            continue;
        }
        match (in_use, p.delete_marked) {
            (true, Some(_)) => {
                p.delete_marked = None;
                report.packs_unmarked += 1;
                kept.push(p);
            }
            (true, None) => {
                report.packs_in_use += 1;
                kept.push(p);
            }
            (false, Some(m)) if m < barrier => to_delete.push((p.id, p.size)),
            (false, Some(_)) => {
                report.packs_waiting += 1;
                kept.push(p);
            }
            (false, None) => {
                p.delete_marked = Some(now);
                report.packs_marked += 1;
                kept.push(p);
            }
        }
    }

    // Packs in no index: leftovers of killed backups, or of a backup still running.
    let indexed: HashSet<PackId> = kept
        .iter()
        .chain(repack.iter())
        .map(|p| p.id)
        .chain(to_delete.iter().map(|(id, _)| *id))
        .collect();
    // Their headers say what they hold. One that holds a chunk a snapshot needs and that no
    // index lists is indexed again, never deleted (its index object was lost); one whose header
    // cannot be read is deleted only when every chunk the snapshots need is found elsewhere.
    let mut listed: HashSet<ChunkId> = kept
        .iter()
        .chain(repack.iter())
        .flat_map(|p| p.chunks.iter().map(|c| c.id))
        .collect();
    let mut unindexed = Vec::new();
    for m in repo.list_objects("data").await? {
        let Some(id) = m
            .path
            .rsplit('/')
            .next()
            .and_then(|n| n.parse::<PackId>().ok())
        else {
            continue;
        };
        if !indexed.contains(&id) && m.modified < barrier {
            unindexed.push((id, m.size));
        }
    }
    let headers = super::repair::read_headers(repo, unindexed).await;
    for p in headers.packs {
        if p.chunks
            .iter()
            .any(|c| used.contains(&c.id) && !listed.contains(&c.id))
        {
            tracing::warn!(pack = %p.id, "a pack no index lists holds chunks that snapshots need; indexing it again (run `tidemark check`)");
            listed.extend(p.chunks.iter().map(|c| c.id));
            report.packs_reindexed += 1;
            kept.push(p);
        } else {
            to_delete.push((p.id, p.size));
        }
    }
    let mut unreadable = Vec::new();
    for (id, size, e) in headers.unreadable {
        match e {
            Error::Corrupt { .. } => unreadable.push((id, size)),
            e => return Err(e),
        }
    }
    if !unreadable.is_empty() {
        if used.iter().all(|c| listed.contains(c)) {
            to_delete.extend(unreadable);
        } else {
            tracing::warn!(packs = unreadable.len(), "keeping packs no index lists whose headers are damaged: snapshots need chunks that are found nowhere else (run `tidemark check --read-data`)");
            report.packs_kept_unreadable = unreadable.len();
        }
    }

    report.packs_repacked = repack.len();
    report.packs_deleted = to_delete.len();
    report.bytes_deleted = to_delete.iter().map(|(_, s)| *s).sum();
    report.indexes_replaced = files.len();
    if opts.dry_run {
        return Ok(report);
    }
    lock.check()?;

    // 0. Copy the used chunks of partly used packs into new packs; mark the old packs.
    if !repack.is_empty() {
        kept.extend(
            copy_blobs(repo, lock, repack, &used, false, now)
                .await?
                .packs,
        );
    }

    // 1. The merged index, superseding everything read.
    let changed =
        report.packs_marked + report.packs_unmarked + report.packs_deleted + report.packs_reindexed
            > 0
            || files.len() > 1;
    if changed {
        kept.sort_by_key(|p| p.id);
        let merged = IndexFile {
            version: 1,
            supersedes: files.iter().map(|(id, _, _)| *id).collect(),
            packs: kept,
        };
        let merged_id = repo.save_index(&merged).await?;
        lock.check()?;
        // 2. The superseded index objects.
        for (id, _, _) in &files {
            if *id != merged_id {
                repo.storage().delete(&format!("index/{id}")).await?;
            }
        }
    } else {
        report.indexes_replaced = 0;
    }
    // 3. The packs, last.
    for (id, _) in &to_delete {
        lock.check()?;
        repo.storage()
            .delete(&id.path())
            .await
            .map_err(Error::from)?;
    }
    // 4. Leftovers of uploads that were killed (WAL archivers take no lock, so only files
    // older than the grace period, which no live upload has).
    report.temporaries_removed = repo.storage().sweep(opts.grace).await?;
    Ok(report)
}

/// What `copy_blobs` wrote.
pub(crate) struct Copied {
    /// The new packs, and the old ones marked for deletion (or kept unmarked, see below).
    pub packs: Vec<IndexPack>,
    /// Blobs that could not be copied, one line each (only with `partial`).
    pub lost: Vec<String>,
}

/// Copy the wanted blobs of `packs` as they are (sealed blobs do not depend on their pack),
/// after verifying each one, into new packs; return the new packs and the old ones marked.
///
/// Without `partial` (prune), a pack with a damaged wanted blob is kept unmarked and nothing of
/// it is copied, so repacking never loses the readable copy. With `partial` (repair of a damaged
/// header), the intact blobs are copied, the damaged ones are reported, and the old pack is
/// marked: what it still has that could be read is in the new pack.
pub(crate) async fn copy_blobs(
    repo: &Repository,
    lock: &LockGuard,
    packs: Vec<IndexPack>,
    wanted: &HashSet<ChunkId>,
    partial: bool,
    now: DateTime<Utc>,
) -> Result<Copied> {
    let mut out = Copied {
        packs: Vec::new(),
        lost: Vec::new(),
    };
    let mut copied: HashSet<ChunkId> = HashSet::new();
    let mut builder = PackBuilder::new();
    let min = repo.config().pack_size.min as usize;
    let dicts = repo.dictionaries().await?;
    for mut p in packs {
        lock.check()?;
        let path = p.id.path();
        let data = repo.storage().get(&path).await?;
        let keys = repo.keys().clone();
        let dicts = dicts.clone();
        let chosen: Vec<_> = p
            .chunks
            .iter()
            .filter(|c| wanted.contains(&c.id) && !copied.contains(&c.id))
            .cloned()
            .collect();
        let path2 = path.clone();
        let opened = tokio::task::spawn_blocking(move || -> Vec<Result<Blob>> {
            chosen
                .iter()
                .map(|c| {
                    let e = PackEntry::from(c);
                    let range = c.offset as usize..c.offset as usize + c.length as usize;
                    let blob = data.get(range).ok_or_else(|| {
                        Error::corrupt(
                            format!("{path2} chunk {}", c.id.short()),
                            "the blob lies beyond the end of the pack",
                        )
                    })?;
                    open_blob(&keys, &dicts, &e, blob, &path2)?;
                    Ok(Blob {
                        id: c.id,
                        data: blob.to_vec(),
                        raw_length: c.raw_length,
                        compression: c.compression,
                    })
                })
                .collect()
        })
        .await
        .map_err(|e| Error::Invalid(format!("repack task failed: {e}")))?;
        let (blobs, failed): (Vec<_>, Vec<_>) = opened.into_iter().partition(|b| b.is_ok());
        if !failed.is_empty() && !partial {
            let e = failed
                .into_iter()
                .find_map(|b| b.err())
                .expect("one failed");
            tracing::error!(pack = %p.id, error = %e, "not repacking a damaged pack; run `tidemark check --read-data`");
            p.delete_marked = None;
            out.packs.push(p);
            continue;
        }
        out.lost.extend(
            failed
                .into_iter()
                .filter_map(|b| b.err())
                .map(|e| e.to_string()),
        );
        for b in blobs.into_iter().flatten() {
            copied.insert(b.id);
            builder.add(&b);
            if builder.len() >= min {
                out.packs
                    .push(repo.save_pack(std::mem::take(&mut builder)).await?);
            }
        }
        p.delete_marked = Some(now);
        out.packs.push(p);
    }
    if !builder.is_empty() {
        out.packs.push(repo.save_pack(builder).await?);
    }
    Ok(out)
}
