//! A bandwidth limit in bytes per second, shared by every operation through the layer.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use crate::error::Result;
use crate::storage::{Capabilities, ObjectMeta, PutMode, Storage, Upload};

/// Paces transfers so that, over time, no more than the limit flows in each direction.
#[derive(Debug)]
pub struct ThrottleLayer {
    inner: Arc<dyn Storage>,
    upload: Option<Pacer>,
    download: Option<Pacer>,
}

#[derive(Debug)]
struct Pacer {
    rate: u64,
    next_free: Mutex<Instant>,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Pacer {
            rate: rate.max(1),
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// Reserve the link for `bytes` and return when that reservation ends.
    fn reserve(&self, bytes: u64) -> Instant {
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*next).max(Instant::now());
        *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        *next
    }
}

impl ThrottleLayer {
    /// Wrap `inner` with optional upload and download limits in bytes per second.
    pub fn new(inner: Arc<dyn Storage>, upload: Option<u64>, download: Option<u64>) -> Self {
        ThrottleLayer {
            inner,
            upload: upload.map(Pacer::new),
            download: download.map(Pacer::new),
        }
    }

    async fn after_download(&self, bytes: u64) {
        if let Some(p) = &self.download {
            tokio::time::sleep_until(p.reserve(bytes)).await;
        }
    }
}

#[async_trait]
impl Storage for ThrottleLayer {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<()> {
        if let Some(p) = &self.upload {
            tokio::time::sleep_until(p.reserve(data.len() as u64)).await;
        }
        self.inner.put(path, data, mode).await
    }
    async fn put_multipart(&self, path: &str) -> Result<Box<dyn Upload>> {
        let inner = self.inner.put_multipart(path).await?;
        match &self.upload {
            Some(p) => Ok(Box::new(ThrottledUpload {
                inner,
                pacer: Pacer::new(p.rate),
            })),
            None => Ok(inner),
        }
    }
    async fn get(&self, path: &str) -> Result<Bytes> {
        let b = self.inner.get(path).await?;
        self.after_download(b.len() as u64).await;
        Ok(b)
    }
    async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        let b = self.inner.get_range(path, range).await?;
        self.after_download(b.len() as u64).await;
        Ok(b)
    }
    async fn head(&self, path: &str) -> Result<ObjectMeta> {
        self.inner.head(path).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, path: &str) -> Result<()> {
        self.inner.delete(path).await
    }
    async fn sweep(&self, older_than: std::time::Duration) -> Result<u64> {
        self.inner.sweep(older_than).await
    }
}

struct ThrottledUpload {
    inner: Box<dyn Upload>,
    pacer: Pacer,
}

#[async_trait]
impl Upload for ThrottledUpload {
    async fn write_part(&mut self, data: Bytes) -> Result<()> {
        tokio::time::sleep_until(self.pacer.reserve(data.len() as u64)).await;
        self.inner.write_part(data).await
    }
    async fn complete(self: Box<Self>) -> Result<()> {
        self.inner.complete().await
    }
    async fn abort(self: Box<Self>) -> Result<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ObjectStorage;

    #[tokio::test(start_paused = true)]
    async fn uploads_are_paced_to_the_limit() {
        let s = ThrottleLayer::new(Arc::new(ObjectStorage::memory()), Some(1000), None);
        let start = Instant::now();
        for i in 0..5 {
            s.put(
                &format!("x/{i}"),
                Bytes::from(vec![0u8; 1000]),
                PutMode::CreateNew,
            )
            .await
            .unwrap();
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(4900),
            "5000 bytes at 1000 B/s took {took:?}"
        );
    }
}
