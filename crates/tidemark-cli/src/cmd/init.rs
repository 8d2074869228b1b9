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
    /// Make this location a second home of the repository at URL (the same identity and
    /// keys, copied), instead of creating a new repository. Fill it with `tidemark copy`.
    #[arg(long, value_name = "URL")]
    copy_from: Option<String>,
    /// A storage option of the --copy-from location (KEY=VALUE, repeatable).
    #[arg(long, value_name = "KEY=VALUE", requires = "copy_from")]
    from_option: Vec<String>,
}

pub async fn run(ctx: &Context, a: Args) -> Result<i32> {
    let secret = ctx.secret()?;
    let opts = InitOptions {
        compression_level: a.compression_level,
        ..Default::default()
    };
    let repo = match &a.copy_from {
        Some(url) => {
            let from = Repository::open(ctx.other_storage(url, &a.from_option)?, &secret).await?;
            from.add_location(ctx.storage()?).await?
        }
        None => Repository::init(ctx.storage()?, &secret, &opts).await?,
    };
    if ctx.json {
        super::print_json(
            &serde_json::json!({"id": repo.config().id, "location": repo.location(), "key": repo.key_id().to_hex()}),
        )?;
    } else if !ctx.quiet {
        println!(
            "{} repository {} at {}",
            if a.copy_from.is_some() {
                "added a location of"
            } else {
                "created"
            },
            repo.config().id,
            repo.location()
        );
    }
    Ok(crate::exit::OK)
}
