//! `tidemark pg`: PostgreSQL backups and restores (docs/design/pitr.md).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use tidemark_engine::postgres::logical::RestoreOptions;
use tidemark_engine::postgres::{ConnOptions, PasswordSource, Postgres, SslMode};
use tidemark_engine::Engine;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::backup::{Backup, BackupOptions};
use tidemark_repo::progress::Progress;

use crate::context::{usage, Context};
use crate::output::{size, Bar};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Back up a PostgreSQL server: pg_dump per database (custom format) plus globals.
    Backup(BackupArgs),
    /// Restore one database of a logical snapshot with pg_restore.
    Restore(RestoreArgs),
}

/// How to reach the server. Unset fields come from the libpq environment (PGHOST, PGPORT,
/// PGUSER, PGDATABASE, PGSSLMODE). The password comes from a file, PGPASSWORD or a passfile;
/// never from a flag or a URL.
#[derive(Debug, clap::Args)]
pub struct ConnArgs {
    /// A libpq URL without a password: postgresql://user@host:port/dbname?sslmode=…
    #[arg(long, env = "TIDEMARK_PG_URL")]
    url: Option<String>,
    /// Host name or address.
    #[arg(long)]
    host: Option<String>,
    /// Port.
    #[arg(long)]
    port: Option<u16>,
    /// User (role) to connect as.
    #[arg(long)]
    user: Option<String>,
    /// Database to connect to (and to dump, unless --database or --all).
    #[arg(long)]
    dbname: Option<String>,
    /// disable, allow, prefer, require, verify-ca or verify-full.
    #[arg(long)]
    sslmode: Option<String>,
    /// File whose first line is the PostgreSQL password.
    #[arg(long, env = "TIDEMARK_PG_PASSWORD_FILE")]
    pg_password_file: Option<PathBuf>,
    /// Directory of pg_dump, pg_restore, …; default: the server's version under
    /// /usr/lib/postgresql, then PATH.
    #[arg(long, env = "TIDEMARK_PG_BIN")]
    pg_bin: Option<PathBuf>,
}

impl ConnArgs {
    fn engine(&self) -> Result<Postgres> {
        let bad = |m: String| usage(m, "see `tidemark pg backup --help`");
        let mut c = ConnOptions::from_env().map_err(bad)?;
        if let Some(u) = &self.url {
            c.apply_url(u).map_err(bad)?;
        }
        if let Some(h) = &self.host {
            c.host.clone_from(h);
        }
        if let Some(p) = self.port {
            c.port = p;
        }
        if let Some(u) = &self.user {
            c.user.clone_from(u);
        }
        if let Some(d) = &self.dbname {
            c.dbname.clone_from(d);
        }
        if let Some(s) = &self.sslmode {
            c.sslmode = SslMode::parse(s).map_err(bad)?;
        }
        if let Some(f) = &self.pg_password_file {
            c.password = PasswordSource::File(f.clone());
        }
        let mut pg = Postgres::new(c);
        pg.bin_dir.clone_from(&self.pg_bin);
        Ok(pg)
    }
}

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Dump this database (repeatable); default the connection's database.
    #[arg(long = "database", conflicts_with = "all")]
    databases: Vec<String>,
    /// Dump every database that accepts connections, and the globals.
    #[arg(long)]
    all: bool,
    /// Also dump roles and tablespaces (pg_dumpall --globals-only).
    #[arg(long)]
    globals: bool,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Snapshot id (or a unique prefix), or `latest`.
    snapshot: String,
    /// The database in the snapshot to restore (needed when it holds several).
    #[arg(long)]
    database: Option<String>,
    /// Restore into this database (default: the same name). Created if it does not exist.
    #[arg(long)]
    into: Option<String>,
    /// Restore over an existing database (drops its objects first).
    #[arg(long)]
    clean: bool,
    /// Only this schema (repeatable).
    #[arg(long = "schema")]
    schemas: Vec<String>,
    /// Only this table (repeatable).
    #[arg(long = "table")]
    tables: Vec<String>,
    /// Parallel pg_restore jobs (above 1 the dump is first written to a private temporary file).
    #[arg(long, default_value_t = 1)]
    jobs: u32,
    /// Do not restore ownership (for a server without the original roles).
    #[arg(long)]
    no_owner: bool,
}

pub async fn run(ctx: &Context, c: Command) -> Result<i32> {
    match c {
        Command::Backup(a) => backup(ctx, a).await,
        Command::Restore(a) => restore(ctx, a).await,
    }
}

async fn backup(ctx: &Context, a: BackupArgs) -> Result<i32> {
    let mut pg = a.conn.engine()?;
    pg.logical.databases = a.databases;
    pg.logical.all = a.all;
    pg.logical.globals = a.globals;
    let repo = ctx.open().await?;
    let lock =
        LockGuard::acquire(&repo, LockKind::Shared, "backup", &LockOptions::default()).await?;
    let progress = Arc::new(Progress::default());
    let bar = Bar::start("pg backup", None, progress.clone(), ctx.quiet || ctx.json);
    let result = async {
        let opts = BackupOptions {
            engine: pg.name().into(),
            tags: a.tags,
            ..Default::default()
        };
        let b = Backup::start(&repo, &lock, opts, progress.clone()).await?;
        tidemark_engine::run_backup(&pg, b)
            .await
            .map_err(super::backup::engine_error)
    }
    .await;
    bar.finish();
    lock.release().await?;
    let (id, snap) = result?;
    if ctx.json {
        super::print_json(&serde_json::json!({"id": id.to_hex(), "snapshot": snap}))?;
    } else if !ctx.quiet {
        let s = &snap.summary;
        println!(
            "snapshot {} saved: {} database stream(s), {} read, {} new ({} stored) in {:.1}s",
            id.short(),
            snap.streams.len(),
            size(s.raw_bytes),
            size(s.new_raw_bytes),
            size(s.new_stored_bytes),
            s.duration_seconds
        );
    }
    Ok(crate::exit::OK)
}

async fn restore(ctx: &Context, a: RestoreArgs) -> Result<i32> {
    let pg = a.conn.engine()?;
    let repo = ctx.open().await?;
    let lock =
        LockGuard::acquire(&repo, LockKind::Shared, "restore", &LockOptions::default()).await?;
    let started = std::time::Instant::now();
    let result = async {
        let (id, snap) = repo.find_snapshot(&a.snapshot).await?;
        let opts = RestoreOptions {
            source: a.database,
            target: a.into,
            clean: a.clean,
            schemas: a.schemas,
            tables: a.tables,
            jobs: a.jobs,
            no_owner: a.no_owner,
            temp_dir: None,
        };
        let progress = Arc::new(Progress::default());
        let bar = Bar::start("pg restore", None, progress.clone(), ctx.quiet || ctx.json);
        let r = tidemark_engine::postgres::logical::restore(
            &pg,
            &repo,
            &id.short(),
            &snap,
            &opts,
            progress,
        )
        .await;
        bar.finish();
        Ok::<_, anyhow::Error>((id, r?))
    }
    .await;
    lock.release().await?;
    let (id, report) = result?;
    if ctx.json {
        super::print_json(&report)?;
    } else if !ctx.quiet {
        println!(
            "restored snapshot {} into {} ({}) in {:.1}s",
            id.short(),
            report.target,
            size(report.bytes),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(crate::exit::OK)
}
