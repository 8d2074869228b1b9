//! `tidemark copy --to URL [SNAPSHOT...]`: fill another location of the repository (--repo is
//! the source) with the snapshots and log segments it lacks (format §9a).

use anyhow::Result;
use tidemark_repo::id::SnapshotId;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::copy::{copy_segments, copy_snapshots, CopyReport};
use tidemark_repo::Repository;

use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The location to fill (made with `tidemark init --copy-from`).
    #[arg(long, value_name = "URL")]
    to: String,
    /// A storage option of the --to location (KEY=VALUE, repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    to_option: Vec<String>,
    /// Snapshots to copy (id prefixes or `latest`); default: every snapshot the target lacks.
    snapshots: Vec<String>,
    /// Copy no log segments.
    #[arg(long)]
    no_logs: bool,
}

pub async fn run(ctx: &Context, a: Args) -> Result<i32> {
    let from = ctx.open().await?;
    let to = Repository::open(ctx.other_storage(&a.to, &a.to_option)?, &ctx.secret()?).await?;
    let ids: Vec<SnapshotId> = if a.snapshots.is_empty() {
        from.snapshots()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    } else {
        let mut v = Vec::new();
        for s in &a.snapshots {
            v.push(from.find_snapshot(s).await?.0);
        }
        v
    };
    let lock = LockGuard::acquire(&to, LockKind::Shared, "copy", &LockOptions::default()).await?;
    let result = async {
        let mut r = copy_snapshots(&from, &to, &lock, &ids).await?;
        if !a.no_logs {
            // Every segment, streamed pieces included: a copy made now is as current as the source.
            let logs: CopyReport = copy_segments(&from, &to, |_, _| true).await?;
            r.segments = logs.segments;
            r.bytes += logs.bytes;
        }
        Ok::<_, tidemark_repo::Error>(r)
    }
    .await;
    lock.release().await?;
    let r = result?;
    if ctx.json {
        super::print_json(&r)?;
    } else if !ctx.quiet {
        println!(
            "copied {} snapshot(s) ({} already there), {} pack(s), {} dictionar{}, {} log segment(s): {} bytes to {}",
            r.snapshots.len(),
            r.already_present.len(),
            r.packs,
            r.dictionaries,
            if r.dictionaries == 1 { "y" } else { "ies" },
            r.segments,
            r.bytes,
            to.location()
        );
    }
    Ok(crate::exit::OK)
}
