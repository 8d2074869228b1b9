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
        for e in &report.repairable {
            eprintln!("repairable: {e}");
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
                match (report.errors.len(), report.repairable.len()) {
                    (0, 0) => "no errors".to_owned(),
                    (e, 0) => format!("{e} errors"),
                    (0, r) => format!("{r} repairable problems, nothing lost"),
                    (e, r) => format!("{e} errors, {r} repairable problems"),
                }
            );
            let short = |v: &[tidemark_repo::id::SnapshotId]| {
                v.iter().map(|s| s.short()).collect::<Vec<_>>().join(", ")
            };
            if !report.damaged_snapshots.is_empty() {
                println!(
                    "cannot be restored whole: {}",
                    short(&report.damaged_snapshots)
                );
            } else if !report.unverified_snapshots.is_empty() {
                println!(
                    "may be damaged (run `tidemark check --read-data` to know): {}",
                    short(&report.unverified_snapshots)
                );
            } else if report.snapshots > 0 && a.read_data {
                println!("every snapshot can be restored whole");
            } else if report.snapshots > 0 {
                println!("every chunk of every snapshot is in a pack that exists (`--read-data` reads them)");
            }
            if report.unindexed_packs > 0 {
                println!("{} packs that no snapshot needs are not indexed (left by interrupted backups); `tidemark prune` removes them", report.unindexed_packs);
            }
        }
    }
    Ok(if report.is_ok() {
        crate::exit::OK
    } else {
        crate::exit::DAMAGED
    })
}
