//! `tidemark prune`.

use anyhow::Result;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::prune::{prune, PruneOptions};

use crate::context::Context;
use crate::output::size;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Minutes a pack stays marked unused before deletion.
    #[arg(long, default_value_t = 60)]
    grace_minutes: u64,
    /// Report what would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(ctx: &Context, a: Args) -> Result<i32> {
    let repo = ctx.open().await?;
    let lock =
        LockGuard::acquire(&repo, LockKind::Exclusive, "prune", &LockOptions::default()).await?;
    let opts = PruneOptions {
        grace: std::time::Duration::from_secs(a.grace_minutes * 60),
        dry_run: a.dry_run,
        ..Default::default()
    };
    let r = prune(&repo, &lock, &opts).await;
    lock.release().await?;
    let r = r?;
    if ctx.json {
        super::print_json(&r)?;
    } else if !ctx.quiet {
        println!(
            "{}{} packs in use, {} repacked, {} newly marked unused, {} waiting for the grace period, {} unmarked; deleted {} packs ({})",
            if a.dry_run { "dry run: " } else { "" },
            r.packs_in_use,
            r.packs_repacked,
            r.packs_marked,
            r.packs_waiting,
            r.packs_unmarked,
            r.packs_deleted,
            size(r.bytes_deleted)
        );
        if r.temporaries_removed > 0 {
            println!(
                "removed {} temporary files left by interrupted uploads",
                r.temporaries_removed
            );
        }
    }
    Ok(crate::exit::OK)
}
