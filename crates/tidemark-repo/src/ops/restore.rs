//! Restore: fetch blobs by range in parallel, verify each chunk, write in order through a bounded
//! window so memory does not grow with the stream.

use std::io::Write;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::id::PackId;
use crate::index::MasterIndex;
use crate::pack::{open_blob_into, PackEntry};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::StreamEntry;

/// Options for restores: shared by the CLI, the agent and tests.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Ranged reads in flight (default 4).
    pub concurrency: usize,
    /// Raw bytes fetched per read at most (default 4 MiB). Memory is about
    /// `concurrency × window` plus the writer's queue.
    pub window: u64,
    /// Largest gap of unneeded bytes read to join two blobs into one request (default 1 MiB).
    pub max_gap: u64,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            concurrency: 4,
            window: 4 << 20,
            max_gap: 1 << 20,
        }
    }
}

/// One ranged read: consecutive chunks of the stream that lie close together in one pack.
#[derive(Debug)]
struct Group {
    pack: PackId,
    start: u64,
    end: u64,
    raw: u64,
    entries: Vec<PackEntry>,
}

fn plan(index: &MasterIndex, entry: &StreamEntry, opts: &RestoreOptions) -> Result<Vec<Group>> {
    let mut groups: Vec<Group> = Vec::new();
    for id in &entry.chunks {
        let (pack, c) = index.get(id).ok_or_else(|| Error::MissingChunk {
            chunk: id.to_hex(),
            stream: entry.name.clone(),
        })?;
        let e = PackEntry::from(c);
        let (start, end) = (c.offset as u64, c.offset as u64 + c.length as u64);
        if let Some(g) = groups.last_mut() {
            let joinable = g.pack == pack.id
                && start >= g.end
                && start - g.end <= opts.max_gap
                && g.raw + c.raw_length as u64 <= opts.window;
            if joinable {
                g.end = end;
                g.raw += c.raw_length as u64;
                g.entries.push(e);
                continue;
            }
        }
        groups.push(Group {
            pack: pack.id,
            start,
            end,
            raw: c.raw_length as u64,
            entries: vec![e],
        });
    }
    Ok(groups)
}

thread_local! {
    /// Per-thread buffer for decrypted payloads.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spare chunk buffers, bounded so the pool never holds more than a restore window's worth.
#[derive(Default)]
struct BufferPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    const MAX: usize = 16;

    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    fn put(&self, mut b: Vec<u8>) {
        b.clear();
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < Self::MAX {
            v.push(b);
        }
    }
}

/// Write the content of `entry` to `writer`, verifying every chunk before any of its bytes
/// are written. Returns the bytes written.
///
/// # Errors
/// `MissingChunk` before anything is written if a chunk is in no index; `Corrupt` naming the pack
/// and chunk when verification fails; `Io` when writing fails.
pub async fn restore_stream<W: Write + Send + 'static>(
    repo: &Repository,
    index: &MasterIndex,
    entry: &StreamEntry,
    writer: W,
    opts: &RestoreOptions,
    progress: Arc<Progress>,
) -> Result<u64> {
    let groups = plan(index, entry, opts)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(2);
    let name = entry.name.clone();
    // Chunk buffers go round: decoders fill them, the writer empties them and hands them back.
    let pool = Arc::new(BufferPool::default());
    let writer_pool = pool.clone();
    let writer_thread = std::thread::spawn(move || -> std::io::Result<(u64, W)> {
        let mut w = writer;
        let mut n = 0u64;
        for batch in rx {
            for b in batch {
                w.write_all(&b)?;
                n += b.len() as u64;
                writer_pool.put(b);
            }
        }
        w.flush()?;
        Ok((n, w))
    });

    let fetch = futures::stream::iter(groups)
        .map(|g| {
            let (repo, pool) = (repo.clone(), pool.clone());
            async move {
                let path = g.pack.path();
                let data = repo.storage().get_range(&path, g.start..g.end).await?;
                let keys = repo.keys().clone();
                tokio::task::spawn_blocking(move || {
                    SCRATCH.with_borrow_mut(|scratch| {
                        g.entries
                            .iter()
                            .map(|e| {
                                let off = (e.offset as u64 - g.start) as usize;
                                let mut out = pool.take();
                                open_blob_into(
                                    &keys,
                                    e,
                                    &data[off..off + e.length as usize],
                                    &path,
                                    scratch,
                                    &mut out,
                                )?;
                                Ok(out)
                            })
                            .collect::<Result<Vec<Vec<u8>>>>()
                    })
                })
                .await
                .map_err(|e| Error::Invalid(format!("decode task failed: {e}")))?
            }
        })
        .buffered(opts.concurrency.max(1));

    let sent: Result<()> = fetch
        .try_for_each(|batch| {
            let raw: u64 = batch.iter().map(|b| b.len() as u64).sum();
            Progress::add(&progress.bytes, raw);
            let r = tx.send(batch).map_err(|_| {
                Error::io(
                    "write",
                    name.clone(),
                    std::io::Error::other("writer stopped"),
                )
            });
            async move { r }
        })
        .await;
    drop(tx);
    let written = writer_thread
        .join()
        .map_err(|_| Error::Invalid("writer thread panicked".into()))?;
    // A failed write stops the fetches too; report the write's own error, not the symptom.
    let (n, _) = written.map_err(|e| Error::io("write", entry.name.clone(), e))?;
    sent?;
    if n != entry.size {
        return Err(Error::corrupt(
            format!("snapshot stream {:?}", entry.name),
            format!("restored {n} bytes, expected {}", entry.size),
        ));
    }
    Progress::add(&progress.items, 1);
    Ok(n)
}
