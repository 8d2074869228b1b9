//! The local filesystem, written directly so that every acknowledged write is fsynced.
//!
//! `object_store`'s `LocalFileSystem` does not fsync files or directories, so a power loss could
//! lose a pack that a later snapshot refers to. This implementation writes to a temporary file,
//! fsyncs it, links it into place (atomic create-if-absent) and fsyncs the directory.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{Capabilities, ObjectMeta, PutMode, Storage, Upload};

/// A location in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
    name: String,
}

impl LocalStorage {
    /// A location rooted at `root`, which is created if it does not exist.
    ///
    /// # Errors
    /// Fails if `root` cannot be created.
    pub fn new(root: impl Into<PathBuf>, name: impl Into<String>) -> Result<Self> {
        let root = root.into();
        let name = name.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| io_error(e, "create", &root.display().to_string(), &name))?;
        Ok(LocalStorage { root, name })
    }

    fn path(&self, op: &'static str, rel: &str) -> Result<PathBuf> {
        if rel.is_empty()
            || rel.starts_with('/')
            || rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(Error::new(ErrorKind::Invalid, op, rel, &self.name));
        }
        Ok(self.root.join(rel))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        rel: &str,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (name, rel2) = (self.name.clone(), rel.to_owned());
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r.map_err(|e| io_error(e, op, &rel2, &name)),
            Err(e) => Err(Error::new(ErrorKind::Permanent, op, rel, &self.name).with_source(e)),
        }
    }
}

fn io_error(e: std::io::Error, op: &'static str, path: &str, location: &str) -> Error {
    use std::io::ErrorKind as K;
    let kind = match e.kind() {
        K::NotFound => ErrorKind::NotFound,
        K::AlreadyExists => ErrorKind::AlreadyExists,
        K::PermissionDenied => ErrorKind::Denied,
        K::Interrupted | K::TimedOut | K::WouldBlock => ErrorKind::Transient,
        _ => ErrorKind::Permanent,
    };
    Error::new(kind, op, path, location).with_source(e)
}

fn temp_name(dest: &Path) -> PathBuf {
    let file = dest
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".tmp-{}-{:016x}", file, rand::random::<u64>()))
}

/// Remove `.tmp-*` files (temporary files of uploads that never completed) older than
/// `older_than` under `dir`; how many.
fn sweep_dir(dir: &Path, older_than: std::time::Duration) -> std::io::Result<u64> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            removed += sweep_dir(&entry.path(), older_than)?;
            continue;
        }
        let old = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age >= older_than);
        if entry.file_name().to_string_lossy().starts_with(".tmp-") && old {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Move a complete, fsynced temporary file into place and make the rename durable.
fn publish(tmp: &Path, dest: &Path, mode: PutMode) -> std::io::Result<()> {
    let result = match mode {
        // link(2) fails with EEXIST if dest exists: atomic create-if-absent.
        PutMode::CreateNew => std::fs::hard_link(tmp, dest),
        PutMode::Overwrite => std::fs::rename(tmp, dest),
    };
    let _ = std::fs::remove_file(tmp);
    result?;
    sync_dir(dest.parent().unwrap_or(Path::new(".")))
}

/// Objects this large (packs, log segments) are written around the page cache.
const DIRECT_FROM: usize = 1 << 20;

fn write_file(dest: &Path, data: &[u8], mode: PutMode) -> std::io::Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    if mode == PutMode::CreateNew && dest.exists() {
        return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
    }
    let tmp = temp_name(dest);
    let written = (|| {
        let f = std::fs::File::create(&tmp)?;
        if data.len() >= DIRECT_FROM {
            let mut w = crate::direct::DirectWriter::new(f);
            w.write_all(data)?;
            w.finish()?.sync_all()
        } else {
            let mut f = f;
            f.write_all(data)?;
            f.sync_all()
        }
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    publish(&tmp, dest, mode)
}

fn modified(meta: &std::fs::Metadata) -> DateTime<Utc> {
    meta.modified()
        .map(DateTime::<Utc>::from)
        .unwrap_or_else(|_| Utc::now())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<ObjectMeta>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let path = entry.path();
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push(ObjectMeta {
                path: rel,
                size: meta.len(),
                modified: modified(&meta),
            });
        }
    }
    Ok(())
}

#[async_trait]
impl Storage for LocalStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::durable_store()
    }

    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<()> {
        let dest = self.path("upload", path)?;
        self.blocking("upload", path, move || write_file(&dest, &data, mode))
            .await
    }

    async fn put_multipart(&self, path: &str) -> Result<Box<dyn Upload>> {
        let dest = self.path("upload", path)?;
        let tmp = temp_name(&dest);
        let (d2, t2) = (dest.clone(), tmp.clone());
        let file = self
            .blocking("upload", path, move || {
                std::fs::create_dir_all(d2.parent().unwrap_or(Path::new(".")))?;
                std::fs::File::create(&t2)
            })
            .await?;
        Ok(Box::new(LocalUpload {
            file: Some(file),
            tmp,
            dest,
            path: path.to_owned(),
            name: self.name.clone(),
        }))
    }

    async fn get(&self, path: &str) -> Result<Bytes> {
        let p = self.path("read", path)?;
        self.blocking("read", path, move || std::fs::read(p).map(Bytes::from))
            .await
    }

    async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        let p = self.path("read", path)?;
        let (name, rel) = (self.name.clone(), path.to_owned());
        let data = self
            .blocking("read", path, move || {
                use std::io::{Read, Seek, SeekFrom};
                let mut f = std::fs::File::open(p)?;
                let len = f.metadata()?.len();
                if range.end > len || range.start > range.end {
                    return Ok(None);
                }
                f.seek(SeekFrom::Start(range.start))?;
                let mut buf = vec![0u8; (range.end - range.start) as usize];
                f.read_exact(&mut buf)?;
                Ok(Some(Bytes::from(buf)))
            })
            .await?;
        data.ok_or_else(|| {
            Error::new(ErrorKind::Invalid, "read", &rel, &name)
                .with_source("range beyond the end of the object")
        })
    }

    async fn head(&self, path: &str) -> Result<ObjectMeta> {
        let p = self.path("stat", path)?;
        let rel = path.to_owned();
        self.blocking("stat", path, move || {
            let m = std::fs::metadata(p)?;
            Ok(ObjectMeta {
                path: rel,
                size: m.len(),
                modified: modified(&m),
            })
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let root = self.root.clone();
        let prefix2 = prefix.to_owned();
        let mut all = self
            .blocking("list", prefix, move || {
                // Walk only the directory part of the prefix, then filter by the full prefix.
                let dir_part = prefix2.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                let start = if dir_part.is_empty() {
                    root.clone()
                } else {
                    root.join(dir_part)
                };
                let mut out = Vec::new();
                walk(&root, &start, &mut out)?;
                Ok(out)
            })
            .await?;
        all.retain(|m| m.path.starts_with(prefix));
        Ok(all)
    }

    async fn delete(&self, path: &str) -> Result<()> {
        let p = self.path("delete", path)?;
        self.blocking("delete", path, move || match std::fs::remove_file(&p) {
            Ok(()) => sync_dir(p.parent().unwrap_or(Path::new("."))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
    }

    async fn sweep(&self, older_than: std::time::Duration) -> Result<u64> {
        let root = self.root.clone();
        self.blocking("sweep", "", move || sweep_dir(&root, older_than))
            .await
    }
}

struct LocalUpload {
    file: Option<std::fs::File>,
    tmp: PathBuf,
    dest: PathBuf,
    path: String,
    name: String,
}

impl LocalUpload {
    async fn run<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut std::fs::File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Invalid, "upload", &self.path, &self.name))?;
        let (r, file) = tokio::task::spawn_blocking(move || {
            let r = f(&mut file);
            (r, file)
        })
        .await
        .map_err(|e| {
            Error::new(ErrorKind::Permanent, "upload", &self.path, &self.name).with_source(e)
        })?;
        self.file = Some(file);
        r.map_err(|e| io_error(e, "upload", &self.path, &self.name))
    }
}

#[async_trait]
impl Upload for LocalUpload {
    async fn write_part(&mut self, data: Bytes) -> Result<()> {
        self.run(move |f| f.write_all(&data)).await
    }

    async fn complete(mut self: Box<Self>) -> Result<()> {
        self.run(|f| f.sync_all()).await?;
        self.file = None;
        let (tmp, dest) = (self.tmp.clone(), self.dest.clone());
        let r = tokio::task::spawn_blocking(move || publish(&tmp, &dest, PutMode::Overwrite)).await;
        match r {
            Ok(r) => r.map_err(|e| io_error(e, "upload", &self.path, &self.name)),
            Err(e) => Err(
                Error::new(ErrorKind::Permanent, "upload", &self.path, &self.name).with_source(e),
            ),
        }
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.file = None;
        let _ = std::fs::remove_file(&self.tmp);
        Ok(())
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sweep_removes_only_old_temporaries_of_killed_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path(), "test").unwrap();
        s.put(
            "logs/pg/1/wal/seg",
            Bytes::from_static(b"kept"),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
        let wal = dir.path().join("logs/pg/1/wal");
        let old = wal.join(".tmp-seg2-0000000000000001");
        let fresh = wal.join(".tmp-seg3-0000000000000002");
        std::fs::write(&old, b"half").unwrap();
        std::fs::write(&fresh, b"in flight").unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        assert_eq!(
            s.sweep(std::time::Duration::from_secs(3600)).await.unwrap(),
            1
        );
        assert!(!old.exists());
        assert!(fresh.exists(), "a live upload's file was removed");
        assert_eq!(
            s.get("logs/pg/1/wal/seg").await.unwrap(),
            Bytes::from_static(b"kept")
        );
    }
}
