//! Check: every snapshot's chunks are indexed in existing packs; with `read_data`, every pack is
//! read and every blob verified, and the damaged snapshots are named.

use std::collections::{BTreeSet, HashMap, HashSet};

use futures::StreamExt;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::pack::{open_blob, read_header, PackEntry};
use crate::repository::{index_of, Repository};

/// Options for `check`.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Read every pack and verify every blob.
    pub read_data: bool,
}

/// What `check` found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CheckReport {
    /// Snapshots checked.
    pub snapshots: usize,
    /// Packs in the index.
    pub packs: usize,
    /// Packs read and verified (with `read_data`).
    pub packs_read: usize,
    /// Damage that loses data, or may (one line each).
    pub errors: Vec<String>,
    /// Damage that loses nothing and that `tidemark repair index` fixes (one line each).
    pub repairable: Vec<String>,
    /// Snapshots that cannot be restored whole: a chunk they need is found nowhere intact.
    pub damaged_snapshots: Vec<SnapshotId>,
    /// Snapshots that may be damaged: a pack they need has the wrong size (`--read-data` says
    /// whether the chunks they need are intact).
    pub unverified_snapshots: Vec<SnapshotId>,
    /// Packs in no index that no snapshot needs (left by killed backups; prune removes them).
    pub unindexed_packs: usize,
    /// Packs in no index that hold chunks snapshots need (`repair index` indexes them; prune
    /// keeps them).
    pub unindexed_needed_packs: usize,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty() && self.repairable.is_empty()
    }
}

/// Run the check.
///
/// # Errors
/// Only failures that stop the check itself (listing, reading); damage is reported in the
/// `CheckReport`.
pub async fn check(repo: &Repository, opts: &CheckOptions) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let read = repo.read_index_files_lenient().await?;
    for (id, e) in &read.damaged {
        report.repairable.push(format!(
            "index object {id} is damaged ({e}); `tidemark repair index` rebuilds it from the packs' headers"
        ));
    }
    let (_, index) = index_of(read.files);
    let snapshots = repo.snapshots().await?;
    report.snapshots = snapshots.len();
    report.packs = index.packs().len();
    let needed: HashSet<ChunkId> = snapshots
        .iter()
        .flat_map(|(_, s)| s.streams.iter().flat_map(|st| st.chunks.iter().copied()))
        .collect();

    let stored: HashMap<PackId, u64> = repo
        .list_objects("data")
        .await?
        .into_iter()
        .filter_map(|m| {
            m.path
                .rsplit('/')
                .next()
                .and_then(|n| n.parse().ok())
                .map(|id| (id, m.size))
        })
        .collect();
    // Chunks whose indexed copy is lost, and chunks whose pack has the wrong size (unknown
    // until the pack is read).
    let mut bad_chunks: HashSet<ChunkId> = HashSet::new();
    let mut unsure: HashSet<ChunkId> = HashSet::new();
    for p in index.packs() {
        match stored.get(&p.id) {
            None if p.delete_marked.is_some() => {}
            None => {
                report.errors.push(format!(
                    "pack {} is in the index but missing from storage",
                    p.id
                ));
                bad_chunks.extend(p.chunks.iter().map(|c| c.id));
            }
            Some(&size) if size != p.size && !opts.read_data => {
                report.errors.push(format!(
                    "pack {} has {size} bytes, the index says {}; `tidemark check --read-data` finds which chunks are intact",
                    p.id, p.size
                ));
                unsure.extend(p.chunks.iter().map(|c| c.id));
            }
            Some(_) => {}
        }
    }

    // Packs no index lists: their headers say whether snapshots need them.
    let found = super::repair::unindexed_packs(repo, &index).await?;
    let mut recovered: HashSet<ChunkId> = HashSet::new();
    for p in &found.packs {
        let holds_needed = p
            .chunks
            .iter()
            .any(|c| needed.contains(&c.id) && index.get(&c.id).is_none());
        if holds_needed {
            report.unindexed_needed_packs += 1;
            report.repairable.push(format!(
                "pack {} holds chunks that snapshots need, but no index lists it; `tidemark repair index` indexes it (do not delete it)",
                p.id
            ));
            recovered.extend(p.chunks.iter().map(|c| c.id));
        } else {
            report.unindexed_packs += 1;
        }
    }
    for (id, _, e) in &found.unreadable {
        report.errors.push(format!(
            "pack {id} is in no index and its header cannot be read ({e}); what it holds is unknown"
        ));
    }

    // Every dictionary object is read and checked (name, envelope, header) in any case.
    let dicts = match repo.dictionaries().await {
        Ok(d) => d,
        Err(e) => {
            report.errors.push(e.to_string());
            Arc::default()
        }
    };
    if opts.read_data {
        let keys = repo.keys().clone();
        let packs: Vec<_> = index
            .packs()
            .iter()
            .filter(|p| stored.contains_key(&p.id))
            .cloned()
            .collect();
        let results: Vec<Verified> = futures::stream::iter(packs)
            .map(|p| {
                let (repo, keys, dicts) = (repo.clone(), keys.clone(), dicts.clone());
                async move {
                    let path = p.id.path();
                    let data = match repo.storage().get(&path).await {
                        Ok(d) => d,
                        Err(e) => {
                            return Verified {
                                errors: vec![format!("failed to read pack {}: {e}", p.id)],
                                bad: p.chunks.iter().map(|c| c.id).collect(),
                                ..Verified::default()
                            }
                        }
                    };
                    tokio::task::spawn_blocking(move || {
                        verify_pack(&keys, &dicts, &p.id, &path, &data, &p.chunks)
                    })
                    .await
                    .unwrap_or_else(|e| Verified {
                        errors: vec![format!("verifying pack failed: {e}")],
                        ..Verified::default()
                    })
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        for v in results {
            report.packs_read += 1;
            report.errors.extend(v.errors);
            report.repairable.extend(v.repairable);
            bad_chunks.extend(v.bad);
        }
    }

    let mut damaged = BTreeSet::new();
    let mut unverified = BTreeSet::new();
    for (sid, snap) in &snapshots {
        for s in &snap.streams {
            for c in &s.chunks {
                let lost = match index.get(c) {
                    None => !recovered.contains(c),
                    Some(_) => bad_chunks.contains(c),
                };
                if lost {
                    if index.get(c).is_none() {
                        report.errors.push(format!(
                            "snapshot {} stream {:?}: chunk {} is in no index and in no pack header",
                            sid.short(),
                            s.name,
                            c.short()
                        ));
                    }
                    damaged.insert(*sid);
                } else if unsure.contains(c) {
                    unverified.insert(*sid);
                }
            }
        }
    }
    for sid in &damaged {
        report.errors.push(format!(
            "snapshot {sid} is damaged and cannot be restored whole"
        ));
    }
    unverified.retain(|s| !damaged.contains(s));
    report.damaged_snapshots = damaged.into_iter().collect();
    report.unverified_snapshots = unverified.into_iter().collect();
    Ok(report)
}

/// What reading one pack found.
#[derive(Debug, Default)]
struct Verified {
    /// Lost data.
    errors: Vec<String>,
    /// Damage that loses nothing (the header).
    repairable: Vec<String>,
    /// Chunks whose blob is damaged or missing.
    bad: Vec<ChunkId>,
}

/// Verify one pack's bytes: every indexed blob, then the header. A damaged or cut-off header
/// loses nothing while the index lists the blobs, so it is repairable, not an error.
fn verify_pack(
    keys: &crate::crypto::Keys,
    dicts: &crate::dict::Dictionaries,
    id: &PackId,
    path: &str,
    data: &[u8],
    indexed: &[crate::index::IndexChunk],
) -> Verified {
    let mut v = Verified::default();
    for c in indexed {
        let e = PackEntry::from(c);
        let end = c.offset as usize + c.length as usize;
        let opened = if end <= data.len() {
            open_blob(keys, dicts, &e, &data[c.offset as usize..end], path).map(|_| ())
        } else {
            Err(Error::corrupt(
                path,
                "the blob lies beyond the end of the pack",
            ))
        };
        if let Err(e) = opened {
            v.errors
                .push(format!("pack {id}: chunk {} is damaged: {e}", c.id.short()));
            v.bad.push(c.id);
        }
    }
    match read_header(keys, data, path) {
        Ok(header) => {
            let in_header: HashSet<ChunkId> = header.iter().map(|e| e.id).collect();
            let absent = indexed.iter().filter(|c| !in_header.contains(&c.id)).count();
            if absent > 0 {
                v.repairable.push(format!(
                    "pack {id}: {absent} indexed chunks are not in its header; `tidemark repair index --read-headers` rewrites it"
                ));
            }
        }
        Err(e) => v.repairable.push(format!(
            "pack {id}: {e}; its blobs are listed by the index, so nothing is lost; `tidemark repair index --read-headers` rewrites it"
        )),
    }
    if v.errors.is_empty() && v.repairable.is_empty() && PackId::of_bytes(data) != *id {
        v.errors
            .push(format!("pack {id}: content does not match its name"));
    }
    v
}
