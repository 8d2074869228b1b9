//! `tidemark wal-push %p` (archive_command) and `tidemark wal-fetch %f %p` (restore_command).
//!
//! Their exit codes follow what PostgreSQL makes of them, not tidemark's table: `wal-push`
//! exits 0 only once the segment is durable; `wal-fetch` exits 1 only when the archive does not
//! have the file, and 126 for any failure, which makes PostgreSQL stop recovery instead of
//! ending it early as if the archive were exhausted.

use std::path::PathBuf;

use anyhow::Result;
use tidemark_engine::postgres::archive::{self, FetchOptions, Fetched, PushOptions};

use crate::context::Context;

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The WAL file (PostgreSQL's %p, relative to the data directory).
    path: PathBuf,
    /// Segments archived per call, this one included (further ones are taken from
    /// pg_wal/archive_status/*.ready).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Spool directory for records of segments archived ahead (default pg_wal/tidemark-spool).
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// The data directory (default: the current directory, where archive_command runs).
    #[arg(long, env = "PGDATA")]
    pgdata: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// The file PostgreSQL wants (%f).
    name: String,
    /// Where to put it (%p).
    dest: PathBuf,
    /// The cluster's system identifier (default: read from global/pg_control).
    #[arg(long)]
    system_id: Option<u64>,
    /// Segments to fetch ahead (0 turns prefetch off).
    #[arg(long, default_value_t = 4)]
    prefetch: usize,
    /// The data directory being recovered (default: the current directory).
    #[arg(long, env = "PGDATA")]
    pgdata: Option<PathBuf>,
}

/// The exit code that makes PostgreSQL abort recovery rather than treat a failure as the end
/// of the archive.
pub const FETCH_FAILED: i32 = 126;
/// "Not in the archive".
pub const FETCH_NOT_FOUND: i32 = 1;

pub async fn push(ctx: &Context, a: PushArgs) -> Result<i32> {
    let o = PushOptions {
        batch: a.batch.max(1),
        spool_dir: a.spool_dir,
        data_dir: a.pgdata.unwrap_or_else(|| PathBuf::from(".")),
    };
    // Archived ahead by an earlier call with exactly this content: no repository access.
    if archive::already_pushed(&a.path, &o) {
        return Ok(crate::exit::OK);
    }
    let repo = ctx.open().await?;
    let report = archive::push(&repo, &a.path, &o).await?;
    if ctx.json {
        super::print_json(&report)?;
    }
    Ok(crate::exit::OK)
}

pub async fn fetch(ctx: &Context, a: FetchArgs) -> i32 {
    let o = FetchOptions {
        system_id: a.system_id,
        data_dir: a.pgdata.unwrap_or_else(|| PathBuf::from(".")),
        prefetch: a.prefetch,
    };
    let r = async {
        let repo = ctx.open().await?;
        Ok::<_, anyhow::Error>(archive::fetch(&repo, &a.name, &a.dest, &o).await?)
    }
    .await;
    match r {
        Ok(Fetched::Restored(_)) => crate::exit::OK,
        Ok(Fetched::NotFound) => FETCH_NOT_FOUND,
        Err(e) => {
            eprintln!(
                "tidemark wal-fetch {}: {} (exit {FETCH_FAILED}: PostgreSQL stops recovery here rather than end it early)",
                a.name,
                crate::exit::one_line(&e)
            );
            FETCH_FAILED
        }
    }
}
