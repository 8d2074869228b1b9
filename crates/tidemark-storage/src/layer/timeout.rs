//! Deadlines per operation, scaled by the bytes moved, so a dead endpoint fails instead of hanging.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{Capabilities, ObjectMeta, PutMode, Storage, Upload};

/// Fails an operation with `ErrorKind::Timeout` when it takes longer than
/// `base + bytes / min_throughput`.
#[derive(Debug)]
pub struct TimeoutLayer {
    inner: Arc<dyn Storage>,
    base: Duration,
    min_throughput: u64,
}

/// Size assumed for whole-object reads, whose size is not known in advance (a large pack).
const ASSUMED_OBJECT_SIZE: u64 = 64 << 20;

impl TimeoutLayer {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Storage>, base: Duration, min_throughput: u64) -> Self {
        TimeoutLayer {
            inner,
            base,
            min_throughput: min_throughput.max(1),
        }
    }

    fn limit(&self, bytes: u64) -> Duration {
        self.base + Duration::from_secs_f64(bytes as f64 / self.min_throughput as f64)
    }

    async fn run<T>(
        &self,
        op: &'static str,
        path: &str,
        bytes: u64,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let limit = self.limit(bytes);
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorKind::Timeout, op, path, self.inner.name())
                .with_source(format!("no answer within {:.0?}", limit))),
        }
    }
}

#[async_trait]
impl Storage for TimeoutLayer {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<()> {
        let n = data.len() as u64;
        self.run("upload", path, n, self.inner.put(path, data, mode))
            .await
    }
    async fn put_multipart(&self, path: &str) -> Result<Box<dyn Upload>> {
        self.run("upload", path, 0, self.inner.put_multipart(path))
            .await
    }
    async fn get(&self, path: &str) -> Result<Bytes> {
        self.run("read", path, ASSUMED_OBJECT_SIZE, self.inner.get(path))
            .await
    }
    async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        let n = range.end.saturating_sub(range.start);
        self.run("read", path, n, self.inner.get_range(path, range))
            .await
    }
    async fn head(&self, path: &str) -> Result<ObjectMeta> {
        self.run("stat", path, 0, self.inner.head(path)).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        // Listing a large repository takes many pages; allow for it.
        self.run("list", prefix, ASSUMED_OBJECT_SIZE, self.inner.list(prefix))
            .await
    }
    async fn delete(&self, path: &str) -> Result<()> {
        self.run("delete", path, 0, self.inner.delete(path)).await
    }
    async fn sweep(&self, older_than: std::time::Duration) -> Result<u64> {
        self.inner.sweep(older_than).await
    }
}
