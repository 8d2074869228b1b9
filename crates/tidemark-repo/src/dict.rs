//! zstd dictionaries for blocks (format §5.1): trained once per repository from a backup's own
//! blocks, stored under `dicts/`, and named by the id in every frame compressed with one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::crypto::aad;
use crate::error::{Error, Result};
use crate::repository::Repository;

/// The purpose of dictionaries for streams cut into fixed blocks.
pub const BLOCKS: &str = "blocks";
/// Size of a trained dictionary.
const DICT_SIZE: usize = 110 << 10;
/// Bytes sampled from each chosen block, and the most samples kept.
const SAMPLE: usize = 8192;
const MAX_SAMPLES: usize = 512;
/// Fewer samples than this train no dictionary (a small first backup).
const MIN_SAMPLES: usize = 64;
/// The zstd dictionary header: magic, then the dictionary id (both u32 LE).
const MAGIC: [u8; 4] = 0xEC30_A437u32.to_le_bytes();
/// Ids below this are reserved by zstd's convention.
const FIRST_ID: u32 = 32768;

/// One dictionary, ready to use.
#[derive(Debug, Clone)]
pub struct Dictionary {
    /// The id in its header and in every frame compressed with it.
    pub id: u32,
    /// Tells dictionaries apart in per-thread caches across repositories (ids are only
    /// unique within one).
    pub fingerprint: u64,
    /// The dictionary.
    pub bytes: Arc<Vec<u8>>,
}

impl Dictionary {
    fn new(id: u32, bytes: Vec<u8>) -> Dictionary {
        let h = blake3::hash(&bytes);
        Dictionary {
            id,
            fingerprint: u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")),
            bytes: Arc::new(bytes),
        }
    }
}

/// A repository's dictionaries.
#[derive(Debug, Clone, Default)]
pub struct Dictionaries {
    by_id: HashMap<u32, Dictionary>,
    blocks: Option<u32>,
}

impl Dictionaries {
    /// The dictionary with this id.
    pub fn get(&self, id: u32) -> Option<&Dictionary> {
        self.by_id.get(&id)
    }

    /// The dictionary new blocks are compressed with: the `blocks` one of the lowest id.
    pub fn for_blocks(&self) -> Option<&Dictionary> {
        self.blocks.and_then(|id| self.by_id.get(&id))
    }

    fn insert(&mut self, purpose: &str, d: Dictionary) {
        if purpose == BLOCKS && self.blocks.is_none_or(|b| d.id < b) {
            self.blocks = Some(d.id);
        }
        self.by_id.insert(d.id, d);
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct DictObject {
    version: u32,
    purpose: String,
    dict_id: u32,
    created: DateTime<Utc>,
    /// Hex of the dictionary.
    zstd: String,
}

/// Load every dictionary of `repo`.
///
/// # Errors
/// Storage errors; `Corrupt` for a damaged dictionary object or two with one id.
pub async fn load(repo: &Repository) -> Result<Dictionaries> {
    let mut dicts = Dictionaries::default();
    for meta in repo.list_objects("dicts").await? {
        let o: DictObject = repo.load_json(&meta.path, aad::DICT).await?;
        let bytes = hex::decode(&o.zstd)
            .map_err(|_| Error::corrupt(&meta.path, "the dictionary is not hex"))?;
        if bytes.len() < 8 || bytes[..4] != MAGIC || header_id(&bytes) != o.dict_id {
            return Err(Error::corrupt(
                &meta.path,
                "the dictionary's header does not carry its id",
            ));
        }
        if dicts.by_id.contains_key(&o.dict_id) {
            return Err(Error::corrupt(
                &meta.path,
                format!("a second dictionary has id {}", o.dict_id),
            ));
        }
        dicts.insert(&o.purpose, Dictionary::new(o.dict_id, bytes));
    }
    Ok(dicts)
}

fn header_id(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"))
}

/// Samples of a backup's new blocks, kept for training when the repository has no
/// dictionary: a reservoir of 8 KiB slices, one from each chosen block, so that the samples
/// come from across the whole backup and not only its first files.
#[derive(Debug, Default)]
pub struct Sampler {
    inner: Mutex<(u64, Vec<Vec<u8>>)>,
}

impl Sampler {
    /// Offer one new block.
    pub fn offer(&self, block: &[u8]) {
        if block.len() < SAMPLE {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (seen, kept) = &mut *g;
        *seen += 1;
        // A page from the middle of the block: the first page of a file is often special.
        let at = (block.len() / SAMPLE / 2) * SAMPLE;
        let slice = &block[at..at + SAMPLE];
        if kept.len() < MAX_SAMPLES {
            kept.push(slice.to_vec());
        } else {
            let j = rand::thread_rng().gen_range(0..*seen);
            if (j as usize) < MAX_SAMPLES {
                kept[j as usize] = slice.to_vec();
            }
        }
    }

    fn take(&self) -> Vec<Vec<u8>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut g.1)
    }
}

/// Train a `blocks` dictionary from `sampler` and store it, unless there are too few samples
/// or training fails (then the repository simply has no dictionary yet). Returns its id.
///
/// # Errors
/// Storage errors.
pub async fn train_and_store(
    repo: &Repository,
    existing: &Dictionaries,
    sampler: &Sampler,
) -> Result<Option<u32>> {
    let samples = sampler.take();
    if samples.len() < MIN_SAMPLES {
        return Ok(None);
    }
    let trained =
        tokio::task::spawn_blocking(move || zstd::dict::from_samples(&samples, DICT_SIZE))
            .await
            .map_err(|e| Error::Invalid(format!("dictionary training failed: {e}")))?;
    let mut bytes = match trained {
        Ok(b) if b.len() >= 8 && b[..4] == MAGIC => b,
        Ok(_) => return Ok(None),
        Err(e) => {
            tracing::debug!("no dictionary trained: {e}");
            return Ok(None);
        }
    };
    let id = loop {
        let id = rand::thread_rng().gen_range(FIRST_ID..=u32::MAX);
        if existing.get(id).is_none() {
            break id;
        }
    };
    bytes[4..8].copy_from_slice(&id.to_le_bytes());
    let o = DictObject {
        version: 1,
        purpose: BLOCKS.into(),
        dict_id: id,
        created: Utc::now(),
        zstd: hex::encode(&bytes),
    };
    repo.save_json("dicts", aad::DICT, &o).await?;
    Ok(Some(id))
}
