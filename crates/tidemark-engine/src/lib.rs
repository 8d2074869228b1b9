//! Database engines behind one trait. Each engine module turns a live database into named
//! streams for a backup, and streams from a snapshot back into a working database.
//!
//! What engines can do differs as data (`Capabilities`), never as `if engine == …` in callers.

use std::collections::BTreeMap;
use std::path::Path;

use async_trait::async_trait;
use tidemark_repo::ops::backup::{Backup, Finished};
use tidemark_repo::snapshot::{DatabaseIdentity, Snapshot, SnapshotKind};
use tidemark_repo::Repository;

pub mod census;
pub mod postgres;
pub mod retention;
pub mod sqlite;

/// What an engine can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// Logical dumps.
    pub logical: bool,
    /// Physical copies.
    pub physical: bool,
    /// Backups while the database takes writes, with a consistent result.
    pub online: bool,
    /// Continuous log archiving.
    pub log_archiving: bool,
    /// Recovery to a point in time.
    pub point_in_time: bool,
    /// A check that proves a restored database is sound.
    pub verify: bool,
}

/// Engine failures. Messages name the database and the action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] tidemark_repo::Error),
    /// The database refused or failed an operation.
    #[error("failed to {action} {database:?}: {reason}")]
    Database {
        /// The action.
        action: &'static str,
        /// Path or name of the database.
        database: String,
        /// The database's own message.
        reason: String,
    },
    /// A restored database failed its integrity check; it was not put in place.
    #[error("restored database {database:?} failed its integrity check: {reason}")]
    Verification {
        /// The database.
        database: String,
        /// What the check said.
        reason: String,
    },
    /// The snapshot was not made by this engine, or lacks a stream the engine needs.
    #[error("snapshot {snapshot} cannot be restored by the {engine} engine: {reason}")]
    WrongSnapshot {
        /// Snapshot id (short).
        snapshot: String,
        /// The engine.
        engine: &'static str,
        /// Why.
        reason: String,
    },
    /// A local file operation failed.
    #[error("failed to {action} {path:?}")]
    Io {
        /// The action.
        action: &'static str,
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result with the engine error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a backup recorded besides its streams.
#[derive(Debug, Clone)]
pub struct BackupInfo {
    /// Logical or physical.
    pub kind: SnapshotKind,
    /// The database's identity.
    pub database: DatabaseIdentity,
    /// Positions for point-in-time recovery.
    pub positions: BTreeMap<String, serde_json::Value>,
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// Where the database now is.
    pub target: String,
    /// Bytes written.
    pub bytes: u64,
    /// What the engine's verification said, if it ran.
    pub verified: Option<String>,
    /// What was written outside the target (PostgreSQL's tablespaces), as `what: path`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub elsewhere: Vec<String>,
    /// What a delta restore kept, wrote and removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<tidemark_repo::ops::restore::DeltaSummary>,
}

/// A database engine.
#[async_trait]
pub trait Engine: Send + Sync {
    /// The engine's name, as recorded in snapshots (`sqlite`).
    fn name(&self) -> &'static str;

    /// What it can do.
    fn capabilities(&self) -> Capabilities;

    /// The database's identity, read from the live database.
    ///
    /// # Errors
    /// `Database` when it cannot be reached.
    async fn identity(&self) -> Result<DatabaseIdentity>;

    /// Write a consistent copy of the database into `backup` as named streams. MUST NOT return
    /// Ok unless every stream was read to its end from a consistent state.
    ///
    /// # Errors
    /// `Database` when the copy fails; the caller then abandons the backup (no snapshot).
    async fn backup(&self, backup: &mut Backup<'_>) -> Result<BackupInfo>;

    /// Restore `snapshot` to `target` and verify it. MUST NOT leave a partial or unverified
    /// database at `target`.
    ///
    /// # Errors
    /// `WrongSnapshot`, `Verification`, repository and I/O errors.
    async fn restore(
        &self,
        repo: &Repository,
        id: &str,
        snapshot: &Snapshot,
        target: &Path,
    ) -> Result<RestoreReport>;
}

/// Run `engine`'s backup into `backup` and write the snapshot, with the kind, identity and
/// positions the engine reported. An engine error abandons the backup: no snapshot.
///
/// # Errors
/// The engine's error, or the repository's when writing the snapshot fails.
pub async fn run_backup(engine: &dyn Engine, mut backup: Backup<'_>) -> Result<Finished> {
    let info = engine.backup(&mut backup).await?;
    backup.describe(info.kind, info.database);
    Ok(backup.finish_report(info.positions).await?)
}
