//! Snapshot manifests (format §6.2).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::id::{ChunkId, SnapshotId};

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// A logical dump (SQL text, archive format).
    Logical,
    /// A physical copy of the database's files.
    Physical,
    /// Plain files and directories.
    Files,
}

/// The type of a named stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    /// A byte stream (stdin, a command's output, a database file).
    Stream,
    /// A regular file of a directory tree.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

/// One named stream or file and its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEntry {
    /// Name; for trees, a relative path with `/` separators.
    pub name: String,
    /// The type.
    #[serde(rename = "type")]
    pub kind: EntryType,
    /// Bytes of content.
    pub size: u64,
    /// Unix permission bits, for files and directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Modification time, for files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<DateTime<Utc>>,
    /// Link target, for symlinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The chunks, in order.
    pub chunks: Vec<ChunkId>,
}

/// The database a snapshot came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseIdentity {
    /// Database or instance name.
    #[serde(default)]
    pub name: String,
    /// A system identifier that tells clusters apart (PostgreSQL system id, server uuid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    /// Server or library version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// What a backup stored, for people and for `stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Bytes read from the source.
    pub raw_bytes: u64,
    /// Chunks in the snapshot.
    pub chunks: u64,
    /// Chunks that were not in the repository yet.
    pub new_chunks: u64,
    /// Their raw bytes.
    pub new_raw_bytes: u64,
    /// Their stored bytes (compressed and sealed).
    pub new_stored_bytes: u64,
    /// Wall time of the backup.
    pub duration_seconds: f64,
}

/// A snapshot manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Format version (1).
    pub version: u32,
    /// Start time.
    pub time: DateTime<Utc>,
    /// End time.
    pub time_end: DateTime<Utc>,
    /// Host.
    pub hostname: String,
    /// User.
    #[serde(default)]
    pub username: String,
    /// Engine name (`sqlite`, `postgresql`, `stdin`, `files`).
    pub engine: String,
    /// Logical, physical or files.
    pub kind: SnapshotKind,
    /// The database.
    #[serde(default)]
    pub database: DatabaseIdentity,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The snapshot this one was compared with, if any.
    #[serde(default)]
    pub parent: Option<SnapshotId>,
    /// Streams and files.
    pub streams: Vec<StreamEntry>,
    /// Engine positions (LSN, GTID, oplog time) for point-in-time recovery; opaque here.
    #[serde(default)]
    pub positions: BTreeMap<String, serde_json::Value>,
    /// What the backup stored.
    #[serde(default)]
    pub summary: Summary,
}

impl Snapshot {
    /// Total bytes of content.
    pub fn size(&self) -> u64 {
        self.streams.iter().map(|s| s.size).sum()
    }

    /// Whether every tag in `tags` is on this snapshot.
    pub fn has_tags(&self, tags: &[String]) -> bool {
        tags.iter().all(|t| self.tags.contains(t))
    }
}
