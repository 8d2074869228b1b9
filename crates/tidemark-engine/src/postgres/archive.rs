//! `wal-push` (archive_command) and `wal-fetch` (restore_command): pitr.md §5 and §7.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use tidemark_repo::log::{read_segment, write_segment, Written};
use tidemark_repo::Repository;
use tidemark_storage::ErrorKind;

use super::wal::{self, WalFile};
use crate::{Error, Result};

/// Name of the spool directory kept next to the WAL (inside `pg_wal`, which base backups skip).
pub const SPOOL: &str = "tidemark-spool";

fn io(action: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

fn bad_wal(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Database {
        action: "archive",
        database: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// How `wal-push` works.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Segments archived per call, the requested one included (default 8).
    pub batch: usize,
    /// Where `.ok` records go; default `<dir of the WAL file>/tidemark-spool`.
    pub spool_dir: Option<PathBuf>,
    /// The data directory, for the system identifier of history files; default the current
    /// directory (where PostgreSQL runs archive_command).
    pub data_dir: PathBuf,
    /// The repository's id (from its config object): the spool keeps records per repository
    /// id, so that a record made for one repository never stands for another (two chained
    /// archive_commands, or a repository created again at the same location). Empty: records
    /// go in the spool directory itself (tests, and callers with one repository per spool).
    pub repository: String,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            batch: 8,
            spool_dir: None,
            data_dir: PathBuf::from("."),
            repository: String::new(),
        }
    }
}

impl PushOptions {
    fn spool(&self, wal_path: &Path) -> PathBuf {
        let base = self.spool_dir.clone().unwrap_or_else(|| {
            wal_path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(SPOOL)
        });
        if self.repository.is_empty() {
            return base;
        }
        base.join(format!("repository-{}", self.repository))
    }

    /// The spool's root: where the map of config fingerprints to repository ids is kept.
    fn spool_root(&self, wal_path: &Path) -> PathBuf {
        self.spool_dir.clone().unwrap_or_else(|| {
            wal_path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(SPOOL)
        })
    }
}

/// The file in the spool that maps config fingerprints (`Repository::fingerprint`) to
/// repository ids, a line each.
const IDENTITIES: &str = "repositories";

/// The id of the repository whose config has `fingerprint`, as an earlier `wal-push` that
/// opened it recorded: lets a call whose segment was archived ahead learn the repository's
/// id from one read of its config object, without a key. `None` when this fingerprint was
/// never seen (a new repository, or one created again at the same place).
pub fn known_repository(wal_path: &Path, o: &PushOptions, fingerprint: &str) -> Option<String> {
    let map = std::fs::read_to_string(o.spool_root(wal_path).join(IDENTITIES)).ok()?;
    map.lines().find_map(|l| {
        let (fp, id) = l.split_once(' ')?;
        (fp == fingerprint && !id.is_empty()).then(|| id.to_owned())
    })
}

/// Record that the repository with config `fingerprint` has id `id` (after opening it).
///
/// # Errors
/// When the spool cannot be written.
pub fn remember_repository(
    wal_path: &Path,
    o: &PushOptions,
    fingerprint: &str,
    id: &str,
) -> Result<()> {
    if known_repository(wal_path, o, fingerprint).as_deref() == Some(id) {
        return Ok(());
    }
    let root = o.spool_root(wal_path);
    std::fs::create_dir_all(&root).map_err(|e| io("create", &root, e))?;
    let path = root.join(IDENTITIES);
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    // The newest few are enough: one repository per archive_command, or a few chained.
    let mut lines: Vec<&str> = old
        .lines()
        .filter(|l| l.split_once(' ').is_some_and(|(fp, _)| fp != fingerprint))
        .collect();
    let new = format!("{fingerprint} {id}");
    lines.push(&new);
    let keep = lines.len().saturating_sub(16);
    // Records of the layout before this map (per location, `repo-<hash>`) are not read any
    // more: drop them once.
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("repo-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    write_atomic(&path, (lines[keep..].join("\n") + "\n").as_bytes())
        .map_err(|e| io("write", &path, e))
}

/// Remove the spool's records of segments PostgreSQL has removed or recycled from the
/// directory of `wal_path` (pg_wal), for every repository the spool keeps records for: they
/// can never be asked for again, and would otherwise pile up for ever. A repository's
/// directory left empty goes too. Cheap: one listing of the spool.
pub fn forget_removed(wal_path: &Path, o: &PushOptions) {
    let dir = wal_path.parent().unwrap_or_else(|| Path::new("."));
    let root = o.spool_root(wal_path);
    let Ok(rd) = std::fs::read_dir(&root) else {
        return;
    };
    for sub in rd.flatten() {
        if !sub.file_name().to_string_lossy().starts_with("repository-") {
            continue;
        }
        let Ok(records) = std::fs::read_dir(sub.path()) else {
            continue;
        };
        for e in records.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(seg) = n.strip_suffix(".ok") {
                if WalFile::parse(seg).is_some() && !dir.join(seg).exists() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // Only when empty.
        let _ = std::fs::remove_dir(sub.path());
    }
}

/// The key of a segment's metadata that holds what its records say for targets
/// (`walscan::Scan`).
pub const SCAN: &str = "scan";

/// A WAL file read from disk and checked.
struct WalData {
    name: String,
    path: PathBuf,
    data: Bytes,
    system_id: u64,
    meta: serde_json::Value,
}

fn read_wal(path: &Path, o: &PushOptions) -> Result<WalData> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let kind = WalFile::parse(&name).ok_or_else(|| {
        bad_wal(
            path,
            "not a WAL file name (segment, .partial, .history or .backup)",
        )
    })?;
    let data = Bytes::from(std::fs::read(path).map_err(|e| io("read", path, e))?);
    let (system_id, meta) = if kind.has_page_header() {
        let h = wal::long_header(&data).map_err(|e| bad_wal(path, e))?;
        let seg = match kind {
            WalFile::Segment(s) | WalFile::Partial(s) => s,
            _ => unreachable!("has_page_header"),
        };
        let start = seg.start_lsn(u64::from(h.seg_size));
        let whole = matches!(kind, WalFile::Segment(_));
        // The first segment of a new timeline starts as a copy of its parent's segment, so its
        // first page may carry an older (smaller) timeline; never a newer one.
        if h.page_addr != start || h.timeline > seg.timeline {
            return Err(bad_wal(
                path,
                format!(
                    "its header says timeline {} at {}, its name says timeline {} at {}",
                    h.timeline,
                    wal::lsn_string(h.page_addr),
                    seg.timeline,
                    wal::lsn_string(start)
                ),
            ));
        }
        (
            h.system_id,
            serde_json::json!({
                "timeline": seg.timeline,
                "start_lsn": wal::lsn_string(start),
                "end_lsn": wal::lsn_string(start + data.len() as u64),
                "seg_size": h.seg_size,
                SCAN: scan_wal(&name, &data, start, u64::from(h.block_size), whole),
            }),
        )
    } else {
        let id = wal::control_system_id(&o.data_dir).map_err(|e| bad_wal(path, e))?;
        (id, serde_json::json!({}))
    };
    Ok(WalData {
        name,
        path: path.to_owned(),
        data,
        system_id,
        meta,
    })
}

/// The record scan an archived file's metadata carries (`whole`: a complete segment, not a
/// piece or a `.partial`). Scanning is metadata: a file whose
/// records cannot all be read is still archived whole, with its scan marked incomplete and a
/// warning; the scanner is total, and a panic in it (a bug) is caught and treated the same, so
/// our own parser can never stop PostgreSQL's archiving.
pub fn scan_wal(
    name: &str,
    data: &[u8],
    start: u64,
    page: u64,
    whole: bool,
) -> super::walscan::Scan {
    let walked = std::panic::catch_unwind(|| {
        if whole {
            super::walscan::scan_segment(data, start, page)
        } else {
            super::walscan::scan(data, start, page)
        }
    });
    let scan = walked.unwrap_or_else(|_| super::walscan::Scan {
        incomplete: Some("the record scanner failed on it (a bug: please report it)".into()),
        ..Default::default()
    });
    if let Some(why) = &scan.incomplete {
        tracing::warn!(
            segment = %name,
            reason = %why,
            "archived whole, but recovery targets in it cannot be looked up before recovery (PostgreSQL still finds them)"
        );
    }
    scan
}

fn spool_record(spool: &Path, name: &str) -> PathBuf {
    spool.join(format!("{name}.ok"))
}

/// Whether `wal_path` was already archived by an earlier batch with exactly this content.
/// Cheap: no repository access, one hash of the file.
pub fn already_pushed(wal_path: &Path, o: &PushOptions) -> bool {
    let Some(name) = wal_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return false;
    };
    let Ok(recorded) = std::fs::read_to_string(spool_record(&o.spool(wal_path), &name)) else {
        return false;
    };
    let Ok(data) = std::fs::read(wal_path) else {
        return false;
    };
    recorded.trim() == blake3::hash(&data).to_hex().as_str()
}

/// Write `content` to `path` durably: a temporary name, fsync, rename, fsync the directory.
fn write_atomic(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tidemark-")
        .tempfile_in(dir)?;
    tmp.write_all(content)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The result of one `wal-push` call.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    /// The segment PostgreSQL asked for, and whether it was new.
    pub requested: String,
    /// `stored` or `already present`.
    pub outcome: &'static str,
    /// Further ready segments archived in the same call.
    pub ahead: Vec<String>,
}

async fn push_one(repo: &Repository, w: &WalData, spool: &Path) -> Result<Written> {
    let written = write_segment(
        repo,
        &wal::stream(w.system_id),
        &w.name,
        w.data.clone(),
        w.meta.clone(),
    )
    .await?;
    // Only now is the segment durable; the record may claim no more than that.
    std::fs::create_dir_all(spool).map_err(|e| io("create", spool, e))?;
    let hash = blake3::hash(&w.data).to_hex();
    write_atomic(&spool_record(spool, &w.name), hash.as_bytes())
        .map_err(|e| io("write", &spool_record(spool, &w.name), e))?;
    Ok(written)
}

/// Archive `wal_path`, and up to `batch - 1` further segments PostgreSQL has marked ready.
/// Returns only after the requested segment is durable in the repository.
///
/// # Errors
/// `Database` for a file that is not WAL (or not this cluster's), repository errors (a segment
/// of that name with different content is `Corrupt`). Failures of the segments archived
/// ahead are logged, not returned: PostgreSQL will ask for them again.
pub async fn push(repo: &Repository, wal_path: &Path, o: &PushOptions) -> Result<PushReport> {
    let spool = o.spool(wal_path);
    // A server that archives has finished recovery: segments prefetched for it are garbage.
    let prefetched = prefetch_dir(wal_path);
    if prefetched.exists() {
        let _ = std::fs::remove_dir_all(&prefetched);
    }
    let main = read_wal(wal_path, o)?;
    let mut ahead = Vec::new();
    if o.batch > 1 && matches!(WalFile::parse(&main.name), Some(WalFile::Segment(_))) {
        let dir = wal_path.parent().unwrap_or_else(|| Path::new("."));
        let mut ready: Vec<String> = std::fs::read_dir(dir.join("archive_status"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_suffix(".ready").map(str::to_owned)
                    })
                    .filter(|n| {
                        matches!(WalFile::parse(n), Some(WalFile::Segment(_))) && *n > main.name
                    })
                    .collect()
            })
            .unwrap_or_default();
        ready.sort();
        for n in ready.into_iter().take(o.batch - 1) {
            let p = dir.join(&n);
            if already_pushed(&p, o) {
                continue;
            }
            match read_wal(&p, o) {
                Ok(w) if w.system_id == main.system_id => ahead.push(w),
                Ok(_) => {}
                Err(e) => tracing::debug!(segment = %n, error = %e, "not archived ahead"),
            }
        }
    }
    let others = futures::stream::iter(ahead.iter())
        .map(|w| async {
            let r = push_one(repo, w, &spool).await;
            if let Err(e) = &r {
                tracing::warn!(segment = %w.name, error = %e, "archiving ahead failed; PostgreSQL will retry it");
            }
            r.ok().map(|_| w.name.clone())
        })
        .buffer_unordered(4);
    let (main_result, done) =
        tokio::join!(push_one(repo, &main, &spool), others.collect::<Vec<_>>());
    let written = main_result?;
    forget_removed(wal_path, o);
    let mut ahead: Vec<String> = done.into_iter().flatten().collect();
    ahead.sort();
    tracing::info!(segment = %main.name, path = %main.path.display(), ahead = ahead.len(), "archived");
    Ok(PushReport {
        requested: main.name,
        outcome: match written {
            Written::Stored => "stored",
            Written::AlreadyPresent => "already present",
        },
        ahead,
    })
}

/// What `wal-fetch` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// Written to the destination, this many bytes.
    Restored(u64),
    /// The archive does not have it (PostgreSQL then ends recovery or tries elsewhere).
    NotFound,
}

/// How `wal-fetch` works.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The cluster; default: `global/pg_control` of `data_dir`.
    pub system_id: Option<u64>,
    /// The data directory being recovered; default the current directory.
    pub data_dir: PathBuf,
    /// Segments a background prefetcher keeps ahead in the spool (default 8).
    pub prefetch: usize,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            system_id: None,
            data_dir: PathBuf::from("."),
            prefetch: 8,
        }
    }
}

fn is_not_found(e: &tidemark_repo::Error) -> bool {
    matches!(e, tidemark_repo::Error::Storage(s) if s.kind == ErrorKind::NotFound)
}

/// Fetch `name` from the archive into `dest`, verified, never leaving a partial file there.
/// Segments after it are fetched ahead into the spool, so the next calls are local.
///
/// # Errors
/// `Database` for a name that is not WAL; repository errors for anything but absence (a
/// damaged segment is `Corrupt`): the caller must make PostgreSQL stop, not carry on.
pub async fn fetch(
    repo: &Repository,
    name: &str,
    dest: &Path,
    o: &FetchOptions,
) -> Result<Fetched> {
    let kind = WalFile::parse(name).ok_or_else(|| {
        bad_wal(
            Path::new(name),
            "not a WAL file name PostgreSQL would ask for",
        )
    })?;
    let system_id = match o.system_id {
        Some(id) => id,
        None => wal::control_system_id(&o.data_dir).map_err(|e| bad_wal(&o.data_dir, e))?,
    };
    let stream = wal::stream(system_id);
    // A whole file missing or damaged here is read from the repository's fallback locations
    // inside `read_segment` (format §9a); streamed pieces are looked for here only.
    let data = match fetch_at(repo, &stream, name, &kind).await? {
        Some(d) => d,
        None => return Ok(Fetched::NotFound),
    };
    write_atomic(dest, &data).map_err(|e| io("write", dest, e))?;
    Ok(Fetched::Restored(data.len() as u64))
}

/// `name`, whole and verified: `None` when the repository does not have it (for a segment:
/// neither whole nor as streamed pieces).
async fn fetch_at(
    repo: &Repository,
    stream: &str,
    name: &str,
    kind: &WalFile,
) -> Result<Option<Bytes>> {
    match read_segment(repo, stream, name).await {
        Ok(d) => Ok(Some(d)),
        Err(e) if is_not_found(&e) => match kind {
            WalFile::Segment(seg) => streamed(repo, stream, *seg).await,
            _ => Ok(None),
        },
        Err(e) => Err(e.into()),
    }
}

/// The prefetch spool next to `dest` (inside `pg_wal`).
pub fn prefetch_dir(dest: &Path) -> PathBuf {
    dest.parent()
        .unwrap_or_else(|| Path::new("."))
        .join(SPOOL)
        .join("prefetch")
}

/// Serve `name` from the prefetch spool, if a prefetcher put it there: a rename, no
/// repository access. Spooled files were verified when they were written, and archived names
/// are immutable, so a file left from an earlier recovery is still right.
///
/// # Errors
/// When the spooled file exists but cannot be moved or copied to `dest`.
pub fn take_spooled(name: &str, dest: &Path) -> Result<bool> {
    if WalFile::parse(name).is_none() {
        return Ok(false);
    }
    let spooled = prefetch_dir(dest).join(name);
    match std::fs::rename(&spooled, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        // Another file system (a symlinked pg_wal): copy, then drop the spooled file.
        Err(_) => {
            let data = std::fs::read(&spooled).map_err(|e| io("read", &spooled, e))?;
            write_atomic(dest, &data).map_err(|e| io("write", dest, e))?;
            let _ = std::fs::remove_file(&spooled);
            Ok(true)
        }
    }
}

/// How many of the `n` segments after `name` are waiting in the spool of `dest`.
pub fn spooled_ahead(name: &str, dest: &Path, seg_size: u64, n: usize) -> usize {
    let Some(WalFile::Segment(mut seg)) = WalFile::parse(name) else {
        return 0;
    };
    let spool = prefetch_dir(dest);
    (0..n)
        .filter(|_| {
            seg = seg.next(seg_size);
            spool.join(seg.to_string()).exists()
        })
        .count()
}

/// Record that PostgreSQL asked for `name`, for the background prefetcher to follow.
pub fn note_requested(name: &str, dest: &Path) {
    if !matches!(WalFile::parse(name), Some(WalFile::Segment(_))) {
        return;
    }
    let spool = prefetch_dir(dest);
    if std::fs::create_dir_all(&spool).is_ok() {
        let _ = write_atomic(&spool.join(".requested"), name.as_bytes());
    }
}

/// How long the prefetcher stays without a new request before it exits.
const PREFETCH_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the postmaster of `data_dir` runs: its `postmaster.pid` names a live process.
pub(crate) fn postmaster_alive(data_dir: &Path) -> bool {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next()?.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// Whether the server of `data_dir` is still in archive recovery: it runs, and its
/// `recovery.signal` (or `standby.signal`), which PostgreSQL removes when recovery ends, is
/// still there.
pub fn recovering(data_dir: &Path) -> bool {
    (data_dir.join("recovery.signal").exists() || data_dir.join("standby.signal").exists())
        && postmaster_alive(data_dir)
}

/// Remove the prefetch spool next to `dest` (inside `pg_wal`), and the spool directory when
/// nothing else is in it: a cluster that has left recovery holds nothing of ours.
fn remove_prefetched(dest: &Path) {
    let prefetch = prefetch_dir(dest);
    if let Err(e) = std::fs::remove_dir_all(&prefetch) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("failed to remove {}: {e}", prefetch.display());
        }
    }
    if let Some(root) = prefetch.parent() {
        // Only when empty: wal-push keeps its records there.
        let _ = std::fs::remove_dir(root);
    }
}

/// The background prefetcher's lock, holding its pid: beside the prefetch spool, not in it,
/// so that removing the spool when recovery ends leaves it for `clean_after_recovery` to
/// wait on.
pub fn prefetch_lock(dest: &Path) -> PathBuf {
    prefetch_dir(dest).with_file_name("prefetcher.pid")
}

/// Called by the prefetcher once it released its lock: when recovery is over, nothing of
/// ours stays in `pg_wal`.
pub fn prefetcher_done(dest: &Path, data_dir: &Path) {
    if !recovering(data_dir) {
        remove_prefetched(dest);
    }
}

/// After the server of `data_dir` left recovery (promoted, or stopped): wait up to `wait` for
/// a background prefetcher to notice and exit, then remove the prefetch spool, so that the
/// restored cluster holds nothing of ours. `pg restore --start` calls it; the prefetcher
/// does the same itself when it sees recovery end, and `recovery_end_command` covers a
/// recovery that ends while no prefetcher runs.
pub fn clean_after_recovery(data_dir: &Path, wait: std::time::Duration) {
    let dest = data_dir.join("pg_wal").join("RECOVERYXLOG");
    let lock = prefetch_lock(&dest);
    let until = std::time::Instant::now() + wait;
    while std::time::Instant::now() < until {
        let holder = std::fs::read_to_string(&lock)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        if !holder.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    remove_prefetched(&dest);
}

/// The `recovery_end_command` that `pg restore` writes: PostgreSQL runs it in the data
/// directory once archive recovery ends, and it removes the prefetch spool.
pub const RECOVERY_END_COMMAND: &str =
    "rm -rf pg_wal/tidemark-spool/prefetch; rmdir pg_wal/tidemark-spool 2>/dev/null; true";

/// The background prefetcher: keeps the `o.prefetch` segments after the latest one PostgreSQL
/// asked for (`note_requested`) in the spool of `dest`, verified, written then renamed, until
/// no new request came for 10 s, or recovery ended, or the server went away (see
/// `recovering`); in the last two cases it removes the spool as it exits, since nothing will
/// ask for what is in it. It opens the repository once for the whole recovery (with a
/// passphrase, key derivation costs more than fetching a segment). Failures only mean a later
/// call fetches for itself.
///
/// # Errors
/// When the system identifier cannot be read or the spool cannot be made.
pub async fn prefetch_after(
    repo: &Repository,
    name: &str,
    dest: &Path,
    o: &FetchOptions,
    seg_size: u64,
) -> Result<usize> {
    let system_id = match o.system_id {
        Some(id) => id,
        None => wal::control_system_id(&o.data_dir).map_err(|e| bad_wal(&o.data_dir, e))?,
    };
    let stream = wal::stream(system_id);
    let spool = prefetch_dir(dest);
    std::fs::create_dir_all(&spool).map_err(|e| io("create", &spool, e))?;
    let mut requested = name.to_owned();
    let mut since = std::time::Instant::now();
    let mut fetched = 0;
    loop {
        if let Ok(r) = std::fs::read_to_string(spool.join(".requested")) {
            let r = r.trim();
            if r != requested && matches!(WalFile::parse(r), Some(WalFile::Segment(_))) {
                requested = r.to_owned();
                since = std::time::Instant::now();
            }
        }
        let Some(WalFile::Segment(seg)) = WalFile::parse(&requested) else {
            break;
        };
        if !recovering(&o.data_dir) {
            remove_prefetched(dest);
            break;
        }
        if since.elapsed() > PREFETCH_IDLE || !spool.exists() {
            break;
        }
        let ahead = prefetch(repo, &stream, seg, seg_size, &spool, o.prefetch).await;
        fetched += ahead;
        // At the end of the archive, look again less often.
        let pause = if ahead < o.prefetch { 250 } else { 50 };
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
    }
    Ok(fetched)
}

/// A segment the streamer had not finished: its pieces from the start, joined and padded with
/// zeros to the segment size, as `pg_receivewal` leaves a `.partial` file. Recovery reads up
/// to the last whole record and ends there. Pieces after a missing one are not used (and said
/// so): the bytes they hold cannot be replayed without the ones before.
async fn streamed(repo: &Repository, stream: &str, seg: wal::SegmentName) -> Result<Option<Bytes>> {
    let names =
        tidemark_repo::log::list_segments_starting(repo, stream, &format!("{seg}.s")).await?;
    let mut pieces: Vec<(u64, &String)> = names
        .iter()
        .filter_map(|n| wal::parse_piece(n).map(|(_, off)| (off, n)))
        .collect();
    if pieces.is_empty() {
        return Ok(None);
    }
    pieces.sort();
    let mut out: Vec<u8> = Vec::new();
    let mut seg_size = 0u64;
    for (offset, name) in pieces {
        if offset > out.len() as u64 {
            tracing::warn!(
                piece = %name, have = out.len(),
                "a streamed piece is missing before this one; recovery ends before it"
            );
            break;
        }
        let info = tidemark_repo::log::segment_info(repo, stream, name).await?;
        seg_size = info
            .meta
            .get("seg_size")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(seg_size);
        let data = read_segment(repo, stream, name).await?;
        // A piece may overlap the ones before it; only its new bytes count.
        let skip = (out.len() as u64 - offset) as usize;
        if skip < data.len() {
            out.extend_from_slice(&data[skip..]);
        }
    }
    if seg_size == 0 || out.len() as u64 > seg_size {
        return Err(Error::Database {
            action: "restore",
            database: format!("{stream}/{seg}"),
            reason: "its streamed pieces do not say the segment size, or exceed it".into(),
        });
    }
    tracing::info!(
        segment = %seg, bytes = out.len(),
        "restoring a segment the streamer had not finished; recovery ends at its last record"
    );
    out.resize(seg_size as usize, 0);
    Ok(Some(Bytes::from(out)))
}

/// Fetch the `n` segments after `seg` into `spool` (verified; write-then-rename), four at a
/// time, in order, stopping at the first the archive does not have; how many were fetched.
async fn prefetch(
    repo: &Repository,
    stream: &str,
    seg: wal::SegmentName,
    seg_size: u64,
    spool: &Path,
    n: usize,
) -> usize {
    let mut names = Vec::new();
    let mut next = seg;
    for _ in 0..n {
        next = next.next(seg_size);
        names.push(next.to_string());
    }
    let mut fetched = 0;
    let mut results = futures::stream::iter(names)
        .map(|name| async move {
            if spool.join(&name).exists() {
                return true;
            }
            match read_segment(repo, stream, &name).await {
                Ok(d) => write_atomic(&spool.join(&name), &d).is_ok(),
                Err(e) => {
                    if !is_not_found(&e) {
                        tracing::debug!(segment = %name, error = %e, "not prefetched");
                    }
                    false
                }
            }
        })
        .buffered(4);
    while let Some(ok) = results.next().await {
        if !ok {
            break;
        }
        fetched += 1;
    }
    fetched
}

/// The archived WAL of one timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TimelineWal {
    /// The timeline.
    pub timeline: u32,
    /// First and last segment archived.
    pub first: String,
    /// The last segment archived.
    pub last: String,
    /// Segments archived.
    pub segments: usize,
    /// Missing runs of segments between `first` and `last`: (first missing, last missing).
    pub gaps: Vec<(String, String)>,
    /// For each gap, in order: when the segments on either side of it reached the archive
    /// (what a timeline can draw).
    #[serde(skip)]
    pub gap_times: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)>,
    /// When the last transaction in the timeline's archived WAL ended, read from the records
    /// of its newest segments; None when the newest WAL is a streamed piece or was archived
    /// without a scan (then only the upload time bounds it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_xact: Option<chrono::DateTime<chrono::Utc>>,
    /// When the timeline began (its promotion), read from its first segment's records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub began: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether `last_xact` was read from the records (None then means: no transaction in the
    /// newest segments).
    #[serde(skip)]
    pub scanned: bool,
}

/// What the archive holds for one cluster.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ArchiveSummary {
    /// Per timeline, in order.
    pub timelines: Vec<TimelineWal>,
    /// When the newest WAL object reached the archive: no commit after this can be recovered.
    pub latest_upload: Option<chrono::DateTime<chrono::Utc>>,
    /// Timeline history files and when each reached the archive (after it began: archiving
    /// is asynchronous).
    pub histories: Vec<(u32, chrono::DateTime<chrono::Utc>)>,
    /// When each timeline began, read from its first segment's records (the promotion's
    /// end-of-recovery record or checkpoint); absent for a timeline whose first segment was
    /// archived without that record scanned.
    pub began: std::collections::BTreeMap<u32, chrono::DateTime<chrono::Utc>>,
}

impl ArchiveSummary {
    /// The latest time a time target can name: recovery to a time stops at the first
    /// transaction that ended after it, so one must exist in the archive. The last
    /// transaction's end where every timeline's newest WAL was read for it, else the newest
    /// upload (an upper bound); and which of the two it is.
    pub fn time_end(&self) -> Option<(chrono::DateTime<chrono::Utc>, &'static str)> {
        if self.timelines.iter().all(|t| t.scanned) {
            if let Some(end) = self.timelines.iter().filter_map(|t| t.last_xact).max() {
                return Some((end, "the last transaction in the archived WAL ended"));
            }
        }
        self.latest_upload
            .map(|u| (u, "the newest WAL reached the archive"))
    }

    /// The timeline that was current at wall time `t`: the newest one that began (was
    /// promoted) at or before `t`. When a timeline began is read from the records at its
    /// switch point (`began`); for one archived without them, the time its history file
    /// reached the archive stands in, which is later than the promotion (archiving is
    /// asynchronous), so a time shortly after a promotion could fall on the old timeline,
    /// where nothing was committed after it. `None` when no timeline began by then (the base
    /// backup's own timeline is meant). A restore that branched off earlier and promoted
    /// makes a newer timeline that does not contain the times before its promotion, so
    /// "latest" would be wrong for them.
    pub fn timeline_at(&self, t: chrono::DateTime<chrono::Utc>) -> Option<u32> {
        self.histories
            .iter()
            .map(|(tli, archived)| (*tli, self.began.get(tli).copied().unwrap_or(*archived)))
            .chain(self.began.iter().map(|(tli, at)| (*tli, *at)))
            .filter(|(_, at)| *at <= t)
            .map(|(tli, _)| tli)
            .max()
    }
}

/// When the last transaction in `files` (one timeline's segments, in order) ended: the newest
/// segments' scans, read back from the newest until one holds a transaction. `Some(None)`:
/// the timeline's segments hold none. `None`: unknown, because a segment on the way has no
/// scan (archived by an older tidemark) or 16 were read without finding one (a long idle
/// stretch of switched segments is not read whole).
async fn last_transaction(
    repo: &Repository,
    stream: &str,
    files: &[(wal::SegmentName, &str)],
    seg_size: u64,
) -> Result<Option<Option<chrono::DateTime<chrono::Utc>>>> {
    // The segment after the one being read, for a record split between the two.
    let mut newer: Option<(wal::SegmentName, super::walscan::Scan)> = None;
    for (seg, name) in files.iter().rev().take(16) {
        let info = tidemark_repo::log::segment_info(repo, stream, name).await?;
        let Some(scan) = info.meta.get(SCAN) else {
            return Ok(None);
        };
        let scan: super::walscan::Scan = serde_json::from_value(scan.clone()).unwrap_or_default();
        if scan.incomplete.is_some() {
            // Transactions past where its walk ended are not in it: unknown, as unscanned.
            return Ok(None);
        }
        let split = newer
            .as_ref()
            .filter(|(n, _)| *n == seg.next(seg_size))
            .and_then(|(_, n)| super::walscan::join(&scan, n))
            .and_then(|j| j.last_xact);
        let last = scan.last_xact.max(split);
        if last.is_some() {
            return Ok(Some(last));
        }
        newer = Some((*seg, scan));
    }
    Ok((files.len() <= 16).then_some(None))
}

/// The scans of every segment a cluster's archive holds (section 7b), in LSN order
/// (timelines in order within one position; for a segment only streamed pieces hold so far,
/// the newest piece's); None for a segment archived without one.
///
/// # Errors
/// Storage errors.
pub async fn scans(
    repo: &Repository,
    system_id: u64,
    seg_size: u64,
) -> Result<Vec<(wal::SegmentName, Option<super::walscan::Scan>)>> {
    let stream = wal::stream(system_id);
    let names = tidemark_repo::log::list_segments(repo, &stream).await?;
    let mut segments: Vec<(wal::SegmentName, String)> = names
        .iter()
        .filter_map(|n| match WalFile::parse(n) {
            Some(WalFile::Segment(s) | WalFile::Partial(s)) => Some((s, n.clone())),
            _ => None,
        })
        .collect();
    let whole: std::collections::HashSet<wal::SegmentName> =
        segments.iter().map(|(s, _)| *s).collect();
    // Segments so far held only by streamed pieces: the newest piece's scan covers the
    // segment from its start.
    let mut newest: std::collections::BTreeMap<wal::SegmentName, (u64, &String)> =
        Default::default();
    for n in &names {
        if let Some((s, off)) = wal::parse_piece(n).filter(|(s, _)| !whole.contains(s)) {
            let e = newest.entry(s).or_insert((off, n));
            if off >= e.0 {
                *e = (off, n);
            }
        }
    }
    segments.extend(newest.into_iter().map(|(s, (_, n))| (s, n.clone())));
    segments.sort_by_key(|(s, _)| (s.log, s.seg, s.timeline));
    futures::stream::iter(segments)
        .map(|(seg, name)| {
            let stream = stream.clone();
            async move {
                let info = tidemark_repo::log::segment_info(repo, &stream, &name).await?;
                let scan = info
                    .meta
                    .get(SCAN)
                    .and_then(|v| serde_json::from_value(v.clone()).ok());
                Ok::<_, Error>((seg, scan))
            }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()
        .map(|mut scans| {
            join_split_records(&mut scans, seg_size);
            scans
        })
}

/// How many segments whose xid range holds a transaction are read to find its end, at most:
/// past that the search is left to PostgreSQL.
const XACT_SEARCH: usize = 32;

/// Where transaction `xid` ended in the archived WAL of `system_id`: the LSN of its commit
/// or abort record, found by reading the segments whose scanned xid range holds it (section
/// 7b; the range is a smallest and a largest, so it only says where to look), in WAL order.
/// `Ok(None)`: not in any of them, or more than 32 would have to be read.
///
/// # Errors
/// Storage errors and damaged segments.
pub async fn xact_end(
    repo: &Repository,
    system_id: u64,
    scans: &[(wal::SegmentName, Option<super::walscan::Scan>)],
    seg_size: u64,
    xid: u32,
) -> Result<Option<u64>> {
    let stream = wal::stream(system_id);
    let candidates: Vec<usize> = (0..scans.len())
        .filter(|&i| {
            scans[i]
                .1
                .as_ref()
                .and_then(|s| s.xids)
                .is_some_and(|(lo, hi)| (lo..=hi).contains(&xid))
        })
        .collect();
    if candidates.len() > XACT_SEARCH {
        tracing::warn!(
            segments = candidates.len(),
            "too many archived segments may hold the transaction's end; PostgreSQL will look for it"
        );
        return Ok(None);
    }
    for i in candidates {
        let (seg, scan) = (
            &scans[i].0,
            scans[i].1.as_ref().expect("a candidate has a scan"),
        );
        // Its record may be the one split with the next segment (already in the range).
        let next = scans
            .iter()
            .find(|(s, _)| *s == seg.next(seg_size))
            .and_then(|(_, s)| s.as_ref());
        if let Some(lsn) = next.and_then(|n| super::walscan::find_end_split(scan, n, xid)) {
            return Ok(Some(lsn));
        }
        let name = seg.to_string();
        let Some(data) = fetch_at(repo, &stream, &name, &WalFile::Segment(*seg)).await? else {
            continue;
        };
        let page = wal::long_header(&data).map_or(8192, |h| u64::from(h.block_size));
        if let Some(lsn) = super::walscan::find_end(&data, seg.start_lsn(seg_size), page, xid) {
            return Ok(Some(lsn));
        }
    }
    Ok(None)
}

/// The restore points in `scans`, in WAL order, each once: a new timeline's first segment
/// repeats its parent's records up to the switch, so one point can be in two scans.
pub fn restore_points(
    scans: &[(wal::SegmentName, Option<super::walscan::Scan>)],
) -> Vec<super::walscan::RestorePoint> {
    let mut points: Vec<super::walscan::RestorePoint> = scans
        .iter()
        .filter_map(|(_, s)| s.as_ref())
        .flat_map(|s| s.restore_points.iter().cloned())
        .collect();
    points.dedup_by(|a, b| a.name == b.name && a.lsn == b.lsn);
    points
}

/// Add to each segment's scan the record it shares with the next segment (section 7b).
fn join_split_records(
    scans: &mut [(wal::SegmentName, Option<super::walscan::Scan>)],
    seg_size: u64,
) {
    let at: std::collections::HashMap<wal::SegmentName, usize> = scans
        .iter()
        .enumerate()
        .map(|(i, (s, _))| (*s, i))
        .collect();
    let joined: Vec<(usize, super::walscan::Scan)> = (0..scans.len())
        .filter_map(|i| {
            let j = *at.get(&scans[i].0.next(seg_size))?;
            let s = super::walscan::join(scans[i].1.as_ref()?, scans[j].1.as_ref()?)?;
            Some((i, s))
        })
        .collect();
    for (i, s) in joined {
        if let Some(scan) = &mut scans[i].1 {
            scan.absorb(s);
        }
    }
}

/// Summarize the archived WAL of a cluster: segments per timeline, gaps, the newest upload.
/// With fallback locations (format §9a), the archive includes the whole files any of them
/// holds: a segment missing at the repository's own location is fetched from another.
///
/// # Errors
/// Storage errors.
pub async fn summarize(repo: &Repository, system_id: u64, seg_size: u64) -> Result<ArchiveSummary> {
    let prefix = format!("logs/{}/", wal::stream(system_id));
    let mut metas = repo
        .storage()
        .list(&prefix)
        .await
        .map_err(tidemark_repo::Error::from)?;
    for other in repo.fallback_repositories() {
        let seen: std::collections::HashSet<String> =
            metas.iter().map(|m| m.path.clone()).collect();
        match other.storage().list(&prefix).await {
            // Whole files only: streamed pieces are fetched from the repository's own location.
            Ok(more) => metas.extend(more.into_iter().filter(|m| {
                !seen.contains(&m.path)
                    && m.path
                        .strip_prefix(&prefix)
                        .and_then(|n| n.rsplit('/').next())
                        .is_some_and(|n| wal::parse_piece(n).is_none())
            })),
            Err(e) => tracing::warn!(
                "failed to list the WAL archive at {}: {e}",
                other.location()
            ),
        }
    }
    let mut by_tli: std::collections::BTreeMap<u32, Vec<wal::SegmentName>> = Default::default();
    // Per timeline, the whole segments and .partial files by name, and the newest streamed
    // piece (its segment and offset, and name).
    let mut files: std::collections::BTreeMap<u32, Vec<(wal::SegmentName, &str)>> =
        Default::default();
    let mut newest_piece: std::collections::BTreeMap<u32, ((wal::SegmentName, u64), &str)> =
        Default::default();
    let mut latest_upload = None;
    let mut histories = Vec::new();
    let mut uploaded: std::collections::BTreeMap<wal::SegmentName, chrono::DateTime<chrono::Utc>> =
        Default::default();
    for m in &metas {
        let Some(name) = m.path.strip_prefix(&prefix) else {
            continue;
        };
        // Streamed pieces count as their segment (partly) archived.
        if let Some((s, off)) = wal::parse_piece(name) {
            let n = newest_piece.entry(s.timeline).or_insert(((s, off), name));
            if (s, off) > n.0 {
                *n = ((s, off), name);
            }
        }
        let piece = wal::parse_piece(name).map(|(s, _)| WalFile::Partial(s));
        let whole = WalFile::parse(name);
        if let Some(WalFile::Segment(s) | WalFile::Partial(s)) = &whole {
            files.entry(s.timeline).or_default().push((*s, name));
        }
        match piece.or(whole) {
            Some(WalFile::Segment(s) | WalFile::Partial(s)) => {
                by_tli.entry(s.timeline).or_default().push(s);
                let t = uploaded.entry(s).or_insert(m.modified);
                *t = (*t).max(m.modified);
                latest_upload = latest_upload.max(Some(m.modified));
            }
            Some(WalFile::History(tli)) => histories.push((tli, m.modified)),
            _ => {}
        }
    }
    let mut timelines = Vec::new();
    let mut began = std::collections::BTreeMap::new();
    for (tli, mut segs) in by_tli {
        segs.sort();
        segs.dedup();
        let mut gaps = Vec::new();
        let mut gap_times = Vec::new();
        for w in segs.windows(2) {
            let expected = w[0].next(seg_size);
            if expected != w[1] {
                let last_missing = wal::SegmentName::containing(
                    tli,
                    w[1].start_lsn(seg_size) - seg_size,
                    seg_size,
                );
                gaps.push((expected.to_string(), last_missing.to_string()));
                gap_times.push((uploaded[&w[0]], uploaded[&w[1]]));
            }
        }
        let last = segs[segs.len() - 1];
        // The whole segments, then the newest piece when its segment is not whole yet (its
        // scan covers the segment from the start).
        let mut f = files.remove(&tli).unwrap_or_default();
        f.sort();
        if let Some(((s, _), name)) = newest_piece.get(&tli) {
            if f.last().is_none_or(|(w, _)| w < s) {
                f.push((*s, name));
            }
        }
        let found = last_transaction(repo, &wal::stream(system_id), &f, seg_size).await?;
        if let Some((_, name)) = f.first() {
            let info =
                tidemark_repo::log::segment_info(repo, &wal::stream(system_id), name).await?;
            let begin = info
                .meta
                .get(SCAN)
                .and_then(|v| serde_json::from_value::<super::walscan::Scan>(v.clone()).ok())
                .and_then(|s| s.began)
                .filter(|b| b.timeline == tli);
            if let Some(b) = begin {
                began.insert(tli, b.time);
            }
        }
        timelines.push(TimelineWal {
            timeline: tli,
            first: segs[0].to_string(),
            last: last.to_string(),
            segments: segs.len(),
            gaps,
            gap_times,
            last_xact: found.flatten(),
            began: began.get(&tli).copied(),
            scanned: found.is_some(),
        });
    }
    Ok(ArchiveSummary {
        timelines,
        latest_upload,
        histories,
        began,
    })
}
