//! Helpers shared by the repository's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use tidemark_repo::config::InitOptions;
use tidemark_repo::id::SnapshotId;
use tidemark_repo::key::{KdfParams, Secret};
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::backup::{Backup, BackupOptions, Cutting};
use tidemark_repo::progress::Progress;
use tidemark_repo::snapshot::{EntryType, Snapshot};
use tidemark_repo::Repository;
use tidemark_storage::{ObjectStorage, Storage};

/// Deterministic dump-like text: rows of a table with ids, names and numbers.
pub fn dump_like(rows: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(rows * 60);
    for i in 0..rows {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(
            format!(
                "{i}\t{}\tname-{:08x}\t{}.{:02}\n",
                x % 1000,
                x >> 40,
                (x >> 20) % 100000,
                x % 100
            )
            .as_bytes(),
        );
    }
    out
}

pub fn small_init() -> InitOptions {
    InitOptions {
        kdf: KdfParams::insecure_for_tests(),
        ..Default::default()
    }
}

pub async fn memory_repo() -> (Arc<dyn Storage>, Repository) {
    let s: Arc<dyn Storage> = Arc::new(ObjectStorage::memory());
    let r = Repository::init(s.clone(), &Secret::password("pw"), &small_init())
        .await
        .unwrap();
    (s, r)
}

pub async fn backup_bytes(repo: &Repository, name: &str, data: Vec<u8>) -> (SnapshotId, Snapshot) {
    backup_cut(repo, name, data, Cutting::ContentDefined, true).await
}

/// One backup of `data` as the stream `name`, cut as `cut`, read as a stream or (`streamed`
/// false) handed over in memory.
pub async fn backup_cut(
    repo: &Repository,
    name: &str,
    data: Vec<u8>,
    cut: Cutting,
    streamed: bool,
) -> (SnapshotId, Snapshot) {
    let lock = LockGuard::acquire(repo, LockKind::Shared, "backup", &LockOptions::default())
        .await
        .unwrap();
    let mut b = Backup::start(
        repo,
        &lock,
        BackupOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    let kind = match cut {
        Cutting::ContentDefined => EntryType::Stream,
        Cutting::Fixed(_) => EntryType::File,
    };
    if streamed {
        b.add_stream_cut(name, kind, std::io::Cursor::new(data), None, None, cut)
            .await
            .unwrap();
    } else {
        b.add_bytes_cut(name, kind, data, None, None, cut)
            .await
            .unwrap();
    }
    let r = b.finish(Default::default()).await.unwrap();
    lock.release().await.unwrap();
    r
}

/// One backup of several files, each cut as `cut` and handed over in memory.
pub async fn backup_files(repo: &Repository, files: &[(&str, &Vec<u8>)], cut: Cutting) -> Snapshot {
    let lock = LockGuard::acquire(repo, LockKind::Shared, "backup", &LockOptions::default())
        .await
        .unwrap();
    let mut b = Backup::start(
        repo,
        &lock,
        BackupOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    for (name, data) in files {
        b.add_bytes_cut(name, EntryType::File, (*data).clone(), None, None, cut)
            .await
            .unwrap();
    }
    let (_, snap) = b.finish(Default::default()).await.unwrap();
    lock.release().await.unwrap();
    snap
}

/// The first stream of `snap`, read as a restore reads it (`load_index_for`).
pub async fn restore_bytes(repo: &Repository, snap: &Snapshot) -> tidemark_repo::Result<Vec<u8>> {
    let index = repo.load_index_for(&snap.streams[0].chunks).await?;
    tidemark_repo::ops::restore::read_stream(
        repo,
        &index,
        &snap.streams[0],
        Arc::new(Progress::default()),
    )
    .await
}

#[derive(Clone, Default)]
pub struct SharedBuf(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
