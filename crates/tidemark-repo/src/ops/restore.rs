//! Restore: fetch blobs by range in parallel, verify each chunk, write in order through a bounded
//! window so memory does not grow with the stream.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::dict::Dictionaries;
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::index::MasterIndex;
use crate::pack::{open_blob_into, PackEntry};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::{EntryType, StreamEntry};

/// Options for restores: shared by the CLI, the agent and tests.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Ranged reads in flight per stream (default 4).
    pub concurrency: usize,
    /// Raw bytes fetched per read at most (default 4 MiB).
    pub window: u64,
    /// Largest gap of unneeded bytes read to join two blobs into one request (default 1 MiB).
    pub max_gap: u64,
    /// The memory the reads in flight may hold, fetched and decoded, until the writer has
    /// written them; shared by every stream of one restore (a tree restores several files at
    /// once). `None`: a budget of `DEFAULT_BUDGET` for this stream alone.
    pub budget: Option<Budget>,
    /// How each chunk is checked before it is written.
    pub check: ChunkCheck,
    /// Files are written at their own names, not through a temporary file moved into place
    /// when whole: for trees whose completeness is shown otherwise (a data directory is
    /// startable only once its `pg_control` is written, last). Three directory operations
    /// per file became one; they serialize on the directory's lock, and a restore's 1000
    /// small files waited 1.3-4.7 ms each to be created. A file that fails is removed.
    pub in_place: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            concurrency: 4,
            window: 4 << 20,
            max_gap: 1 << 20,
            budget: None,
            check: ChunkCheck::Rehash,
            in_place: false,
        }
    }
}

/// How a restore checks each chunk it decodes (format §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkCheck {
    /// Authenticate the blob, whose AEAD binds it to its chunk id, and hash the plaintext
    /// again against that id: a chunk is proven before any of its bytes are written.
    Rehash,
    /// Authenticate only, for callers that check every restored file against an
    /// independent checksum afterwards (a physical PostgreSQL restore checks each file's
    /// CRC32C against the server's backup manifest). Authentication already proves that a
    /// holder of the key sealed these bytes for this chunk id, in this repository; the
    /// hash left out was a sixth of a restore's CPU time.
    AuthenticateOnly,
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

fn plan(
    index: &MasterIndex,
    name: &str,
    chunks: &[ChunkId],
    opts: &RestoreOptions,
) -> Result<Vec<Group>> {
    let mut groups: Vec<Group> = Vec::new();
    for id in chunks {
        let (pack, c) = index.get(id).ok_or_else(|| Error::MissingChunk {
            chunk: id.to_hex(),
            stream: name.to_owned(),
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
    let n = restore_chunks(
        repo,
        index,
        &entry.name,
        &entry.chunks,
        writer,
        opts,
        progress.clone(),
    )
    .await?;
    if n != entry.size {
        return Err(Error::corrupt(
            format!("snapshot stream {:?}", entry.name),
            format!("restored {n} bytes, expected {}", entry.size),
        ));
    }
    Progress::add(&progress.items, 1);
    Ok(n)
}

/// Write `chunks` (all or a run of the stream `name`) to `writer` in order, each verified
/// before any of its bytes are written; returns the bytes written.
async fn restore_chunks<W: Write + Send + 'static>(
    repo: &Repository,
    index: &MasterIndex,
    name: &str,
    chunks: &[ChunkId],
    writer: W,
    opts: &RestoreOptions,
    progress: Arc<Progress>,
) -> Result<u64> {
    let groups = plan(index, name, chunks, opts)?;
    let dicts = repo.dictionaries().await?;
    let budget = opts
        .budget
        .clone()
        .unwrap_or_else(|| Budget::new(DEFAULT_BUDGET));
    // Each batch travels with its share of the budget, given back once it is written.
    type Batch = (Vec<Vec<u8>>, tokio::sync::OwnedSemaphorePermit);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
    let name = name.to_owned();
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

    let check = opts.check;
    let fetch = futures::stream::iter(groups)
        .map(|g| {
            let (repo, pool, dicts, budget) =
                (repo.clone(), pool.clone(), dicts.clone(), budget.clone());
            async move {
                let share = budget.take((g.end - g.start) + g.raw).await;
                let batch = if repo.fallbacks().is_empty() {
                    fetch_group(&repo, g, pool, dicts, check).await
                } else {
                    let (pack, entries) = (g.pack, g.entries.clone());
                    match fetch_group(&repo, g, pool, dicts, check).await {
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
    let (n, _) = written.map_err(|e| Error::io("write", name, e))?;
    sent?;
    Ok(n)
}

/// One ranged read of a pack, each chunk in it opened and verified.
async fn fetch_group(
    repo: &Repository,
    g: Group,
    pool: Arc<BufferPool>,
    dicts: Arc<Dictionaries>,
    check: ChunkCheck,
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
                        check == ChunkCheck::Rehash,
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
                    open_blob_into(
                        &keys,
                        &dicts,
                        &entry,
                        &data,
                        &path,
                        &mut scratch,
                        &mut out,
                        true,
                    )
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

/// A restored file's writer: direct, pipelined writes; the CRC32C of what passed through;
/// and, at the end, an `fdatasync` if the file is large or the caller asked for one.
struct FileWriter {
    inner: tidemark_storage::direct::DirectWriter,
    crc: Arc<std::sync::atomic::AtomicU32>,
    value: u32,
    written: u64,
    sync: bool,
}

/// A file at least this large is synced as soon as it is written, by its writer thread, even
/// when the tree is synced once at the end: the device then writes it back while the other
/// files are still being decoded, instead of all of it waiting for the final sync (2 of 10
/// seconds of a 1.3 GB restore went to that sync). Smaller files are left to the one sync:
/// one fsync per file made trees of small files slow.
const SYNC_ALONE: u64 = 16 << 20;

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.value = crc32c::crc32c_append(self.value, &buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.sync || self.written >= SYNC_ALONE {
            self.inner.sync_data()?;
        } else {
            self.inner.flush()?;
        }
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
    let io = |action, p: &Path, e| Error::io(action, p.display().to_string(), e);
    // File system calls off the runtime's threads: creating a file can wait for the journal,
    // and a tree restore's hundreds of small files were created one after another there.
    let (owned, in_place) = (target.to_path_buf(), opts.in_place);
    let tmp = tokio::task::spawn_blocking(move || {
        let target = owned.as_path();
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
        std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        if in_place {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(target)
                .map_err(|e| io("create", target, e))?;
            return Ok(None);
        }
        tempfile::Builder::new()
            .prefix(".tidemark-restore-")
            .tempfile_in(dir)
            .map(Some)
            .map_err(|e| io("create a temporary file in", dir, e))
    })
    .await
    .map_err(|e| Error::Invalid(format!("file task failed: {e}")))??;
    let path = tmp.as_ref().map_or(target, |t| t.path());
    let whole = vec![(0..s.chunks.len(), 0)];
    let written = write_runs(repo, index, s, path, whole, &progress, sync, opts)
        .await
        .and_then(|done| {
            let (size, crc) = done[0];
            if size != s.size {
                return Err(Error::corrupt(
                    format!("snapshot stream {:?}", s.name),
                    format!("restored {size} bytes, expected {}", s.size),
                ));
            }
            Ok((size, crc))
        });
    let (size, crc) = match written {
        Ok(w) => w,
        Err(e) => {
            if tmp.is_none() {
                // Best effort: a partial file does not stay under its name.
                let _ = std::fs::remove_file(target);
            }
            return Err(e);
        }
    };
    Progress::add(&progress.items, 1);
    let (mode, owned) = (s.mode, target.to_path_buf());
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::PermissionsExt;
        let Some(tmp) = tmp else {
            return match mode {
                Some(m) => std::fs::set_permissions(&owned, std::fs::Permissions::from_mode(m))
                    .map_err(|e| io("set the mode of", &owned, e)),
                None => Ok(()),
            };
        };
        let tmp_path = tmp.into_temp_path();
        if let Some(m) = mode {
            std::fs::set_permissions(&tmp_path, std::fs::Permissions::from_mode(m))
                .map_err(|e| io("set the mode of", &tmp_path, e))?;
        }
        tmp_path
            .persist_noclobber(&owned)
            .map_err(|e| io("move the restored file to", &owned, e.error))
    })
    .await
    .map_err(|e| Error::Invalid(format!("file task failed: {e}")))??;
    Ok((size, crc))
}

/// Write runs of the chunks of `s` into the file at `path`, each run at its offset through
/// its own descriptor (the direct-I/O flag belongs to the open file description), up to
/// `RUNS_AT_ONCE` at once; each run's bytes and their CRC32C, in order.
#[allow(clippy::too_many_arguments)]
async fn write_runs(
    repo: &Repository,
    index: &MasterIndex,
    s: &StreamEntry,
    path: &Path,
    runs: Vec<(std::ops::Range<usize>, u64)>,
    progress: &Arc<Progress>,
    sync: bool,
    opts: &RestoreOptions,
) -> Result<Vec<(u64, u32)>> {
    let io = |action, p: &Path, e| Error::io(action, p.display().to_string(), e);
    futures::stream::iter(runs)
        .map(|(range, offset)| {
            let progress = progress.clone();
            async move {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| io("open", path, e))?;
                let crc = Arc::new(std::sync::atomic::AtomicU32::new(0));
                let n = restore_chunks(
                    repo,
                    index,
                    &s.name,
                    &s.chunks[range],
                    FileWriter {
                        inner: tidemark_storage::direct::DirectWriter::pipelined_at(
                            f,
                            offset,
                            WRITES_IN_FLIGHT,
                        ),
                        crc: crc.clone(),
                        value: 0,
                        written: 0,
                        sync,
                    },
                    opts,
                    progress,
                )
                .await?;
                Ok::<_, Error>((n, crc.load(std::sync::atomic::Ordering::Acquire)))
            }
        })
        .buffered(RUNS_AT_ONCE)
        .try_collect()
        .await
}

/// Bytes of an existing file one delta-restore comparison task reads and hashes.
const COMPARE_PIECE: u64 = 32 << 20;

/// Comparison tasks of one file at once.
const COMPARES_AT_ONCE: usize = 2;

/// Runs of one file written at once (a delta restore's differing runs).
const RUNS_AT_ONCE: usize = 2;

/// Blocks of 1 MiB each restored file has being written at once while the next is filled
/// (a direct write waits for the device; one at a time left it idle between them).
const WRITES_IN_FLIGHT: usize = 2;

/// Files restored at once by `restore_tree` (each also fetches its chunks in parallel).
const FILES_AT_ONCE: usize = 4;

/// Restore entries of a tree under `target`, each at its name with `strip` removed from the
/// front; the file system is synced once at the end, and directory modes are set last.
/// Directories and links are made first, then up to `FILES_AT_ONCE` files are written at a
/// time. Returns every file written, with its size and CRC32C; `check` as for `ChunkCheck`.
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
    check: ChunkCheck,
) -> Result<Vec<RestoredFile>> {
    restore_tree_with(repo, index, entries, strip, target, progress, check, false)
        .await
        .map(|(written, _)| written)
}

/// What a delta restore kept, wrote and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeltaSummary {
    /// Files whose every chunk was already there.
    pub files_kept: u64,
    /// Files written whole or in part.
    pub files_written: u64,
    /// Bytes found equal to the snapshot's and left in place.
    pub bytes_kept: u64,
    /// Bytes fetched from the repository and written.
    pub bytes_written: u64,
    /// Paths removed because the snapshot does not have them (a directory counts once).
    pub removed: u64,
}

/// Remove whatever lies at `path` (a directory with its contents; a link, not its target).
fn remove_path(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Remove everything under `dir` whose path relative to the tree's root is not in `wanted`;
/// directories the tree has are descended into (never through a link). The count removed.
fn remove_unwanted(
    root: &Path,
    dir: &Path,
    wanted: &std::collections::HashMap<PathBuf, EntryType>,
) -> Result<u64> {
    let io = |action, p: &Path, e| Error::io(action, p.display().to_string(), e);
    let mut removed = 0;
    let list = std::fs::read_dir(dir).map_err(|e| io("list", dir, e))?;
    for item in list {
        let item = item.map_err(|e| io("list", dir, e))?;
        let path = item.path();
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let is_dir = item
            .file_type()
            .map_err(|e| io("inspect", &path, e))?
            .is_dir();
        match wanted.get(&rel) {
            None => {
                remove_path(&path).map_err(|e| io("remove", &path, e))?;
                removed += 1;
            }
            Some(EntryType::Dir) if is_dir => removed += remove_unwanted(root, &path, wanted)?,
            Some(_) => {}
        }
    }
    Ok(removed)
}

/// One file of a delta restore: (size, CRC32C of the final content, bytes kept, bytes
/// written).
async fn restore_file_delta(
    repo: &Repository,
    index: &MasterIndex,
    s: &StreamEntry,
    target: &Path,
    progress: Arc<Progress>,
    opts: &RestoreOptions,
) -> Result<(u64, u32, u64, u64)> {
    let io = |action, p: &Path, e| Error::io(action, p.display().to_string(), e);
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            remove_path(target).map_err(|e| io("remove", target, e))?;
            let (n, crc) = restore_file_with(repo, index, s, target, progress, false, opts).await?;
            return Ok((n, crc, 0, n));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (n, crc) = restore_file_with(repo, index, s, target, progress, false, opts).await?;
            return Ok((n, crc, 0, n));
        }
        Err(e) => return Err(io("inspect", target, e)),
    }
    let lengths = s
        .chunks
        .iter()
        .map(|id| {
            index
                .get(id)
                .map(|(_, c)| u64::from(c.raw_length))
                .ok_or_else(|| Error::MissingChunk {
                    chunk: id.to_hex(),
                    stream: s.name.clone(),
                })
        })
        .collect::<Result<Vec<u64>>>()?;
    // Which chunks the file already holds, and the CRC32C of each that it does: pieces of
    // about `COMPARE_PIECE` hashed on blocking threads, several at once (a data directory's
    // largest file hashed by one thread was the whole comparison's critical path).
    let len = std::fs::metadata(target)
        .map_err(|e| io("inspect", target, e))?
        .len();
    let mut pieces: Vec<(std::ops::Range<usize>, u64)> = Vec::new();
    let (mut offset, mut start, mut start_offset) = (0u64, 0usize, 0u64);
    for (i, l) in lengths.iter().enumerate() {
        if offset - start_offset >= COMPARE_PIECE {
            pieces.push((start..i, start_offset));
            (start, start_offset) = (i, offset);
        }
        offset += l;
    }
    pieces.push((start..lengths.len(), start_offset));
    let ids = Arc::new(s.chunks.clone());
    let lens = Arc::new(lengths.clone());
    let same: Vec<Vec<Option<u32>>> = futures::stream::iter(pieces)
        .map(|(range, mut at)| {
            let (keys, ids, lens, path) = (
                repo.keys().clone(),
                ids.clone(),
                lens.clone(),
                target.to_path_buf(),
            );
            async move {
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let f = std::fs::File::open(&path).map_err(|e| io("open", &path, e))?;
                    let mut buf = Vec::new();
                    let mut same = Vec::with_capacity(range.len());
                    for i in range {
                        let (l, here) = (lens[i], at);
                        at += l;
                        if here + l > len {
                            same.push(None);
                            continue;
                        }
                        buf.resize(l as usize, 0);
                        f.read_exact_at(&mut buf, here)
                            .map_err(|e| io("read", &path, e))?;
                        same.push((keys.chunk_id(&buf) == ids[i]).then(|| crc32c::crc32c(&buf)));
                    }
                    Ok::<_, Error>(same)
                })
                .await
                .map_err(|e| Error::Invalid(format!("compare task failed: {e}")))?
            }
        })
        .buffered(COMPARES_AT_ONCE)
        .try_collect()
        .await?;
    let same: Vec<Option<u32>> = same.into_iter().flatten().collect();
    // Runs of chunks that differ, with their offsets.
    let mut runs: Vec<(std::ops::Range<usize>, u64)> = Vec::new();
    let mut offset = 0u64;
    for (i, (c, l)) in same.iter().zip(&lengths).enumerate() {
        if c.is_none() {
            match runs.last_mut() {
                Some((r, _)) if r.end == i => r.end = i + 1,
                _ => runs.push((i..i + 1, offset)),
            }
        }
        offset += l;
    }
    let done = write_runs(repo, index, s, target, runs.clone(), &progress, false, opts).await?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .map_err(|e| io("open", target, e))?;
    f.set_len(s.size).map_err(|e| io("resize", target, e))?;
    if let Some(m) = s.mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(m))
            .map_err(|e| io("set the mode of", target, e))?;
    }
    // The whole file's CRC32C, from the kept chunks' and the written runs' in order.
    let (mut crc, mut size, mut kept, mut written) = (0u32, 0u64, 0u64, 0u64);
    let mut run = runs.iter().zip(&done).peekable();
    for (i, (c, &l)) in same.iter().zip(&lengths).enumerate() {
        match c {
            Some(c) => {
                crc = crc32c::crc32c_combine(crc, *c, l as usize);
                size += l;
                kept += l;
            }
            None => {
                if let Some(((r, _), &(n, c))) = run.peek() {
                    if r.start == i {
                        crc = crc32c::crc32c_combine(crc, c, n as usize);
                        size += n;
                        written += n;
                        run.next();
                    }
                }
            }
        }
    }
    if size != s.size {
        return Err(Error::corrupt(
            format!("snapshot stream {:?}", s.name),
            format!("restored {size} bytes, expected {}", s.size),
        ));
    }
    Progress::add(&progress.items, 1);
    Progress::add(&progress.bytes, kept);
    Ok((size, crc, kept, written))
}

/// `restore_tree`, or with `delta` into a directory that may already hold an older or
/// damaged copy of the tree (PITR design §9b): every file is compared with the snapshot chunk
/// by chunk (its bytes hashed with the repository's chunk-id key), and only chunks that
/// differ are fetched and written, in place; each file is cut or extended to its size;
/// whatever the snapshot does not have is removed first; a path of the wrong kind (a file
/// where a directory belongs) is replaced. Returns every file of the tree with its size and
/// the CRC32C of its final content, kept and written bytes alike, and what was kept, written
/// and removed. The caller makes sure nothing else uses the directory.
///
/// # Errors
/// As for `restore_tree`.
#[allow(clippy::too_many_arguments)]
pub async fn restore_tree_with(
    repo: &Repository,
    index: &MasterIndex,
    entries: &[&StreamEntry],
    strip: &str,
    target: &Path,
    progress: Arc<Progress>,
    check: ChunkCheck,
    delta: bool,
) -> Result<(Vec<RestoredFile>, DeltaSummary)> {
    let io = |action, p: &Path, e| Error::io(action, p.display().to_string(), e);
    std::fs::create_dir_all(target).map_err(|e| io("create", target, e))?;
    let rel = |e: &StreamEntry| safe_name(e.name.strip_prefix(strip).unwrap_or(&e.name));
    let mut summary = DeltaSummary::default();
    if delta {
        // What the snapshot does not have goes first (it also frees the space).
        let mut wanted = std::collections::HashMap::new();
        for e in entries {
            let r = rel(e)?;
            // A file's directories are wanted even when the snapshot does not list them.
            for a in r.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()) {
                wanted.entry(a.to_path_buf()).or_insert(EntryType::Dir);
            }
            wanted.insert(r, e.kind);
        }
        summary.removed = remove_unwanted(target, target, &wanted)?;
    }
    let mut files = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let r = rel(e)?;
        let path = target.join(&r);
        match e.kind {
            EntryType::Dir => {
                if delta && std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
                    remove_path(&path).map_err(|e| io("remove", &path, e))?;
                }
                std::fs::create_dir_all(&path).map_err(|e| io("create", &path, e))?
            }
            EntryType::Symlink => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
                }
                let t = e.target.as_deref().unwrap_or("");
                if delta {
                    if std::fs::read_link(&path).is_ok_and(|l| l == Path::new(t)) {
                        continue;
                    }
                    remove_path(&path).map_err(|e| io("remove", &path, e))?;
                }
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
        check,
        in_place: true,
        ..RestoreOptions::default()
    };
    let opts = &opts;
    let done: Vec<(RestoredFile, u64, u64)> = futures::stream::iter(files)
        .map(|(i, r, path)| {
            let progress = progress.clone();
            async move {
                let (size, crc32c, kept, written) = if delta {
                    restore_file_delta(repo, index, entries[i], &path, progress, opts).await?
                } else {
                    let (n, crc) =
                        restore_file_with(repo, index, entries[i], &path, progress, false, opts)
                            .await?;
                    (n, crc, 0, n)
                };
                let file = RestoredFile {
                    path: r.to_string_lossy().into_owned(),
                    size,
                    crc32c,
                };
                Ok::<_, Error>((file, kept, written))
            }
        })
        .buffer_unordered(FILES_AT_ONCE)
        .try_collect()
        .await?;
    let mut written = Vec::with_capacity(done.len());
    for (file, kept, wrote) in done {
        if wrote > 0 {
            summary.files_written += 1;
        } else {
            summary.files_kept += 1;
        }
        summary.bytes_kept += kept;
        summary.bytes_written += wrote;
        written.push(file);
    }
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
    Ok((written, summary))
}
