//! Logical backups: `pg_dump --format=custom` per database, streamed into the repository as it
//! is produced, plus `pg_dumpall --globals-only`; restores with `pg_restore` (pitr.md §2–3).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use tidemark_repo::ops::backup::Backup;
use tidemark_repo::ops::restore::{restore_stream, RestoreOptions as StreamOptions};
use tidemark_repo::progress::Progress;
use tidemark_repo::snapshot::{EntryType, Snapshot, SnapshotKind, StreamEntry};
use tidemark_repo::Repository;

use super::{quote_ident, quote_literal, Postgres};
use crate::{BackupInfo, Error, RestoreReport, Result};

/// Stream name prefix and suffix of one database's dump.
const DUMP_PREFIX: &str = "pg/";
const DUMP_SUFFIX: &str = ".dump";
/// The globals stream.
pub const GLOBALS: &str = "pg/globals.sql";

/// What a logical backup takes.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// These databases; empty means the connection's database (unless `all`).
    pub databases: Vec<String>,
    /// Every connectable, non-template database.
    pub all: bool,
    /// Also roles and tablespaces (`pg_dumpall --globals-only`).
    pub globals: bool,
    /// Record each table's row count and checksum (snapshot position `census`), taken in the
    /// very snapshot pg_dump dumps (`--snapshot`), for verification restores to compare with.
    /// Costs one more read of every table.
    pub census: bool,
}

/// Open a repeatable-read transaction on `db`, export its snapshot for pg_dump and take the
/// census in it. The connection must stay open until pg_dump has finished.
async fn census_snapshot(
    pg: &Postgres,
    db: &str,
) -> Result<(super::wire::Connection, String, crate::census::Census)> {
    let mut on_db = pg.clone();
    on_db.conn.dbname = db.to_owned();
    let mut c = on_db.connect().await?;
    let r = async {
        c.query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(|e| e.to_string())?;
        let rows = c
            .query("SELECT pg_export_snapshot()")
            .await
            .map_err(|e| e.to_string())?;
        let id = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .ok_or("pg_export_snapshot() returned nothing")?;
        let census = crate::census::postgres(&mut c, &format!("{db}/")).await?;
        Ok::<_, String>((id, census))
    }
    .await;
    match r {
        Ok((id, census)) => Ok((c, id, census)),
        Err(e) => {
            c.close().await;
            Err(Error::Database {
                action: "take the census of",
                database: format!("{db} on {}", pg.conn.server()),
                reason: e,
            })
        }
    }
}

/// The stream name of a database's dump (`/` and `%` escaped so any name round-trips).
pub fn dump_stream(db: &str) -> String {
    format!(
        "{DUMP_PREFIX}{}{DUMP_SUFFIX}",
        db.replace('%', "%25").replace('/', "%2F")
    )
}

/// The database a dump stream holds.
pub fn stream_database(stream: &str) -> Option<String> {
    let inner = stream
        .strip_prefix(DUMP_PREFIX)?
        .strip_suffix(DUMP_SUFFIX)?;
    Some(inner.replace("%2F", "/").replace("%25", "%"))
}

/// Collect a child's stderr on a thread; the last lines make the error message.
fn stderr_tail(child: &mut std::process::Child) -> std::thread::JoinHandle<String> {
    let mut err = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    })
}

/// Wait for a PostgreSQL tool to exit; a failure carries the last lines of its stderr.
async fn finish_child(
    pg: &Postgres,
    mut child: std::process::Child,
    tail: std::thread::JoinHandle<String>,
    program: &std::path::Path,
    action: &'static str,
    database: String,
) -> Result<()> {
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .map_err(|e| pg.db_error(action, e))?
        .map_err(|e| spawn_failed(program, e))?;
    let stderr = tail.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    Err(Error::Database {
        action,
        database,
        reason: format!(
            "{} exited with {status}: {stderr}",
            program.file_name().unwrap_or_default().to_string_lossy()
        ),
    })
}

fn spawn_failed(program: &std::path::Path, e: std::io::Error) -> Error {
    Error::Io {
        action: "start",
        path: program.display().to_string(),
        source: e,
    }
}

/// Run `program` with `args` and the connection's environment, and stream its stdout into the
/// backup as `stream`. A non-zero exit is an error carrying its stderr.
async fn dump_into(
    pg: &Postgres,
    backup: &mut Backup<'_>,
    program: PathBuf,
    args: &[&str],
    database: Option<&str>,
    stream: &str,
) -> Result<StreamEntry> {
    let env = pg
        .conn
        .child_env()
        .map_err(|e| pg.db_error("prepare the connection to", e))?;
    let mut cmd = Command::new(&program);
    env.apply(&mut cmd);
    if let Some(db) = database {
        // Through the environment: pg_dump would read a --dbname with '=' as a conninfo string.
        cmd.env("PGDATABASE", db);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_failed(&program, e))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let tail = stderr_tail(&mut child);
    let added = backup
        .add_stream(stream, EntryType::Stream, stdout, Some(0o600), None)
        .await;
    let database = format!(
        "{} on {}",
        database.unwrap_or("the globals"),
        pg.conn.server()
    );
    finish_child(pg, child, tail, &program, "dump", database).await?;
    Ok(added?)
}

/// Dump the databases (and globals) into `backup`.
///
/// # Errors
/// `Database` when the server cannot be reached or a dump fails; the caller then abandons the
/// backup, so no snapshot is written.
pub async fn backup(pg: &Postgres, backup: &mut Backup<'_>) -> Result<BackupInfo> {
    let info = pg.server_info().await?;
    let o = &pg.logical;
    let databases = if o.all {
        pg.databases().await?
    } else if o.databases.is_empty() {
        vec![pg.conn.dbname.clone()]
    } else {
        o.databases.clone()
    };
    let pg_dump = pg.program("pg_dump", info.version_num);
    let mut census = crate::census::Census::new();
    for db in &databases {
        tracing::info!(database = %db, "pg_dump");
        let mut args = vec![
            "--format=custom".to_owned(),
            "--no-password".into(),
            "--compress=0".into(),
        ];
        let held = if o.census {
            let (c, snapshot, tables) = census_snapshot(pg, db).await?;
            census.extend(tables);
            args.push(format!("--snapshot={snapshot}"));
            Some(c)
        } else {
            None
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = dump_into(
            pg,
            backup,
            pg_dump.clone(),
            &args,
            Some(db),
            &dump_stream(db),
        )
        .await;
        if let Some(mut c) = held {
            let _ = c.query("COMMIT").await;
            c.close().await;
        }
        r?;
    }
    if o.globals || o.all {
        let dumpall = pg.program("pg_dumpall", info.version_num);
        dump_into(
            pg,
            backup,
            dumpall,
            &["--globals-only", "--no-password"],
            None,
            GLOBALS,
        )
        .await?;
    }
    let mut positions = BTreeMap::new();
    positions.insert("pg.system_id".into(), info.system_id.clone().into());
    positions.insert("pg.server_version".into(), info.version.clone().into());
    positions.insert("pg.databases".into(), serde_json::json!(databases));
    if o.census {
        positions.insert(
            crate::census::POSITION.into(),
            serde_json::to_value(&census).expect("a census serializes"),
        );
    }
    Ok(BackupInfo {
        kind: SnapshotKind::Logical,
        database: tidemark_repo::snapshot::DatabaseIdentity {
            name: pg.conn.server(),
            system_id: Some(info.system_id),
            version: Some(info.version),
        },
        positions,
    })
}

/// What a logical restore does.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// The database in the snapshot; needed when it holds several.
    pub source: Option<String>,
    /// The database to restore into; default the source's name.
    pub target: Option<String>,
    /// Restore over an existing database (`pg_restore --clean --if-exists`). Without it an
    /// existing target is refused.
    pub clean: bool,
    /// Only these schemas (`pg_restore -n`).
    pub schemas: Vec<String>,
    /// Only these tables (`pg_restore -t`).
    pub tables: Vec<String>,
    /// Parallel jobs; above 1 the dump is written to a private temporary file first, because
    /// `pg_restore -j` needs to seek.
    pub jobs: u32,
    /// Skip ownership (`--no-owner`), for a server without the original roles.
    pub no_owner: bool,
    /// Skip grants (`--no-privileges`), for a server without the original roles.
    pub no_privileges: bool,
    /// Where the temporary file for `jobs > 1` goes.
    pub temp_dir: Option<PathBuf>,
}

/// Pick the dump stream of `source` in `snapshot`.
fn pick_stream<'s>(
    id: &str,
    snapshot: &'s Snapshot,
    source: Option<&str>,
) -> Result<(String, &'s StreamEntry)> {
    let dumps: Vec<(String, &StreamEntry)> = snapshot
        .streams
        .iter()
        .filter_map(|s| stream_database(&s.name).map(|d| (d, s)))
        .collect();
    let names = dumps
        .iter()
        .map(|(d, _)| d.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let wrong = |reason: String| Error::WrongSnapshot {
        snapshot: id.to_owned(),
        engine: "postgres",
        reason,
    };
    if snapshot.engine != "postgres" {
        return Err(wrong(format!(
            "it was made by the {:?} engine",
            snapshot.engine
        )));
    }
    match source {
        Some(want) => dumps.into_iter().find(|(d, _)| d == want).ok_or_else(|| {
            wrong(format!(
                "it has no dump of database {want:?} (it has: {names})"
            ))
        }),
        None if dumps.len() == 1 => Ok(dumps.into_iter().next().expect("one")),
        None if dumps.is_empty() => Err(wrong("it holds no database dump".into())),
        None => Err(wrong(format!(
            "it holds several databases ({names}); choose one with --database"
        ))),
    }
}

/// Restore one database of a logical snapshot with `pg_restore`.
///
/// # Errors
/// `WrongSnapshot` when the snapshot has no such dump; `Database` when the target exists and
/// `clean` is not set, or pg_restore fails (a database created for the restore is dropped again).
pub async fn restore(
    pg: &Postgres,
    repo: &Repository,
    id: &str,
    snapshot: &Snapshot,
    o: &RestoreOptions,
    progress: Arc<Progress>,
) -> Result<RestoreReport> {
    let (source, entry) = pick_stream(id, snapshot, o.source.as_deref())?;
    Progress::add(&progress.total, entry.size);
    let target = o.target.clone().unwrap_or(source);
    let info = pg.server_info().await?;

    // The maintenance connection goes to the connection's database unless that is the target.
    let mut maint = pg.clone();
    if maint.conn.dbname == target {
        maint.conn.dbname = "postgres".into();
    }
    let mut c = maint.connect().await?;
    let exists = !c
        .query(&format!(
            "SELECT 1 FROM pg_database WHERE datname = {}",
            quote_literal(&target)
        ))
        .await
        .map_err(|e| pg.db_error("query", e))?
        .is_empty();
    let created = if exists {
        if !o.clean {
            c.close().await;
            return Err(Error::Database {
                action: "restore into",
                database: target.clone(),
                reason: "the database exists; give --clean to restore over it, or --dbname to restore into a new database".into(),
            });
        }
        false
    } else {
        c.query(&format!("CREATE DATABASE {}", quote_ident(&target)))
            .await
            .map_err(|e| pg.db_error("create a database on", e))?;
        true
    };

    let result = run_pg_restore(pg, repo, entry, &target, o, info.version_num, progress).await;
    if result.is_err() && created {
        if let Err(e) = c
            .query(&format!("DROP DATABASE IF EXISTS {}", quote_ident(&target)))
            .await
        {
            tracing::warn!(database = %target, error = %e, "could not drop the database created for the failed restore");
        }
    }
    c.close().await;
    let bytes = result?;
    Ok(RestoreReport {
        target: format!("{target} on {}", pg.conn.server()),
        bytes,
        verified: Some("pg_restore completed with --exit-on-error".into()),
        elsewhere: Vec::new(),
        delta: None,
    })
}

async fn run_pg_restore(
    pg: &Postgres,
    repo: &Repository,
    entry: &StreamEntry,
    target: &str,
    o: &RestoreOptions,
    version_num: u32,
    progress: Arc<Progress>,
) -> Result<u64> {
    let program = pg.program("pg_restore", version_num);
    let env = pg
        .conn
        .child_env()
        .map_err(|e| pg.db_error("prepare the connection to", e))?;
    let mut cmd = Command::new(&program);
    env.apply(&mut cmd);
    // A conninfo string with the name quoted, so that any database name is taken literally.
    let conninfo = format!(
        "dbname='{}'",
        target.replace('\\', "\\\\").replace('\'', "\\'")
    );
    cmd.arg("--dbname")
        .arg(conninfo)
        .args(["--no-password", "--exit-on-error"]);
    if o.clean {
        cmd.args(["--clean", "--if-exists"]);
    }
    if o.no_owner {
        cmd.arg("--no-owner");
    }
    if o.no_privileges {
        cmd.arg("--no-privileges");
    }
    for s in &o.schemas {
        cmd.arg("--schema").arg(s);
    }
    for t in &o.tables {
        cmd.arg("--table").arg(t);
    }
    let index = repo.load_index_for(&entry.chunks).await?;
    let jobs = o.jobs.max(1);
    // With several jobs pg_restore needs a seekable file; hold it here until it has finished.
    let mut _spool = None;
    if jobs > 1 {
        let dir = o.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
        let tmp = tempfile::Builder::new()
            .prefix("tidemark-pg-restore-")
            .tempfile_in(&dir)
            .map_err(|e| Error::Io {
                action: "create a temporary file in",
                path: dir.display().to_string(),
                source: e,
            })?;
        let file = tmp.reopen().map_err(|e| Error::Io {
            action: "open",
            path: tmp.path().display().to_string(),
            source: e,
        })?;
        restore_stream(
            repo,
            &index,
            entry,
            std::io::BufWriter::with_capacity(1 << 20, file),
            &StreamOptions::default(),
            progress.clone(),
        )
        .await?;
        cmd.arg("--jobs").arg(jobs.to_string()).arg(tmp.path());
        cmd.stdin(Stdio::null());
        _spool = Some(tmp);
    } else {
        cmd.arg("--single-transaction").stdin(Stdio::piped());
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_failed(&program, e))?;
    let tail = stderr_tail(&mut child);
    let mut fed = Ok(entry.size);
    if let Some(stdin) = child.stdin.take() {
        fed = restore_stream(
            repo,
            &index,
            entry,
            stdin,
            &StreamOptions::default(),
            progress,
        )
        .await;
    }
    let database = format!("{target} on {}", pg.conn.server());
    finish_child(pg, child, tail, &program, "restore into", database).await?;
    // pg_restore succeeded but the stream did not reach it whole: not a restore.
    Ok(fed?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_stream_names_round_trip_any_database_name() {
        for db in ["shop", "a/b", "100%", "we%2Fird", "x.dump"] {
            assert_eq!(stream_database(&dump_stream(db)).as_deref(), Some(db));
        }
        assert_eq!(stream_database(GLOBALS), None);
    }
}
