//! Physical base backups read straight from the data directory, for a tidemark on the
//! database's host (pitr.md §9): `pg_backup_start` and `pg_backup_stop` over an ordinary
//! connection, the files read here rather than sent through a walsender, and a backup manifest
//! in PostgreSQL's own format (the one BASE_BACKUP sends), so that a restore checks both kinds
//! of backup alike. The files and the exclusions are those of PostgreSQL's `basebackup.c`.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tidemark_repo::ops::backup::Backup;
use tidemark_repo::snapshot::{EntryType, StreamEntry};

use super::page::{Checks, FileCheck};
use super::physical::{cutting_for, wal_segment_size, Ended, DATA, SMALL};
use super::wal;
use super::{Postgres, ServerInfo};
use crate::{Error, Result};

/// The control file: read last, as `basebackup.c` sends it.
const CONTROL: &str = "global/pg_control";

/// Files never copied, wherever they are (`basebackup.c` excludeFiles; `pg_internal.init` and
/// `pgsql_tmp` are prefixes).
const SKIP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "current_logfiles",
    "postgresql.auto.conf.tmp",
    "backup_manifest",
    "backup_manifest.tmp",
];

/// Top-level directories kept empty (their contents are rebuilt or useless after a restore).
const EMPTY_DIRS: &[&str] = &[
    "pg_wal",
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Where to read the data directory, when this host has it: the server's `data_directory`,
/// if its `global/pg_control` carries the server's system identifier and the server's own
/// process works in it (its `/proc/<pid>/cwd`; PostgreSQL changes into its data directory).
/// With `required`, the process check is waived when the process is not visible here (a
/// sidecar that shares the volume but not the process namespace), and every failure is an
/// error that says why; otherwise a failure means "read over the replication protocol".
///
/// # Errors
/// With `required`: `Database` naming what did not match.
pub(super) async fn locate(
    pg: &Postgres,
    info: &ServerInfo,
    required: bool,
) -> Result<Option<PathBuf>> {
    let mut conn = pg.connect().await?;
    let start = if info.version_num >= 150_000 {
        "pg_backup_start(text, boolean)"
    } else {
        "pg_start_backup(text, boolean, boolean)"
    };
    let rows = conn
        .query(&format!(
            "SELECT current_setting('data_directory'), pg_backend_pid()::text, \
             has_function_privilege('{start}', 'execute')::text"
        ))
        .await;
    // Judged while the connection is open: once it closes, its backend is gone from /proc.
    let judged = match rows {
        Ok(rows) => judge(
            &rows.into_iter().next().unwrap_or_default(),
            info,
            start,
            required,
        ),
        Err(e) => Err(format!(
            "the server does not say where its data directory is ({e}); \
             it needs a superuser or pg_read_all_settings"
        )),
    };
    conn.close().await;
    match judged {
        Ok(dir) => Ok(Some(dir)),
        Err(why) if required => Err(Error::Database {
            action: "read the data directory of",
            database: pg.conn.server(),
            reason: format!("{why}; use --read replication to back up over the network"),
        }),
        Err(why) => {
            tracing::debug!("reading over the replication protocol: {why}");
            Ok(None)
        }
    }
}

/// Whether the data directory the server names (row: directory, backend pid, whether the role
/// may start a backup) is the one here, or why not.
fn judge(
    row: &[Option<String>],
    info: &ServerInfo,
    start: &str,
    required: bool,
) -> std::result::Result<PathBuf, String> {
    let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    if get(2) != "true" {
        return Err(format!(
            "the role may not run {start}; a superuser may GRANT EXECUTE on it"
        ));
    }
    let dir = PathBuf::from(get(0));
    let control = dir.join(CONTROL);
    let ours = match std::fs::read(&control) {
        Ok(bytes) if bytes.len() >= 8 => {
            u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")).to_string()
        }
        Ok(_) => return Err(format!("{} is too short", control.display())),
        Err(e) => return Err(format!("{} cannot be read here ({e})", control.display())),
    };
    if ours != info.system_id {
        return Err(format!(
            "{} belongs to system {ours}, not to the server's {}",
            dir.display(),
            info.system_id
        ));
    }
    let cwd = PathBuf::from(format!("/proc/{}/cwd", get(1)));
    match (std::fs::canonicalize(&cwd), std::fs::canonicalize(&dir)) {
        (Ok(a), Ok(b)) if a == b => Ok(dir),
        (Err(e), _) if required && e.kind() == std::io::ErrorKind::NotFound => Ok(dir),
        (Ok(a), Ok(_)) => Err(format!(
            "the server's process {} works in {}, not {}",
            get(1),
            a.display(),
            dir.display()
        )),
        (Err(e), _) | (_, Err(e)) => Err(format!(
            "the server's process {} cannot be matched with {} ({e})",
            get(1),
            dir.display()
        )),
    }
}

/// What to do with one thing found under the data directory.
#[derive(Debug)]
enum What {
    Dir,
    Symlink(String),
    File(PathBuf),
}

/// One thing to back up: its name in the snapshot, its path in the manifest (files only).
#[derive(Debug)]
struct Item {
    name: String,
    manifest: String,
    what: What,
    mode: u32,
    mtime: Option<DateTime<Utc>>,
}

fn modified(m: &std::fs::Metadata) -> Option<DateTime<Utc>> {
    m.modified().ok().map(DateTime::<Utc>::from)
}

fn io_err(action: &'static str, path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        action,
        path: path.display().to_string(),
        source: e,
    }
}

/// The relation a database directory's file belongs to, and its fork: `16384_vm.2` is
/// (`16384`, `vm`); `None` for a file that is not a relation's.
fn relation(name: &str) -> Option<(&str, &str)> {
    let base = name.split('.').next().unwrap_or(name);
    let (node, fork) = base.split_once('_').unwrap_or((base, "main"));
    (!node.is_empty() && node.bytes().all(|b| b.is_ascii_digit())).then_some((node, fork))
}

/// Whether a file in a database directory is a temporary relation's (`t3_16384`).
fn temporary(name: &str) -> bool {
    name.strip_prefix('t')
        .and_then(|r| r.split_once('_'))
        .is_some_and(|(b, r)| {
            !b.is_empty()
                && b.bytes().all(|c| c.is_ascii_digit())
                && r.bytes().next().is_some_and(|c| c.is_ascii_digit())
        })
}

/// Walks the data directory in name order, applying `basebackup.c`'s exclusions.
struct Walk {
    items: Vec<Item>,
    tablespaces: usize,
    /// Bytes of the files found, as listed (the progress bar's total).
    bytes: u64,
    /// The `PG_<major>_` prefix of a tablespace's version directory.
    version_dir: String,
}

impl Walk {
    /// `dir` (on disk) holds what is named `name`/`manifest` (with trailing slashes, or
    /// empty at a root); `database` when it is a database's directory.
    fn dir(&mut self, dir: &Path, name: &str, manifest: &str, database: bool) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| io_err("list", dir, e))?
            .collect::<std::io::Result<_>>()
            .map_err(|e| io_err("list", dir, e))?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        let names: Vec<String> = entries
            .iter()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        // Unlogged relations: only their init fork is copied (recovery resets them from it).
        let unlogged: HashSet<&str> = if database {
            names
                .iter()
                .filter_map(|n| relation(n).filter(|(_, f)| *f == "init").map(|(r, _)| r))
                .collect()
        } else {
            HashSet::new()
        };
        for (entry, file) in entries.iter().zip(&names) {
            let path = entry.path();
            let rel = format!("{manifest}{file}");
            if SKIP_FILES.contains(&file.as_str())
                || file.starts_with("pg_internal.init")
                || file.starts_with("pgsql_tmp")
                || rel == CONTROL
            {
                continue;
            }
            if database
                && (temporary(file)
                    || relation(file).is_some_and(|(r, f)| f != "init" && unlogged.contains(r)))
            {
                continue;
            }
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Dropped since it was listed: recovery drops it again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read the metadata of", &path, e)),
            };
            let item = |what| {
                use std::os::unix::fs::PermissionsExt;
                Item {
                    name: format!("{name}{file}"),
                    manifest: rel.clone(),
                    what,
                    mode: meta.permissions().mode() & 0o7777,
                    mtime: modified(&meta),
                }
            };
            let kind = meta.file_type();
            if manifest.is_empty() && EMPTY_DIRS.contains(&file.as_str()) {
                // pg_wal may be a symlink to another disk; a restore makes it a directory.
                self.items.push(Item {
                    mode: 0o700,
                    ..item(What::Dir)
                });
                if file == "pg_wal" {
                    self.items.push(Item {
                        name: format!("{name}pg_wal/archive_status"),
                        mode: 0o700,
                        ..item(What::Dir)
                    });
                }
            } else if manifest == "pg_tblspc/" && kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| io_err("read", &path, e))?;
                self.items
                    .push(item(What::Symlink(target.to_string_lossy().into_owned())));
                self.tablespace(&path, file)?;
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| io_err("read", &path, e))?;
                self.items
                    .push(item(What::Symlink(target.to_string_lossy().into_owned())));
            } else if kind.is_dir() {
                self.items.push(item(What::Dir));
                self.dir(
                    &path,
                    &format!("{name}{file}/"),
                    &format!("{rel}/"),
                    manifest == "base/",
                )?;
            } else if kind.is_file() {
                self.bytes += meta.len();
                self.items.push(item(What::File(path)));
            }
        }
        Ok(())
    }

    /// A tablespace's files: its directory for this major version, under `tablespace/<oid>/`
    /// as BASE_BACKUP names them.
    fn tablespace(&mut self, link: &Path, oid: &str) -> Result<()> {
        self.tablespaces += 1;
        let mut found = None;
        for e in std::fs::read_dir(link).map_err(|e| io_err("list", link, e))? {
            let e = e.map_err(|e| io_err("list", link, e))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&self.version_dir) {
                found = Some((e.path(), n));
            }
        }
        let Some((path, version)) = found else {
            return Ok(());
        };
        let name = format!("tablespace/{oid}/{version}/");
        self.items.push(Item {
            name: name.trim_end_matches('/').to_owned(),
            manifest: String::new(),
            what: What::Dir,
            mode: 0o700,
            mtime: None,
        });
        // Below the version directory come the databases' directories.
        let mut databases = Vec::new();
        for e in std::fs::read_dir(&path).map_err(|e| io_err("list", &path, e))? {
            let e = e.map_err(|e| io_err("list", &path, e))?;
            databases.push(e.file_name().to_string_lossy().into_owned());
        }
        databases.sort();
        for db in databases {
            let dir = path.join(&db);
            if !dir.is_dir() {
                continue;
            }
            self.items.push(Item {
                name: format!("{name}{db}"),
                manifest: String::new(),
                what: What::Dir,
                mode: 0o700,
                mtime: None,
            });
            self.dir(
                &dir,
                &format!("{name}{db}/"),
                &format!("pg_tblspc/{oid}/{version}/{db}/"),
                true,
            )?;
        }
        Ok(())
    }
}

/// A file's bytes as the backup reads them, with their CRC32C for the manifest and their pages
/// checked.
struct CrcReader {
    file: std::fs::File,
    crc: u32,
    out: Arc<AtomicU32>,
    pages: Option<FileCheck>,
}

impl Read for CrcReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.out.store(self.crc, Ordering::Relaxed);
        if n == 0 {
            if let Some(p) = self.pages.take() {
                p.finish();
            }
        } else if let Some(p) = &mut self.pages {
            p.feed(&buf[..n], &self.file);
        }
        Ok(n)
    }
}

/// One line of the manifest's file list, as PostgreSQL writes it.
fn manifest_line(path: &str, size: u64, mtime: Option<DateTime<Utc>>, crc: u32) -> String {
    let when = mtime
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M:%S GMT")
        .to_string();
    format!(
        "{{ \"Path\": {}, \"Size\": {size}, \"Last-Modified\": \"{when}\", \
         \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\" }}",
        serde_json::Value::String(path.to_owned()),
        hex::encode(crc.to_le_bytes())
    )
}

/// The whole manifest, with its own SHA-256 over everything before its last line.
fn manifest_text(lines: &[String], timeline: u32, start: u64, end: u64) -> Vec<u8> {
    use sha2::Digest;
    let mut text = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
    text.push_str(&lines.join(",\n"));
    text.push_str(&format!(
        " ],\n\"WAL-Ranges\": [\n{{ \"Timeline\": {timeline}, \"Start-LSN\": \"{}\", \"End-LSN\": \"{}\" }}\n],\n",
        wal::lsn_string(start),
        wal::lsn_string(end)
    ));
    let sum = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    text.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    text.into_bytes()
}

/// The timeline a backup started on, from its backup label (`START TIMELINE: 1`, or the
/// segment named on the `START WAL LOCATION` line).
fn label_timeline(label: &str) -> Option<u32> {
    for line in label.lines() {
        if let Some(t) = line.strip_prefix("START TIMELINE: ") {
            return t.trim().parse().ok();
        }
    }
    let seg = label.lines().find_map(|l| l.split("(file ").nth(1))?;
    u32::from_str_radix(seg.get(..8)?, 16).ok()
}

/// Take the backup: start it on the server, read the data directory `dir`, stop it, and
/// write the backup label and the manifest; (where it ended, the WAL segment size).
pub(super) async fn backup(
    pg: &Postgres,
    backup: &mut Backup<'_>,
    dir: &Path,
    info: &ServerInfo,
    block: usize,
) -> Result<(Ended, u64)> {
    let modern = info.version_num >= 150_000;
    // The session holds the backup: if it ends early, the server abandons the backup.
    let mut conn = pg.connect().await?;
    let seg_size = wal_segment_size(&mut conn).await;
    let start_sql = if modern {
        "SELECT pg_backup_start('tidemark', true)::text"
    } else {
        "SELECT pg_start_backup('tidemark', true, false)::text"
    };
    let rows = conn
        .query(start_sql)
        .await
        .map_err(|e| pg.db_error("start a backup on", e))?;
    let start_lsn = rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|l| wal::parse_lsn(&l))
        .ok_or_else(|| pg.db_error("start a backup on", "no start position was returned"))?;
    // Page checksums are checked when the cluster has them, as BASE_BACKUP does.
    let checksums = conn
        .query("SHOW data_checksums")
        .await
        .map_err(|e| pg.db_error("start a backup on", e))?
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .is_some_and(|v| v == "on");
    let checks = checksums.then(|| Checks::new(start_lsn));

    let root = dir.to_owned();
    let major = if info.version_num >= 100_000 {
        info.version_num / 10_000
    } else {
        info.version_num / 100
    };
    let walk = tokio::task::spawn_blocking(move || -> Result<Walk> {
        let mut w = Walk {
            items: Vec::new(),
            tablespaces: 0,
            bytes: 0,
            version_dir: format!("PG_{major}_"),
        };
        w.dir(&root, DATA, "", false)?;
        let control = root.join(CONTROL);
        let meta = std::fs::metadata(&control).map_err(|e| io_err("read", &control, e))?;
        w.bytes += meta.len();
        w.items.push(Item {
            name: format!("{DATA}{CONTROL}"),
            manifest: CONTROL.to_owned(),
            what: What::File(control),
            mode: 0o600,
            mtime: modified(&meta),
        });
        Ok(w)
    })
    .await
    .map_err(|e| pg.db_error("back up", e))??;
    backup.expect_bytes(walk.bytes);

    let mut lines = Vec::new();
    for item in walk.items {
        let path = match item.what {
            What::Dir | What::Symlink(_) => {
                let (kind, target) = match item.what {
                    What::Symlink(t) => (EntryType::Symlink, Some(t)),
                    _ => (EntryType::Dir, None),
                };
                backup.add_entry(StreamEntry {
                    name: item.name,
                    kind,
                    size: 0,
                    mode: Some(item.mode),
                    mtime: item.mtime,
                    target,
                    chunks: vec![],
                });
                continue;
            }
            What::File(path) => path,
        };
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("open", &path, e)),
        };
        let len = file
            .metadata()
            .map_err(|e| io_err("read the metadata of", &path, e))?
            .len();
        let pages = checks.as_ref().and_then(|c| c.file(&item.manifest));
        let (size, crc) = if len <= SMALL {
            let p = path.clone();
            let data = tokio::task::spawn_blocking(move || {
                let mut data = Vec::with_capacity(len as usize);
                (&file).read_to_end(&mut data)?;
                if let Some(mut pages) = pages {
                    pages.feed(&data, &file);
                    pages.finish();
                }
                Ok::<_, std::io::Error>(data)
            })
            .await
            .map_err(|e| pg.db_error("back up", e))?
            .map_err(|e| io_err("read", &p, e))?;
            let crc = crc32c::crc32c(&data);
            let cut = cutting_for(&data, block);
            let e = backup
                .add_bytes_cut(
                    &item.name,
                    EntryType::File,
                    data,
                    Some(item.mode),
                    item.mtime,
                    cut,
                )
                .await?;
            (e.size, crc)
        } else {
            let mut first = [0u8; 24];
            let n = std::os::unix::fs::FileExt::read_at(&file, &mut first, 0)
                .map_err(|e| io_err("read", &path, e))?;
            let cut = cutting_for(&first[..n], block);
            let out = Arc::new(AtomicU32::new(0));
            let reader = CrcReader {
                file,
                crc: 0,
                out: out.clone(),
                pages,
            };
            let e = backup
                .add_stream_cut(
                    &item.name,
                    EntryType::File,
                    reader,
                    Some(item.mode),
                    item.mtime,
                    cut,
                )
                .await?;
            (e.size, out.load(Ordering::Relaxed))
        };
        lines.push(manifest_line(&item.manifest, size, item.mtime, crc));
    }

    let stop_sql = if modern {
        "SELECT lsn::text, labelfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile FROM pg_stop_backup(false, false)"
    };
    let rows = conn
        .query(stop_sql)
        .await
        .map_err(|e| pg.db_error("finish the backup on", e))?;
    conn.close().await;
    let row = rows.into_iter().next().unwrap_or_default();
    let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let end_lsn = wal::parse_lsn(&get(0))
        .ok_or_else(|| pg.db_error("finish the backup on", "no stop position was returned"))?;
    let label = get(1);
    let timeline = label_timeline(&label)
        .ok_or_else(|| pg.db_error("finish the backup on", "the backup label names no timeline"))?;
    let now = Some(Utc::now());
    lines.insert(
        0,
        manifest_line(
            "backup_label",
            label.len() as u64,
            now,
            crc32c::crc32c(label.as_bytes()),
        ),
    );
    backup
        .add_bytes(
            &format!("{DATA}backup_label"),
            EntryType::File,
            label.into_bytes(),
            Some(0o600),
            now,
        )
        .await?;
    let ended = Ended {
        start_lsn,
        start_tli: timeline,
        end_lsn,
        // A standby promoted during the backup fails pg_backup_stop, so it ends where it began.
        end_tli: timeline,
        manifest: manifest_text(&lines, timeline, start_lsn, end_lsn),
        tablespaces: walk.tablespaces + 1,
        checksum_failures: checks.map_or_else(Vec::new, |c| {
            c.failures()
                .iter()
                .map(|f| (f.blocks.len() as u64, f.describe()))
                .collect()
        }),
    };
    Ok((ended, seg_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_files_are_told_apart() {
        assert_eq!(relation("16384"), Some(("16384", "main")));
        assert_eq!(relation("16384.2"), Some(("16384", "main")));
        assert_eq!(relation("16384_vm"), Some(("16384", "vm")));
        assert_eq!(relation("16384_init"), Some(("16384", "init")));
        assert_eq!(relation("PG_VERSION"), None);
        assert!(temporary("t3_16384"));
        assert!(temporary("t3_16384_fsm.1"));
        assert!(!temporary("16384"));
        assert!(!temporary("tx_1"));
    }

    #[test]
    fn the_label_names_the_timeline() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000030000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 3\n";
        assert_eq!(label_timeline(label), Some(3));
        assert_eq!(
            label_timeline("START WAL LOCATION: 0/2000028 (file 000000020000000000000002)\n"),
            Some(2)
        );
        assert_eq!(label_timeline("nothing"), None);
    }

    #[test]
    fn a_written_manifest_is_one_the_restore_accepts() {
        let lines = vec![
            manifest_line("PG_VERSION", 3, None, crc32c::crc32c(b"15\n")),
            manifest_line("odd \"name\"", 0, None, 0),
        ];
        let text = manifest_text(&lines, 1, 0x200_0028, 0x200_0100);
        let files = super::super::physical::parse_manifest(&text).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].path, "odd \"name\"");
        assert!(String::from_utf8(text)
            .unwrap()
            .contains("\"End-LSN\": \"0/2000100\""));
    }
}
