//! `tidemark wal-push %p` (archive_command) and `tidemark wal-fetch %f %p` (restore_command).
//!
//! Their exit codes follow what PostgreSQL makes of them, not tidemark's table: `wal-push`
//! exits 0 only once the segment is durable; `wal-fetch` exits 1 only when the archive does not
//! have the file, and 126 for any failure, which makes PostgreSQL stop recovery instead of
//! ending it early as if the archive were exhausted.

use std::path::PathBuf;

use anyhow::Result;
use tidemark_engine::postgres::archive::{self, FetchOptions, Fetched, PushOptions};

use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The WAL file (PostgreSQL's %p, relative to the data directory).
    path: PathBuf,
    /// Segments archived per call, this one included (further ones are taken from
    /// pg_wal/archive_status/*.ready).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Spool directory for records of segments archived ahead (default pg_wal/tidemark-spool).
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// The data directory (default: the current directory, where archive_command runs).
    #[arg(long, env = "PGDATA")]
    pgdata: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// The file PostgreSQL wants (%f).
    name: String,
    /// Where to put it (%p).
    dest: PathBuf,
    /// The cluster's system identifier (default: read from global/pg_control).
    #[arg(long)]
    system_id: Option<u64>,
    /// Segments a background prefetcher keeps ahead in pg_wal/tidemark-spool/prefetch
    /// (0 turns prefetch off).
    #[arg(long, default_value_t = 8)]
    prefetch: usize,
    /// Internal: run as the background prefetcher for the segments after NAME.
    #[arg(long, hide = true)]
    prefetch_only: bool,
    /// Internal: the segment size, for the prefetcher.
    #[arg(long, hide = true, default_value_t = 16 << 20)]
    seg_size: u64,
    /// The data directory being recovered (default: the current directory).
    #[arg(long, env = "PGDATA")]
    pgdata: Option<PathBuf>,
    /// Fetch the file here when the repository's copy is missing or damaged (repeatable; the
    /// background prefetcher reads the repository only).
    #[command(flatten)]
    fallback: crate::targets::FallbackArgs,
}

/// The exit code that makes PostgreSQL abort recovery rather than treat a failure as the end
/// of the archive.
pub const FETCH_FAILED: i32 = 126;
/// "Not in the archive".
pub const FETCH_NOT_FOUND: i32 = 1;

pub async fn push(ctx: &Context, a: PushArgs) -> Result<i32> {
    let mut o = PushOptions {
        batch: a.batch.max(1),
        spool_dir: a.spool_dir,
        data_dir: a.pgdata.unwrap_or_else(|| PathBuf::from(".")),
        repository: String::new(),
    };
    // Archived ahead by an earlier call with exactly this content, to this very repository:
    // one read of its config object tells which repository is there now (a record made for
    // one created earlier at the same place never counts), without the key derivation.
    let storage = ctx.storage()?;
    let fingerprint = tidemark_repo::Repository::fingerprint(&*storage).await.ok();
    if let Some(id) = fingerprint
        .as_deref()
        .and_then(|fp| archive::known_repository(&a.path, &o, fp))
    {
        o.repository = id;
        if archive::already_pushed(&a.path, &o) {
            archive::forget_removed(&a.path, &o);
            return Ok(crate::exit::OK);
        }
    }
    let repo = ctx.open().await?;
    o.repository = repo.config().id.clone();
    // The fingerprint read before opening is the one that opened, unless the repository was
    // replaced in between: then it maps to the new id only until the next call reads again.
    let now = tidemark_repo::Repository::fingerprint(&**repo.storage())
        .await
        .ok();
    if let Some(fp) = now.filter(|n| fingerprint.as_ref() == Some(n)) {
        if let Err(e) = archive::remember_repository(&a.path, &o, &fp, &o.repository) {
            tracing::warn!("{e:#}");
        }
    }
    let report = archive::push(&repo, &a.path, &o).await?;
    if ctx.json {
        super::print_json(&report)?;
    }
    Ok(crate::exit::OK)
}

/// The prefetcher's lock in the spool: one prefetcher at a time.
struct PrefetchLock(PathBuf);

impl PrefetchLock {
    /// Take the lock at `path` unless a live process holds it.
    fn take(path: &std::path::Path) -> Option<PrefetchLock> {
        std::fs::create_dir_all(path.parent()?).ok()?;
        let path = path.to_owned();
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    let _ = write!(f, "{}", std::process::id());
                    return Some(PrefetchLock(path));
                }
                Err(_) => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let alive = holder
                        .trim()
                        .parse::<u32>()
                        .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
                    if alive {
                        return None;
                    }
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        None
    }
}

impl Drop for PrefetchLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Start a background prefetcher for the segments after `name` (this command again, with
/// `--prefetch-only`), unless one runs or enough are spooled. PostgreSQL does not wait for it.
fn spawn_prefetcher(a: &FetchArgs, seg_size: u64) {
    if a.prefetch == 0
        || archive::spooled_ahead(&a.name, &a.dest, seg_size, a.prefetch) > a.prefetch / 2
    {
        return;
    }
    if archive::prefetch_lock(&a.dest).exists() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--prefetch-only".into());
    args.push("--seg-size".into());
    args.push(seg_size.to_string().into());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // Its own process group: not stopped with the restore_command's shell.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if let Err(e) = cmd.spawn() {
        tracing::debug!(error = %e, "no background prefetcher");
    }
}

/// The segment size from the long header at the start of a WAL file.
fn seg_size_of(path: &std::path::Path) -> Option<u64> {
    use std::io::Read;
    let mut head = [0u8; 40];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    tidemark_engine::postgres::wal::long_header(&head)
        .ok()
        .map(|h| u64::from(h.seg_size))
}

/// `wal-fetch` served from the prefetch spool, if the segment is there: no configuration, no
/// repository opening (no key derivation) at all. `None` when it must be fetched.
pub fn fetch_spooled(a: &FetchArgs) -> Option<i32> {
    if a.prefetch_only {
        return None;
    }
    if a.prefetch > 0 {
        archive::note_requested(&a.name, &a.dest);
    }
    match archive::take_spooled(&a.name, &a.dest) {
        Ok(true) => {
            if let Some(n) = seg_size_of(&a.dest) {
                spawn_prefetcher(a, n);
            }
            Some(crate::exit::OK)
        }
        Ok(false) => None,
        Err(e) => {
            eprintln!(
                "tidemark wal-fetch {}: {} (exit {FETCH_FAILED})",
                a.name,
                crate::exit::one_line(&anyhow::Error::from(e))
            );
            Some(FETCH_FAILED)
        }
    }
}

pub async fn fetch(ctx: &Context, a: FetchArgs) -> i32 {
    let o = FetchOptions {
        system_id: a.system_id,
        data_dir: a.pgdata.clone().unwrap_or_else(|| PathBuf::from(".")),
        prefetch: a.prefetch,
    };
    if a.prefetch_only {
        // The background prefetcher: failures only mean later calls fetch for themselves.
        if let Some(lock) = PrefetchLock::take(&archive::prefetch_lock(&a.dest)) {
            if let Ok(repo) = ctx.open().await {
                let _ = archive::prefetch_after(&repo, &a.name, &a.dest, &o, a.seg_size).await;
            }
            drop(lock);
            archive::prefetcher_done(&a.dest, &o.data_dir);
        }
        return crate::exit::OK;
    }
    let r = async {
        let repo = crate::targets::open_with_fallbacks(ctx, &a.fallback).await?;
        Ok::<_, anyhow::Error>(archive::fetch(&repo, &a.name, &a.dest, &o).await?)
    }
    .await;
    match r {
        Ok(Fetched::Restored(_)) => {
            if let Some(n) = seg_size_of(&a.dest) {
                spawn_prefetcher(&a, n);
            }
            crate::exit::OK
        }
        Ok(Fetched::NotFound) => FETCH_NOT_FOUND,
        Err(e) => {
            eprintln!(
                "tidemark wal-fetch {}: {} (exit {FETCH_FAILED}: PostgreSQL stops recovery here rather than end it early)",
                a.name,
                crate::exit::one_line(&e)
            );
            FETCH_FAILED
        }
    }
}
