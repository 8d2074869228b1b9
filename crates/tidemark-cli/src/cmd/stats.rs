//! `tidemark stats`.

use std::collections::HashSet;

use anyhow::Result;

use crate::context::Context;
use crate::output::size;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub async fn run(ctx: &Context, _a: Args) -> Result<i32> {
    let repo = ctx.open().await?;
    let snaps = repo.snapshots().await?;
    let index = repo.load_index().await?;
    let logical: u64 = snaps.iter().map(|(_, s)| s.size()).sum();
    let mut seen = HashSet::new();
    let mut unique_raw = 0u64;
    for (_, s) in &snaps {
        for st in &s.streams {
            for c in &st.chunks {
                if seen.insert(*c) {
                    unique_raw += index.get(c).map(|(_, e)| e.raw_length as u64).unwrap_or(0);
                }
            }
        }
    }
    let stored: u64 = index.packs().iter().map(|p| p.size).sum();
    let ratio = if stored > 0 {
        logical as f64 / stored as f64
    } else {
        0.0
    };
    if ctx.json {
        super::print_json(&serde_json::json!({
            "snapshots": snaps.len(), "logical_bytes": logical, "unique_bytes": unique_raw,
            "stored_bytes": stored, "packs": index.packs().len(), "chunks": index.chunk_count(), "ratio": ratio
        }))?;
    } else {
        println!("snapshots:        {}", snaps.len());
        println!("logical size:     {}", size(logical));
        println!("unique content:   {}", size(unique_raw));
        println!(
            "stored (packs):   {} in {} packs, {} chunks",
            size(stored),
            index.packs().len(),
            index.chunk_count()
        );
        println!("logical / stored: {ratio:.2}x");
    }
    Ok(crate::exit::OK)
}
