//! `tidemark check`.

use anyhow::Result;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::check::{check, CheckOptions};

use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Read every pack and verify every chunk.
    #[arg(long)]
    read_data: bool,
}

pub async fn run(ctx: &Context, a: Args) -> Result<i32> {
    let repo = ctx.open().await?;
    let lock =
        LockGuard::acquire(&repo, LockKind::Shared, "check", &LockOptions::default()).await?;
    let report = check(
        &repo,
        &CheckOptions {
            read_data: a.read_data,
        },
    )
    .await;
    lock.release().await?;
    let report = report?;
    if ctx.json {
        super::print_json(&report)?;
    } else {
        for e in &report.errors {
            eprintln!("error: {e}");
        }
        if !ctx.quiet {
            println!(
                "checked {} snapshots, {} packs{}: {}",
                report.snapshots,
                report.packs,
                if a.read_data {
                    format!(" ({} read)", report.packs_read)
                } else {
                    String::new()
                },
                if report.is_ok() {
                    "no errors".to_owned()
                } else {
                    format!("{} errors", report.errors.len())
                }
            );
            if report.unindexed_packs > 0 {
                println!("{} packs are not indexed (left by interrupted backups); `tidemark prune` removes them", report.unindexed_packs);
            }
        }
    }
    Ok(if report.is_ok() {
        crate::exit::OK
    } else {
        crate::exit::DAMAGED
    })
}
