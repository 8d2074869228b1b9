//! A fault-injecting layer for tests: fails chosen operations, transiently or for good.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{Capabilities, ObjectMeta, PutMode, Storage, Upload};

/// Which calls fail.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Every n-th call (1 = every call) fails with `ErrorKind::Transient`; 0 disables.
    pub transient_every: u64,
    /// Calls on paths starting with this prefix fail with `ErrorKind::Permanent`.
    pub permanent_prefix: Option<String>,
    /// Only calls that write (put, delete) are affected.
    pub writes_only: bool,
}

impl FaultPlan {
    /// Every n-th call fails transiently.
    pub fn transient_every(n: u64) -> Self {
        FaultPlan {
            transient_every: n,
            ..Default::default()
        }
    }
    /// Every call under `prefix` fails permanently.
    pub fn permanent_under(prefix: &str) -> Self {
        FaultPlan {
            permanent_prefix: Some(prefix.to_owned()),
            ..Default::default()
        }
    }
}

/// Wraps a storage and injects the failures of a `FaultPlan`. For tests only: it exists because
/// real servers cannot be made to fail on cue.
#[derive(Debug)]
pub struct FaultLayer {
    inner: Arc<dyn Storage>,
    plan: std::sync::RwLock<FaultPlan>,
    calls: AtomicU64,
    injected: AtomicU64,
}

impl FaultLayer {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Storage>, plan: FaultPlan) -> Self {
        FaultLayer {
            inner,
            plan: std::sync::RwLock::new(plan),
            calls: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// Change the plan, for faults that start in the middle of an operation.
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.write().unwrap_or_else(|p| p.into_inner()) = plan;
    }

    /// How many faults have been injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    fn check(&self, op: &'static str, path: &str, write: bool) -> Result<()> {
        let plan = self.plan.read().unwrap_or_else(|p| p.into_inner()).clone();
        if plan.writes_only && !write {
            return Ok(());
        }
        if let Some(prefix) = &plan.permanent_prefix {
            if path.starts_with(prefix.as_str()) {
                self.injected.fetch_add(1, Ordering::SeqCst);
                return Err(
                    Error::new(ErrorKind::Permanent, op, path, self.inner.name())
                        .with_source("injected permanent fault"),
                );
            }
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if plan.transient_every > 0 && n.is_multiple_of(plan.transient_every) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(
                Error::new(ErrorKind::Transient, op, path, self.inner.name())
                    .with_source("injected transient fault"),
            );
        }
        Ok(())
    }
}

#[async_trait]
impl Storage for FaultLayer {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<()> {
        self.check("upload", path, true)?;
        self.inner.put(path, data, mode).await
    }
    async fn put_multipart(&self, path: &str) -> Result<Box<dyn Upload>> {
        self.check("upload", path, true)?;
        self.inner.put_multipart(path).await
    }
    async fn get(&self, path: &str) -> Result<Bytes> {
        self.check("read", path, false)?;
        self.inner.get(path).await
    }
    async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        self.check("read", path, false)?;
        self.inner.get_range(path, range).await
    }
    async fn head(&self, path: &str) -> Result<ObjectMeta> {
        self.check("stat", path, false)?;
        self.inner.head(path).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.check("list", prefix, false)?;
        self.inner.list(prefix).await
    }
    async fn delete(&self, path: &str) -> Result<()> {
        self.check("delete", path, true)?;
        self.inner.delete(path).await
    }
    async fn sweep(&self, older_than: std::time::Duration) -> Result<u64> {
        self.inner.sweep(older_than).await
    }
}
