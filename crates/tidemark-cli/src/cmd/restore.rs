//! `tidemark restore` and `tidemark dump`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use tidemark_engine::Engine;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::restore::{
    restore_file, restore_stream, restore_tree, safe_name, ChunkCheck, RestoreOptions,
};
use tidemark_repo::progress::Progress;
use tidemark_repo::snapshot::{EntryType, Snapshot, StreamEntry};
use tidemark_repo::Repository;

use crate::context::{usage, Context};
use crate::output::{size, Bar};
use crate::targets::{open_with_fallbacks, report_fallbacks, FallbackArgs};

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Snapshot id (or a unique prefix), or `latest`.
    snapshot: String,
    /// Where to restore: a database path (SQLite), a directory (files), a file (a stream), or `-` for stdout.
    #[arg(long, short)]
    target: PathBuf,
    /// Restore only this stream or path.
    #[arg(long)]
    stream: Option<String>,
    #[command(flatten)]
    fallback: FallbackArgs,
}

#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// Snapshot id (or a unique prefix), or `latest`.
    snapshot: String,
    /// The stream to write; the first one when omitted.
    stream: Option<String>,
    #[command(flatten)]
    fallback: FallbackArgs,
}

pub async fn run_restore(ctx: &Context, a: RestoreArgs) -> Result<i32> {
    let repo = open_with_fallbacks(ctx, &a.fallback).await?;
    let lock =
        LockGuard::acquire(&repo, LockKind::Shared, "restore", &LockOptions::default()).await?;
    let r = restore(ctx, &repo, &a).await;
    lock.release().await?;
    report_fallbacks(&repo);
    r
}

async fn restore(ctx: &Context, repo: &Repository, a: &RestoreArgs) -> Result<i32> {
    let (id, snap) = repo.find_snapshot(&a.snapshot).await?;
    let started = std::time::Instant::now();
    if snap.engine == "sqlite" && a.stream.is_none() && a.target != Path::new("-") {
        let report = tidemark_engine::sqlite::Sqlite::new(&a.target)
            .restore(repo, &id.short(), &snap, &a.target)
            .await?;
        if ctx.json {
            super::print_json(&report)?;
        } else if !ctx.quiet {
            println!(
                "restored snapshot {} to {} ({}, {}) in {:.1}s",
                id.short(),
                report.target,
                size(report.bytes),
                report.verified.as_deref().unwrap_or("not verified"),
                started.elapsed().as_secs_f64()
            );
        }
        return Ok(crate::exit::OK);
    }
    let index = repo
        .load_index_for(snap.streams.iter().flat_map(|s| &s.chunks))
        .await?;
    let progress = Arc::new(Progress::default());
    let wanted: Vec<&StreamEntry> = snap
        .streams
        .iter()
        .filter(|s| {
            a.stream
                .as_ref()
                .is_none_or(|n| s.name == *n || s.name.starts_with(&format!("{n}/")))
        })
        .collect();
    if wanted.is_empty() {
        return Err(usage(
            format!(
                "snapshot {} has no stream {:?}",
                id.short(),
                a.stream.as_deref().unwrap_or("")
            ),
            "list streams with `tidemark snapshots --json`",
        ));
    }
    let total = wanted.iter().map(|s| s.size).sum();
    let bar = Bar::start(
        "restore",
        Some(total),
        progress.clone(),
        ctx.quiet || ctx.json || a.target == Path::new("-"),
    );
    let result = async {
        if a.target == Path::new("-") {
            let s = wanted[0];
            restore_stream(
                repo,
                &index,
                s,
                std::io::BufWriter::with_capacity(1 << 20, raw_stdout()?),
                &RestoreOptions::default(),
                progress.clone(),
            )
            .await?;
            return Ok::<_, anyhow::Error>(());
        }
        let is_tree = snap.streams.iter().any(|s| s.kind != EntryType::Stream);
        if is_tree {
            restore_tree(
                repo,
                &index,
                &wanted,
                "",
                &a.target,
                progress.clone(),
                ChunkCheck::Rehash,
            )
            .await?;
            Ok(())
        } else if wanted.len() == 1 {
            restore_file(repo, &index, wanted[0], &a.target, progress.clone(), true).await?;
            Ok(())
        } else {
            std::fs::create_dir_all(&a.target)
                .with_context(|| format!("failed to create {}", a.target.display()))?;
            for s in wanted {
                restore_file(
                    repo,
                    &index,
                    s,
                    &a.target.join(safe_name(&s.name)?),
                    progress.clone(),
                    true,
                )
                .await?;
            }
            Ok(())
        }
    }
    .await;
    bar.finish();
    result?;
    if ctx.json {
        super::print_json(
            &serde_json::json!({"snapshot": id.to_hex(), "target": a.target, "bytes": total}),
        )?;
    } else if !ctx.quiet {
        println!(
            "restored snapshot {} to {} ({}) in {:.1}s",
            id.short(),
            a.target.display(),
            size(total),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(crate::exit::OK)
}

/// Standard output as a plain file: `std::io::stdout()` is line-buffered, which scans every byte
/// of a restored dump for newlines and splits writes at them.
fn raw_stdout() -> Result<std::fs::File> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("failed to duplicate stdout")?;
    Ok(std::fs::File::from(fd))
}

pub async fn run_dump(ctx: &Context, a: DumpArgs) -> Result<i32> {
    let repo = open_with_fallbacks(ctx, &a.fallback).await?;
    let lock = LockGuard::acquire(&repo, LockKind::Shared, "dump", &LockOptions::default()).await?;
    let r = dump(&repo, &a).await;
    lock.release().await?;
    report_fallbacks(&repo);
    r
}

async fn dump(repo: &Repository, a: &DumpArgs) -> Result<i32> {
    let (id, snap): (_, Snapshot) = repo.find_snapshot(&a.snapshot).await?;
    let s = match &a.stream {
        Some(n) => snap.streams.iter().find(|s| s.name == *n),
        None => snap
            .streams
            .iter()
            .find(|s| matches!(s.kind, EntryType::Stream | EntryType::File)),
    }
    .ok_or_else(|| {
        usage(
            format!("snapshot {} has no such stream", id.short()),
            "list streams with `tidemark snapshots --json`",
        )
    })?;
    let index = repo.load_index_for(&s.chunks).await?;
    restore_stream(
        repo,
        &index,
        s,
        std::io::BufWriter::with_capacity(1 << 20, raw_stdout()?),
        &RestoreOptions::default(),
        Default::default(),
    )
    .await?;
    std::io::stdout().flush()?;
    Ok(crate::exit::OK)
}
