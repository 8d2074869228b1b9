//! Backup: chunk, deduplicate, compress and seal streams in parallel, pack and upload the blobs,
//! then write the index and, last, the snapshot (format §8.2).
//!
//! One backup can write to several locations of one repository from a single read (format
//! §9a): each chunk is hashed, compressed and sealed once; each location has its own index for
//! "already stored", its own packer and its own lock. A location that fails is dropped and the
//! others go on; the snapshot is written, byte for byte the same, wherever nothing failed.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::task::JoinSet;

use crate::chunker::{Chunker, Cutter};
use crate::crypto::{aad, Keys};
use crate::dict::{Dictionaries, Dictionary, Sampler};
use crate::error::{Error, Result};
use crate::id::{ChunkId, SnapshotId};
use crate::index::{IndexFile, IndexPack, MasterIndex};
use crate::key::{hostname, username};
use crate::lock::LockGuard;
use crate::pack::{Blob, PackBuilder};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::{DatabaseIdentity, EntryType, Snapshot, SnapshotKind, StreamEntry, Summary};

/// Options for one backup: shared by the CLI, the agent and tests.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Engine name recorded in the snapshot.
    pub engine: String,
    /// Logical, physical or files.
    pub kind: SnapshotKind,
    /// The database.
    pub database: DatabaseIdentity,
    /// Tags.
    pub tags: Vec<String>,
    /// Threads that hash, compress and seal (default: the number of CPUs).
    pub threads: usize,
    /// Pack uploads in flight (default 2; each holds up to one pack in memory).
    pub uploads: usize,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            engine: "stdin".into(),
            kind: SnapshotKind::Logical,
            database: DatabaseIdentity::default(),
            tags: Vec::new(),
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            uploads: 2,
        }
    }
}

/// Batches (up to `BATCH_BYTES` each) waiting between the reader and the workers, and between
/// the workers and the packer. Four keep two threads busy; eight cost 20 MB of peak RSS for no
/// speed (docs/benchmarks.md, "Memory of a full physical backup").
const QUEUE: usize = 4;

struct Packer {
    repo: Repository,
    current: PackBuilder,
    uploads: JoinSet<Result<IndexPack>>,
    done: Vec<IndexPack>,
    max_uploads: usize,
}

impl Packer {
    fn new(repo: Repository, max_uploads: usize) -> Self {
        Packer {
            current: PackBuilder::with_capacity(repo.config().pack_size.min as usize),
            repo,
            uploads: JoinSet::new(),
            done: Vec::new(),
            max_uploads: max_uploads.max(1),
        }
    }

    async fn add(&mut self, blob: &Blob) -> Result<()> {
        self.current.add(blob);
        if self.current.len() >= self.repo.config().pack_size.min as usize {
            self.flush_current().await?;
        }
        Ok(())
    }

    async fn flush_current(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        while self.uploads.len() >= self.max_uploads {
            self.join_one().await?;
        }
        let capacity = self.repo.config().pack_size.min as usize;
        let pack = std::mem::replace(&mut self.current, PackBuilder::with_capacity(capacity));
        let repo = self.repo.clone();
        self.uploads
            .spawn(async move { repo.save_pack(pack).await });
        Ok(())
    }

    async fn join_one(&mut self) -> Result<()> {
        if let Some(r) = self.uploads.join_next().await {
            let p = r.map_err(|e| Error::Invalid(format!("upload task failed: {e}")))??;
            self.done.push(p);
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<Vec<IndexPack>> {
        self.flush_current().await?;
        while !self.uploads.is_empty() {
            self.join_one().await?;
        }
        Ok(self.done)
    }
}

/// How new blocks of a fixed-cut stream are compressed: with the repository's dictionary, or
/// sampled to train one (format §5.1). Neither for content-defined streams.
#[derive(Clone, Default)]
struct Blocks {
    dict: Option<Dictionary>,
    sampler: Option<Arc<Sampler>>,
}

/// What one location has already: its index, and the chunks this backup has given it.
struct Dedup {
    index: MasterIndex,
    claimed: Mutex<HashSet<ChunkId>>,
}

/// The most locations one backup writes to (a bit each in a `u64`).
pub const MAX_LOCATIONS: usize = 64;

/// A sealed chunk and the locations (bits) that do not have it yet.
type NewBlob = (Blob, u64);

/// Hash a chunk, and seal it once unless every location already has it.
fn process_chunk(
    keys: &Keys,
    dedup: &[Dedup],
    chunk: &[u8],
    level: i32,
    blocks: &Blocks,
) -> (ChunkId, Option<NewBlob>) {
    let id = keys.chunk_id(chunk);
    let mut wanted = 0u64;
    for (i, d) in dedup.iter().enumerate() {
        if !d.index.has_for_dedup(&id)
            && d.claimed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id)
        {
            wanted |= 1 << i;
        }
    }
    if wanted == 0 {
        return (id, None);
    }
    if let Some(s) = &blocks.sampler {
        s.offer(chunk);
    }
    (
        id,
        Some((
            Blob::seal(keys, id, chunk, level, blocks.dict.as_ref()),
            wanted,
        )),
    )
}

/// One location a backup writes to.
struct Sink<'l> {
    repo: Repository,
    lock: &'l LockGuard,
    /// `None` once the location failed.
    packer: Option<Packer>,
    new_chunks: u64,
    new_stored_bytes: u64,
    error: Option<Error>,
}

impl Sink<'_> {
    fn live(&self) -> bool {
        self.error.is_none()
    }

    /// Drop this location from the backup: it gets no snapshot, only unreferenced packs that
    /// its prune removes.
    fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            tracing::warn!(
                "location {} dropped from the backup: {e}",
                self.repo.location()
            );
            self.packer = None;
            self.error = Some(e);
        }
    }

    async fn add(&mut self, blob: &Blob) {
        if let Some(p) = &mut self.packer {
            if let Err(e) = p.add(blob).await {
                self.fail(e);
                return;
            }
            self.new_chunks += 1;
            self.new_stored_bytes += blob.data.len() as u64;
        }
    }

    /// Flush and upload the last packs, then write the index of this backup's packs.
    async fn finish_packs(&mut self) {
        let Some(packer) = self.packer.take() else {
            return;
        };
        let result = async {
            let packs = packer.finish().await?;
            self.lock.check()?;
            if !packs.is_empty() {
                self.repo
                    .save_index(&IndexFile {
                        version: 1,
                        supersedes: Vec::new(),
                        packs,
                    })
                    .await?;
            }
            self.lock.check()
        }
        .await;
        if let Err(e) = result {
            self.fail(e);
        }
    }
}

/// How one location fared in a backup.
#[derive(Debug, Clone)]
pub struct LocationOutcome {
    /// The location's name (as `Repository::location`).
    pub location: String,
    /// Chunks this location did not have before.
    pub new_chunks: u64,
    /// Bytes those took, as stored.
    pub new_stored_bytes: u64,
    /// Why the location was dropped; `None` when it has the snapshot.
    pub error: Option<String>,
}

/// A finished backup: the snapshot, and where it was written.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The snapshot's id: the same at every location that has it.
    pub id: SnapshotId,
    /// The snapshot.
    pub snapshot: Snapshot,
    /// One entry per location, in the order given to `start_at`.
    pub locations: Vec<LocationOutcome>,
}

impl Finished {
    /// The locations that missed the snapshot, with why.
    pub fn missing(&self) -> impl Iterator<Item = &LocationOutcome> {
        self.locations.iter().filter(|l| l.error.is_some())
    }
}

/// A backup in progress: add streams, then `finish` to write the index and the snapshot.
pub struct Backup<'l> {
    /// The first location that started: the repository's keys and config (the same at every
    /// location), and what `repository()` answers.
    repo: Repository,
    sinks: Vec<Sink<'l>>,
    dedup: Arc<Vec<Dedup>>,
    streams: Vec<StreamEntry>,
    summary: Summary,
    opts: BackupOptions,
    started: DateTime<Utc>,
    progress: Arc<Progress>,
    dicts: Arc<Dictionaries>,
    /// Samples of new blocks, when the repository has no dictionary for them yet.
    sampler: Option<Arc<Sampler>>,
}

/// How a stream is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cutting {
    /// Content-defined (FastCDC with the repository's keyed gear table): for dumps and other
    /// streams where an insertion shifts everything after it.
    #[default]
    ContentDefined,
    /// Fixed blocks of this many bytes (the last one shorter): for files changed in place at
    /// fixed offsets, such as database pages, where content-defined cuts drift (format §5).
    Fixed(usize),
}

impl Cutting {
    fn check(self) -> Result<()> {
        match self {
            Cutting::Fixed(n) if n == 0 || n > MAX_FIXED_BLOCK => Err(Error::Invalid(format!(
                "a fixed block of {n} bytes is outside 1..={MAX_FIXED_BLOCK}"
            ))),
            _ => Ok(()),
        }
    }
}

/// The largest fixed block (the content-defined maximum chunk size is larger still).
pub const MAX_FIXED_BLOCK: usize = 1 << 20;

/// Chunks handed to a worker at once: a batch of up to `BATCH_CHUNKS` chunks or
/// `BATCH_BYTES`, so that threads meet once per batch rather than once per 64 KiB block.
enum Work {
    Chunks(u64, Vec<Bytes>),
    Failed(std::io::Error),
}

const BATCH_CHUNKS: usize = 32;
const BATCH_BYTES: usize = 2 << 20;

/// A worker's results for one batch, in order.
struct Done {
    seq: u64,
    chunks: Vec<(ChunkId, u64, Option<NewBlob>)>,
}

impl<'l> Backup<'l> {
    /// Say that `n` more bytes will be read, where the source knows its size (files, a copy
    /// of a database, a base backup the server has sized): progress then shows a total.
    pub fn expect_bytes(&self, n: u64) {
        Progress::add(&self.progress.total, n);
    }

    /// The counters this backup updates.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Start a backup under a shared lock: loads the index for deduplication.
    ///
    /// # Errors
    /// Storage errors and damaged index objects.
    pub async fn start(
        repo: &Repository,
        lock: &'l LockGuard,
        opts: BackupOptions,
        progress: Arc<Progress>,
    ) -> Result<Backup<'l>> {
        Backup::start_at(vec![(repo.clone(), lock)], opts, progress).await
    }

    /// Start one backup to several locations of one repository, each under its own shared
    /// lock. A location that cannot start (unreachable, lock lost) is dropped now; the backup
    /// starts if one location can.
    ///
    /// # Errors
    /// `Invalid` for no locations, too many, or locations holding different repositories;
    /// the location's own error when there is one location; `EveryLocationFailed` otherwise.
    pub async fn start_at(
        targets: Vec<(Repository, &'l LockGuard)>,
        opts: BackupOptions,
        progress: Arc<Progress>,
    ) -> Result<Backup<'l>> {
        let Some((first, _)) = targets.first() else {
            return Err(Error::Invalid(
                "a backup needs at least one location".into(),
            ));
        };
        if targets.len() > MAX_LOCATIONS {
            return Err(Error::Invalid(format!(
                "a backup writes to at most {MAX_LOCATIONS} locations, not {}",
                targets.len()
            )));
        }
        if let Some((other, _)) = targets.iter().find(|t| !first.same_repository(&t.0)) {
            return Err(Error::Invalid(format!(
                "locations {:?} and {:?} hold different repositories; add a location with `tidemark init --copy-from`",
                first.location(),
                other.location()
            )));
        }
        let loaded = futures::future::join_all(targets.iter().map(|(repo, lock)| async move {
            lock.check()?;
            repo.load_index().await
        }))
        .await;
        let mut sinks = Vec::with_capacity(targets.len());
        let mut dedup = Vec::with_capacity(targets.len());
        for ((repo, lock), index) in targets.into_iter().zip(loaded) {
            let (index, error) = match index {
                Ok(i) => (i, None),
                Err(e) => (MasterIndex::new(), Some(e)),
            };
            dedup.push(Dedup {
                index,
                claimed: Mutex::new(HashSet::new()),
            });
            let mut sink = Sink {
                packer: Some(Packer::new(repo.clone(), opts.uploads)),
                repo,
                lock,
                new_chunks: 0,
                new_stored_bytes: 0,
                error: None,
            };
            if let Some(e) = error {
                sink.fail(e);
            }
            sinks.push(sink);
        }
        sync_dictionaries(&mut sinks).await;
        let repo = match sinks.iter().find(|s| s.live()) {
            Some(s) => s.repo.clone(),
            None => return Err(every_location_failed(&mut sinks)),
        };
        let dicts = repo.dictionaries().await?;
        let sampler = dicts
            .for_blocks()
            .is_none()
            .then(|| Arc::new(Sampler::default()));
        Ok(Backup {
            dicts,
            sampler,
            repo,
            sinks,
            dedup: Arc::new(dedup),
            streams: Vec::new(),
            summary: Summary::default(),
            started: Utc::now(),
            opts,
            progress,
        })
    }

    fn blocks(&self, cutting: Cutting) -> Blocks {
        match cutting {
            Cutting::Fixed(_) => Blocks {
                dict: self.dicts.for_blocks().cloned(),
                sampler: self.sampler.clone(),
            },
            Cutting::ContentDefined => Blocks::default(),
        }
    }

    /// The repository being written.
    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// Add a directory or symlink entry (no content).
    pub fn add_entry(&mut self, entry: StreamEntry) {
        self.streams.push(entry);
    }

    /// Read `reader` to its end as the stream `name` of type `kind`.
    ///
    /// # Errors
    /// `Io` when the reader fails (the backup must then be abandoned), storage errors, `LockLost`.
    pub async fn add_stream<R: Read + Send + 'static>(
        &mut self,
        name: &str,
        kind: EntryType,
        reader: R,
        mode: Option<u32>,
        mtime: Option<DateTime<Utc>>,
    ) -> Result<StreamEntry> {
        self.add_stream_cut(name, kind, reader, mode, mtime, Cutting::ContentDefined)
            .await
    }

    /// `add_stream` with a choice of how the stream is cut.
    ///
    /// # Errors
    /// As for `add_stream`; `Invalid` for a fixed block size out of range.
    pub async fn add_stream_cut<R: Read + Send + 'static>(
        &mut self,
        name: &str,
        kind: EntryType,
        reader: R,
        mode: Option<u32>,
        mtime: Option<DateTime<Utc>>,
        cutting: Cutting,
    ) -> Result<StreamEntry> {
        self.check_locks()?;
        cutting.check()?;
        let params = self.repo.config().chunker;
        let keys = self.repo.keys().clone();
        let level = self.repo.config().compression.level;
        let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<Work>(QUEUE);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Done>(QUEUE);

        let seed = keys.gear_seed();
        let reader_thread = std::thread::spawn(move || {
            let mut source: Box<dyn FnMut() -> std::io::Result<Option<Bytes>>> = match cutting {
                Cutting::ContentDefined => {
                    let mut chunker = Chunker::new(reader, params, seed);
                    Box::new(move || chunker.next_chunk())
                }
                Cutting::Fixed(block) => {
                    let mut reader = reader;
                    Box::new(move || read_block(&mut reader, block))
                }
            };
            let mut seq = 0u64;
            let mut batch = Vec::with_capacity(BATCH_CHUNKS);
            let mut bytes = 0;
            loop {
                match source() {
                    Ok(Some(c)) => {
                        bytes += c.len();
                        batch.push(c);
                        if batch.len() < BATCH_CHUNKS && bytes < BATCH_BYTES {
                            continue;
                        }
                        let n = batch.len() as u64;
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_CHUNKS));
                        if work_tx.send(Work::Chunks(seq, full)).is_err() {
                            return;
                        }
                        seq += n;
                        bytes = 0;
                    }
                    Ok(None) => {
                        if !batch.is_empty() {
                            let _ = work_tx.send(Work::Chunks(seq, batch));
                        }
                        return;
                    }
                    Err(e) => {
                        let _ = work_tx.send(Work::Failed(e));
                        return;
                    }
                }
            }
        });

        let (io_tx, mut io_rx) = tokio::sync::mpsc::channel::<std::io::Error>(1);
        let mut workers = Vec::new();
        let blocks = self.blocks(cutting);
        for _ in 0..self.opts.threads.max(1) {
            let (rx, tx, io_tx) = (work_rx.clone(), done_tx.clone(), io_tx.clone());
            let (keys, dedup) = (keys.clone(), self.dedup.clone());
            let blocks = blocks.clone();
            workers.push(std::thread::spawn(move || loop {
                let item = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let (seq, batch) = match item {
                    Ok(Work::Chunks(s, c)) => (s, c),
                    Ok(Work::Failed(e)) => {
                        let _ = io_tx.blocking_send(e);
                        return;
                    }
                    Err(_) => return,
                };
                let chunks = batch
                    .iter()
                    .map(|chunk| {
                        let (id, blob) = process_chunk(&keys, &dedup, chunk, level, &blocks);
                        (id, chunk.len() as u64, blob)
                    })
                    .collect();
                if tx.blocking_send(Done { seq, chunks }).is_err() {
                    return;
                }
            }));
        }
        drop(done_tx);
        drop(io_tx);

        let mut pending: BTreeMap<u64, Vec<ChunkId>> = BTreeMap::new();
        let mut chunks = Vec::new();
        let mut size = 0u64;
        let result: Result<()> = async {
            while let Some(d) = done_rx.recv().await {
                let mut ids = Vec::with_capacity(d.chunks.len());
                for (id, raw, blob) in d.chunks {
                    size += raw;
                    self.record(raw, blob).await?;
                    ids.push(id);
                }
                pending.insert(d.seq, ids);
                while let Some(e) = pending.first_entry() {
                    if *e.key() != chunks.len() as u64 {
                        break;
                    }
                    chunks.extend(e.remove());
                }
            }
            if let Ok(e) = io_rx.try_recv() {
                return Err(Error::io("read", name, e));
            }
            Ok(())
        }
        .await;
        drop(done_rx);
        let _ = reader_thread.join();
        for w in workers {
            let _ = w.join();
        }
        result?;
        if !pending.is_empty() {
            return Err(Error::Invalid(format!(
                "internal error: {} chunks of {name:?} were not ordered",
                pending.len()
            )));
        }
        Ok(self.finish_stream(StreamEntry {
            name: name.to_owned(),
            kind,
            size,
            mode,
            mtime,
            target: None,
            chunks,
        }))
    }

    /// Record a finished stream in the snapshot-to-be.
    fn finish_stream(&mut self, entry: StreamEntry) -> StreamEntry {
        self.summary.raw_bytes += entry.size;
        Progress::add(&self.progress.items, 1);
        self.streams.push(entry.clone());
        entry
    }

    /// Count one chunk of a stream and pack it at each location that lacks it.
    async fn record(&mut self, raw: u64, blob: Option<NewBlob>) -> Result<()> {
        self.summary.chunks += 1;
        Progress::add(&self.progress.bytes, raw);
        if let Some((blob, wanted)) = blob {
            self.summary.new_chunks += 1;
            self.summary.new_raw_bytes += raw;
            self.summary.new_stored_bytes += blob.data.len() as u64;
            Progress::add(&self.progress.stored, blob.data.len() as u64);
            let mut lost = false;
            for (i, sink) in self.sinks.iter_mut().enumerate() {
                if wanted & (1 << i) != 0 && sink.live() {
                    sink.add(&blob).await;
                    lost |= !sink.live();
                }
            }
            if lost {
                self.require_live()?;
            }
        }
        Ok(())
    }

    /// Drop the locations whose lock was lost; an error once none is left.
    fn check_locks(&mut self) -> Result<()> {
        for sink in self.sinks.iter_mut().filter(|s| s.live()) {
            if let Err(e) = sink.lock.check() {
                sink.fail(e);
            }
        }
        self.require_live()
    }

    fn require_live(&mut self) -> Result<()> {
        if self.sinks.iter().any(Sink::live) {
            Ok(())
        } else {
            Err(every_location_failed(&mut self.sinks))
        }
    }

    /// Add a small stream held in memory (a small file of a tree) without starting the
    /// threads `add_stream` uses: for many small files those would cost more than the work.
    ///
    /// # Errors
    /// Storage errors, `LockLost`.
    pub async fn add_bytes(
        &mut self,
        name: &str,
        kind: EntryType,
        data: Vec<u8>,
        mode: Option<u32>,
        mtime: Option<DateTime<Utc>>,
    ) -> Result<StreamEntry> {
        self.add_bytes_cut(name, kind, data, mode, mtime, Cutting::ContentDefined)
            .await
    }

    /// `add_bytes` with a choice of how the bytes are cut.
    ///
    /// # Errors
    /// As for `add_bytes`; `Invalid` for a fixed block size out of range.
    pub async fn add_bytes_cut(
        &mut self,
        name: &str,
        kind: EntryType,
        data: Vec<u8>,
        mode: Option<u32>,
        mtime: Option<DateTime<Utc>>,
        cutting: Cutting,
    ) -> Result<StreamEntry> {
        self.check_locks()?;
        cutting.check()?;
        let (keys, dedup) = (self.repo.keys().clone(), self.dedup.clone());
        let (params, level) = (
            self.repo.config().chunker,
            self.repo.config().compression.level,
        );
        let size = data.len() as u64;
        let blocks = self.blocks(cutting);
        let processed =
            tokio::task::spawn_blocking(move || -> Vec<(ChunkId, u64, Option<NewBlob>)> {
                // Cut the buffer in place: a streaming chunker would allocate and zero 4 MiB per file.
                let cutter = Cutter::new(params, keys.gear_seed());
                let chunks: Box<dyn Iterator<Item = &[u8]>> = match cutting {
                    Cutting::ContentDefined => Box::new(cutter.cut_all(&data)),
                    Cutting::Fixed(block) => Box::new(data.chunks(block)),
                };
                chunks
                    .map(|chunk| {
                        let (id, blob) = process_chunk(&keys, &dedup, chunk, level, &blocks);
                        (id, chunk.len() as u64, blob)
                    })
                    .collect()
            })
            .await
            .map_err(|e| Error::Invalid(format!("chunking task failed: {e}")))?;
        let mut chunks = Vec::with_capacity(processed.len());
        for (id, raw, blob) in processed {
            self.record(raw, blob).await?;
            chunks.push(id);
        }
        Ok(self.finish_stream(StreamEntry {
            name: name.to_owned(),
            kind,
            size,
            mode,
            mtime,
            target: None,
            chunks,
        }))
    }

    /// Record what the snapshot says about its source, once the engine knows it (its kind and
    /// the database's identity, read during the backup).
    pub fn describe(&mut self, kind: SnapshotKind, database: DatabaseIdentity) {
        self.opts.kind = kind;
        self.opts.database = database;
    }

    /// Flush packs, write the index, then the snapshot. Only now does the snapshot exist.
    ///
    /// # Errors
    /// Storage errors, `LockLost`: at every location (see `finish_report`).
    pub async fn finish(
        self,
        positions: BTreeMap<String, serde_json::Value>,
    ) -> Result<(SnapshotId, Snapshot)> {
        let f = self.finish_report(positions).await?;
        Ok((f.id, f.snapshot))
    }

    /// `finish`, and how each location fared. The snapshot is written, the same bytes, at each
    /// location where every step succeeded; the others get none (format §9a).
    ///
    /// # Errors
    /// When no location has the snapshot: the location's error if there was one location,
    /// `EveryLocationFailed` otherwise.
    pub async fn finish_report(
        mut self,
        positions: BTreeMap<String, serde_json::Value>,
    ) -> Result<Finished> {
        futures::future::join_all(self.sinks.iter_mut().map(Sink::finish_packs)).await;
        self.require_live()?;
        // The first backup of fixed blocks trains the dictionary later ones use. It is an
        // optimisation: failing to store it does not fail the backup.
        if let Some(sampler) = &self.sampler {
            let first = self.sinks.iter().find(|s| s.live()).map(|s| s.repo.clone());
            if let Some(repo) = first {
                match crate::dict::train_and_store(&repo, &self.dicts, sampler).await {
                    Ok(Some(id)) => {
                        tracing::debug!("stored zstd dictionary {id} for blocks");
                        // The next backup copies it to the other locations (`sync_dictionaries`).
                        repo.reload_dictionaries();
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("no zstd dictionary stored for later backups: {e}"),
                }
            }
        }
        self.check_locks()?;
        let now = Utc::now();
        self.summary.duration_seconds = (now - self.started).num_milliseconds() as f64 / 1000.0;
        let snapshot = Snapshot {
            version: 1,
            time: self.started,
            time_end: now,
            hostname: hostname(),
            username: username(),
            engine: self.opts.engine.clone(),
            kind: self.opts.kind,
            database: self.opts.database.clone(),
            tags: self.opts.tags.clone(),
            parent: None,
            streams: std::mem::take(&mut self.streams),
            positions,
            summary: self.summary.clone(),
        };
        let (id, sealed) = self.repo.seal_json("snapshots", aad::SNAPSHOT, &snapshot)?;
        let puts = futures::future::join_all(self.sinks.iter().map(|s| {
            let sealed = sealed.clone();
            async move {
                if s.live() {
                    Some(s.repo.put_sealed("snapshots", id, sealed).await)
                } else {
                    None
                }
            }
        }))
        .await;
        for (sink, put) in self.sinks.iter_mut().zip(puts) {
            if let Some(Err(e)) = put {
                sink.fail(e);
            }
        }
        self.require_live()?;
        let locations = self
            .sinks
            .iter()
            .map(|s| LocationOutcome {
                location: s.repo.location().to_owned(),
                new_chunks: s.new_chunks,
                new_stored_bytes: s.new_stored_bytes,
                error: s.error.as_ref().map(|e| e.to_string()),
            })
            .collect();
        Ok(Finished {
            id: SnapshotId(id),
            snapshot,
            locations,
        })
    }
}

/// The error when no location is left: the location's own when there was one.
fn every_location_failed(sinks: &mut [Sink<'_>]) -> Error {
    if let [only] = sinks {
        return only
            .error
            .take()
            .unwrap_or_else(|| Error::Invalid("the backup's location failed".into()));
    }
    let each = sinks
        .iter()
        .map(|s| {
            let why = s.error.as_ref().map(|e| e.to_string()).unwrap_or_default();
            format!("{}: {why}", s.repo.location())
        })
        .collect::<Vec<_>>()
        .join("; ");
    Error::EveryLocationFailed(each)
}

/// Give every live location the dictionaries any of them has (plain copies: the objects are
/// sealed with the repository's key), so that a blob compressed with one can go anywhere. A
/// location that cannot be brought level is dropped.
async fn sync_dictionaries(sinks: &mut [Sink<'_>]) {
    if sinks.len() < 2 {
        return;
    }
    let listed = futures::future::join_all(sinks.iter().map(|s| async move {
        if s.live() {
            Some(s.repo.list_objects("dicts").await)
        } else {
            None
        }
    }))
    .await;
    let mut have: Vec<Option<HashSet<String>>> = Vec::with_capacity(sinks.len());
    for (sink, l) in sinks.iter_mut().zip(listed) {
        match l {
            Some(Ok(metas)) => have.push(Some(metas.into_iter().map(|m| m.path).collect())),
            Some(Err(e)) => {
                sink.fail(e);
                have.push(None);
            }
            None => have.push(None),
        }
    }
    let all: HashSet<&String> = have.iter().flatten().flatten().collect();
    for path in all {
        let Some(from) = have
            .iter()
            .position(|h| h.as_ref().is_some_and(|h| h.contains(path)))
        else {
            continue;
        };
        for i in 0..sinks.len() {
            if have[i].as_ref().is_none_or(|h| h.contains(path)) || !sinks[i].live() {
                continue;
            }
            let r = crate::repository::copy_object(
                &**sinks[from].repo.storage(),
                &**sinks[i].repo.storage(),
                path,
            )
            .await;
            match r {
                Ok(_) => sinks[i].repo.reload_dictionaries(),
                Err(e) => sinks[i].fail(e),
            }
        }
    }
}

/// Read up to `block` bytes: a full block unless the reader ends first; `None` at the end.
fn read_block<R: Read>(reader: &mut R, block: usize) -> std::io::Result<Option<Bytes>> {
    // Not zero-filled first: `read_to_end` reads into the spare capacity.
    let mut buf = Vec::with_capacity(block);
    reader.by_ref().take(block as u64).read_to_end(&mut buf)?;
    if buf.is_empty() {
        return Ok(None);
    }
    Ok(Some(Bytes::from(buf)))
}
