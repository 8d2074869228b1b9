//! Index objects (format §6.1) and the in-memory index built from all of them.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::id::{ChunkId, IndexId, PackId};
use crate::pack::PackEntry;

/// One chunk in an index object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexChunk {
    /// The chunk.
    pub id: ChunkId,
    /// Blob offset in the pack.
    pub offset: u32,
    /// Blob length.
    pub length: u32,
    /// Chunk length.
    pub raw_length: u32,
    /// Compression of the blob.
    pub compression: u8,
}

/// One pack in an index object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPack {
    /// The pack.
    pub id: PackId,
    /// Its size in bytes.
    pub size: u64,
    /// When prune found it unused, if it did.
    pub delete_marked: Option<DateTime<Utc>>,
    /// Its chunks.
    pub chunks: Vec<IndexChunk>,
}

/// An index object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    /// Format version (1).
    pub version: u32,
    /// Index objects whose content this one contains.
    pub supersedes: Vec<IndexId>,
    /// The packs.
    pub packs: Vec<IndexPack>,
}

impl From<&IndexChunk> for PackEntry {
    fn from(c: &IndexChunk) -> Self {
        PackEntry {
            id: c.id,
            offset: c.offset,
            length: c.length,
            raw_length: c.raw_length,
            compression: c.compression,
        }
    }
}

impl IndexPack {
    /// An index entry for a pack just written.
    pub fn new(id: PackId, size: u64, entries: &[PackEntry]) -> Self {
        IndexPack {
            id,
            size,
            delete_marked: None,
            chunks: entries
                .iter()
                .map(|e| IndexChunk {
                    id: e.id,
                    offset: e.offset,
                    length: e.length,
                    raw_length: e.raw_length,
                    compression: e.compression,
                })
                .collect(),
        }
    }
}

/// A pack known to the in-memory index.
#[derive(Debug, Clone)]
pub struct PackInfo {
    /// The pack.
    pub id: PackId,
    /// Its size.
    pub size: u64,
    /// Its deletion mark.
    pub delete_marked: Option<DateTime<Utc>>,
    /// Its chunks.
    pub chunks: Vec<IndexChunk>,
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    pack: u32,
    entry: u32,
}

/// Every chunk's location, from all index objects that are not superseded.
#[derive(Debug, Default, Clone)]
pub struct MasterIndex {
    packs: Vec<PackInfo>,
    pack_pos: HashMap<PackId, u32>,
    chunks: HashMap<ChunkId, Loc>,
}

impl MasterIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a pack. A pack seen twice keeps the first record, except that an unmarked record
    /// replaces a marked one (a backup may have re-indexed it).
    pub fn add_pack(&mut self, p: IndexPack) {
        if let Some(&pos) = self.pack_pos.get(&p.id) {
            if p.delete_marked.is_none() {
                self.packs[pos as usize].delete_marked = None;
            }
            return;
        }
        let pos = self.packs.len() as u32;
        for (i, c) in p.chunks.iter().enumerate() {
            let loc = Loc {
                pack: pos,
                entry: i as u32,
            };
            match self.chunks.get(&c.id) {
                // Prefer a copy in an unmarked pack.
                Some(old)
                    if self.packs[old.pack as usize].delete_marked.is_none()
                        || p.delete_marked.is_some() => {}
                _ => {
                    self.chunks.insert(c.id, loc);
                }
            }
        }
        self.pack_pos.insert(p.id, pos);
        self.packs.push(PackInfo {
            id: p.id,
            size: p.size,
            delete_marked: p.delete_marked,
            chunks: p.chunks,
        });
    }

    /// Where a chunk is: its pack and entry.
    pub fn get(&self, id: &ChunkId) -> Option<(&PackInfo, &IndexChunk)> {
        let loc = self.chunks.get(id)?;
        let p = &self.packs[loc.pack as usize];
        Some((p, &p.chunks[loc.entry as usize]))
    }

    /// Whether a backup may reuse this chunk instead of storing it: it is indexed in a pack that
    /// is not marked for deletion (format §6.1).
    pub fn has_for_dedup(&self, id: &ChunkId) -> bool {
        self.get(id).is_some_and(|(p, _)| p.delete_marked.is_none())
    }

    /// Whether a pack is known.
    pub fn has_pack(&self, id: &PackId) -> bool {
        self.pack_pos.contains_key(id)
    }

    /// All packs.
    pub fn packs(&self) -> &[PackInfo] {
        &self.packs
    }

    /// Number of distinct chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}
