//! SQLite: a consistent online copy with SQLite's backup API, restored to a file and checked
//! with `PRAGMA integrity_check` before it is put in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use tidemark_repo::ops::backup::Backup;
use tidemark_repo::ops::restore::{restore_stream, RestoreOptions};
use tidemark_repo::progress::Progress;
use tidemark_repo::snapshot::{DatabaseIdentity, EntryType, Snapshot, SnapshotKind};
use tidemark_repo::Repository;

use crate::{BackupInfo, Capabilities, Engine, Error, RestoreReport, Result};

/// The name of the one stream an SQLite snapshot holds.
pub const STREAM: &str = "database.sqlite";

/// An SQLite database file.
#[derive(Debug, Clone)]
pub struct Sqlite {
    path: PathBuf,
}

impl Sqlite {
    /// The database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Sqlite { path: path.into() }
    }

    fn db_err(&self, action: &'static str, e: impl std::fmt::Display) -> Error {
        Error::Database {
            action,
            database: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }
}

/// Copy `src` to `dst` with the online backup API: a consistent image even while others write.
fn online_copy(src: &Path, dst: &Path) -> rusqlite::Result<()> {
    let src = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mut dst = Connection::open(dst)?;
    let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
    // Copy in steps so writers are not blocked for the whole copy; the API restarts the copy
    // if the source changes between steps through another connection.
    backup.run_to_completion(4096, std::time::Duration::from_millis(0), None)?;
    Ok(())
}

/// Open a database file that nothing else writes (our copy, or a restore) read-only and
/// immutable. A read-only connection to a WAL-mode database otherwise creates `-wal` and `-shm`
/// files beside it and, unable to checkpoint, leaves them there (issue #15).
///
/// # Errors
/// SQLite's.
pub fn open_still(path: &Path) -> rusqlite::Result<Connection> {
    let mut uri = String::from("file:");
    for b in path.as_os_str().as_encoded_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                uri.push(*b as char)
            }
            _ => uri.push_str(&format!("%{b:02X}")),
        }
    }
    uri.push_str("?mode=ro&immutable=1");
    Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
}

/// Remove a database file and whatever SQLite keeps beside it. Missing files are not an error.
pub fn remove_database(path: &Path) {
    let _ = std::fs::remove_file(path);
    remove_sidecars(path);
}

/// Remove what SQLite keeps beside a database file (`-wal`, `-shm`, `-journal`).
fn remove_sidecars(path: &Path) {
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let _ = std::fs::remove_file(side);
    }
}

/// Run `PRAGMA integrity_check` on a database file; Ok("ok") when sound.
pub fn integrity_check(path: &Path) -> rusqlite::Result<String> {
    let c = open_still(path)?;
    let rows: Vec<String> = c
        .prepare("PRAGMA integrity_check")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows.join("; "))
}

#[async_trait]
impl Engine for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            logical: false,
            physical: true,
            online: true,
            log_archiving: false,
            point_in_time: false,
            verify: true,
        }
    }

    async fn identity(&self) -> Result<DatabaseIdentity> {
        let path = self.path.clone();
        if !path.is_file() {
            return Err(self.db_err("open", "no such database file"));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(DatabaseIdentity {
            name,
            system_id: None,
            version: Some(rusqlite::version().to_owned()),
        })
    }

    async fn backup(&self, backup: &mut Backup<'_>) -> Result<BackupInfo> {
        let database = self.identity().await?;
        let tmp = tempfile::tempdir().map_err(|e| Error::Io {
            action: "create a temporary directory for",
            path: "sqlite copy".into(),
            source: e,
        })?;
        let copy = tmp.path().join(STREAM);
        let (src, dst) = (self.path.clone(), copy.clone());
        // The census is taken from the copy, so it describes exactly what is backed up.
        let census = tokio::task::spawn_blocking(move || {
            online_copy(&src, &dst)?;
            crate::census::sqlite(&dst)
        })
        .await
        .map_err(|e| self.db_err("copy", e))?
        .map_err(|e| self.db_err("copy", e))?;
        let file = std::fs::File::open(&copy).map_err(|e| Error::Io {
            action: "open",
            path: copy.display().to_string(),
            source: e,
        })?;
        if let Ok(m) = file.metadata() {
            backup.expect_bytes(m.len());
        }
        backup
            .add_stream(STREAM, EntryType::Stream, file, None, None)
            .await?;
        let mut positions = std::collections::BTreeMap::new();
        positions.insert(
            crate::census::POSITION.to_owned(),
            serde_json::to_value(&census).expect("census serializes"),
        );
        Ok(BackupInfo {
            kind: SnapshotKind::Physical,
            database,
            positions,
        })
    }

    async fn restore(
        &self,
        repo: &Repository,
        id: &str,
        snapshot: &Snapshot,
        target: &Path,
    ) -> Result<RestoreReport> {
        let wrong = |reason: &str| Error::WrongSnapshot {
            snapshot: id.to_owned(),
            engine: "sqlite",
            reason: reason.to_owned(),
        };
        if snapshot.engine != "sqlite" {
            return Err(wrong(&format!(
                "it was made by the {} engine",
                snapshot.engine
            )));
        }
        let stream = snapshot
            .streams
            .iter()
            .find(|s| s.name == STREAM)
            .ok_or_else(|| wrong("it has no database stream"))?;
        let io = |action: &'static str, p: &Path, e: std::io::Error| Error::Io {
            action,
            path: p.display().to_string(),
            source: e,
        };
        if target.exists() {
            return Err(io(
                "restore to",
                target,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the target exists; remove it or choose another path",
                ),
            ));
        }
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        // Restore beside the target, verify, then rename: never a partial database in place.
        let tmp = tempfile::Builder::new()
            .prefix(".tidemark-restore-")
            .tempfile_in(dir)
            .map_err(|e| io("create a temporary file in", dir, e))?;
        let file = tmp.reopen().map_err(|e| io("open", tmp.path(), e))?;
        let index = repo
            .load_index_for(snapshot.streams.iter().flat_map(|s| &s.chunks))
            .await?;
        let bytes = restore_stream(
            repo,
            &index,
            stream,
            std::io::BufWriter::with_capacity(1 << 20, file),
            &RestoreOptions::default(),
            Arc::new(Progress::default()),
        )
        .await?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| io("sync", tmp.path(), e))?;
        let check_path = tmp.path().to_owned();
        let verdict = tokio::task::spawn_blocking(move || {
            let v = integrity_check(&check_path);
            // Nothing but the target may remain, whatever the check found.
            remove_sidecars(&check_path);
            v
        })
        .await
        .map_err(|e| self.db_err("verify", e))?
        .map_err(|e| Error::Verification {
            database: target.display().to_string(),
            reason: e.to_string(),
        })?;
        if verdict != "ok" {
            return Err(Error::Verification {
                database: target.display().to_string(),
                reason: verdict,
            });
        }
        tmp.persist_noclobber(target)
            .map_err(|e| io("move the restored database to", target, e.error))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(RestoreReport {
            target: target.display().to_string(),
            bytes,
            verified: Some("PRAGMA integrity_check: ok".into()),
            elsewhere: Vec::new(),
            delta: None,
        })
    }
}

/// A restored database opened read-only, for verification queries.
#[derive(Debug)]
pub struct ReadOnly(Connection);

impl ReadOnly {
    /// Open `path` (a restored database nothing else writes) read-only.
    ///
    /// # Errors
    /// SQLite's.
    pub fn open(path: &Path) -> rusqlite::Result<ReadOnly> {
        open_still(path).map(ReadOnly)
    }

    /// The first column of the first row of `sql`, as text (NULL is empty).
    ///
    /// # Errors
    /// SQLite's, and a query that returns no row.
    pub fn query_text(&self, sql: &str) -> rusqlite::Result<String> {
        self.0.query_row(sql, [], |r| {
            Ok(match r.get_ref(0)? {
                rusqlite::types::ValueRef::Null => String::new(),
                rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                rusqlite::types::ValueRef::Real(v) => v.to_string(),
                rusqlite::types::ValueRef::Text(v) | rusqlite::types::ValueRef::Blob(v) => {
                    String::from_utf8_lossy(v).into_owned()
                }
            })
        })
    }
}
