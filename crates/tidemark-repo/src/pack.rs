//! Packs: blobs followed by an encrypted header that lists them (format §5).

use bytes::Bytes;

use std::collections::HashMap;

use crate::crypto::{aad, Keys};
use crate::dict::{Dictionaries, Dictionary};
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};

/// Blob payload is the raw chunk.
pub const COMPRESSION_NONE: u8 = 0;
/// Blob payload is a zstd frame.
pub const COMPRESSION_ZSTD: u8 = 1;

const MAGIC: &[u8; 4] = b"TMPH";
const ENTRY_LEN: usize = 32 + 4 + 4 + 4 + 1;

/// Where a chunk is inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Offset of its blob in the pack.
    pub offset: u32,
    /// Length of its blob (envelope).
    pub length: u32,
    /// Length of the chunk.
    pub raw_length: u32,
    /// `COMPRESSION_NONE` or `COMPRESSION_ZSTD`.
    pub compression: u8,
}

/// A chunk made ready for a pack: compressed (if that helps) and sealed.
#[derive(Debug, Clone)]
pub struct Blob {
    /// The chunk id.
    pub id: ChunkId,
    /// The envelope.
    pub data: Vec<u8>,
    /// Length of the chunk.
    pub raw_length: u32,
    /// Compression of the payload.
    pub compression: u8,
}

thread_local! {
    // One zstd context per thread, reused: making a context per chunk allocated (and faulted
    // in) about a megabyte each time. With a dictionary, one per dictionary (by fingerprint:
    // ids are unique only within a repository) and level.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DICT_COMPRESSORS: std::cell::RefCell<HashMap<(u64, i32), zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(HashMap::new());
    static DICT_DECOMPRESSORS: std::cell::RefCell<HashMap<u64, zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(HashMap::new());
}

/// zstd-compress `data` at `level` (with `dict`, if any) with this thread's reusable context.
fn compress(data: &[u8], level: i32, dict: Option<&Dictionary>) -> Option<Vec<u8>> {
    if let Some(d) = dict {
        return DICT_COMPRESSORS.with_borrow_mut(|m| {
            let c = match m.entry((d.fingerprint, level)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(zstd::bulk::Compressor::with_dictionary(level, &d.bytes).ok()?)
                }
            };
            c.compress(data).ok()
        });
    }
    COMPRESSOR.with_borrow_mut(|c| {
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        c.as_mut()?.1.compress(data).ok()
    })
}

/// Decompress the zstd frame `frame` into `out`, with the dictionary its header names.
fn decompress(
    frame: &[u8],
    out: &mut Vec<u8>,
    dicts: &Dictionaries,
) -> std::result::Result<(), String> {
    let Some(id) = zstd::zstd_safe::get_dict_id_from_frame(frame) else {
        return DECOMPRESSOR
            .with_borrow_mut(|d| match d {
                Some(d) => d.decompress_to_buffer(frame, out),
                None => zstd::bulk::Decompressor::new()
                    .and_then(|new| d.insert(new).decompress_to_buffer(frame, out)),
            })
            .map(|_| ())
            .map_err(|_| "zstd frame is invalid".to_owned());
    };
    let d = dicts.get(id.get()).ok_or_else(|| {
        format!(
            "it was compressed with zstd dictionary {id}, which is not in the repository (dicts/)"
        )
    })?;
    DICT_DECOMPRESSORS
        .with_borrow_mut(|m| {
            let dec = match m.entry(d.fingerprint) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(zstd::bulk::Decompressor::with_dictionary(&d.bytes)?)
                }
            };
            dec.decompress_to_buffer(frame, out)
        })
        .map(|_| ())
        .map_err(|_| "zstd frame is invalid".to_owned())
}

/// Whether a sample of `data` looks like random bytes (encrypted, already compressed): byte
/// entropy of 16 spread-out 256-byte slices above 7.8 bits per byte, where zstd would save
/// under about 2% and cost as much CPU as on any other data. A few microseconds per chunk.
fn looks_incompressible(data: &[u8]) -> bool {
    const SLICES: usize = 16;
    const SLICE: usize = 256;
    if data.len() < SLICES * SLICE * 2 {
        return false;
    }
    let mut counts = [0u32; 256];
    let step = data.len() / SLICES;
    for i in 0..SLICES {
        for &b in &data[i * step..i * step + SLICE] {
            counts[b as usize] += 1;
        }
    }
    let n = (SLICES * SLICE) as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    entropy > 7.8
}

impl Blob {
    /// Compress `chunk` with zstd at `level` (with `dict`, if any) when that makes it smaller,
    /// then seal it. Chunks that look random are stored uncompressed without trying.
    pub fn seal(
        keys: &Keys,
        id: ChunkId,
        chunk: &[u8],
        level: i32,
        dict: Option<&Dictionary>,
    ) -> Blob {
        let compressed = (!looks_incompressible(chunk))
            .then(|| compress(chunk, level, dict))
            .flatten()
            .filter(|c| c.len() < chunk.len());
        let (payload, compression) = match &compressed {
            Some(c) => (&c[..], COMPRESSION_ZSTD),
            None => (chunk, COMPRESSION_NONE),
        };
        Blob {
            id,
            data: keys.seal(&id.0, payload),
            raw_length: chunk.len() as u32,
            compression,
        }
    }
}

/// Open a blob read from a pack: authenticate, decompress, and check length and id.
///
/// # Errors
/// `Corrupt` naming `object` if any check fails; no plaintext is returned then.
pub fn open_blob(
    keys: &Keys,
    dicts: &Dictionaries,
    entry: &PackEntry,
    data: &[u8],
    object: &str,
) -> Result<Bytes> {
    let mut out = Vec::new();
    open_blob_into(
        keys,
        dicts,
        entry,
        data,
        object,
        &mut Vec::new(),
        &mut out,
        true,
    )?;
    Ok(Bytes::from(out))
}

/// `open_blob` into caller-owned buffers, so a restore reuses memory instead of faulting in
/// fresh pages for every chunk. `scratch` holds the decrypted payload; `out` the chunk.
/// Without `rehash` the plaintext is not hashed again against the chunk id: the AEAD, whose
/// associated data is that id, has authenticated it (see `ChunkCheck` for who may do this).
///
/// # Errors
/// As for `open_blob`; `out` is then cleared.
#[allow(clippy::too_many_arguments)]
pub fn open_blob_into(
    keys: &Keys,
    dicts: &Dictionaries,
    entry: &PackEntry,
    data: &[u8],
    object: &str,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
    rehash: bool,
) -> Result<()> {
    let bad =
        |reason: &str| Error::corrupt(format!("{object} (chunk {})", entry.id.short()), reason);
    out.clear();
    keys.open_into(&entry.id.0, data, scratch)
        .map_err(|_| bad("authentication failed"))?;
    match entry.compression {
        COMPRESSION_NONE => out.extend_from_slice(scratch),
        COMPRESSION_ZSTD => {
            out.reserve(entry.raw_length as usize);
            if let Err(reason) = decompress(scratch, out, dicts) {
                out.clear();
                return Err(bad(&reason));
            }
        }
        c => return Err(bad(&format!("unknown compression {c}"))),
    }
    if out.len() != entry.raw_length as usize {
        out.clear();
        return Err(bad("length does not match the index"));
    }
    if rehash && keys.chunk_id(out) != entry.id {
        out.clear();
        return Err(bad("content does not match the chunk id"));
    }
    Ok(())
}

/// Builds one pack in memory.
#[derive(Debug, Default)]
pub struct PackBuilder {
    data: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// An empty pack.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty pack with room for `bytes` of blobs (and its header) without reallocating.
    pub fn with_capacity(bytes: usize) -> Self {
        PackBuilder {
            data: Vec::with_capacity(bytes + (bytes >> 4) + 4096),
            entries: Vec::new(),
        }
    }

    /// Bytes of blobs so far.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Append a blob.
    pub fn add(&mut self, blob: &Blob) {
        self.entries.push(PackEntry {
            id: blob.id,
            offset: self.data.len() as u32,
            length: blob.data.len() as u32,
            raw_length: blob.raw_length,
            compression: blob.compression,
        });
        self.data.extend_from_slice(&blob.data);
    }

    /// Append the sealed header and its length; return the pack's id, bytes and entries.
    pub fn finish(mut self, keys: &Keys) -> (PackId, Bytes, Vec<PackEntry>) {
        let mut header = Vec::with_capacity(9 + self.entries.len() * ENTRY_LEN);
        header.extend_from_slice(MAGIC);
        header.push(1);
        header.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            header.extend_from_slice(&e.id.0);
            header.extend_from_slice(&e.offset.to_le_bytes());
            header.extend_from_slice(&e.length.to_le_bytes());
            header.extend_from_slice(&e.raw_length.to_le_bytes());
            header.push(e.compression);
        }
        let sealed = keys.seal(aad::PACK_HEADER, &header);
        self.data.extend_from_slice(&sealed);
        self.data
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        let id = PackId::of_bytes(&self.data);
        (id, Bytes::from(self.data), self.entries)
    }
}

/// Read the header of a whole pack (used by `check` and index rebuilds).
///
/// # Errors
/// `Corrupt` naming `object` when the trailer or header is damaged.
pub fn read_header(keys: &Keys, pack: &[u8], object: &str) -> Result<Vec<PackEntry>> {
    let bad = |reason: &str| Error::corrupt(object, reason);
    if pack.len() < 4 {
        return Err(bad("too short for a pack"));
    }
    let hlen = u32::from_le_bytes(pack[pack.len() - 4..].try_into().expect("4 bytes")) as usize;
    if hlen + 4 > pack.len() {
        return Err(bad("header length is beyond the start of the pack"));
    }
    let start = pack.len() - 4 - hlen;
    let header = keys
        .open(aad::PACK_HEADER, &pack[start..pack.len() - 4])
        .map_err(|_| bad("header authentication failed"))?;
    parse_header(&header, start, object)
}

/// Decode an opened pack header whose sealed form starts at byte `start` of its pack.
///
/// # Errors
/// `Corrupt` naming `object`; `UnsupportedVersion`.
pub(crate) fn parse_header(header: &[u8], start: usize, object: &str) -> Result<Vec<PackEntry>> {
    let bad = |reason: &str| Error::corrupt(object, reason);
    if header.len() < 9 || &header[..4] != MAGIC {
        return Err(bad("header has no magic"));
    }
    if header[4] != 1 {
        return Err(Error::UnsupportedVersion {
            object: object.to_owned(),
            version: header[4] as u32,
        });
    }
    let count = u32::from_le_bytes(header[5..9].try_into().expect("4 bytes")) as usize;
    if header.len() != 9 + count * ENTRY_LEN {
        return Err(bad("header length does not match its entry count"));
    }
    let mut out = Vec::with_capacity(count);
    for e in header[9..].chunks_exact(ENTRY_LEN) {
        let u = |i: usize| u32::from_le_bytes(e[i..i + 4].try_into().expect("4 bytes"));
        let entry = PackEntry {
            id: ChunkId(e[..32].try_into().expect("32 bytes")),
            offset: u(32),
            length: u(36),
            raw_length: u(40),
            compression: e[44],
        };
        if entry.offset as usize + entry.length as usize > start {
            return Err(bad("a blob extends past the header"));
        }
        out.push(entry);
    }
    Ok(out)
}

#[cfg(test)]
mod entropy_tests {
    use super::looks_incompressible;

    #[test]
    fn random_bytes_are_recognized_and_database_pages_are_not() {
        use rand::RngCore;
        let mut random = vec![0u8; 65536];
        rand::thread_rng().fill_bytes(&mut random);
        assert!(looks_incompressible(&random));
        // Text, zeros, and a page of random tuples with headers and free space.
        let text: Vec<u8> = (0..65536u32)
            .map(|i| b"pgbench_accounts "[i as usize % 17])
            .collect();
        assert!(!looks_incompressible(&text));
        assert!(!looks_incompressible(&[0u8; 65536]));
        let mut page = vec![0u8; 65536];
        rand::thread_rng().fill_bytes(&mut page[40000..]);
        assert!(!looks_incompressible(&page));
        assert!(
            !looks_incompressible(&random[..1000]),
            "small chunks are always tried"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    #[test]
    fn a_pack_round_trips_through_its_header() {
        let keys = Keys::derive(&MasterKey::generate());
        let chunks: Vec<Vec<u8>> = vec![
            vec![1u8; 5000],
            (0..3000u32).map(|i| (i * 7) as u8).collect(),
            b"x".to_vec(),
        ];
        let mut b = PackBuilder::new();
        for c in &chunks {
            b.add(&Blob::seal(&keys, keys.chunk_id(c), c, 1, None));
        }
        let (id, bytes, entries) = b.finish(&keys);
        assert_eq!(id, PackId::of_bytes(&bytes));
        let header = read_header(&keys, &bytes, "p").unwrap();
        assert_eq!(header, entries);
        for (e, c) in header.iter().zip(&chunks) {
            let blob = &bytes[e.offset as usize..(e.offset + e.length) as usize];
            assert_eq!(
                &open_blob(&keys, &Default::default(), e, blob, "p").unwrap()[..],
                &c[..]
            );
        }
        assert_eq!(header[0].compression, COMPRESSION_ZSTD);
    }

    #[test]
    fn a_flipped_byte_in_a_blob_is_reported_as_damage() {
        let keys = Keys::derive(&MasterKey::generate());
        let c = vec![9u8; 1000];
        let blob = Blob::seal(&keys, keys.chunk_id(&c), &c, 1, None);
        let e = PackEntry {
            id: blob.id,
            offset: 0,
            length: blob.data.len() as u32,
            raw_length: 1000,
            compression: blob.compression,
        };
        let mut bad = blob.data.clone();
        bad[30] ^= 0x40;
        let err = open_blob(&keys, &Default::default(), &e, &bad, "data/ab/x").unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    /// Without the second hash (`rehash` false) a blob is still refused when its bytes were
    /// changed or when the index puts it under another chunk's id: the AEAD binds the id.
    #[test]
    fn authentication_alone_refuses_a_changed_blob_and_a_blob_under_another_id() {
        let keys = Keys::derive(&MasterKey::generate());
        let (c, other) = (vec![9u8; 1000], vec![8u8; 1000]);
        let blob = Blob::seal(&keys, keys.chunk_id(&c), &c, 1, None);
        let entry = |id| PackEntry {
            id,
            offset: 0,
            length: blob.data.len() as u32,
            raw_length: 1000,
            compression: blob.compression,
        };
        let open = |e: &PackEntry, data: &[u8]| {
            let (mut scratch, mut out) = (Vec::new(), Vec::new());
            open_blob_into(
                &keys,
                &Default::default(),
                e,
                data,
                "p",
                &mut scratch,
                &mut out,
                false,
            )
            .map(|()| out)
        };
        assert_eq!(open(&entry(blob.id), &blob.data).unwrap(), c);
        let mut bad = blob.data.clone();
        bad[30] ^= 0x40;
        assert!(open(&entry(blob.id), &bad).is_err(), "a changed byte");
        assert!(
            open(&entry(keys.chunk_id(&other)), &blob.data).is_err(),
            "a blob under another id"
        );
    }
}
