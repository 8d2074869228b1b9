//! Entry points for fuzzing the decoders of bytes that come from storage (threat model,
//! format §9: storage is not trusted). Each takes arbitrary bytes and must return, never panic,
//! whatever the bytes are. `fuzz/` runs them under libFuzzer; each crate's `fuzz_smoke` test
//! runs them over the seed corpus and mutations of it, in CI.
//!
//! The sealed objects are decoded after their envelope has been opened: an attacker without
//! the key cannot get past the AEAD, so the parsers behind it are fuzzed directly, as a reader
//! holding the key (or a future bug in the envelope) would meet them.

use crate::index::{IndexFile, MasterIndex};
use crate::key::{KeyFile, Secret};
use crate::snapshot::Snapshot;

/// The opened header of a pack, as if its sealed form began at byte `start` (the first four
/// input bytes choose `start`).
pub fn pack_header(data: &[u8]) {
    let (start, header) = split_u32(data);
    let _ = crate::pack::parse_header(header, start as usize, "fuzz");
}

/// The opened content of an index object: zstd, JSON, version, then the in-memory index.
pub fn index(data: &[u8]) {
    if let Ok(f) = crate::repository::decode_json::<IndexFile>(data, "index/fuzz") {
        let mut m = MasterIndex::new();
        for p in f.packs {
            m.add_pack(p);
        }
        let _ = m.chunk_count();
    }
}

/// The same decoding for raw JSON, which libFuzzer reaches more easily than zstd frames.
pub fn index_json(data: &[u8]) {
    index(&zstd::bulk::compress(data, 1).unwrap_or_default());
}

/// The opened content of a snapshot object, and what readers compute from one.
pub fn snapshot(data: &[u8]) {
    if let Ok(s) = crate::repository::decode_json::<Snapshot>(data, "snapshots/fuzz") {
        let _ = s.size();
        let _ = s.has_tags(&["a".to_owned()]);
    }
}

/// Raw JSON of a snapshot object.
pub fn snapshot_json(data: &[u8]) {
    snapshot(&zstd::bulk::compress(data, 1).unwrap_or_default());
}

/// A key object (stored in clear: JSON with a sealed master key), opened with a raw secret.
pub fn key_object(data: &[u8]) {
    if let Ok(k) = serde_json::from_slice::<KeyFile>(data) {
        let _ = k.kind();
        let _ = k.unwrap_master(&Secret::Raw(vec![7u8; 32].into()), "keys/fuzz");
    }
}

/// The opened content of the config object.
pub fn config_object(data: &[u8]) {
    let _ = crate::repository::decode_config(data);
}

/// The opened footer of a log segment whose frames end at the offset in the first four bytes.
pub fn segment_footer(data: &[u8]) {
    let (end, plain) = split_u32(data);
    let _ = crate::log::footer_info(plain, end as u64, "logs/fuzz");
}

fn split_u32(data: &[u8]) -> (u32, &[u8]) {
    match data.split_first_chunk::<4>() {
        Some((n, rest)) => (u32::from_le_bytes(*n), rest),
        None => (0, data),
    }
}

/// A fuzz target: arbitrary bytes in, and it returns whatever they are.
pub type Target = fn(&[u8]);

/// Every target by name, for the harnesses.
pub const TARGETS: &[(&str, Target)] = &[
    ("pack_header", pack_header),
    ("index", index),
    ("index_json", index_json),
    ("snapshot", snapshot),
    ("snapshot_json", snapshot_json),
    ("key_object", key_object),
    ("config_object", config_object),
    ("segment_footer", segment_footer),
];
