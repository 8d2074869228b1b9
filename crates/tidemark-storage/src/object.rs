//! Locations served by the `object_store` crate: S3 and compatibles, GCS, Azure Blob, memory.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutOptions, PutPayload};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{Capabilities, ObjectMeta, PutMode, Storage, Upload};

/// A location backed by any `object_store::ObjectStore`, under an optional prefix.
#[derive(Debug, Clone)]
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    name: String,
    caps: Capabilities,
}

impl ObjectStorage {
    /// Wrap `store`. `prefix` (without leading or trailing `/`) is prepended to every path.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        name: impl Into<String>,
        caps: Capabilities,
    ) -> Self {
        ObjectStorage {
            store,
            prefix: prefix.trim_matches('/').to_owned(),
            name: name.into(),
            caps,
        }
    }

    /// An in-memory location, for tests and dry runs.
    pub fn memory() -> Self {
        let caps = Capabilities {
            atomic_create: true,
            multipart: true,
            multipart_part_size: 5 << 20,
            list_modified_time: true,
            durable: false,
        };
        ObjectStorage::new(
            Arc::new(object_store::memory::InMemory::new()),
            "",
            "memory",
            caps,
        )
    }

    fn full(&self, op: &'static str, path: &str) -> Result<StorePath> {
        if path.starts_with('/') || path.split('/').any(|c| c == "." || c == "..") {
            return Err(Error::new(ErrorKind::Invalid, op, path, &self.name));
        }
        let full = if self.prefix.is_empty() {
            path.to_owned()
        } else {
            format!("{}/{}", self.prefix, path)
        };
        StorePath::parse(&full)
            .map_err(|e| Error::new(ErrorKind::Invalid, op, path, &self.name).with_source(e))
    }

    fn relative(&self, p: &StorePath) -> String {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            s.to_owned()
        } else {
            s.strip_prefix(&self.prefix)
                .map(|r| r.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| s.to_owned())
        }
    }

    fn err(&self, e: object_store::Error, op: &'static str, path: &str) -> Error {
        Error::from_object_store(e, op, path, &self.name)
    }
}

#[async_trait]
impl Storage for ObjectStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<()> {
        let p = self.full("upload", path)?;
        let mode = match mode {
            PutMode::CreateNew if self.caps.atomic_create => object_store::PutMode::Create,
            PutMode::CreateNew => {
                // Emulated create-if-absent: documented as racy in Capabilities::atomic_create.
                match self.store.head(&p).await {
                    Ok(_) => {
                        return Err(Error::new(
                            ErrorKind::AlreadyExists,
                            "upload",
                            path,
                            &self.name,
                        ))
                    }
                    Err(object_store::Error::NotFound { .. }) => object_store::PutMode::Overwrite,
                    Err(e) => return Err(self.err(e, "upload", path)),
                }
            }
            PutMode::Overwrite => object_store::PutMode::Overwrite,
        };
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        self.store
            .put_opts(&p, PutPayload::from_bytes(data), opts)
            .await
            .map_err(|e| self.err(e, "upload", path))?;
        Ok(())
    }

    async fn put_multipart(&self, path: &str) -> Result<Box<dyn Upload>> {
        let p = self.full("upload", path)?;
        let upload = self
            .store
            .put_multipart(&p)
            .await
            .map_err(|e| self.err(e, "upload", path))?;
        Ok(Box::new(StoreUpload {
            upload,
            path: path.to_owned(),
            name: self.name.clone(),
        }))
    }

    async fn get(&self, path: &str) -> Result<Bytes> {
        let p = self.full("read", path)?;
        let r = self
            .store
            .get(&p)
            .await
            .map_err(|e| self.err(e, "read", path))?;
        r.bytes().await.map_err(|e| self.err(e, "read", path))
    }

    async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        let p = self.full("read", path)?;
        let want = range.end - range.start;
        let b = self
            .store
            .get_range(&p, range)
            .await
            .map_err(|e| self.err(e, "read", path))?;
        if b.len() as u64 != want {
            return Err(Error::new(ErrorKind::Invalid, "read", path, &self.name)
                .with_source(format!("asked for {want} bytes, got {}", b.len())));
        }
        Ok(b)
    }

    async fn head(&self, path: &str) -> Result<ObjectMeta> {
        let p = self.full("stat", path)?;
        let m = self
            .store
            .head(&p)
            .await
            .map_err(|e| self.err(e, "stat", path))?;
        Ok(ObjectMeta {
            path: path.to_owned(),
            size: m.size,
            modified: m.last_modified,
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        // object_store lists by path segments; list the directory part and filter the rest.
        let dir = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let dir_path = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, true) => None,
            (true, false) => Some(self.full("list", dir)?),
            (false, true) => Some(StorePath::from(self.prefix.as_str())),
            (false, false) => Some(self.full("list", dir)?),
        };
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(dir_path.as_ref())
            .try_collect()
            .await
            .map_err(|e| self.err(e, "list", prefix))?;
        Ok(metas
            .into_iter()
            .map(|m| ObjectMeta {
                path: self.relative(&m.location),
                size: m.size,
                modified: m.last_modified,
            })
            .filter(|m| {
                m.path.starts_with(prefix)
                    && !m
                        .path
                        .split('/')
                        .any(|c| c.starts_with('.') || c.contains('#'))
            })
            .collect())
    }

    async fn delete(&self, path: &str) -> Result<()> {
        let p = self.full("delete", path)?;
        match self.store.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(e, "delete", path)),
        }
    }
}

struct StoreUpload {
    upload: Box<dyn object_store::MultipartUpload>,
    path: String,
    name: String,
}

#[async_trait]
impl Upload for StoreUpload {
    async fn write_part(&mut self, data: Bytes) -> Result<()> {
        self.upload
            .put_part(PutPayload::from_bytes(data))
            .await
            .map_err(|e| Error::from_object_store(e, "upload", &self.path, &self.name))
    }

    async fn complete(mut self: Box<Self>) -> Result<()> {
        self.upload
            .complete()
            .await
            .map_err(|e| Error::from_object_store(e, "upload", &self.path, &self.name))?;
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.upload
            .abort()
            .await
            .map_err(|e| Error::from_object_store(e, "upload", &self.path, &self.name))
    }
}
