//! `tidemark pg`: PostgreSQL backups and restores (docs/design/pitr.md).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use tidemark_engine::postgres::logical::RestoreOptions;
use tidemark_engine::postgres::physical::{PhysicalOptions, ReadMode};
use tidemark_engine::postgres::ConnSpec;
use tidemark_engine::Engine;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::backup::BackupOptions;
use tidemark_repo::progress::Progress;

use crate::context::{usage, Context};
use crate::output::{size, Bar};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Back up a PostgreSQL server: pg_dump per database (custom format) plus globals, or
    /// (--physical) a base backup over the replication protocol.
    Backup(Box<BackupArgs>),
    /// Restore one database of a logical snapshot with pg_restore, or (--pgdata) a physical
    /// backup into a new data directory with recovery to a point in time.
    Restore(Box<RestoreArgs>),
    /// Show each cluster's recoverable window: base backups, archived WAL per timeline, gaps.
    Window,
    /// Archive WAL continuously over the replication protocol (as pg_receivewal does), with a
    /// replication slot, storing the segment being written every --flush-interval-ms. Runs
    /// until SIGTERM or Ctrl-C, reconnecting with backoff when the server goes away.
    Receive(Box<ReceiveArgs>),
}

#[derive(Debug, clap::Args)]
pub struct ReceiveArgs {
    #[command(flatten)]
    conn: ConnSpec,
    /// The physical replication slot that keeps the WAL the archive does not have yet.
    #[arg(long, default_value = "tidemark")]
    slot: String,
    /// Fail when the slot does not exist instead of creating it.
    #[arg(long)]
    no_create_slot: bool,
    /// Milliseconds between stores of the segment being written: how far behind committed
    /// data may be in the archive.
    #[arg(long, default_value_t = 500)]
    flush_interval_ms: u64,
    /// Stop after the first error instead of reconnecting.
    #[arg(long)]
    once: bool,
}

/// `--read` of `pg backup --physical`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ReadArg {
    Auto,
    Local,
    Replication,
}

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    conn: ConnSpec,
    /// A physical base backup over the replication protocol (for point-in-time recovery)
    /// instead of pg_dump. Needs a role with REPLICATION and the WAL archived to this
    /// repository (archive_command = 'tidemark wal-push %p').
    #[arg(long, conflicts_with_all = ["databases", "all", "globals"])]
    physical: bool,
    /// With --physical: KiB per block that files are cut into (a multiple of 8, the page
    /// size; default 64). Smaller blocks store less after scattered page changes, and cost more
    /// index entries.
    #[arg(long, default_value_t = 64, requires = "physical")]
    block_kib: usize,
    /// Seconds to wait for the WAL a physical backup needs to reach the archive.
    #[arg(long, default_value_t = 60)]
    wal_wait: u64,
    /// With --physical: where the files are read. `auto` reads the data directory directly
    /// when this host has it (faster: no walsender) and otherwise over the replication
    /// protocol; `local` insists on the data directory, `replication` on the network.
    #[arg(long, value_enum, default_value_t = ReadArg::Auto, requires = "physical")]
    read: ReadArg,
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
    #[command(flatten)]
    also: crate::targets::AlsoArgs,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    conn: ConnSpec,
    /// Snapshot id (or a unique prefix), or `latest` (for --pgdata with a target: the latest
    /// physical backup before it).
    snapshot: String,
    /// Restore a physical backup into this new (or empty) data directory and configure
    /// recovery from the WAL archive, instead of restoring a logical dump into a database.
    #[arg(long, conflicts_with_all = ["database", "into", "clean", "schemas", "tables", "jobs", "no_owner", "no_privileges"])]
    pgdata: Option<PathBuf>,
    /// Recover up to this time ('2026-11-20 14:50:00+01').
    #[arg(long, requires = "pgdata", group = "target")]
    to_time: Option<String>,
    /// Recover up to this WAL position (16/B374D848).
    #[arg(long, requires = "pgdata", group = "target")]
    to_lsn: Option<String>,
    /// Recover up to the commit of this transaction id.
    #[arg(long, requires = "pgdata", group = "target")]
    to_xid: Option<String>,
    /// Recover up to this named restore point (pg_create_restore_point).
    #[arg(long, requires = "pgdata", group = "target")]
    to_name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long, requires = "pgdata", group = "target")]
    immediate: bool,
    /// Recover to the end of the archived WAL (the default).
    #[arg(long, requires = "pgdata", group = "target")]
    latest: bool,
    /// Restore over a stopped copy of the same cluster in --pgdata, rewriting only the
    /// blocks that differ from the backup and removing what the backup does not have. Refused
    /// while a server runs there, or when the directory holds another cluster.
    #[arg(long, requires = "pgdata")]
    delta: bool,
    /// The timeline to recover along: a number, `current` (the base backup's) or `latest`.
    /// Default: for --to-time, the timeline that was current at that time (a later branch
    /// does not contain it); otherwise `latest`.
    #[arg(long, requires = "pgdata")]
    timeline: Option<String>,
    /// What the server does at the target: promote, pause or shutdown.
    #[arg(long, requires = "pgdata", default_value = "promote")]
    action: String,
    /// Start the restored server, wait until recovery reaches the target and the server
    /// promotes (or pauses or shuts down, per --action), and report how long each phase took.
    #[arg(long, requires = "pgdata")]
    start: bool,
    /// With --start: the port the restored server listens on (default: the original's, from
    /// its configuration).
    #[arg(long, requires = "start")]
    start_port: Option<u16>,
    /// With --start: the operating-system user that runs the server (default: `postgres` when
    /// tidemark runs as root, which PostgreSQL refuses; else the current user).
    #[arg(long, requires = "start")]
    os_user: Option<String>,
    /// A setting for the restored server, written to its postgresql.auto.conf:
    /// `name=value` (repeatable), e.g. `archive_mode=off` so that a test restore does not
    /// archive into the production archive.
    #[arg(long = "conf", requires = "pgdata", value_name = "NAME=VALUE")]
    conf: Vec<String>,
    /// Put a tablespace that lived outside the data directory somewhere else: `OID=DIR` or
    /// `OLDDIR=NEWDIR` (repeatable). Without it each tablespace goes back where it was, which
    /// must then be empty or missing.
    #[arg(long = "tablespace-map", requires = "pgdata", value_name = "FROM=DIR")]
    tablespace_map: Vec<String>,
    /// The cluster to restore: its system identifier, as `tidemark pg window` lists them, or
    /// its WAL stream (pg/<id>/wal). Needed with `latest` when the repository holds base
    /// backups of more than one cluster; a restore never picks another cluster for you.
    #[arg(long, requires = "pgdata")]
    cluster: Option<String>,
    /// With --start: give up waiting for recovery after this many seconds.
    #[arg(long, requires = "start", default_value_t = 86_400)]
    start_timeout: u64,
    /// Read chunks whose copy at --repo is missing or damaged from here (the base backup or
    /// dump; with --pgdata, the WAL is still fetched from --repo).
    #[command(flatten)]
    fallback: crate::targets::FallbackArgs,
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
    /// Do not restore grants (for a server without the original roles).
    #[arg(long)]
    no_privileges: bool,
}

pub async fn run(ctx: &Context, c: Command) -> Result<i32> {
    match c {
        Command::Backup(a) => backup(ctx, *a).await,
        Command::Restore(a) => restore(ctx, *a).await,
        Command::Window => window(ctx).await,
        Command::Receive(a) => receive(ctx, *a).await,
    }
}

async fn receive(ctx: &Context, a: ReceiveArgs) -> Result<i32> {
    use tidemark_engine::postgres::stream::{self, StreamOptions};
    let pg = a
        .conn
        .engine()
        .map_err(|m| usage(m, "see `tidemark pg backup --help`"))?;
    if a.flush_interval_ms == 0 {
        return Err(usage(
            "--flush-interval-ms must be at least 1",
            "500 is the default",
        ));
    }
    let o = StreamOptions {
        slot: a.slot,
        create_slot: !a.no_create_slot,
        flush_interval: std::time::Duration::from_millis(a.flush_interval_ms),
        ..Default::default()
    };
    let repo = ctx.open().await?;
    let stop_rx = super::stop_on_signal("stopping: storing what was received");
    let (progress, _) = tokio::sync::watch::channel(stream::Progress::default());
    stream::supervise(&pg, &repo, &o, stop_rx, &progress, a.once, |e, retry_in| {
        tracing::error!(error = %e, ?retry_in, "streaming failed; reconnecting");
    })
    .await?;
    Ok(0)
}

async fn backup(ctx: &Context, a: BackupArgs) -> Result<i32> {
    let mut pg = a
        .conn
        .engine()
        .map_err(|m| usage(m, "see `tidemark pg backup --help`"))?;
    pg.logical.databases = a.databases;
    pg.logical.all = a.all;
    pg.logical.globals = a.globals;
    if a.physical {
        pg.physical = Some(PhysicalOptions {
            wal_wait: std::time::Duration::from_secs(a.wal_wait),
            block: a.block_kib * 1024,
            read: match a.read {
                ReadArg::Auto => ReadMode::Auto,
                ReadArg::Local => ReadMode::Local,
                ReadArg::Replication => ReadMode::Replication,
            },
        });
    }
    let repo = ctx.open().await?;
    let mut targets =
        crate::targets::Targets::acquire(ctx, repo, &a.also, &LockOptions::default()).await?;
    let progress = Arc::new(Progress::default());
    let bar = Bar::start("pg backup", None, progress.clone(), ctx.quiet || ctx.json);
    let result = async {
        let opts = BackupOptions {
            engine: pg.name().into(),
            tags: a.tags,
            ..Default::default()
        };
        let b = targets.start(opts, progress.clone()).await?;
        tidemark_engine::run_backup(&pg, b)
            .await
            .map_err(super::backup::engine_error)
    }
    .await;
    bar.finish();
    targets.release().await;
    let f = result?;
    let (id, snap) = (f.id, &f.snapshot);
    let damaged = snap
        .positions
        .get(tidemark_engine::postgres::physical::CHECKSUM_FAILURES)
        .and_then(serde_json::Value::as_u64);
    if ctx.json {
        super::print_json(&serde_json::json!({
            "id": id.to_hex(),
            "snapshot": snap,
            "locations": crate::targets::locations_json(&targets.outcomes(&f)),
        }))?;
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
    if let Some(pages) = damaged {
        // The snapshot is kept (everything else in it is sound), but this is no success.
        eprintln!(
            "tidemark: {pages} page(s) of the database failed their checksums while read: the source is damaged, and snapshot {} holds those pages as they were read:",
            id.short()
        );
        for line in snap
            .positions
            .get("pg.checksum_report")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str)
        {
            eprintln!("  {line}");
        }
        eprintln!("hint: find the damaged relations (their files are named above), check the storage, and restore them from an earlier backup or repair them");
        targets.report_missing(&f);
        return Ok(crate::exit::DAMAGED);
    }
    Ok(targets.report_missing(&f))
}

async fn restore(ctx: &Context, a: RestoreArgs) -> Result<i32> {
    if a.pgdata.is_some() {
        return restore_physical(ctx, a).await;
    }
    let pg = a
        .conn
        .engine()
        .map_err(|m| usage(m, "see `tidemark pg backup --help`"))?;
    let repo = crate::targets::open_with_fallbacks(ctx, &a.fallback).await?;
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
            no_privileges: a.no_privileges,
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
    crate::targets::report_fallbacks(&repo);
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

/// The recovery target as PostgreSQL settings, and the bound it puts on the base backup.
enum Bound {
    None,
    Time(chrono::DateTime<chrono::FixedOffset>),
    Lsn(u64),
}

fn recovery_settings(a: &RestoreArgs) -> Result<(Vec<(&'static str, String)>, Bound)> {
    use tidemark_engine::postgres::wal::parse_lsn;
    let mut s = Vec::new();
    let mut bound = Bound::None;
    if let Some(t) = &a.to_time {
        let parsed = ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"]
            .iter()
            .find_map(|f| chrono::DateTime::parse_from_str(t, f).ok())
            .ok_or_else(|| {
                usage(
                    format!("--to-time {t:?} is not a time with a zone"),
                    "write it like '2026-11-20 14:50:00+01'",
                )
            })?;
        s.push(("recovery_target_time", parsed.to_rfc3339()));
        bound = Bound::Time(parsed);
    } else if let Some(l) = &a.to_lsn {
        let lsn = parse_lsn(l).ok_or_else(|| {
            usage(
                format!("--to-lsn {l:?} is not an LSN"),
                "write it like 16/B374D848",
            )
        })?;
        s.push(("recovery_target_lsn", l.clone()));
        bound = Bound::Lsn(lsn);
    } else if let Some(x) = &a.to_xid {
        if x.parse::<u64>().is_err() {
            return Err(usage(
                format!("--to-xid {x:?} is not a transaction id"),
                "give a number",
            ));
        }
        s.push(("recovery_target_xid", x.clone()));
    } else if let Some(n) = &a.to_name {
        s.push(("recovery_target_name", n.clone()));
    } else if a.immediate {
        s.push(("recovery_target", "immediate".into()));
    }
    if !matches!(a.action.as_str(), "promote" | "pause" | "shutdown") {
        return Err(usage(
            format!("--action {:?} is not promote, pause or shutdown", a.action),
            "see `tidemark pg restore --help`",
        ));
    }
    if let Some(t) = &a.timeline {
        if t != "latest" && t != "current" && t.parse::<u32>().is_err() {
            return Err(usage(
                format!("--timeline {t:?} is not a number, current or latest"),
                "see `tidemark pg restore --help`",
            ));
        }
    }
    // Without a target PostgreSQL recovers to the end of the archive and promotes.
    if !s.is_empty() {
        s.push(("recovery_target_action", a.action.clone()));
    }
    Ok((s, bound))
}

/// Quote a value for postgresql.conf.
fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quote a word for the shell that runs restore_command.
fn sh_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "'\\''"))
}

async fn restore_physical(ctx: &Context, a: RestoreArgs) -> Result<i32> {
    let target = a.pgdata.clone().expect("checked by the caller");
    let (settings, bound) = recovery_settings(&a)?;
    let mut extra = Vec::new();
    for c in &a.conf {
        let (name, value) = c
            .split_once('=')
            .map(|(n, v)| (n.trim(), v.trim()))
            .filter(|(n, _)| {
                !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            })
            .ok_or_else(|| {
                usage(
                    format!("--conf {c:?} is not name=value"),
                    "write it like --conf archive_mode=off",
                )
            })?;
        extra.push((name.to_owned(), value.to_owned()));
    }
    let mut tablespace_map = Vec::new();
    for m in &a.tablespace_map {
        let (from, to) = m
            .split_once('=')
            .filter(|(f, t)| !f.is_empty() && !t.is_empty())
            .ok_or_else(|| {
                usage(
                    format!("--tablespace-map {m:?} is not FROM=DIR"),
                    "write it like --tablespace-map 16384=/srv/pg/ts1 (the tablespace's OID or old directory)",
                )
            })?;
        tablespace_map.push((from.to_owned(), std::path::absolute(to)?));
    }
    let env = ctx.child_env()?;
    let repo = crate::targets::open_with_fallbacks(ctx, &a.fallback).await?;
    let lock =
        LockGuard::acquire(&repo, LockKind::Shared, "restore", &LockOptions::default()).await?;
    let started = std::time::Instant::now();
    let result = async {
        // Loaded once: every snapshot is read and decrypted (0.13 s each time on the
        // benchmark's repository).
        let snapshots = repo.snapshots().await?;
        let cluster = choose_cluster(&repo, &snapshots, &a).await?;
        // A transaction or restore point is looked up in the archived WAL's scans: refused
        // when it is not there, and the base backup is picked from before it.
        let bound = match check_named_target(&repo, &a, cluster).await? {
            Some(b) => b,
            None => bound,
        };
        let (id, snap) = if a.snapshot == "latest" {
            pick_base_backup(&snapshots, &bound, cluster)?
        } else {
            repo.find_snapshot(&a.snapshot).await?
        };
        let system_id = snap.database.system_id.clone().unwrap_or_default();
        let seg = snap.positions.get("pg.seg_size").and_then(|v| v.as_u64()).unwrap_or(16 << 20);
        let archive =
            tidemark_engine::postgres::archive::summarize(&repo, system_id.parse().unwrap_or(0), seg)
                .await?;
        let timeline = match (&a.timeline, &bound) {
            (Some(t), _) => t.clone(),
            (None, Bound::Time(t)) => {
                let t = t.with_timezone(&chrono::Utc);
                // Recovery to a time stops at the first transaction that ended after it; without
                // one, PostgreSQL replays everything and then refuses to promote.
                let end = archive.time_end();
                if end.is_none_or(|(e, _)| e <= t) {
                    return Err(usage(
                        format!(
                            "--to-time {t} is outside the recoverable window: {}",
                            end.map_or("no WAL is archived".to_owned(), |(e, what)| format!("it ends when {what} ({e}), and a time target needs a transaction that ended after it"))
                        ),
                        "see the window with `tidemark pg window`; use --latest to recover everything archived; check that archive_command runs",
                    ));
                }
                archive
                    .timeline_at(t)
                    .map_or_else(|| "current".to_owned(), |n| n.to_string())
            }
            (None, _) => "latest".to_owned(),
        };
        // Recovery stops at the first missing segment: none may lie between the base backup
        // and the target (the end of the archive when there is none).
        let upto = match &bound {
            _ if settings.is_empty() => Some(None),
            Bound::Lsn(l) => Some(Some(*l)),
            _ if a.immediate => snap
                .positions
                .get("pg.stop_lsn")
                .and_then(|v| v.as_str())
                .and_then(tidemark_engine::postgres::wal::parse_lsn)
                .map(Some),
            Bound::Time(t) => {
                let sys: u64 = system_id.parse().unwrap_or(0);
                let t = t.with_timezone(&chrono::Utc);
                // Where recovery stops: the first segment with a transaction that ended later,
                // or one whose records were not all read (the target may be in it; the server
                // finds it).
                tidemark_engine::postgres::archive::scans(&repo, sys, seg)
                    .await?
                    .iter()
                    .find(|(_, s)| match s {
                        Some(s) if s.incomplete.is_none() => s.last_xact.is_some_and(|x| x > t),
                        _ => true,
                    })
                    .map(|(s, _)| Some(s.start_lsn(seg)))
            }
            Bound::None => None,
        };
        if let Some(upto) = upto {
            refuse_gap(&snap, &archive, upto, seg)?;
        }
        if let Bound::Lsn(l) = bound {
            // The end of the archived WAL, on any timeline (a segment counts whole).
            let end = archive
                .timelines
                .iter()
                .filter_map(|t| tidemark_engine::postgres::wal::SegmentName::parse(&t.last))
                .map(|s| s.start_lsn(seg) + seg)
                .max();
            if end.is_none_or(|e| l > e) {
                use tidemark_engine::postgres::wal::lsn_string;
                return Err(usage(
                    format!(
                        "--to-lsn {} is beyond the end of the archived WAL ({})",
                        lsn_string(l),
                        end.map_or("no WAL is archived".to_owned(), lsn_string)
                    ),
                    "see the window with `tidemark pg window`; check that archive_command runs",
                ));
            }
        }
        let mut settings = settings.clone();
        // Said when the server ends recovery before the target: where each timeline of the
        // archive began and ended, so the user can pick one that holds the target.
        let timelines_said = archive
            .timelines
            .iter()
            .map(|t| {
                format!(
                    "timeline {}{}{}",
                    t.timeline,
                    archive
                        .began
                        .get(&t.timeline)
                        .map_or_else(String::new, |b| format!(", began {b}")),
                    t.last_xact.map_or_else(String::new, |x| format!(
                        ", its last transaction ended {x}"
                    ))
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let early_hint = format!(
            "recovery followed timeline {timeline}; the archive holds {timelines_said}. A target \
             is reached on a timeline with a transaction after it: name that timeline with \
             --timeline N, or recover everything archived with --latest"
        );
        settings.push(("recovery_target_timeline", timeline));
        let progress = Arc::new(Progress::default());
        let bar = Bar::start("pg restore", None, progress.clone(), ctx.quiet || ctx.json);
        let r = tidemark_engine::postgres::physical::restore(
            &repo,
            &id.short(),
            &snap,
            &target,
            &tidemark_engine::postgres::physical::RestoreOptions {
                tablespace_map: tablespace_map.clone(),
                delta: a.delta,
            },
            progress,
        )
        .await;
        bar.finish();
        let report = r?;
        // Recovery from the archive: restore_command runs this binary with the repository's
        // location and the path of its secret, never the secret.
        let exe = std::env::current_exe()?;
        let mut command = String::new();
        for (k, v) in &env {
            command.push_str(&format!("{k}={} ", sh_quote(v)));
        }
        command.push_str(&format!(
            "{} wal-fetch --system-id {}",
            sh_quote(&exe.display().to_string()),
            sh_quote(&system_id)
        ));
        // Locations, never secrets: credentials are refused in URLs.
        for url in &a.fallback.fallback {
            command.push_str(&format!(" --fallback {}", sh_quote(url)));
        }
        command.push_str(" %f %p");
        let mut conf = String::from("\n# Written by tidemark pg restore\n");
        conf.push_str(&format!("restore_command = {}\n", conf_quote(&command)));
        // When recovery ends, the prefetch spool goes: the running cluster holds nothing of
        // ours (the prefetcher removes it too when it sees the end).
        conf.push_str(&format!(
            "recovery_end_command = {}\n",
            conf_quote(tidemark_engine::postgres::archive::RECOVERY_END_COMMAND)
        ));
        for (k, v) in &settings {
            conf.push_str(&format!("{k} = {}\n", conf_quote(v)));
        }
        if let Some(port) = a.start_port {
            conf.push_str(&format!("port = {port}\n"));
        }
        for (name, value) in &extra {
            conf.push_str(&format!("{name} = {}\n", conf_quote(value)));
        }
        let auto = target.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&conf);
        std::fs::write(&auto, text)?;
        std::fs::write(target.join("recovery.signal"), "")?;
        // A backup of a standby carries its standby.signal: PostgreSQL would then stay a
        // standby forever instead of recovering to the target.
        match std::fs::remove_file(target.join("standby.signal")) {
            Ok(()) => tracing::info!("removed the standby.signal the base backup carried"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok::<_, anyhow::Error>((id, snap, report, settings, early_hint))
    }
    .await;
    lock.release().await?;
    crate::targets::report_fallbacks(&repo);
    let (id, snap, report, settings, early_hint) = result?;
    let restore_seconds = started.elapsed().as_secs_f64();
    let started_server = if a.start {
        let version = snap.database.version.clone().unwrap_or_default();
        let pg_ctl = a
            .conn
            .engine()
            .map_err(|m| usage(m, "see `tidemark pg backup --help`"))?
            .program(
                "pg_ctl",
                tidemark_engine::postgres::major_version_num(&version),
            );
        let o = tidemark_engine::postgres::start::StartOptions {
            pg_ctl,
            os_user: tidemark_engine::postgres::start::server_os_user(a.os_user.clone()),
            timeout: std::time::Duration::from_secs(a.start_timeout),
        };
        let dir = target.clone();
        if !ctx.quiet && !ctx.json {
            eprintln!("starting the restored server and waiting for recovery to finish");
        }
        Some(
            tokio::task::spawn_blocking(move || {
                let r = tidemark_engine::postgres::start::start_and_wait(&dir, &o);
                // Promoted, shut down, or the server stopped: nothing will ask for the
                // prefetched WAL (paused, or still recovering after a timeout: it may).
                if !tidemark_engine::postgres::archive::recovering(&dir) {
                    tidemark_engine::postgres::archive::clean_after_recovery(
                        &dir,
                        std::time::Duration::from_secs(5),
                    );
                }
                r
            })
            .await?
            .map_err(|e| {
                if e.to_string()
                    .contains("recovery ended before the target was reached")
                {
                    anyhow::Error::from(e).context(early_hint)
                } else {
                    e.into()
                }
            })?,
        )
    } else {
        None
    };
    if ctx.json {
        super::print_json(&serde_json::json!({
            "snapshot": id.to_hex(),
            "restore": report,
            "start_lsn": snap.positions.get("pg.start_lsn"),
            "stop_lsn": snap.positions.get("pg.stop_lsn"),
            "recovery": settings.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<std::collections::BTreeMap<_, _>>(),
            "restore_seconds": restore_seconds,
            "server": started_server,
        }))?;
    } else if let (Some(s), false) = (&started_server, ctx.quiet) {
        println!(
            "restored base backup {} into {} ({}, {}) in {restore_seconds:.1}s",
            id.short(),
            report.target,
            size(report.bytes),
            report.verified.as_deref().unwrap_or("not verified"),
        );
        for e in &report.elsewhere {
            println!("  {e}");
        }
        print_delta(&report);
        match s.consistent_seconds {
            Some(c) => println!("server accepted read-only connections after {c:.1}s"),
            None => println!("server did not open for read-only connections during recovery"),
        }
        println!(
            "recovery {} after {:.1}s (total {:.1}s)",
            s.outcome,
            s.recovery_seconds,
            restore_seconds + s.recovery_seconds
        );
        for l in &s.recovery_log {
            println!("  {l}");
        }
    } else if !ctx.quiet {
        println!(
            "restored base backup {} into {} ({}, {}) in {:.1}s; recovery is configured: start the server to replay WAL from the archive",
            id.short(),
            report.target,
            size(report.bytes),
            report.verified.as_deref().unwrap_or("not verified"),
            started.elapsed().as_secs_f64()
        );
        for e in &report.elsewhere {
            println!("  {e}");
        }
        print_delta(&report);
    }
    Ok(crate::exit::OK)
}

/// What a delta restore kept, wrote and removed, for people.
fn print_delta(report: &tidemark_engine::RestoreReport) {
    if let Some(d) = &report.delta {
        println!(
            "  delta: {} files kept whole, {} rewritten; {} kept, {} written; {} paths the backup does not have removed",
            d.files_kept,
            d.files_written,
            size(d.bytes_kept),
            size(d.bytes_written),
            d.removed
        );
    }
}

/// Recovery to the end of the archive stops at the first missing segment and promotes, as if
/// that were the end: refuse that unless the user names an end before the gap.
fn refuse_gap(
    snap: &tidemark_repo::snapshot::Snapshot,
    archive: &tidemark_engine::postgres::archive::ArchiveSummary,
    upto: Option<u64>,
    seg_size: u64,
) -> Result<()> {
    let timeline = snap
        .positions
        .get("pg.timeline")
        .and_then(|v| v.as_u64())
        .unwrap_or(1);
    let start = snap
        .positions
        .get("pg.start_wal")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    // Positions compare without the timeline (the first 8 hex digits).
    let pos = |name: &str| name.get(8..).unwrap_or("").to_owned();
    let last = upto.map(|l| {
        pos(&tidemark_engine::postgres::wal::SegmentName::containing(1, l, seg_size).to_string())
    });
    for tl in archive
        .timelines
        .iter()
        .filter(|t| u64::from(t.timeline) >= timeline)
    {
        if let Some((from, to)) = tl.gaps.iter().find(|(from, to)| {
            pos(to) >= pos(start) && last.as_ref().is_none_or(|l| pos(from) <= *l)
        }) {
            return Err(usage(
                if upto.is_some() {
                    format!(
                        "the archived WAL between this base backup and the target has a gap ({from} to {to} are missing); recovery would stop at {from}, before the target"
                    )
                } else {
                    format!(
                        "the archived WAL this base backup needs has a gap ({from} to {to} are missing); recovery to the end of the archive would stop at {from} as if that were the end"
                    )
                },
                "restore the missing WAL, or name a target before the gap; `tidemark pg window` shows the gaps",
            ));
        }
    }
    Ok(())
}

/// For `--to-xid` and `--to-name`: find the target in the scans of the archived WAL (of the
/// cluster of the newest physical backup). Found: a bound that picks a base backup from
/// before it. Not found, with every segment scanned: refused, saying what the archive holds.
/// Not checkable (segments archived without a scan, prepared transactions whose ids are not
/// read): a warning, and PostgreSQL's own check at the end of recovery.
async fn check_named_target(
    repo: &tidemark_repo::Repository,
    a: &RestoreArgs,
    cluster: Option<u64>,
) -> Result<Option<Bound>> {
    use tidemark_engine::postgres::wal::parse_lsn;
    if a.to_xid.is_none() && a.to_name.is_none() {
        return Ok(None);
    }
    let newest = repo
        .snapshots()
        .await?
        .into_iter()
        .filter(|(_, s)| {
            s.engine == "postgres"
                && s.kind == tidemark_repo::snapshot::SnapshotKind::Physical
                && (cluster.is_none() || system_id_of(s) == cluster)
        })
        .max_by_key(|(_, s)| s.time_end);
    let Some((system_id, seg_size)) = newest.and_then(|(_, s)| {
        let id = system_id_of(&s)?;
        let seg = s.positions.get("pg.seg_size").and_then(|v| v.as_u64());
        Some((id, seg.unwrap_or(16 << 20)))
    }) else {
        return Ok(None);
    };
    let scans = tidemark_engine::postgres::archive::scans(repo, system_id, seg_size).await?;
    // Segments archived without a scan, or whose walk ended early (section 7b): what they
    // hold cannot be known here, so a target not found may still be in them.
    let unknown = scans
        .iter()
        .filter(|(_, s)| s.as_ref().is_none_or(|s| s.incomplete.is_some()))
        .count();
    let hint = "see what the archive holds with `tidemark pg window`";
    if let Some(name) = &a.to_name {
        let points = tidemark_engine::postgres::archive::restore_points(&scans);
        let mut found: Vec<u64> = points
            .iter()
            .filter(|p| &p.name == name)
            .filter_map(|p| parse_lsn(&p.lsn))
            .collect();
        found.sort_unstable();
        found.dedup();
        if let Some(&last) = found.last() {
            if found.len() > 1 {
                tracing::warn!(name = %name, count = found.len(), "the restore point name is not unique; recovery stops at the first one after the base backup");
            }
            return Ok(Some(Bound::Lsn(last)));
        }
        if unknown > 0 {
            tracing::warn!(segments = unknown, "some archived WAL has no complete record scan; the restore point cannot be checked before recovery, PostgreSQL will look for it");
            return Ok(None);
        }
        let mut names: Vec<&str> = points
            .iter()
            .rev()
            .take(10)
            .map(|p| p.name.as_str())
            .collect();
        names.reverse();
        return Err(usage(
            format!(
                "--to-name {name:?}: no restore point of that name is in the archived WAL; {}",
                if names.is_empty() {
                    "it holds none".to_owned()
                } else {
                    format!("the newest it holds: {}", names.join(", "))
                }
            ),
            hint,
        ));
    }
    if let Some(x) = &a.to_xid {
        let Ok(xid) = x.parse::<u32>() else {
            return Ok(None);
        };
        // Resolved by its commit (or abort) record: a transaction that began before a base
        // backup and ended after it is a target that backup reaches.
        if let Some(lsn) =
            tidemark_engine::postgres::archive::xact_end(repo, system_id, &scans, seg_size, xid)
                .await?
        {
            return Ok(Some(Bound::Lsn(lsn)));
        }
        let prepared: u64 = scans
            .iter()
            .filter_map(|(_, s)| s.as_ref())
            .map(|s| s.prepared)
            .sum();
        if unknown > 0 || prepared > 0 {
            tracing::warn!(
                segments = unknown,
                prepared,
                "the transaction cannot be checked before recovery"
            );
            return Ok(None);
        }
        let (lo, hi) = scans
            .iter()
            .filter_map(|(_, s)| s.as_ref().and_then(|s| s.xids))
            .fold((u32::MAX, 0), |(a, b), (lo, hi)| (a.min(lo), b.max(hi)));
        let end = scans
            .iter()
            .filter_map(|(_, s)| s.as_ref().and_then(|s| s.end_lsn.clone()))
            .next_back()
            .unwrap_or_default();
        return Err(usage(
            format!(
                "--to-xid {xid}: that transaction did not end in the archived WAL{}",
                if lo <= hi {
                    format!(
                        " (the transactions that ended there run from {lo} to {hi}, up to {end})"
                    )
                } else {
                    String::new()
                }
            ),
            hint,
        ));
    }
    Ok(None)
}

fn system_id_of(s: &tidemark_repo::snapshot::Snapshot) -> Option<u64> {
    s.database.system_id.as_deref()?.parse().ok()
}

/// The cluster a physical restore is of: `--cluster` (a system identifier or its WAL stream
/// name), else the cluster of the snapshot named, else the only cluster with base backups.
/// With `latest` and base backups of several clusters, refused with the list: a restore never
/// picks a cluster the user did not mean. `None` when the repository has no base backup (the
/// base backup's choice then says so).
async fn choose_cluster(
    repo: &tidemark_repo::Repository,
    snapshots: &[(
        tidemark_repo::id::SnapshotId,
        tidemark_repo::snapshot::Snapshot,
    )],
    a: &RestoreArgs,
) -> Result<Option<u64>> {
    let mut clusters: std::collections::BTreeMap<u64, (usize, chrono::DateTime<chrono::Utc>)> =
        Default::default();
    for (_, s) in snapshots {
        if s.engine != "postgres" || s.kind != tidemark_repo::snapshot::SnapshotKind::Physical {
            continue;
        }
        if let Some(id) = system_id_of(s) {
            let e = clusters.entry(id).or_insert((0, s.time_end));
            e.0 += 1;
            e.1 = e.1.max(s.time_end);
        }
    }
    let list = || {
        clusters
            .iter()
            .map(|(id, (n, last))| format!("{id} ({n} base backups, the newest ended {last})"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if let Some(c) = &a.cluster {
        let id: u64 = c
            .strip_prefix("pg/")
            .map(|r| r.trim_end_matches("/wal"))
            .unwrap_or(c)
            .parse()
            .map_err(|_| {
                usage(
                    format!("--cluster {c:?} is not a system identifier"),
                    "give the number `tidemark pg window` lists as system_id",
                )
            })?;
        if !clusters.contains_key(&id) {
            return Err(usage(
                format!(
                    "--cluster {id}: the repository has no base backup of that cluster; it has {}",
                    if clusters.is_empty() {
                        "none".to_owned()
                    } else {
                        list()
                    }
                ),
                "see `tidemark pg window`",
            ));
        }
        if a.snapshot != "latest" {
            let (_, snap) = repo.find_snapshot(&a.snapshot).await?;
            if system_id_of(&snap) != Some(id) {
                return Err(usage(
                    format!(
                        "snapshot {} is of cluster {}, not of --cluster {id}",
                        a.snapshot,
                        snap.database.system_id.as_deref().unwrap_or("(unknown)")
                    ),
                    "name a base backup of that cluster, or `latest`",
                ));
            }
        }
        return Ok(Some(id));
    }
    if a.snapshot != "latest" {
        let (_, snap) = repo.find_snapshot(&a.snapshot).await?;
        return Ok(system_id_of(&snap));
    }
    match clusters.len() {
        0 => Ok(None),
        1 => Ok(clusters.keys().next().copied()),
        _ => Err(usage(
            format!(
                "the repository holds base backups of {} clusters: {}",
                clusters.len(),
                list()
            ),
            "choose one with --cluster SYSTEM_ID (`tidemark pg window` shows each cluster's window)",
        )),
    }
}

/// The latest physical PostgreSQL snapshot of `cluster` that ends before the bound.
fn pick_base_backup(
    snapshots: &[(
        tidemark_repo::id::SnapshotId,
        tidemark_repo::snapshot::Snapshot,
    )],
    bound: &Bound,
    cluster: Option<u64>,
) -> Result<(
    tidemark_repo::id::SnapshotId,
    tidemark_repo::snapshot::Snapshot,
)> {
    use tidemark_engine::postgres::wal::parse_lsn;
    let mut candidates: Vec<_> = snapshots
        .iter()
        .filter(|(_, s)| {
            s.engine == "postgres"
                && s.kind == tidemark_repo::snapshot::SnapshotKind::Physical
                && (cluster.is_none() || system_id_of(s) == cluster)
        })
        .collect();
    let total = candidates.len();
    let oldest = candidates.iter().map(|(_, s)| s.time_end).min();
    candidates.retain(|(_, s)| match bound {
        Bound::None => true,
        Bound::Time(t) => s.time_end <= *t,
        Bound::Lsn(l) => s
            .positions
            .get("pg.stop_lsn")
            .and_then(|v| v.as_str())
            .and_then(parse_lsn)
            .is_some_and(|stop| stop <= *l),
    });
    candidates.sort_by_key(|(_, s)| s.time_end);
    candidates.pop().cloned().ok_or_else(|| {
        usage(
            if total == 0 {
                "the repository has no physical PostgreSQL backup".to_owned()
            } else {
                format!(
                    "the recovery target is before the recoverable window, which starts at the end of the oldest base backup ({})",
                    oldest.map_or_else(String::new, |t| t.to_string())
                )
            },
            "list them with `tidemark snapshots`, or take one with `tidemark pg backup --physical`",
        )
    })
}

async fn window(ctx: &Context) -> Result<i32> {
    let repo = ctx.open().await?;
    let mut backups: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
        Default::default();
    let mut seg_sizes: std::collections::BTreeMap<String, u64> = Default::default();
    let mut earliest: std::collections::BTreeMap<String, chrono::DateTime<chrono::Utc>> =
        Default::default();
    for (id, s) in repo.snapshots().await? {
        if s.engine != "postgres" || s.kind != tidemark_repo::snapshot::SnapshotKind::Physical {
            continue;
        }
        let sys = s.database.system_id.clone().unwrap_or_default();
        if let Some(n) = s.positions.get("pg.seg_size").and_then(|v| v.as_u64()) {
            seg_sizes.insert(sys.clone(), n);
        }
        let e = earliest.entry(sys.clone()).or_insert(s.time_end);
        *e = (*e).min(s.time_end);
        backups.entry(sys).or_default().push(serde_json::json!({
            "id": id.to_hex(),
            "end": s.time_end,
            "timeline": s.positions.get("pg.timeline"),
            "stop_lsn": s.positions.get("pg.stop_lsn"),
        }));
    }
    // Clusters with WAL but no base backup yet are shown too: nothing is restorable there.
    for m in repo.storage().list("logs/pg/").await? {
        if let Some(sys) = m
            .path
            .strip_prefix("logs/pg/")
            .and_then(|r| r.split('/').next())
        {
            backups.entry(sys.to_owned()).or_default();
        }
    }
    let mut out = Vec::new();
    for (sys, list) in &backups {
        let id: u64 = sys.parse().unwrap_or(0);
        let seg = seg_sizes.get(sys).copied().unwrap_or(16 << 20);
        let summary = tidemark_engine::postgres::archive::summarize(&repo, id, seg).await?;
        // The named points `--to-name` can use, from the records of the archived WAL.
        let restore_points = tidemark_engine::postgres::archive::restore_points(
            &tidemark_engine::postgres::archive::scans(&repo, id, seg).await?,
        );
        out.push(serde_json::json!({
            "system_id": sys,
            "base_backups": list,
            "earliest": earliest.get(sys),
            "latest": summary.time_end().map(|(e, _)| e),
            "latest_is": summary.time_end().map(|(_, what)| what),
            "wal": summary.timelines,
            "restore_points": restore_points,
        }));
    }
    if ctx.json {
        super::print_json(&out)?;
        return Ok(crate::exit::OK);
    }
    for c in &out {
        println!("cluster {}", c["system_id"].as_str().unwrap_or(""));
        let n = c["base_backups"].as_array().map_or(0, Vec::len);
        match (c["earliest"].as_str(), c["latest"].as_str()) {
            (Some(e), Some(l)) => println!("  recoverable window: {e} to {l} ({n} base backups)"),
            (None, _) => println!("  nothing is restorable yet: no physical base backup"),
            (Some(e), None) => println!(
                "  only the base backups themselves ({n}, earliest {e}): no WAL is archived"
            ),
        }
        for t in c["wal"].as_array().into_iter().flatten() {
            let gaps = t["gaps"].as_array().map_or(0, Vec::len);
            println!(
                "  timeline {}: {} .. {} ({} segments){}",
                t["timeline"],
                t["first"].as_str().unwrap_or(""),
                t["last"].as_str().unwrap_or(""),
                t["segments"],
                if gaps == 0 {
                    String::new()
                } else {
                    format!(", {gaps} gap(s): {}", t["gaps"])
                }
            );
        }
        let points = c["restore_points"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        if !points.is_empty() {
            println!("  restore points ({}, newest last):", points.len());
            for p in points.iter().rev().take(10).rev() {
                println!(
                    "    {} at {} ({})",
                    p["name"].as_str().unwrap_or(""),
                    p["time"].as_str().unwrap_or(""),
                    p["lsn"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(crate::exit::OK)
}
