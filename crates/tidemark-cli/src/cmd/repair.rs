//! `tidemark repair`.

use anyhow::Result;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::repair::{repair_index, RepairOptions};

use crate::context::Context;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Rebuild the index from the packs' own headers: index every pack no readable index
    /// object lists, then remove the damaged index objects. Safe beside running backups;
    /// running it twice does nothing the second time.
    Index(IndexArgs),
}

#[derive(Debug, clap::Args)]
pub struct IndexArgs {
    /// Also read every indexed pack's header, and rewrite the packs whose header is damaged
    /// (their intact blobs go into a new pack; prune removes the old one after its grace
    /// period).
    #[arg(long)]
    read_headers: bool,
    /// Report what would be done; change nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(ctx: &Context, c: Command) -> Result<i32> {
    let Command::Index(a) = c;
    let repo = ctx.open().await?;
    // Exclusive: never beside prune, which deletes packs no index lists; beside backups.
    let lock = LockGuard::acquire(
        &repo,
        LockKind::Exclusive,
        "repair index",
        &LockOptions::default(),
    )
    .await?;
    let opts = RepairOptions {
        read_headers: a.read_headers,
        dry_run: a.dry_run,
    };
    let r = repair_index(&repo, &lock, &opts).await;
    lock.release().await?;
    let r = r?;
    if ctx.json {
        super::print_json(&r)?;
    } else {
        for u in &r.unrepairable {
            eprintln!("error: {u}");
        }
        if !ctx.quiet {
            let verb =
                |done: &str, planned: &str| if a.dry_run { planned } else { done }.to_owned();
            println!(
                "{}{} packs ({} chunks) {} from their headers; {} damaged index objects {}; {} packs with a damaged header {}",
                if a.dry_run { "dry run: " } else { "" },
                r.packs_indexed,
                r.chunks_indexed,
                verb("indexed", "would be indexed"),
                r.indexes_removed.len(),
                verb("removed", "would be removed"),
                r.packs_rewritten.len(),
                verb("rewritten", "would be rewritten"),
            );
        }
    }
    Ok(if r.unrepairable.is_empty() {
        crate::exit::OK
    } else {
        crate::exit::DAMAGED
    })
}
