//! Repair: rebuild the index from the packs' own headers (format §6.1, §8.4).
//!
//! Every pack ends with a sealed header listing its blobs, so an index object is only a cache of
//! what the packs say. `repair index` indexes every pack no readable index object lists, then
//! removes the damaged index objects. With `read_headers` it also reads the header of every
//! indexed pack and rewrites the packs whose header is damaged or cut off, so that a later loss
//! of the index cannot lose their blobs.
//!
//! It runs under the exclusive lock: beside backups (shared locks), never beside prune, which
//! deletes packs no index lists.

use std::collections::HashSet;

use futures::StreamExt;

use crate::crypto::aad;
use crate::error::{Error, Result};
use crate::id::{ChunkId, IndexId, PackId};
use crate::index::{IndexFile, IndexPack, MasterIndex};
use crate::lock::LockGuard;
use crate::pack::{parse_header, PackEntry};
use crate::repository::{index_of, Repository};

use super::prune::copy_blobs;

/// Pack headers read at once.
const HEADER_READS: usize = 8;

/// Options for `repair index`.
#[derive(Debug, Clone, Default)]
pub struct RepairOptions {
    /// Also read every indexed pack's header and rewrite the packs whose header is damaged.
    pub read_headers: bool,
    /// Only report what would be done.
    pub dry_run: bool,
}

/// What `repair index` did (or would do).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RepairReport {
    /// Packs that no readable index object listed, now indexed from their headers.
    pub packs_indexed: usize,
    /// Chunks in those packs.
    pub chunks_indexed: usize,
    /// Damaged index objects removed (after the new index was written).
    pub indexes_removed: Vec<String>,
    /// Packs with a damaged header whose intact blobs were copied into a new pack.
    pub packs_rewritten: Vec<String>,
    /// Problems that repair cannot fix, one line each.
    pub unrepairable: Vec<String>,
}

/// Packs that no index lists, read from their headers.
#[derive(Debug, Default)]
pub struct Unindexed {
    /// Packs whose header reads whole.
    pub packs: Vec<IndexPack>,
    /// Packs whose header does not, with why.
    pub unreadable: Vec<(PackId, u64, Error)>,
}

/// Read one pack's header with two ranged reads from its end (the trailer, then the header).
///
/// # Errors
/// Storage errors; `Corrupt` naming the pack for a damaged or cut-off header.
pub async fn pack_header(repo: &Repository, id: &PackId, size: u64) -> Result<Vec<PackEntry>> {
    let path = id.path();
    let (start, sealed) = repo.sealed_tail(&path, size, 0, "pack").await?;
    let keys = repo.keys().clone();
    tokio::task::spawn_blocking(move || {
        let header = keys
            .open(aad::PACK_HEADER, &sealed)
            .map_err(|_| Error::corrupt(&path, "header authentication failed"))?;
        parse_header(&header, start as usize, &path)
    })
    .await
    .map_err(|e| Error::Invalid(format!("header task failed: {e}")))?
}

/// The packs in storage that `index` does not list, read from their headers.
///
/// # Errors
/// Listing errors; a pack that cannot be read is reported in `unreadable`.
pub async fn unindexed_packs(repo: &Repository, index: &MasterIndex) -> Result<Unindexed> {
    let stored = repo.list_objects("data").await?;
    let wanted: Vec<(PackId, u64)> = stored
        .into_iter()
        .filter_map(|m| {
            let id: PackId = m.path.rsplit('/').next()?.parse().ok()?;
            (!index.has_pack(&id)).then_some((id, m.size))
        })
        .collect();
    Ok(read_headers(repo, wanted).await)
}

/// The headers of `packs` (id and stored size), `HEADER_READS` at a time.
pub(crate) async fn read_headers(repo: &Repository, packs: Vec<(PackId, u64)>) -> Unindexed {
    let read: Vec<(PackId, u64, Result<Vec<PackEntry>>)> = futures::stream::iter(packs)
        .map(|(id, size)| async move { (id, size, pack_header(repo, &id, size).await) })
        .buffer_unordered(HEADER_READS)
        .collect()
        .await;
    let mut out = Unindexed::default();
    for (id, size, r) in read {
        match r {
            Ok(entries) => out.packs.push(IndexPack::new(id, size, &entries)),
            Err(e) => out.unreadable.push((id, size, e)),
        }
    }
    out.packs.sort_by_key(|p| p.id);
    out.unreadable.sort_by_key(|u| u.0);
    out
}

/// Rebuild the index from the packs' headers. Idempotent: a second run finds nothing to do.
///
/// # Errors
/// Storage errors, `LockLost`; damage is reported, not returned.
pub async fn repair_index(
    repo: &Repository,
    lock: &LockGuard,
    opts: &RepairOptions,
) -> Result<RepairReport> {
    lock.check()?;
    let mut report = RepairReport::default();
    let read = repo.read_index_files_lenient().await?;
    let damaged: Vec<IndexId> = read.damaged.iter().map(|(id, _)| *id).collect();
    let (readable, index) = index_of(read.files);

    let found = unindexed_packs(repo, &index).await?;
    for (id, _, e) in &found.unreadable {
        report.unrepairable.push(format!(
            "pack {id} is in no index and its header cannot be read ({e}); its blobs cannot be located"
        ));
    }
    report.packs_indexed = found.packs.len();
    report.chunks_indexed = found.packs.iter().map(|p| p.chunks.len()).sum();

    // Indexed packs whose own header is damaged: copy their intact blobs into a new pack.
    let mut damaged_headers = Vec::new();
    if opts.read_headers {
        let packs: Vec<PackId> = index
            .packs()
            .iter()
            .filter(|p| p.delete_marked.is_none())
            .map(|p| p.id)
            .collect();
        let results: Vec<(PackId, Result<Vec<PackEntry>>)> = futures::stream::iter(packs)
            .map(|id| async move {
                // The stored size, not the indexed one: a cut-off pack has a cut-off header.
                let size = match repo.storage().head(&id.path()).await {
                    Ok(m) => m.size,
                    Err(e) => return (id, Err(e.into())),
                };
                (id, pack_header(repo, &id, size).await)
            })
            .buffer_unordered(HEADER_READS)
            .collect()
            .await;
        for (id, r) in results {
            match r {
                Err(Error::Corrupt { .. }) => damaged_headers.push(id),
                Err(Error::Storage(e)) if e.kind == tidemark_storage::ErrorKind::NotFound => {
                    report.unrepairable.push(format!(
                        "pack {id} is in the index but missing from storage"
                    ));
                }
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        damaged_headers.sort();
    }

    report.indexes_removed = damaged.iter().map(|id| format!("index/{id}")).collect();
    if opts.dry_run {
        report.packs_rewritten = damaged_headers.iter().map(|id| id.to_string()).collect();
        return Ok(report);
    }

    // The packs as the readable objects list them, the recovered ones, and for each pack with a
    // damaged header a new pack of its intact blobs, the old one marked. A mark takes effect
    // only where no other object lists the pack unmarked, so when packs are rewritten the new
    // index supersedes every object read, as prune's merged index does (format §8.3).
    let rewrite = !damaged_headers.is_empty();
    let mut new_packs = found.packs;
    let mut kept: Vec<IndexPack> = Vec::new();
    if rewrite {
        let set: HashSet<PackId> = damaged_headers.iter().copied().collect();
        let mut old = Vec::new();
        for p in index.packs() {
            let record = IndexPack {
                id: p.id,
                size: p.size,
                delete_marked: p.delete_marked,
                chunks: p.chunks.clone(),
            };
            if set.contains(&p.id) {
                old.push(record);
            } else {
                kept.push(record);
            }
        }
        let all: HashSet<ChunkId> = old
            .iter()
            .flat_map(|p| p.chunks.iter().map(|c| c.id))
            .collect();
        let copied = copy_blobs(repo, lock, old, &all, true, chrono::Utc::now()).await?;
        report.packs_rewritten = damaged_headers.iter().map(|id| id.to_string()).collect();
        report.unrepairable.extend(copied.lost);
        new_packs.extend(copied.packs);
    }

    lock.check()?;
    if !new_packs.is_empty() {
        new_packs.extend(kept);
        new_packs.sort_by_key(|p| p.id);
        repo.save_index(&IndexFile {
            version: 1,
            supersedes: if rewrite {
                readable.clone()
            } else {
                Vec::new()
            },
            packs: new_packs,
        })
        .await?;
    }
    // Only now that every readable pack is indexed: the damaged objects hold nothing more, and
    // the superseded ones are in the new object.
    let superseded = if rewrite { readable } else { Vec::new() };
    for id in damaged.iter().chain(&superseded) {
        lock.check()?;
        repo.storage().delete(&format!("index/{id}")).await?;
    }
    Ok(report)
}
