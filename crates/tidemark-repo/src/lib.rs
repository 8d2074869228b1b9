//! The tidemark repository: content-defined chunks, deduplication, zstd, authenticated
//! encryption, packs, index, snapshots, log segments, locks and keys.
//!
//! The on-storage format is specified in `docs/design/repository.md`; section numbers in
//! comments (§5) refer to it.

pub mod chunker;
pub mod config;
pub mod crypto;
pub mod dict;
pub mod duration;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod id;
pub mod index;
pub mod key;
pub mod lock;
pub mod log;
pub mod ops;
pub mod pack;
pub mod progress;
pub mod repository;
pub mod snapshot;

pub use error::{Error, Result};
pub use repository::Repository;
