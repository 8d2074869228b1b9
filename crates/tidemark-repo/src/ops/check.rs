//! Check: every snapshot's chunks are indexed in existing packs; with `read_data`, every pack is
//! read and every blob verified, and the damaged snapshots are named.

use std::collections::{BTreeSet, HashMap, HashSet};

use futures::StreamExt;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::pack::{open_blob, read_header, PackEntry};
use crate::repository::Repository;

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
    /// Problems, one line each.
    pub errors: Vec<String>,
    /// Snapshots that cannot be restored whole.
    pub damaged_snapshots: Vec<SnapshotId>,
    /// Packs in no index (left by killed backups; prune removes them).
    pub unindexed_packs: usize,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Run the check.
///
/// # Errors
/// Only failures that stop the check itself (listing, loading the index); damage is reported in
/// the `CheckReport`.
pub async fn check(repo: &Repository, opts: &CheckOptions) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let index = repo.load_index().await?;
    let snapshots = repo.snapshots().await?;
    report.snapshots = snapshots.len();
    report.packs = index.packs().len();

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
    let mut bad_chunks: HashSet<ChunkId> = HashSet::new();
    let mut bad_packs: HashSet<PackId> = HashSet::new();
    for p in index.packs() {
        match stored.get(&p.id) {
            None if p.delete_marked.is_some() => {}
            None => {
                report.errors.push(format!(
                    "pack {} is in the index but missing from storage",
                    p.id
                ));
                bad_packs.insert(p.id);
                bad_chunks.extend(p.chunks.iter().map(|c| c.id));
            }
            Some(&size) if size != p.size => {
                report.errors.push(format!(
                    "pack {} has {size} bytes, the index says {}",
                    p.id, p.size
                ));
                bad_packs.insert(p.id);
                bad_chunks.extend(p.chunks.iter().map(|c| c.id));
            }
            Some(_) => {}
        }
    }
    report.unindexed_packs = stored.keys().filter(|id| !index.has_pack(id)).count();

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
        let results: Vec<(PackId, Vec<String>, Vec<ChunkId>)> = futures::stream::iter(packs)
            .map(|p| {
                let (repo, keys, dicts) = (repo.clone(), keys.clone(), dicts.clone());
                async move {
                    let path = p.id.path();
                    let data = match repo.storage().get(&path).await {
                        Ok(d) => d,
                        Err(e) => {
                            return (
                                p.id,
                                vec![format!("failed to read pack {}: {e}", p.id)],
                                p.chunks.iter().map(|c| c.id).collect(),
                            )
                        }
                    };
                    tokio::task::spawn_blocking(move || {
                        verify_pack(&keys, &dicts, &p.id, &path, &data, &p.chunks)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        (
                            p.id,
                            vec![format!("verifying pack failed: {e}")],
                            Vec::new(),
                        )
                    })
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        for (id, errors, chunks) in results {
            report.packs_read += 1;
            if !errors.is_empty() {
                bad_packs.insert(id);
            }
            report.errors.extend(errors);
            bad_chunks.extend(chunks);
        }
    }

    let mut damaged = BTreeSet::new();
    for (sid, snap) in &snapshots {
        for s in &snap.streams {
            for c in &s.chunks {
                match index.get(c) {
                    None => {
                        report.errors.push(format!(
                            "snapshot {} stream {:?}: chunk {} is in no index",
                            sid.short(),
                            s.name,
                            c.short()
                        ));
                        damaged.insert(*sid);
                    }
                    Some((p, _))
                        if bad_packs.contains(&p.id)
                            && (bad_chunks.contains(c) || !opts.read_data) =>
                    {
                        damaged.insert(*sid);
                    }
                    Some(_) if bad_chunks.contains(c) => {
                        damaged.insert(*sid);
                    }
                    Some(_) => {}
                }
            }
        }
    }
    for sid in &damaged {
        report.errors.push(format!(
            "snapshot {sid} is damaged and cannot be restored whole"
        ));
    }
    report.damaged_snapshots = damaged.into_iter().collect();
    Ok(report)
}

/// Verify one pack's bytes: name, header, and every blob. Returns the errors and bad chunks.
fn verify_pack(
    keys: &crate::crypto::Keys,
    dicts: &crate::dict::Dictionaries,
    id: &PackId,
    path: &str,
    data: &[u8],
    indexed: &[crate::index::IndexChunk],
) -> (PackId, Vec<String>, Vec<ChunkId>) {
    let mut errors = Vec::new();
    let mut bad = Vec::new();
    if PackId::of_bytes(data) != *id {
        errors.push(format!("pack {id}: content does not match its name"));
    }
    match read_header(keys, data, path) {
        Ok(header) => {
            let in_header: HashSet<ChunkId> = header.iter().map(|e| e.id).collect();
            for c in indexed {
                if !in_header.contains(&c.id) {
                    errors.push(format!(
                        "pack {id}: chunk {} is indexed but not in the pack header",
                        c.id.short()
                    ));
                    bad.push(c.id);
                }
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
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
            errors.push(format!("pack {id}: chunk {} is damaged: {e}", c.id.short()));
            bad.push(c.id);
        }
    }
    (*id, errors, bad)
}
