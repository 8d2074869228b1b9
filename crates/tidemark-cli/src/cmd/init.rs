//! `tidemark init`: create a repository.

use anyhow::Result;
use tidemark_repo::config::InitOptions;
use tidemark_repo::Repository;

use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// zstd level for new chunks (1 to 19).
    #[arg(long, default_value_t = 1)]
    compression_level: i32,
}

pub async fn run(ctx: &Context, a: Args) -> Result<i32> {
    let secret = ctx.secret()?;
    let opts = InitOptions {
        compression_level: a.compression_level,
        ..Default::default()
    };
    let repo = Repository::init(ctx.storage()?, &secret, &opts).await?;
    if ctx.json {
        super::print_json(
            &serde_json::json!({"id": repo.config().id, "location": repo.location(), "key": repo.key_id().to_hex()}),
        )?;
    } else if !ctx.quiet {
        println!(
            "created repository {} at {}",
            repo.config().id,
            repo.location()
        );
    }
    Ok(crate::exit::OK)
}
