//! The repository configuration object (format §3.4) and the options `init` takes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::KdfParams;

/// Chunk size bounds in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    /// Smallest chunk, except a stream's last (default 64 KiB).
    pub min: u32,
    /// Average chunk (default 256 KiB).
    pub avg: u32,
    /// Largest chunk (default 1 MiB).
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min: 64 << 10,
            avg: 256 << 10,
            max: 1 << 20,
        }
    }
}

/// Compression settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compression {
    /// Only `zstd`.
    pub algorithm: String,
    /// zstd level (default 1: on database dumps level 3 measured slower and larger).
    pub level: i32,
}

/// Pack size bounds in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackSize {
    /// A pack is closed once it reaches this (default 16 MiB).
    pub min: u32,
    /// And never grows past this plus one blob (default 32 MiB).
    pub max: u32,
}

/// The `config` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Format version (1).
    pub version: u32,
    /// Random repository id (hex).
    pub id: String,
    /// Chunker parameters.
    pub chunker: ChunkerParams,
    /// Compression.
    pub compression: Compression,
    /// Pack sizes.
    pub pack_size: PackSize,
    /// When `init` ran.
    pub created: DateTime<Utc>,
}

/// Options for `init`: one struct shared by the CLI, the agent and tests.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Chunker parameters.
    pub chunker: ChunkerParams,
    /// zstd level, 1 to 19.
    pub compression_level: i32,
    /// Pack size bounds.
    pub pack_size: PackSize,
    /// Argon2id parameters of the first key.
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunker: ChunkerParams::default(),
            compression_level: 1,
            pack_size: PackSize {
                min: 16 << 20,
                max: 32 << 20,
            },
            kdf: KdfParams::default(),
        }
    }
}

impl RepoConfig {
    /// A new config from `init`'s options.
    ///
    /// # Errors
    /// `Invalid` when a parameter is out of range.
    pub fn new(opts: &InitOptions) -> Result<Self> {
        let c = opts.chunker;
        let ok = (64..=1 << 20).contains(&c.min)
            && (256..=4 << 20).contains(&c.avg)
            && (1024..=16 << 20).contains(&c.max)
            && c.min < c.avg
            && c.avg < c.max
            && c.avg.is_power_of_two();
        if !ok {
            return Err(Error::Invalid(format!(
                "chunker sizes {}/{}/{} are out of range: need 64 B ≤ min < avg < max ≤ 16 MiB, avg a power of two",
                c.min, c.avg, c.max
            )));
        }
        if !(1..=19).contains(&opts.compression_level) {
            return Err(Error::Invalid(format!(
                "zstd level {} is out of range 1..=19",
                opts.compression_level
            )));
        }
        if opts.pack_size.min == 0
            || opts.pack_size.min > opts.pack_size.max
            || opts.pack_size.max > 1 << 30
        {
            return Err(Error::Invalid(
                "pack sizes must satisfy 0 < min ≤ max ≤ 1 GiB".into(),
            ));
        }
        Ok(RepoConfig {
            version: 1,
            id: hex::encode(rand::random::<[u8; 16]>()),
            chunker: c,
            compression: Compression {
                algorithm: "zstd".into(),
                level: opts.compression_level,
            },
            pack_size: opts.pack_size,
            created: Utc::now(),
        })
    }
}
