//! `tidemark snapshots`: a table, or JSON.

use anyhow::Result;

use crate::context::Context;
use crate::output::size;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only snapshots with all these tags.
    #[arg(long = "tag")]
    tags: Vec<String>,
}

pub async fn run(ctx: &Context, a: Args) -> Result<i32> {
    let repo = ctx.open().await?;
    let snaps: Vec<_> = repo
        .snapshots()
        .await?
        .into_iter()
        .filter(|(_, s)| s.has_tags(&a.tags))
        .collect();
    if ctx.json {
        let v: Vec<_> = snaps
            .iter()
            .map(|(id, s)| {
                let mut j = serde_json::to_value(s).expect("snapshot serializes");
                j["id"] = id.to_hex().into();
                j["short_id"] = id.short().into();
                if let Some(streams) = j["streams"].as_array_mut() {
                    for st in streams {
                        st.as_object_mut().map(|o| o.remove("chunks"));
                    }
                }
                j
            })
            .collect();
        super::print_json(&v)?;
        return Ok(crate::exit::OK);
    }
    println!(
        "{:<10} {:<20} {:<14} {:<8} {:<9} {:>10}  tags",
        "id", "time (UTC)", "host", "engine", "kind", "size"
    );
    for (id, s) in &snaps {
        println!(
            "{:<10} {:<20} {:<14} {:<8} {:<9} {:>10}  {}",
            id.short(),
            s.time.format("%Y-%m-%d %H:%M:%S"),
            truncate(&s.hostname, 14),
            s.engine,
            format!("{:?}", s.kind).to_lowercase(),
            size(s.size()),
            s.tags.join(",")
        );
    }
    println!("{} snapshots", snaps.len());
    Ok(crate::exit::OK)
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
