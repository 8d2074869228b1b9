//! Restore: fetch blobs by range in parallel, verify each chunk, write in order through a bounded
//! window so memory does not grow with the stream.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::dict::Dictionaries;
use crate::error::{Error, Result};
use crate::id::PackId;
use crate::index::MasterIndex;
use crate::pack::{open_blob_into, PackEntry};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::{EntryType, StreamEntry};

/// Options for restores: shared by the CLI, the agent and tests.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Ranged reads in flight (default 4).
    pub concurrency: usize,
    /// Raw bytes fetched per read at most (default 4 MiB).
    pub window: u64,
    /// Largest gap of unneeded bytes read to join two blobs into one request (default 1 MiB).
    pub max_gap: u64,
    /// The memory the reads in flight may hold, fetched and decoded, until the writer has
    /// written them; shared by every stream of one restore (a tree restores several files at
    /// once). `None`: a budget of `DEFAULT_BUDGET` for this stream alone.
    pub budget: Option<Budget>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            concurrency: 4,
            window: 4 << 20,
            max_gap: 1 << 20,
            budget: None,
        }
    }
}

/// The memory budget of one restore when none is given.
pub const DEFAULT_BUDGET: u64 = 32 << 20;

/// Bytes of restore data in memory, at most: each ranged read takes its share (the bytes
/// fetched plus the bytes they decode to) before it starts, and gives it back once the
/// writer has written them. Shared by the streams of one restore, so that restoring several
/// files at once does not multiply the memory (it did: four files, each with four reads of
/// up to 4 MiB and its queues, held about 160 MiB).
#[derive(Debug, Clone)]
pub struct Budget {
    sem: Arc<tokio::sync::Semaphore>,
    units: u32,
}

/// The budget's unit.
const BUDGET_UNIT: u64 = 64 << 10;

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Budget {
        let units = (bytes / BUDGET_UNIT).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        Budget {
            sem: Arc::new(tokio::sync::Semaphore::new(units as usize)),
            units,
        }
    }

    /// Take `bytes` of the budget (the whole budget when more is asked for, so a read never
    /// waits for what cannot be), waiting in turn. The semaphore is fair: the reads of one
    /// stream, which ask in stream order, get theirs in that order, so no stream holds memory
    /// for a later read while an earlier one of its own waits, and the writers always drain.
    async fn take(&self, bytes: u64) -> tokio::sync::OwnedSemaphorePermit {
        let want = bytes.div_ceil(BUDGET_UNIT).clamp(1, u64::from(self.units)) as u32;
        self.sem
            .clone()
            .acquire_many_owned(want)
            .await
            .expect("the budget is never closed")
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
    let dicts = repo.dictionaries().await?;
    let budget = opts
        .budget
        .clone()
        .unwrap_or_else(|| Budget::new(DEFAULT_BUDGET));
    // Each batch travels with its share of the budget, given back once it is written.
    type Batch = (Vec<Vec<u8>>, tokio::sync::OwnedSemaphorePermit);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
    let name = entry.name.clone();
    // Chunk buffers go round: decoders fill them, the writer empties them and hands them back.
    let pool = Arc::new(BufferPool::default());
    let writer_pool = pool.clone();
    let writer_thread = std::thread::spawn(move || -> std::io::Result<(u64, W)> {
        let mut w = writer;
        let mut n = 0u64;
        for (batch, share) in rx {
            for b in batch {
                w.write_all(&b)?;
                n += b.len() as u64;
                writer_pool.put(b);
            }
            drop(share);
        }
        w.flush()?;
        Ok((n, w))
    });

    let fetch = futures::stream::iter(groups)
        .map(|g| {
            let (repo, pool, dicts, budget) =
                (repo.clone(), pool.clone(), dicts.clone(), budget.clone());
            async move {
                let share = budget.take((g.end - g.start) + g.raw).await;
                let batch = if repo.fallbacks().is_empty() {
                    fetch_group(&repo, g, pool, dicts).await
                } else {
                    let (pack, entries) = (g.pack, g.entries.clone());
                    match fetch_group(&repo, g, pool, dicts).await {
                        Err(e) if matches!(e, Error::Corrupt { .. } | Error::Storage(_)) => {
                            repo.fallbacks().group(&repo, pack, &entries, e).await
                        }
                        r => r,
                    }
                };
                batch.map(|b| (b, share))
            }
        })
        .buffered(opts.concurrency.max(1));

    let sent: Result<()> = fetch
        .try_for_each(|batch| {
            let raw: u64 = batch.0.iter().map(|b| b.len() as u64).sum();
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

/// One ranged read of a pack, each chunk in it opened and verified.
async fn fetch_group(
    repo: &Repository,
    g: Group,
    pool: Arc<BufferPool>,
    dicts: Arc<Dictionaries>,
) -> Result<Vec<Vec<u8>>> {
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
                        &dicts,
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

/// Chunk reads in flight per failed group when falling back on another location.
const FALLBACK_READS: usize = 8;

/// A location's index, loaded on first need (or why it could not be).
type LazyIndex = tokio::sync::OnceCell<std::result::Result<Arc<MasterIndex>, String>>;

/// Other locations of a repository that a restore reads chunks from when the first location's
/// copy of a pack is missing or damaged (format §9a). Packs differ between locations, so each
/// chunk is looked up in that location's own index, loaded on first need.
#[derive(Default)]
pub struct Fallbacks {
    others: Vec<(Repository, LazyIndex)>,
    read: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Fallbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.others.iter().map(|(r, _)| r.location()))
            .finish()
    }
}

impl Fallbacks {
    pub(crate) fn new(others: Vec<Repository>) -> Fallbacks {
        Fallbacks {
            others: others
                .into_iter()
                .map(|r| (r, tokio::sync::OnceCell::new()))
                .collect(),
            read: Default::default(),
        }
    }

    pub(crate) fn repositories(&self) -> Vec<Repository> {
        self.others.iter().map(|(r, _)| r.clone()).collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.others.is_empty()
    }

    pub(crate) fn read_elsewhere(&self) -> u64 {
        self.read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The chunks of a group whose read at `repo` failed with `failed`, each from the first
    /// other location that has it whole; `failed` itself when a chunk is nowhere whole.
    async fn group(
        &self,
        repo: &Repository,
        pack: PackId,
        entries: &[PackEntry],
        failed: Error,
    ) -> Result<Vec<Vec<u8>>> {
        // Chunk by chunk (the packs differ at each location), several reads in flight.
        let got: Vec<std::result::Result<Vec<u8>, String>> =
            futures::stream::iter(entries.to_vec())
                .map(|e| self.chunk(e))
                .buffered(FALLBACK_READS)
                .collect()
                .await;
        let mut out = Vec::with_capacity(entries.len());
        for (e, r) in entries.iter().zip(got) {
            match r {
                Ok(b) => out.push(b),
                Err(why) => {
                    tracing::error!(
                        "chunk {} of pack {} is at no other location whole either: {why}",
                        e.id.short(),
                        pack.short()
                    );
                    return Err(failed);
                }
            }
        }
        self.read
            .fetch_add(entries.len() as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            "{failed}; its {} chunk(s) were read from another location instead: run `tidemark check --read-data` at {}",
            entries.len(),
            repo.location()
        );
        Ok(out)
    }

    /// One chunk from the first other location that has it whole.
    async fn chunk(&self, e: PackEntry) -> std::result::Result<Vec<u8>, String> {
        let mut why = Vec::new();
        for (repo, index) in &self.others {
            let index = index
                .get_or_init(|| async {
                    repo.load_index()
                        .await
                        .map(Arc::new)
                        .map_err(|e| e.to_string())
                })
                .await;
            let index = match index {
                Ok(i) => i.clone(),
                Err(err) => {
                    why.push(format!("{}: {err}", repo.location()));
                    continue;
                }
            };
            let Some((pack, c)) = index.get(&e.id) else {
                why.push(format!("{}: not in its index", repo.location()));
                continue;
            };
            let entry = PackEntry::from(c);
            let path = pack.id.path();
            let read = async {
                let range = entry.offset as u64..entry.offset as u64 + entry.length as u64;
                let data = repo.storage().get_range(&path, range).await?;
                let dicts = repo.dictionaries().await?;
                let keys = repo.keys().clone();
                tokio::task::spawn_blocking(move || {
                    let (mut scratch, mut out) = (Vec::new(), Vec::new());
                    open_blob_into(&keys, &dicts, &entry, &data, &path, &mut scratch, &mut out)
                        .map(|()| out)
                })
                .await
                .map_err(|e| Error::Invalid(format!("decode task failed: {e}")))?
            };
            match read.await {
                Ok(b) => return Ok(b),
                Err(err) => why.push(format!("{}: {err}", repo.location())),
            }
        }
        Err(why.join("; "))
    }
}

/// A `Write` into a vector the caller keeps a handle to (`restore_stream` hands its writer to a
/// thread).
#[derive(Clone, Default)]
struct SharedVec(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for SharedVec {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The whole content of a (small) stream in memory, verified as `restore_stream` verifies.
///
/// # Errors
/// As for `restore_stream`.
pub async fn read_stream(
    repo: &Repository,
    index: &MasterIndex,
    entry: &StreamEntry,
    progress: Arc<Progress>,
) -> Result<Vec<u8>> {
    let out = SharedVec::default();
    restore_stream(
        repo,
        index,
        entry,
        out.clone(),
        &RestoreOptions::default(),
        progress,
    )
    .await?;
    let v = std::mem::take(&mut *out.0.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(v)
}

/// A stream name as a relative path, refusing anything that could escape the target.
pub fn safe_name(name: &str) -> Result<PathBuf> {
    if name.is_empty()
        || name.starts_with('/')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(Error::Invalid(format!(
            "refusing to restore unsafe path {name:?} from the snapshot"
        )));
    }
    Ok(PathBuf::from(name))
}

/// A writer that keeps the CRC32C of what passed through it.
struct CrcWriter<W> {
    inner: W,
    crc: Arc<std::sync::atomic::AtomicU32>,
    value: u32,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.value = crc32c::crc32c_append(self.value, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()?;
        self.crc
            .store(self.value, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

/// A file a restore wrote: its path under the target, size and CRC32C (as PostgreSQL's backup
/// manifest records them), computed from the bytes as they were written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredFile {
    /// Relative to the target.
    pub path: String,
    /// Bytes written.
    pub size: u64,
    /// CRC32C (Castagnoli) of the content.
    pub crc32c: u32,
}

/// Restore one stream to `target` through a temporary file: `target` appears only when whole.
/// With `sync`, the file is fsynced before it is moved into place; a tree restore instead syncs
/// the whole file system once at the end (one fsync per file made small files slow). Returns
/// the size and CRC32C of what was written.
pub async fn restore_file(
    repo: &Repository,
    index: &MasterIndex,
    s: &StreamEntry,
    target: &Path,
    progress: Arc<Progress>,
    sync: bool,
) -> Result<(u64, u32)> {
    restore_file_with(
        repo,
        index,
        s,
        target,
        progress,
        sync,
        &RestoreOptions::default(),
    )
    .await
}

/// `restore_file` with options (a tree's files share one memory budget).
async fn restore_file_with(
    repo: &Repository,
    index: &MasterIndex,
    s: &StreamEntry,
    target: &Path,
    progress: Arc<Progress>,
    sync: bool,
    opts: &RestoreOptions,
) -> Result<(u64, u32)> {
    if target.exists() {
        return Err(Error::Invalid(format!(
            "{} exists; remove it or choose another target",
            target.display()
        )));
    }
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let io = |action, p: &Path, e| Error::io(action, p.display().to_string(), e);
    std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tidemark-restore-")
        .tempfile_in(dir)
        .map_err(|e| io("create a temporary file in", dir, e))?;
    let f = tmp.reopen().map_err(|e| io("open", tmp.path(), e))?;
    let crc = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let size = restore_stream(
        repo,
        index,
        s,
        CrcWriter {
            inner: tidemark_storage::direct::DirectWriter::pipelined(f, WRITES_IN_FLIGHT),
            crc: crc.clone(),
            value: 0,
        },
        opts,
        progress,
    )
    .await?;
    if sync {
        tmp.as_file()
            .sync_all()
            .map_err(|e| io("sync", tmp.path(), e))?;
    }
    let tmp_path = tmp.into_temp_path();
    if let Some(m) = s.mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp_path, std::fs::Permissions::from_mode(m))
            .map_err(|e| io("set the mode of", &tmp_path, e))?;
    }
    tmp_path
        .persist_noclobber(target)
        .map_err(|e| io("move the restored file to", target, e.error))?;
    Ok((size, crc.load(std::sync::atomic::Ordering::Acquire)))
}

/// Blocks of 1 MiB each restored file has being written at once while the next is filled
/// (a direct write waits for the device; one at a time left it idle between them).
const WRITES_IN_FLIGHT: usize = 2;

/// Files restored at once by `restore_tree` (each also fetches its chunks in parallel).
const FILES_AT_ONCE: usize = 4;

/// Restore entries of a tree under `target`, each at its name with `strip` removed from the
/// front; the file system is synced once at the end, and directory modes are set last.
/// Directories and links are made first, then up to `FILES_AT_ONCE` files are written at a
/// time. Returns every file written, with its size and CRC32C.
///
/// # Errors
/// `Invalid` for unsafe names or existing files, `Io`, and as for `restore_stream`.
pub async fn restore_tree(
    repo: &Repository,
    index: &MasterIndex,
    entries: &[&StreamEntry],
    strip: &str,
    target: &Path,
    progress: Arc<Progress>,
) -> Result<Vec<RestoredFile>> {
    let io = |action, p: &Path, e| Error::io(action, p.display().to_string(), e);
    std::fs::create_dir_all(target).map_err(|e| io("create", target, e))?;
    let rel = |e: &StreamEntry| safe_name(e.name.strip_prefix(strip).unwrap_or(&e.name));
    let mut files = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let r = rel(e)?;
        let path = target.join(&r);
        match e.kind {
            EntryType::Dir => std::fs::create_dir_all(&path).map_err(|e| io("create", &path, e))?,
            EntryType::Symlink => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
                }
                let t = e.target.as_deref().unwrap_or("");
                std::os::unix::fs::symlink(t, &path)
                    .map_err(|e| io("create the link", &path, e))?;
            }
            EntryType::File | EntryType::Stream => files.push((i, r, path)),
        }
    }
    // Largest first: the biggest file is the longest single stream (its writes are in order),
    // so it starts at once and the many small files fill in beside it; in name order a data
    // directory's hundreds of small catalog files went first and the large relation started
    // seconds late, on the critical path.
    files.sort_by_key(|(i, _, _)| std::cmp::Reverse(entries[*i].size));
    // One memory budget for all the files written at once.
    let opts = RestoreOptions {
        budget: Some(Budget::new(DEFAULT_BUDGET)),
        ..RestoreOptions::default()
    };
    let opts = &opts;
    let written: Vec<RestoredFile> = futures::stream::iter(files)
        .map(|(i, r, path)| {
            let progress = progress.clone();
            async move {
                let (size, crc32c) =
                    restore_file_with(repo, index, entries[i], &path, progress, false, opts)
                        .await?;
                Ok::<_, Error>(RestoredFile {
                    path: r.to_string_lossy().into_owned(),
                    size,
                    crc32c,
                })
            }
        })
        .buffer_unordered(FILES_AT_ONCE)
        .try_collect()
        .await?;
    // Everything written so far reaches the disk before the restore reports success.
    let root = std::fs::File::open(target).map_err(|e| io("open", target, e))?;
    rustix::fs::syncfs(&root)
        .map_err(|e| io("sync the file system of", target, std::io::Error::from(e)))?;
    // Directory modes last, so read-only directories do not stop their own restore.
    for e in entries.iter().filter(|e| e.kind == EntryType::Dir) {
        if let Some(m) = e.mode {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(r) = rel(e) {
                let _ =
                    std::fs::set_permissions(target.join(r), std::fs::Permissions::from_mode(m));
            }
        }
    }
    Ok(written)
}
