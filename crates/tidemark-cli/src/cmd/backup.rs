//! `tidemark backup`: stdin, a command's stdout, an SQLite database, or files and directories.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use tidemark_engine::Engine;
use tidemark_repo::lock::LockOptions;
use tidemark_repo::ops::backup::{Backup, BackupOptions, Finished};
use tidemark_repo::progress::Progress;
use tidemark_repo::snapshot::{EntryType, SnapshotKind, StreamEntry};

use crate::context::{usage, Context};
use crate::output::{size, Bar};
use crate::targets::{locations_json, AlsoArgs, Targets};

/// The source of a backup failed; nothing was written as a snapshot.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceFailed(pub String);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Read the stream from stdin.
    #[arg(long, conflicts_with_all = ["command", "sqlite"])]
    stdin: bool,
    /// Run this shell command and back up its stdout; a non-zero exit abandons the backup.
    #[arg(long, conflicts_with = "sqlite")]
    command: Option<String>,
    /// Name of the stream for --stdin or --command.
    #[arg(long, default_value = "stdin")]
    stream_name: String,
    /// Back up this SQLite database with a consistent online copy.
    #[arg(long)]
    sqlite: Option<PathBuf>,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Seconds to wait for a conflicting lock.
    #[arg(long, default_value_t = 0)]
    lock_wait: u64,
    #[command(flatten)]
    also: AlsoArgs,
    /// Files and directories to back up.
    paths: Vec<PathBuf>,
}

pub async fn run(ctx: &Context, a: Args) -> Result<i32> {
    let sources = [
        a.stdin,
        a.command.is_some(),
        a.sqlite.is_some(),
        !a.paths.is_empty(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if sources != 1 {
        return Err(usage(
            "give exactly one source",
            "use --stdin, --command CMD, --sqlite PATH, or paths",
        ));
    }
    let repo = ctx.open().await?;
    let lock_opts = LockOptions {
        wait: std::time::Duration::from_secs(a.lock_wait),
        ..Default::default()
    };
    let mut targets = Targets::acquire(ctx, repo, &a.also, &lock_opts).await?;
    let result = backup(ctx, &targets, a).await;
    targets.release().await;
    result
}

async fn backup(ctx: &Context, targets: &Targets, a: Args) -> Result<i32> {
    let progress = Arc::new(Progress::default());
    let mut opts = BackupOptions {
        tags: a.tags.clone(),
        ..Default::default()
    };
    let bar = Bar::start("backup", None, progress.clone(), ctx.quiet || ctx.json);
    let positions = Default::default();
    let result = async {
        if let Some(db) = &a.sqlite {
            let engine = tidemark_engine::sqlite::Sqlite::new(db);
            opts.engine = engine.name().into();
            opts.kind = SnapshotKind::Physical;
            opts.database = engine.identity().await?;
            let b = targets.start(opts, progress.clone()).await?;
            return tidemark_engine::run_backup(&engine, b)
                .await
                .map_err(engine_error);
        }
        if a.stdin {
            opts.engine = "stdin".into();
            let mut b = targets.start(opts, progress.clone()).await?;
            b.add_stream(
                &a.stream_name,
                EntryType::Stream,
                std::io::stdin(),
                None,
                None,
            )
            .await?;
            return Ok(b.finish_report(positions).await?);
        }
        if let Some(cmd) = &a.command {
            opts.engine = "command".into();
            let mut child = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| SourceFailed(format!("failed to start the backup command: {e}")))?;
            let stdout = child.stdout.take().expect("piped stdout");
            let mut b = targets.start(opts, progress.clone()).await?;
            let added = b
                .add_stream(&a.stream_name, EntryType::Stream, stdout, None, None)
                .await;
            let status = tokio::task::spawn_blocking(move || child.wait()).await??;
            added?;
            if !status.success() {
                return Err(SourceFailed(format!(
                    "the backup command failed ({status}); no snapshot was written"
                ))
                .into());
            }
            return Ok(b.finish_report(positions).await?);
        }
        opts.engine = "files".into();
        opts.kind = SnapshotKind::Files;
        let mut b = targets.start(opts, progress.clone()).await?;
        // Sized beside the backup (as restic's scanner does), so that it starts at once.
        let (paths, sizing) = (a.paths.clone(), b.progress());
        tokio::task::spawn_blocking(move || {
            let total = paths.iter().map(|p| tree_size(p)).sum();
            Progress::add(&sizing.total, total);
        });
        for p in &a.paths {
            let base = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "root".into());
            add_path(&mut b, p, &base).await?;
        }
        Ok::<Finished, anyhow::Error>(b.finish_report(positions).await?)
    }
    .await;
    bar.finish();
    let f = result?;
    let snap = &f.snapshot;
    if ctx.json {
        super::print_json(&serde_json::json!({
            "id": f.id.to_hex(),
            "snapshot": snap,
            "locations": locations_json(&targets.outcomes(&f)),
        }))?;
    } else if !ctx.quiet {
        let s = &snap.summary;
        println!(
            "snapshot {} saved: {} read, {} new ({} stored) in {:.1}s",
            f.id.short(),
            size(s.raw_bytes),
            size(s.new_raw_bytes),
            size(s.new_stored_bytes),
            s.duration_seconds
        );
    }
    Ok(targets.report_missing(&f))
}

/// A repository failure keeps its own exit code; anything else failed at the source.
pub fn engine_error(e: tidemark_engine::Error) -> anyhow::Error {
    match e {
        tidemark_engine::Error::Repo(r) => anyhow::Error::from(r),
        other => anyhow::Error::from(SourceFailed(other.to_string())),
    }
}

/// Files up to this size are read whole and chunked without the streaming pipeline.
const SMALL_FILE: u64 = 1 << 20;

fn mtime(m: &std::fs::Metadata) -> Option<DateTime<Utc>> {
    m.modified().ok().map(DateTime::<Utc>::from)
}

fn mode(m: &std::fs::Metadata) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    Some(m.permissions().mode() & 0o7777)
}

/// Add `path` as `name`, recursing into directories in name order.
/// Bytes of the regular files under `path` (symbolic links not followed), for the progress
/// bar's total; what cannot be read counts nothing here and fails in the backup itself.
fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    if !meta.is_dir() {
        return 0;
    }
    std::fs::read_dir(path)
        .map(|d| d.flatten().map(|e| tree_size(&e.path())).sum())
        .unwrap_or(0)
}

async fn add_path(b: &mut Backup<'_>, path: &Path, name: &str) -> Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| SourceFailed(format!("failed to read {}: {e}", path.display())))?;
    let entry = |kind, target| StreamEntry {
        name: name.to_owned(),
        kind,
        size: 0,
        mode: mode(&meta),
        mtime: mtime(&meta),
        target,
        chunks: vec![],
    };
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path)
            .with_context(|| format!("failed to read link {}", path.display()))?;
        b.add_entry(entry(
            EntryType::Symlink,
            Some(target.to_string_lossy().into_owned()),
        ));
    } else if meta.is_dir() {
        b.add_entry(entry(EntryType::Dir, None));
        let mut children: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| SourceFailed(format!("failed to list {}: {e}", path.display())))?
            .collect::<std::io::Result<_>>()?;
        children.sort_by_key(|c| c.file_name());
        for c in children {
            let child_name = format!("{name}/{}", c.file_name().to_string_lossy());
            Box::pin(add_path(b, &c.path(), &child_name)).await?;
        }
    } else if meta.is_file() {
        // Small files are read whole and chunked in one step; large ones are streamed.
        if meta.len() <= SMALL_FILE {
            let data = std::fs::read(path)
                .map_err(|e| SourceFailed(format!("failed to read {}: {e}", path.display())))?;
            b.add_bytes(name, EntryType::File, data, mode(&meta), mtime(&meta))
                .await?;
        } else {
            let f = std::fs::File::open(path)
                .map_err(|e| SourceFailed(format!("failed to open {}: {e}", path.display())))?;
            b.add_stream(name, EntryType::File, f, mode(&meta), mtime(&meta))
                .await?;
        }
    }
    Ok(())
}
