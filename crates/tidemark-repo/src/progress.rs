//! Counters that long operations update and a front end (progress bar, metrics) reads.

use std::sync::atomic::{AtomicU64, Ordering};

/// Shared counters; all monotone.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes read from sources (backup) or written to targets (restore).
    pub bytes: AtomicU64,
    /// Bytes stored newly in the repository (backup) or read from it (restore).
    pub stored: AtomicU64,
    /// Items (streams, files, packs) finished.
    pub items: AtomicU64,
    /// Bytes `bytes` will reach in all, where a producer knows it (0: unknown).
    pub total: AtomicU64,
}

impl Progress {
    /// Add to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
