//! Subcommands, one file each, thin over the library crates.

mod agent;
pub mod backup;
mod check;
mod copy;
mod demo;
mod forget;
mod init;
mod key;
mod pg;
mod prune;
mod repair;
mod restore;
mod snapshots;
mod stats;
mod status;
mod wal;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::context::{Context, Global};

/// tidemark backs up databases and brings them back.
#[derive(Debug, Parser)]
#[command(name = "tidemark", version, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 failure, 2 usage or config error, 3 no repository, 4 wrong password or key, \
5 repository locked, 6 damaged data, 7 storage failed or unreachable, 8 backup source failed (no snapshot written).";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repository.
    Init(init::Args),
    /// Back up stdin, a command's output, an SQLite database, or files and directories.
    Backup(backup::Args),
    /// List snapshots.
    Snapshots(snapshots::Args),
    /// Restore a snapshot to a file, a directory, or a database path.
    Restore(restore::RestoreArgs),
    /// Write one stream of a snapshot to stdout.
    Dump(restore::DumpArgs),
    /// Remove snapshots by a retention policy (prune then frees their space).
    Forget(forget::Args),
    /// Delete data no snapshot needs, in two phases with a grace period.
    Prune(prune::Args),
    /// Copy what another location of the repository lacks: snapshots (with their packs,
    /// dictionaries and index) and log segments, each verified before it is written.
    Copy(copy::Args),
    /// Verify the repository; --read-data reads and verifies every chunk.
    Check(check::Args),
    /// Repair what `check` calls repairable.
    #[command(subcommand)]
    Repair(repair::Command),
    /// Manage the keys that open the repository.
    #[command(subcommand)]
    Key(key::Command),
    /// PostgreSQL: logical and physical backups, WAL streaming, the recoverable window, and
    /// restores of a database or of a cluster to any point in time (--delta in place).
    #[command(subcommand)]
    Pg(pg::Command),
    /// Archive one WAL file (PostgreSQL's archive_command: `tidemark wal-push %p`).
    WalPush(wal::PushArgs),
    /// Fetch one WAL file from the archive (restore_command: `tidemark wal-fetch %f %p`).
    /// Exits 1 when the archive does not have it, 126 on any failure.
    WalFetch(wal::FetchArgs),
    /// Show what the repository holds and how well it deduplicates.
    Stats(stats::Args),
    /// Back up and restore a sample SQLite database in a temporary directory. Needs nothing.
    Demo(demo::Args),
    /// Run the schedules, retention and checks of an agent config file (--config) until
    /// SIGTERM; serves /metrics, /status, /healthz and /readyz.
    Agent(agent::Args),
    /// Show what a running agent reports.
    Status(status::Args),
}

/// Run the command; Ok carries the exit code.
pub async fn run(cli: Cli) -> Result<i32> {
    if let Command::Demo(a) = &cli.command {
        return demo::run(a, &cli.global).await;
    }
    if let Command::Agent(a) = cli.command {
        return agent::run(&cli.global, a).await;
    }
    if let Command::Status(a) = cli.command {
        return status::run(&cli.global, a).await;
    }
    if let Command::WalFetch(a) = cli.command {
        // Every failure, a bad config included, must stop recovery (exit 126), never look like
        // "not in the archive" (exit 1 or 2), which would end recovery early. A panic too
        // (Rust's 101 would read as "not found").
        std::panic::set_hook(Box::new(|info| {
            eprintln!("tidemark wal-fetch: internal error: {info}");
            std::process::exit(wal::FETCH_FAILED);
        }));
        // Served from the prefetch spool: neither the configuration nor the repository is
        // needed.
        if let Some(code) = wal::fetch_spooled(&a) {
            return Ok(code);
        }
        return Ok(match Context::resolve(&cli.global) {
            Ok(ctx) => wal::fetch(&ctx, a).await,
            Err(e) => {
                eprintln!("tidemark wal-fetch: {}", crate::exit::one_line(&e));
                wal::FETCH_FAILED
            }
        });
    }
    let ctx = Context::resolve(&cli.global)?;
    match cli.command {
        Command::Init(a) => init::run(&ctx, a).await,
        Command::Backup(a) => backup::run(&ctx, a).await,
        Command::Snapshots(a) => snapshots::run(&ctx, a).await,
        Command::Restore(a) => restore::run_restore(&ctx, a).await,
        Command::Dump(a) => restore::run_dump(&ctx, a).await,
        Command::Forget(a) => forget::run(&ctx, a).await,
        Command::Prune(a) => prune::run(&ctx, a).await,
        Command::Check(a) => check::run(&ctx, a).await,
        Command::Repair(c) => repair::run(&ctx, c).await,
        Command::Copy(a) => copy::run(&ctx, a).await,
        Command::Key(c) => key::run(&ctx, c).await,
        Command::Stats(a) => stats::run(&ctx, a).await,
        Command::Pg(c) => pg::run(&ctx, c).await,
        Command::WalPush(a) => wal::push(&ctx, a).await,
        Command::WalFetch(_) => unreachable!("handled above"),
        Command::Demo(_) | Command::Agent(_) | Command::Status(_) => {
            unreachable!("handled above")
        }
    }
}

/// A flag that turns true at SIGTERM or Ctrl-C (logging `why`), for long-running commands.
pub fn stop_on_signal(why: &'static str) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("{why}");
        let _ = tx.send(true);
    });
    rx
}

/// Print `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap checks duplicate names, bad `requires` and conflicts only when a command is
        // built; this builds every subcommand.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
