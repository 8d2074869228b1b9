//! `tidemark agent`: run schedules, retention and checks for the databases of a config file
//! until SIGTERM or Ctrl-C; `--check` only validates the file.

use anyhow::Result;
use tidemark_agent::config::Config;

use crate::context::{usage, Global};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Validate the config file, print what it declares, and exit.
    #[arg(long)]
    check: bool,
}

/// The agent's config file: `--config` or TIDEMARK_CONFIG (the agent's schema, not the CLI's).
pub fn load(g: &Global) -> Result<Config> {
    let path = g.config.as_ref().ok_or_else(|| {
        usage(
            "no agent config file given",
            "pass --config tidemark.yaml (see docs/agent.md for a complete example)",
        )
    })?;
    Config::load(path).map_err(|e| {
        usage(
            e.to_string(),
            "fix the fields named above and run `tidemark agent --check --config FILE`",
        )
    })
}

pub async fn run(g: &Global, a: Args) -> Result<i32> {
    let config = load(g)?;
    if a.check {
        println!("config is valid: listens on {}", config.listen());
        for (name, d) in &config.databases {
            let kinds: Vec<String> = d
                .schedules
                .iter()
                .map(|s| format!("{} at {:?}", s.kind.as_str(), s.cron))
                .collect();
            println!(
                "  {name}: {:?} into repository {:?}; {}",
                d.engine,
                d.repository,
                kinds.join(", ")
            );
        }
        return Ok(crate::exit::OK);
    }
    let rx = super::stop_on_signal("stopping: finishing or abandoning running work");
    // A repository that does not open exits as the CLI does for it (3, 4, 7); anything
    // else that stops the start is the configuration's (2).
    tidemark_agent::runtime::run(config, rx)
        .await
        .map_err(|e| match e.cause {
            Some(_) => anyhow::Error::new(e),
            None => usage(e.message, "the agent did not start; nothing was changed"),
        })?;
    Ok(crate::exit::OK)
}
