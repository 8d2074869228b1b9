//! The `Storage` trait: the contract every location (file, S3, GCS, Azure, memory) fulfils.

use std::fmt::Debug;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::error::Result;

/// How `put` treats an object that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Create the object only if no object of that name exists. MUST be atomic where
    /// `Capabilities::atomic_create` is true: of two concurrent creators, exactly one succeeds and
    /// the other gets `ErrorKind::AlreadyExists`.
    CreateNew,
    /// Replace any existing object. Used only for objects that are not part of the format's
    /// immutable set (none at present; kept for tools and tests).
    Overwrite,
}

/// What a location can do, as data. Callers decide on these fields, never on the kind of location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `PutMode::CreateNew` is atomic on the server (If-None-Match, generation preconditions,
    /// link(2)). When false it is emulated by a check before the write and may race.
    pub atomic_create: bool,
    /// Objects can be uploaded in parts with `put_multipart` without holding them in memory.
    pub multipart: bool,
    /// Part size the location prefers for multipart uploads.
    pub multipart_part_size: usize,
    /// `list` returns modification times that are reliable enough for prune's grace period.
    pub list_modified_time: bool,
    /// Whether the bytes survive the process (false for memory).
    pub durable: bool,
}

impl Capabilities {
    /// What a durable object store or filesystem with atomic create and multipart offers.
    pub const fn durable_store() -> Self {
        Capabilities {
            atomic_create: true,
            multipart: true,
            multipart_part_size: 8 << 20,
            list_modified_time: true,
            durable: true,
        }
    }
}

/// An object as seen by `list` and `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Path relative to the location's root, with `/` separators.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time as reported by the location.
    pub modified: DateTime<Utc>,
}

/// A multipart upload in progress. Parts are written in order; nothing is visible under the
/// object's name until `complete` returns Ok, and `abort` (or dropping without completing)
/// leaves nothing visible.
#[async_trait]
pub trait Upload: Send {
    /// Append one part. Parts other than the last SHOULD be `multipart_part_size` bytes or more.
    async fn write_part(&mut self, data: Bytes) -> Result<()>;
    /// Make the object visible under its name, replacing any object there.
    async fn complete(self: Box<Self>) -> Result<()>;
    /// Discard the parts written so far.
    async fn abort(self: Box<Self>) -> Result<()>;
}

/// A storage location holding named, immutable objects.
///
/// Paths are relative to the location's root, use `/` as separator, and never start with `/`.
/// Every method either fully succeeds or returns an error; no method may report success for a
/// write that is not durable (for durable locations) and readable by every later call.
#[async_trait]
pub trait Storage: Send + Sync + Debug {
    /// A short, human name for the location, used in every error message (never contains secrets).
    fn name(&self) -> &str;

    /// What this location can do.
    fn capabilities(&self) -> Capabilities;

    /// Write `data` as the whole object at `path`.
    ///
    /// With `PutMode::CreateNew`, MUST fail with `ErrorKind::AlreadyExists` if an object exists
    /// at `path` (section 8 of the repository format relies on this). A failed put MUST NOT leave
    /// a partial object visible under `path`.
    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<()>;

    /// Start a multipart upload to `path` that replaces any object there on completion.
    async fn put_multipart(&self, path: &str) -> Result<Box<dyn Upload>>;

    /// Read the whole object. MUST fail with `ErrorKind::NotFound` if it does not exist.
    async fn get(&self, path: &str) -> Result<Bytes>;

    /// Read the bytes in `range`. The range MUST lie within the object; MUST fail with
    /// `ErrorKind::NotFound` if the object does not exist.
    async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes>;

    /// Size and modification time of one object; `ErrorKind::NotFound` if absent.
    async fn head(&self, path: &str) -> Result<ObjectMeta>;

    /// Every object whose path starts with `prefix` (a directory-like prefix ending in `/`, or
    /// empty for everything), recursively, in no particular order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Delete the object at `path`. Deleting an absent object MUST succeed (deletes are
    /// idempotent so that an interrupted prune can simply run again).
    async fn delete(&self, path: &str) -> Result<()>;

    /// Remove what interrupted writes left behind that is older than `older_than` (a local
    /// location's temporary files of a killed upload; object stores abort multipart uploads
    /// themselves, by lifecycle rule). Never touches an object. Returns how many were removed.
    async fn sweep(&self, older_than: std::time::Duration) -> Result<u64> {
        let _ = older_than;
        Ok(0)
    }
}
