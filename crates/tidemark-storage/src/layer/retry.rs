//! Retry with exponential backoff and jitter for failures classified as transient.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::storage::{Capabilities, ObjectMeta, PutMode, Storage, Upload};

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts including the first; 1 disables retries.
    pub attempts: u32,
    /// Delay before the first retry; doubled each time.
    pub backoff: Duration,
    /// Longest delay.
    pub max_backoff: Duration,
}

/// Retries operations whose error `is_retryable()`.
///
/// A `put` with `PutMode::CreateNew` whose first attempt reached the server but whose answer was
/// lost will see `AlreadyExists` on retry; that is returned as is. Repository objects are named by
/// their content, so callers treat it as success (section 8 of the format).
#[derive(Debug)]
pub struct RetryLayer {
    inner: Arc<dyn Storage>,
    policy: RetryPolicy,
}

impl RetryLayer {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Storage>, policy: RetryPolicy) -> Self {
        RetryLayer { inner, policy }
    }

    async fn run<T, F, Fut>(&self, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T>> + Send,
        T: Send,
    {
        let mut delay = self.policy.backoff;
        let mut attempt = 1;
        loop {
            match f().await {
                Err(e) if e.is_retryable() && attempt < self.policy.attempts => {
                    // Full jitter keeps many clients from retrying in lockstep.
                    let sleep = delay.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                    tracing::warn!(error = %e, cause = ?e.source.as_ref().map(|s| s.to_string()),
                        attempt, retry_in_ms = sleep.as_millis() as u64, "retrying storage operation");
                    tokio::time::sleep(sleep).await;
                    delay = (delay * 2).min(self.policy.max_backoff);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl Storage for RetryLayer {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<()> {
        self.run(|| self.inner.put(path, data.clone(), mode)).await
    }
    async fn put_multipart(&self, path: &str) -> Result<Box<dyn Upload>> {
        self.run(|| self.inner.put_multipart(path)).await
    }
    async fn get(&self, path: &str) -> Result<Bytes> {
        self.run(|| self.inner.get(path)).await
    }
    async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        self.run(|| self.inner.get_range(path, range.clone())).await
    }
    async fn head(&self, path: &str) -> Result<ObjectMeta> {
        self.run(|| self.inner.head(path)).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.run(|| self.inner.list(prefix)).await
    }
    async fn delete(&self, path: &str) -> Result<()> {
        self.run(|| self.inner.delete(path)).await
    }
    async fn sweep(&self, older_than: std::time::Duration) -> Result<u64> {
        self.run(|| self.inner.sweep(older_than)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{FaultLayer, FaultPlan};
    use crate::{ErrorKind, ObjectStorage};

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_the_operation_succeeds() {
        let faulty = Arc::new(FaultLayer::new(
            Arc::new(ObjectStorage::memory()),
            FaultPlan::transient_every(2),
        ));
        let s = RetryLayer::new(faulty.clone(), policy(3));
        for i in 0..10 {
            s.put(
                &format!("o/{i}"),
                Bytes::from_static(b"x"),
                PutMode::CreateNew,
            )
            .await
            .unwrap();
        }
        assert!(
            faulty.injected() >= 5,
            "faults were injected: {}",
            faulty.injected()
        );
        assert_eq!(s.list("o/").await.unwrap().len(), 10);
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried_and_name_the_object() {
        let faulty = Arc::new(FaultLayer::new(
            Arc::new(ObjectStorage::memory()),
            FaultPlan::permanent_under("data/"),
        ));
        let s = RetryLayer::new(faulty.clone(), policy(5));
        let e = s
            .put("data/ab/cd", Bytes::from_static(b"x"), PutMode::CreateNew)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent);
        assert_eq!(faulty.injected(), 1);
        assert!(
            e.to_string().contains("data/ab/cd") && e.to_string().contains("memory"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn retries_give_up_after_the_configured_attempts() {
        let faulty = Arc::new(FaultLayer::new(
            Arc::new(ObjectStorage::memory()),
            FaultPlan::transient_every(1),
        ));
        let s = RetryLayer::new(faulty.clone(), policy(4));
        let e = s.get("missing").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient);
        assert_eq!(faulty.injected(), 4);
    }
}
