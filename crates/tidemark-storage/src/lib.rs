//! Storage locations for tidemark: one small async trait, its implementations, and the layers
//! (retry, timeout, bandwidth limit, fault injection) that wrap any of them.
//!
//! A location is named by a URL (`file:///…`, `s3://bucket/prefix`, `gs://…`, `az://…`,
//! `memory://`) plus options; see [`Location`]. Everything above this crate sees only
//! `Arc<dyn Storage>`.

pub mod direct;
mod error;
mod gcs;
pub mod layer;
mod local;
mod location;
mod object;
mod storage;

pub use error::{Error, ErrorKind, Result};
pub use gcs::GcsStorage;
pub use local::LocalStorage;
pub use location::{is_secret, parse_rate, Location, LocationError, StorageOptions};
pub use object::ObjectStorage;
pub use storage::{Capabilities, ObjectMeta, PutMode, Storage, Upload};
