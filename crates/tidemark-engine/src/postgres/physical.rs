//! Physical base backups over the replication protocol (pitr.md §9): BASE_BACKUP with a
//! manifest, its tar stream parsed file by file, each file cut into fixed blocks of whole
//! pages so that an unchanged block is stored once across backups.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use postgres_protocol::message::backend::Message;
use tidemark_repo::ops::backup::{Backup, Cutting};
use tidemark_repo::snapshot::{DatabaseIdentity, EntryType, SnapshotKind, StreamEntry};
use tokio::sync::mpsc;

use super::tar::{self, Event, Kind};
use super::wal::{self, SegmentName};
use super::wire::{Connection, WireError};
use super::Postgres;
use crate::{BackupInfo, Error, Result};

/// The name of the stream holding PostgreSQL's backup manifest.
pub const MANIFEST: &str = "backup_manifest";
/// Prefix of the main data directory's files in a snapshot.
pub const DATA: &str = "data/";

/// The snapshot position that counts the pages that failed their checksums while read (absent
/// when none did); `pg.checksum_report` names them.
pub const CHECKSUM_FAILURES: &str = "pg.checksum_failures";

/// Files up to this size are gathered in memory and cut in one step.
pub(super) const SMALL: u64 = 1 << 20;

/// How physical backups are taken.
#[derive(Debug, Clone)]
pub struct PhysicalOptions {
    /// Bytes per block: a whole number of 8 KiB pages (default 8 pages, 64 KiB).
    pub block: usize,
    /// How long to wait for the WAL the backup needs to reach the archive.
    pub wal_wait: Duration,
    /// Where the files are read.
    pub read: ReadMode,
}

/// Where a physical backup reads the data directory's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// From the data directory when this host has it (the server's own process works in
    /// it), else over the replication protocol.
    #[default]
    Auto,
    /// From the data directory, or fail saying why not.
    Local,
    /// Over the replication protocol (BASE_BACKUP), from anywhere.
    Replication,
}

impl Default for PhysicalOptions {
    fn default() -> Self {
        PhysicalOptions {
            block: 64 << 10,
            wal_wait: Duration::from_secs(60),
            read: ReadMode::Auto,
        }
    }
}

/// One archive member handed from the receiving task to the backup.
enum Member {
    Small(tar::Header, Vec<u8>),
    Large(tar::Header, mpsc::Receiver<Vec<Bytes>>),
    Entry(tar::Header),
}

/// Where a backup began and ended, and its manifest.
#[derive(Debug, Default)]
pub(super) struct Ended {
    pub(super) start_lsn: u64,
    pub(super) start_tli: u32,
    pub(super) end_lsn: u64,
    pub(super) end_tli: u32,
    pub(super) manifest: Vec<u8>,
    /// Archives (BASE_BACKUP's count): the data directory and each tablespace.
    pub(super) tablespaces: usize,
    /// Pages that failed their checksums: (how many, what the reader said), per file or
    /// message.
    pub(super) checksum_failures: Vec<(u64, String)>,
}

/// The content of a large file, read on the backup's reader thread. Fewer bytes than the
/// header announced is an error, never a short file.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<Bytes>>,
    queue: std::collections::VecDeque<Bytes>,
    cur: Bytes,
    left: u64,
    name: String,
}

/// The large file being received: its channel, the bytes still to come, and the batch being
/// gathered.
struct LargeFile {
    tx: mpsc::Sender<Vec<Bytes>>,
    left: u64,
    batch: Vec<Bytes>,
    gathered: usize,
}

/// Bytes of a large file gathered (as slices of the received messages, not copied) before
/// they are handed to the reader thread: one wake-up per batch instead of per 32 KiB message.
const HANDOFF: usize = 1 << 20;

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            if self.left == 0 {
                return Ok(0);
            }
            if let Some(b) = self.queue.pop_front() {
                self.cur = b;
                continue;
            }
            match self.rx.blocking_recv() {
                Some(batch) => self.queue.extend(batch),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "the base backup stream ended {} bytes before the end of {}",
                            self.left, self.name
                        ),
                    ))
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        self.left -= n as u64;
        Ok(n)
    }
}

fn protocol(server: &str, what: impl Into<String>) -> WireError {
    WireError::Protocol {
        server: server.to_owned(),
        what: what.into(),
    }
}

fn first_row(rows: &[Vec<Option<String>>]) -> (u64, u32) {
    let row = rows.first();
    let get = |i: usize| row.and_then(|r| r.get(i).cloned().flatten());
    (
        get(0).and_then(|l| wal::parse_lsn(&l)).unwrap_or(0),
        get(1).and_then(|t| t.parse().ok()).unwrap_or(0),
    )
}

/// Run BASE_BACKUP on `conn` and hand each member to `tx`, in archive order. The server sizes
/// each tablespace first (PROGRESS), and the sum goes to `progress` as the expected total.
async fn receive(
    mut conn: Connection,
    tx: mpsc::Sender<(String, Member)>,
    progress: std::sync::Arc<tidemark_repo::progress::Progress>,
) -> Result<Ended, WireError> {
    const COMMAND: &str = "BASE_BACKUP (LABEL 'tidemark', PROGRESS true, CHECKPOINT 'fast', \
                           WAIT true, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', \
                           TARGET 'client')";
    let server = conn.server().to_owned();
    let closed = || protocol(&server, "the backup was abandoned by the reader");
    conn.start_query(COMMAND).await?;
    let mut ended = Ended::default();
    let mut results = 0;
    let mut rows: Vec<Vec<Option<String>>> = Vec::new();
    let mut parser = tar::Parser::default();
    let mut prefix = String::new();
    let mut in_manifest = false;
    // The member being received: a small file's buffer, or a large file's channel.
    let mut small: Option<(tar::Header, Vec<u8>)> = None;
    let mut large: Option<LargeFile> = None;
    let mut error = None;
    loop {
        match conn.recv().await? {
            Message::RowDescription(_) => rows.clear(),
            Message::DataRow(body) => {
                let buf = body.buffer();
                let mut row = Vec::new();
                let mut ranges = body.ranges();
                while let Some(r) = fallible_iterator::FallibleIterator::next(&mut ranges)
                    .map_err(|e| protocol(&server, e.to_string()))?
                {
                    row.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                }
                rows.push(row);
            }
            Message::CommandComplete(_) => {
                results += 1;
                match results {
                    1 => (ended.start_lsn, ended.start_tli) = first_row(&rows),
                    2 => {
                        ended.tablespaces = rows.len();
                        // (spcoid, spclocation, size in kB).
                        let kb: u64 = rows
                            .iter()
                            .filter_map(|r| r.get(2).cloned().flatten()?.parse::<u64>().ok())
                            .sum();
                        tidemark_repo::progress::Progress::add(&progress.total, kb * 1024);
                    }
                    3 => (ended.end_lsn, ended.end_tli) = first_row(&rows),
                    _ => {}
                }
            }
            Message::CopyOutResponse(_) => {}
            Message::CopyData(body) => {
                let data = body.into_bytes();
                let Some(&kind) = data.first() else { continue };
                match kind {
                    b'n' => {
                        if !parser.at_boundary() || small.is_some() || large.is_some() {
                            return Err(protocol(&server, "a new archive began inside a file"));
                        }
                        let name = String::from_utf8_lossy(&data[1..])
                            .split('\0')
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        prefix = match name.as_str() {
                            "base.tar" => DATA.to_owned(),
                            other => format!("tablespace/{}/", other.trim_end_matches(".tar")),
                        };
                        parser = tar::Parser::default();
                    }
                    b'm' => in_manifest = true,
                    b'p' => {}
                    b'd' if in_manifest => ended.manifest.extend_from_slice(&data[1..]),
                    b'd' => {
                        let events = parser
                            .feed(data.slice(1..))
                            .map_err(|e| protocol(&server, e))?;
                        for e in events {
                            match e {
                                Event::Member(h) if h.kind == Kind::File && h.size > SMALL => {
                                    let (ftx, frx) = mpsc::channel(2);
                                    large = Some(LargeFile {
                                        tx: ftx,
                                        left: h.size,
                                        batch: Vec::new(),
                                        gathered: 0,
                                    });
                                    tx.send((prefix.clone(), Member::Large(h, frx)))
                                        .await
                                        .map_err(|_| closed())?;
                                }
                                Event::Member(h) if h.kind == Kind::File && h.size > 0 => {
                                    let size = h.size as usize;
                                    small = Some((h, Vec::with_capacity(size)));
                                }
                                Event::Member(h) if h.kind == Kind::File => {
                                    tx.send((prefix.clone(), Member::Small(h, Vec::new())))
                                        .await
                                        .map_err(|_| closed())?;
                                }
                                Event::Member(h) => {
                                    tx.send((prefix.clone(), Member::Entry(h)))
                                        .await
                                        .map_err(|_| closed())?;
                                }
                                Event::Data(d) => {
                                    if let Some((h, buf)) = &mut small {
                                        buf.extend_from_slice(&d);
                                        if buf.len() as u64 == h.size {
                                            let (h, buf) = small.take().expect("set");
                                            tx.send((prefix.clone(), Member::Small(h, buf)))
                                                .await
                                                .map_err(|_| closed())?;
                                        }
                                    } else if let Some(f) = &mut large {
                                        f.left -= d.len() as u64;
                                        f.gathered += d.len();
                                        f.batch.push(d);
                                        let done = f.left == 0;
                                        if done || f.gathered >= HANDOFF {
                                            f.tx.send(std::mem::take(&mut f.batch))
                                                .await
                                                .map_err(|_| closed())?;
                                            f.gathered = 0;
                                        }
                                        if done {
                                            large = None;
                                        }
                                    }
                                }
                                Event::End => {}
                            }
                        }
                    }
                    other => {
                        return Err(protocol(
                            &server,
                            format!("unknown base backup message type {:?}", other as char),
                        ))
                    }
                }
            }
            Message::CopyDone if small.is_some() || large.is_some() || !parser.at_boundary() => {
                return Err(protocol(&server, "the base backup ended inside a file"));
            }
            // Pages that failed their checksums: the server says so after the whole backup
            // (manifest and stop position included) was sent, warning about each first.
            Message::ErrorResponse(body)
                if super::wire::error_code(&body) == "XX001"
                    && ended.end_lsn != 0
                    && !ended.manifest.is_empty() =>
            {
                let total = conn
                    .warnings
                    .iter()
                    .find_map(|w| {
                        w.split(": ")
                            .nth(1)?
                            .strip_suffix(" total checksum verification failures")?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(1);
                let mut report: Vec<(u64, String)> =
                    conn.warnings.iter().map(|w| (0, w.clone())).collect();
                report.push((total, super::wire::error_text(&body)));
                ended.checksum_failures = report;
            }
            Message::ErrorResponse(body) => error = Some(conn.query_error(COMMAND, &body)),
            Message::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    if ended.end_lsn == 0 || ended.manifest.is_empty() {
        return Err(protocol(
            &server,
            "the base backup ended without its stop position or manifest",
        ));
    }
    conn.close().await;
    Ok(ended)
}

fn mtime(h: &tar::Header) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(h.mtime, 0)
}

/// How a file is cut: an index's pages (they end in a special space, which every index access
/// method has and heap pages do not) one page per block, because updates scatter over an index
/// and a 64 KiB block holding one changed page is stored whole again (pitr.md §9); everything
/// else into `block`. `first` is the start of the file.
pub(super) fn cutting_for(first: &[u8], block: usize) -> Cutting {
    const PAGE: usize = 8192;
    if first.len() >= 24 {
        let special = usize::from(u16::from_le_bytes([first[16], first[17]]));
        let size_version = u16::from_le_bytes([first[18], first[19]]);
        if usize::from(size_version & 0xFF00) == PAGE && (24..PAGE).contains(&special) {
            return Cutting::Fixed(PAGE);
        }
    }
    Cutting::Fixed(block)
}

/// Parse a size setting as SHOW prints it (`16MB`).
/// The server's `wal_segment_size` in bytes (16 MiB when it cannot be read).
pub(crate) async fn wal_segment_size(conn: &mut Connection) -> u64 {
    conn.query("SHOW wal_segment_size")
        .await
        .ok()
        .and_then(|r| r.first().cloned())
        .and_then(|r| r.into_iter().next().flatten())
        .and_then(|s| parse_size(&s))
        .unwrap_or(16 << 20)
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: u64 = digits.parse().ok()?;
    Some(match &s[digits.len()..] {
        "" | "B" => n,
        "kB" => n << 10,
        "MB" => n << 20,
        "GB" => n << 30,
        _ => return None,
    })
}

/// Take a base backup into `backup`.
///
/// # Errors
/// `Database` when the server cannot be reached, refuses, or the WAL the backup needs does not
/// reach the archive in time; the caller then abandons the backup (no snapshot).
pub async fn backup(
    pg: &Postgres,
    backup: &mut Backup<'_>,
    o: &PhysicalOptions,
) -> Result<BackupInfo> {
    if o.block == 0 || !o.block.is_multiple_of(8192) {
        return Err(Error::Database {
            action: "back up",
            database: pg.conn.server(),
            reason: format!(
                "a block of {} bytes is not a whole number of 8 KiB pages",
                o.block
            ),
        });
    }
    let info = pg.server_info().await?;
    let dir = match o.read {
        ReadMode::Replication => None,
        ReadMode::Local => super::local::locate(pg, &info, true).await?,
        ReadMode::Auto => super::local::locate(pg, &info, false).await?,
    };
    let (ended, seg_size, read) = match dir {
        Some(dir) => {
            let (ended, seg_size) = super::local::backup(pg, backup, &dir, &info, o.block).await?;
            (ended, seg_size, "local")
        }
        None => {
            let (ended, seg_size) = replicate(pg, backup, o.block).await?;
            (ended, seg_size, "replication")
        }
    };
    backup
        .add_bytes(
            MANIFEST,
            EntryType::Stream,
            ended.manifest.clone(),
            Some(0o600),
            None,
        )
        .await?;

    let system_id: u64 = info
        .system_id
        .parse()
        .map_err(|_| pg.db_error("back up", "the system identifier is not a number"))?;
    let first = SegmentName::containing(ended.start_tli, ended.start_lsn, seg_size);
    let last = SegmentName::containing(ended.end_tli, ended.end_lsn.saturating_sub(1), seg_size);
    wait_for_wal(
        pg,
        backup.repository(),
        system_id,
        (first, last, ended.end_lsn),
        seg_size,
        o.wal_wait,
    )
    .await?;

    let mut positions = BTreeMap::new();
    positions.insert("pg.system_id".into(), info.system_id.clone().into());
    positions.insert("pg.timeline".into(), ended.start_tli.into());
    positions.insert(
        "pg.start_lsn".into(),
        wal::lsn_string(ended.start_lsn).into(),
    );
    positions.insert("pg.stop_lsn".into(), wal::lsn_string(ended.end_lsn).into());
    positions.insert("pg.stop_timeline".into(), ended.end_tli.into());
    positions.insert("pg.start_wal".into(), first.to_string().into());
    positions.insert("pg.stop_wal".into(), last.to_string().into());
    positions.insert("pg.seg_size".into(), seg_size.into());
    positions.insert("pg.block_size".into(), (o.block as u64).into());
    positions.insert("pg.read".into(), read.into());
    positions.insert(
        "pg.tablespaces".into(),
        (ended.tablespaces.saturating_sub(1) as u64).into(),
    );
    if !ended.checksum_failures.is_empty() {
        let pages: u64 = ended.checksum_failures.iter().map(|f| f.0).sum();
        tracing::warn!(
            pages,
            "pages of {} failed their checksums: the source is damaged; the backup holds them as read",
            pg.conn.server()
        );
        positions.insert(CHECKSUM_FAILURES.into(), pages.into());
        positions.insert(
            "pg.checksum_report".into(),
            ended
                .checksum_failures
                .iter()
                .take(50)
                .map(|f| f.1.clone())
                .collect::<Vec<_>>()
                .into(),
        );
    }
    Ok(BackupInfo {
        kind: SnapshotKind::Physical,
        database: DatabaseIdentity {
            name: pg.conn.server(),
            system_id: Some(info.system_id),
            version: Some(info.version),
        },
        positions,
    })
}

/// The backup over the replication protocol: BASE_BACKUP's archives, member by member;
/// (where it ended, the WAL segment size).
async fn replicate(pg: &Postgres, backup: &mut Backup<'_>, block: usize) -> Result<(Ended, u64)> {
    let mut conn = Connection::connect(&pg.conn, true)
        .await
        .map_err(|e| pg.db_error("open a replication connection to", e))?;
    let seg_size = wal_segment_size(&mut conn).await;
    let (tx, mut rx) = mpsc::channel::<(String, Member)>(4);
    let receiver = tokio::spawn(receive(conn, tx, backup.progress()));
    let added: Result<()> = async {
        while let Some((prefix, m)) = rx.recv().await {
            match m {
                Member::Small(h, data) => {
                    let name = format!("{prefix}{}", h.name);
                    let cut = cutting_for(&data, block);
                    backup
                        .add_bytes_cut(&name, EntryType::File, data, Some(h.mode), mtime(&h), cut)
                        .await?;
                }
                Member::Large(h, mut frx) => {
                    let name = format!("{prefix}{}", h.name);
                    // The first batch, to see what kind of file this is.
                    let queue: std::collections::VecDeque<Bytes> =
                        frx.recv().await.unwrap_or_default().into();
                    let mut first = Vec::with_capacity(24);
                    for b in &queue {
                        first.extend_from_slice(&b[..b.len().min(24 - first.len())]);
                        if first.len() == 24 {
                            break;
                        }
                    }
                    let cut = cutting_for(&first, block);
                    let reader = ChannelReader {
                        rx: frx,
                        queue,
                        cur: Bytes::new(),
                        left: h.size,
                        name: name.clone(),
                    };
                    backup
                        .add_stream_cut(
                            &name,
                            EntryType::File,
                            reader,
                            Some(h.mode),
                            mtime(&h),
                            cut,
                        )
                        .await?;
                }
                Member::Entry(h) => {
                    let (kind, target) = match h.kind {
                        Kind::Symlink => (EntryType::Symlink, Some(h.link.clone())),
                        _ => (EntryType::Dir, None),
                    };
                    backup.add_entry(StreamEntry {
                        name: format!("{prefix}{}", h.name),
                        kind,
                        size: 0,
                        mode: Some(h.mode),
                        mtime: mtime(&h),
                        target,
                        chunks: vec![],
                    });
                }
            }
        }
        Ok(())
    }
    .await;
    drop(rx);
    let ended = receiver
        .await
        .map_err(|e| pg.db_error("back up", e))?
        .map_err(|e| pg.db_error("back up", e));
    added?;
    Ok((ended?, seg_size))
}

/// How far from its start the streamed pieces of `seg` in `names` reach without a hole.
async fn pieces_reach(
    repo: &tidemark_repo::Repository,
    stream: &str,
    names: &std::collections::HashSet<String>,
    seg: SegmentName,
) -> Result<u64> {
    let mut pieces: Vec<(u64, &String)> = names
        .iter()
        .filter_map(|n| {
            wal::parse_piece(n)
                .filter(|(s, _)| *s == seg)
                .map(|(_, off)| (off, n))
        })
        .collect();
    pieces.sort();
    let mut reach = 0;
    for (offset, name) in pieces {
        if offset > reach {
            break;
        }
        let info = tidemark_repo::log::segment_info(repo, stream, name).await?;
        reach = reach.max(offset + info.raw_size);
    }
    Ok(reach)
}

/// Wait until the WAL from the start of `first` to `stop_lsn` in `last` is in the archive:
/// whole segments, or for the last one, streamed pieces that reach the stop position (a
/// standby does not switch segments at the end of a backup; `pg receive` has it within a
/// second).
async fn wait_for_wal(
    pg: &Postgres,
    repo: &tidemark_repo::Repository,
    system_id: u64,
    (first, last, stop_lsn): (SegmentName, SegmentName, u64),
    seg_size: u64,
    limit: Duration,
) -> Result<()> {
    let stream = wal::stream(system_id);
    let started = std::time::Instant::now();
    loop {
        let have: std::collections::HashSet<String> =
            tidemark_repo::log::list_segments(repo, &stream)
                .await?
                .into_iter()
                .collect();
        let mut missing = None;
        let mut s = first;
        loop {
            if !have.contains(&s.to_string())
                && (s != last
                    || pieces_reach(repo, &stream, &have, s).await?
                        < stop_lsn - s.start_lsn(seg_size))
            {
                missing = Some(s);
                break;
            }
            // A backup cannot cross a timeline switch (PostgreSQL fails it), so this ends.
            if s.start_lsn(seg_size) >= last.start_lsn(seg_size) {
                break;
            }
            s = s.next(seg_size);
        }
        let Some(missing) = missing else {
            return Ok(());
        };
        if started.elapsed() >= limit {
            return Err(Error::Database {
                action: "back up",
                database: pg.conn.server(),
                reason: format!(
                    "the WAL this base backup needs ({first} to {last}) is not in the archive after {}s \
                     ({missing} is missing); set archive_command = 'tidemark wal-push %p' for this repository or run `tidemark pg receive`; \
                     a backup from a standby needs the primary to finish the segment (archive_timeout) or streaming",
                    limit.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether `dir` is missing or empty.
fn empty_or_missing(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

/// How a physical backup is restored.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Where tablespaces that lived outside the data directory go: (the tablespace's OID or
    /// its original location, the new location). Unnamed ones go back where they were.
    pub tablespace_map: Vec<(String, std::path::PathBuf)>,
    /// Restore into a data directory that already holds this cluster (stopped), rewriting
    /// only what differs (PITR design §9b).
    pub delta: bool,
}

/// `global/pg_control`, written last: PostgreSQL refuses to start a data directory without
/// it, so a restore that is killed or fails verification never leaves one that starts.
const CONTROL: &str = "global/pg_control";

/// Why a data directory may not be delta-restored, or `None`: a server runs in it, it holds
/// no cluster, or another cluster.
fn delta_refusal(dir: &std::path::Path, system_id: Option<&str>) -> Option<String> {
    if crate::postgres::archive::postmaster_alive(dir) {
        let pid = std::fs::read_to_string(dir.join("postmaster.pid")).unwrap_or_default();
        return Some(format!(
            "a server is running in it (postmaster.pid names process {}); stop it first \
             (pg_ctl stop -D {}), then run the restore again",
            pid.lines().next().unwrap_or("?").trim(),
            dir.display()
        ));
    }
    if !dir.join("PG_VERSION").is_file() {
        return Some(
            "it holds no PostgreSQL cluster (no PG_VERSION); --delta restores over a copy of \
             the same cluster; restore into a new or empty directory instead"
                .into(),
        );
    }
    // Without pg_control the directory is one an earlier restore left half-done: going on
    // is what repairs it.
    let here = crate::postgres::wal::control_system_id(dir).ok()?;
    match system_id {
        Some(want) if want != here.to_string() => Some(format!(
            "it holds another cluster (system identifier {here}, the backup is of {want}); \
             restore into a new or empty directory instead, or remove this one first"
        )),
        _ => None,
    }
}

/// A tablespace of a backup and where a restore puts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespacePlace {
    /// Its OID: the name of its link in `pg_tblspc`.
    pub oid: String,
    /// Where it was when the backup was taken.
    pub original: String,
    /// Where the restore writes it.
    pub place: std::path::PathBuf,
}

/// The tablespaces of `snapshot` (its links in `pg_tblspc`) and where each goes under `map`;
/// every entry of `map` must name one of them.
///
/// # Errors
/// A message for a mapping that names no tablespace, a relative or shared place.
pub fn tablespace_places(
    snapshot: &tidemark_repo::snapshot::Snapshot,
    map: &[(String, std::path::PathBuf)],
) -> std::result::Result<Vec<TablespacePlace>, String> {
    let link_prefix = format!("{DATA}pg_tblspc/");
    let mut places: Vec<TablespacePlace> = snapshot
        .streams
        .iter()
        .filter(|s| s.kind == EntryType::Symlink)
        .filter_map(|s| {
            let oid = s.name.strip_prefix(&link_prefix)?;
            let original = s.target.clone().unwrap_or_default();
            Some(TablespacePlace {
                oid: oid.to_owned(),
                place: original.clone().into(),
                original,
            })
        })
        .collect();
    let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
    let mut used = vec![false; map.len()];
    for p in &mut places {
        if let Some(i) = map
            .iter()
            .position(|(from, _)| from == &p.oid || same(from, &p.original))
        {
            used[i] = true;
            p.place = map[i].1.clone();
        }
        if !p.place.is_absolute() {
            return Err(format!(
                "tablespace {} would go to {}, which is not an absolute path; give an absolute one with --tablespace-map {}=DIR",
                p.oid,
                p.place.display(),
                p.oid
            ));
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        let known: Vec<String> = places
            .iter()
            .map(|p| format!("{} ({})", p.oid, p.original))
            .collect();
        return Err(format!(
            "--tablespace-map {}=… names no tablespace of this backup; its tablespaces are: {}",
            map[i].0,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ));
    }
    for (i, a) in places.iter().enumerate() {
        if let Some(b) = places[i + 1..].iter().find(|b| b.place == a.place) {
            return Err(format!(
                "tablespaces {} and {} would both go to {}; give one another place with --tablespace-map",
                a.oid,
                b.oid,
                a.place.display()
            ));
        }
    }
    Ok(places)
}

/// Restore a physical snapshot into `target`, a new or empty directory, and its tablespaces
/// into theirs (per `o`; also new or empty), and verify every file against PostgreSQL's backup
/// manifest (as `pg_verifybackup` does). Nothing is written unless every directory is free.
/// Recovery settings are the caller's business.
///
/// # Errors
/// `WrongSnapshot` for another engine or kind or a mapping that does not fit it; `Database`
/// for a non-empty directory; `Verification` when a file differs from the manifest;
/// repository and I/O errors.
pub async fn restore(
    repo: &tidemark_repo::Repository,
    id: &str,
    snapshot: &tidemark_repo::snapshot::Snapshot,
    target: &std::path::Path,
    o: &RestoreOptions,
    progress: std::sync::Arc<tidemark_repo::progress::Progress>,
) -> Result<crate::RestoreReport> {
    use std::os::unix::fs::PermissionsExt;
    let wrong = |reason: &str| Error::WrongSnapshot {
        snapshot: id.to_owned(),
        engine: "postgres",
        reason: reason.to_owned(),
    };
    if snapshot.engine != "postgres" || snapshot.kind != SnapshotKind::Physical {
        return Err(wrong("it is not a physical PostgreSQL backup"));
    }
    let manifest = snapshot
        .streams
        .iter()
        .find(|s| s.name == MANIFEST)
        .ok_or_else(|| wrong("it has no backup manifest"))?;
    let places = tablespace_places(snapshot, &o.tablespace_map).map_err(|r| wrong(&r))?;
    tidemark_repo::progress::Progress::add(
        &progress.total,
        snapshot.streams.iter().map(|s| s.size).sum(),
    );
    let busy = |dir: &std::path::Path, reason: String| Error::Database {
        action: "restore into",
        database: dir.display().to_string(),
        reason,
    };
    let delta = o.delta && !empty_or_missing(target);
    if delta {
        if let Some(why) = delta_refusal(target, snapshot.database.system_id.as_deref()) {
            return Err(busy(target, why));
        }
        if !places.is_empty() {
            return Err(busy(
                target,
                "the backup has tablespaces outside the data directory, and --delta does not \
                 restore those yet; restore into a new or empty directory instead"
                    .into(),
            ));
        }
    } else if !empty_or_missing(target) {
        return Err(busy(target, "the directory is not empty; a data directory is restored only into a new or empty directory (or over a stopped copy of the same cluster with --delta)".into()));
    }
    for p in &places {
        if !empty_or_missing(&p.place) {
            return Err(busy(
                &p.place,
                format!(
                    "tablespace {} goes here (where it was when backed up) but the directory is not empty; \
                     give it a new or empty directory with --tablespace-map {}=DIR",
                    p.oid, p.oid
                ),
            ));
        }
    }
    let index = repo
        .load_index_for(snapshot.streams.iter().flat_map(|s| &s.chunks))
        .await?;
    let target_name = target.display().to_string();
    let bad = |reason: String| Error::Verification {
        database: target_name.clone(),
        reason,
    };
    // The manifest first: it is checked before any file is written, and each file is checked
    // against it from the bytes as they are written (no second pass over the data).
    let text =
        tidemark_repo::ops::restore::read_stream(repo, &index, manifest, progress.clone()).await?;
    let files = parse_manifest(&text).map_err(bad)?;
    // Every file checked against its CRC32C afterwards: the chunks need not be hashed again.
    let check = if files
        .iter()
        .all(|f| f.algorithm.as_deref() == Some("CRC32C") && f.checksum.is_some())
    {
        tidemark_repo::ops::restore::ChunkCheck::AuthenticateOnly
    } else {
        tidemark_repo::ops::restore::ChunkCheck::Rehash
    };
    let links: Vec<String> = places
        .iter()
        .map(|p| format!("{DATA}pg_tblspc/{}", p.oid))
        .collect();
    let control_name = format!("{DATA}{CONTROL}");
    let control = snapshot.streams.iter().find(|s| s.name == control_name);
    let entries: Vec<&StreamEntry> = snapshot
        .streams
        .iter()
        .filter(|s| s.name.starts_with(DATA) && !links.contains(&s.name) && s.name != control_name)
        .collect();
    let io = |action, path: &std::path::Path, e| Error::Io {
        action,
        path: path.display().to_string(),
        source: e,
    };
    if delta {
        // pg_control goes first, durably: a delta restore killed half-way leaves a
        // directory PostgreSQL refuses to start, not a mix that looks whole.
        let c = target.join(CONTROL);
        match std::fs::remove_file(&c) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", &c, e));
            }
            _ => {}
        }
        let global = target.join("global");
        if let Ok(d) = std::fs::File::open(&global) {
            d.sync_all().map_err(|e| io("sync", &global, e))?;
        }
        let _ = std::fs::remove_file(target.join(MANIFEST));
    }
    let (mut written, summary) = tidemark_repo::ops::restore::restore_tree_with(
        repo,
        &index,
        &entries,
        DATA,
        target,
        progress.clone(),
        check,
        delta,
    )
    .await?;
    let summary = delta.then_some(summary);
    for p in &places {
        let prefix = format!("tablespace/{}/", p.oid);
        let entries: Vec<&StreamEntry> = snapshot
            .streams
            .iter()
            .filter(|s| s.name.starts_with(&prefix))
            .collect();
        let files = tidemark_repo::ops::restore::restore_tree(
            repo,
            &index,
            &entries,
            &prefix,
            &p.place,
            progress.clone(),
            check,
        )
        .await?;
        std::fs::set_permissions(&p.place, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("set the mode of", &p.place, e))?;
        written.extend(files.into_iter().map(|mut f| {
            f.path = format!("pg_tblspc/{}/{}", p.oid, f.path);
            f
        }));
        let link = target.join("pg_tblspc").join(&p.oid);
        std::fs::create_dir_all(target.join("pg_tblspc"))
            .map_err(|e| io("create", &target.join("pg_tblspc"), e))?;
        std::os::unix::fs::symlink(&p.place, &link).map_err(|e| io("create the link", &link, e))?;
    }
    // Everything but pg_control is checked before pg_control is written: a restore that
    // fails verification leaves a directory that does not start.
    let (control_file, files): (Vec<ManifestFile>, Vec<ManifestFile>) =
        files.into_iter().partition(|f| f.path == CONTROL);
    let mut verified = check_files(&files, &written).map_err(bad)?;
    if let Some(c) = control {
        let path = target.join(CONTROL);
        let (size, crc32c) = tidemark_repo::ops::restore::restore_file(
            repo,
            &index,
            c,
            &path,
            progress.clone(),
            true,
        )
        .await?;
        written.push(tidemark_repo::ops::restore::RestoredFile {
            path: CONTROL.into(),
            size,
            crc32c,
        });
        let (n, bytes) = check_files(&control_file, &written).map_err(bad)?;
        verified = (verified.0 + n, verified.1 + bytes);
    } else if !control_file.is_empty() {
        return Err(bad(format!(
            "{CONTROL} is in the backup manifest but not in the backup"
        )));
    }
    let manifest_path = target.join(MANIFEST);
    tidemark_repo::ops::restore::restore_file(
        repo,
        &index,
        manifest,
        &manifest_path,
        progress,
        true,
    )
    .await?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("set the mode of", target, e))?;
    Ok(crate::RestoreReport {
        target: target_name.clone(),
        bytes: verified.1,
        verified: Some(format!(
            "{} files match the backup manifest (sizes and CRC32C)",
            verified.0
        )),
        elsewhere: places
            .iter()
            .map(|p| format!("tablespace {}: {}", p.oid, p.place.display()))
            .collect(),
        delta: summary,
    })
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct ManifestFile {
    #[serde(rename = "Path")]
    pub(super) path: String,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm", default)]
    algorithm: Option<String>,
    #[serde(rename = "Checksum", default)]
    checksum: Option<String>,
}

#[derive(serde::Deserialize)]
struct Manifest {
    #[serde(rename = "Files")]
    files: Vec<ManifestFile>,
    #[serde(rename = "Manifest-Checksum")]
    checksum: String,
}

/// Parse the manifest and check its own SHA-256; its files.
pub(super) fn parse_manifest(text: &[u8]) -> std::result::Result<Vec<ManifestFile>, String> {
    use sha2::Digest;
    let m: Manifest = serde_json::from_slice(text)
        .map_err(|e| format!("the backup manifest does not parse: {e}"))?;
    // The checksum covers everything up to the line that holds it.
    let key = b"\"Manifest-Checksum\"";
    let at = text
        .windows(key.len())
        .rposition(|w| w == key)
        .ok_or("the backup manifest has no checksum")?;
    let line_start = text[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let digest = hex::encode(sha2::Sha256::digest(&text[..line_start]));
    if !digest.eq_ignore_ascii_case(&m.checksum) {
        return Err("the backup manifest's own checksum does not match".into());
    }
    Ok(m.files)
}

/// Check that every file of the manifest was written with its size and checksum, as
/// `pg_verifybackup` does; (files, bytes).
fn check_files(
    files: &[ManifestFile],
    written: &[tidemark_repo::ops::restore::RestoredFile],
) -> std::result::Result<(usize, u64), String> {
    let by_path: std::collections::HashMap<&str, &tidemark_repo::ops::restore::RestoredFile> =
        written.iter().map(|w| (w.path.as_str(), w)).collect();
    let mut bytes = 0;
    for f in files {
        let w = by_path
            .get(f.path.as_str())
            .ok_or_else(|| format!("{} is in the backup manifest but not in the backup", f.path))?;
        if w.size != f.size {
            return Err(format!(
                "{} has {} bytes; the manifest says {}",
                f.path, w.size, f.size
            ));
        }
        if let (Some("CRC32C"), Some(want)) = (f.algorithm.as_deref(), f.checksum.as_deref()) {
            let got = hex::encode(w.crc32c.to_le_bytes());
            if !got.eq_ignore_ascii_case(want) {
                return Err(format!(
                    "{} does not match its CRC32C in the manifest",
                    f.path
                ));
            }
        }
        bytes += f.size;
    }
    Ok((files.len(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restore whose files do not match the backup manifest fails, and leaves no
    /// `global/pg_control`: the directory it leaves does not start.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_restore_that_fails_its_manifest_check_leaves_no_pg_control() {
        use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
        use tidemark_repo::ops::backup::{Backup, BackupOptions, Cutting};
        let storage: std::sync::Arc<dyn tidemark_storage::Storage> =
            std::sync::Arc::new(tidemark_storage::ObjectStorage::memory());
        let repo = tidemark_repo::Repository::init(
            storage,
            &tidemark_repo::key::Secret::password("pw"),
            &tidemark_repo::config::InitOptions {
                kdf: tidemark_repo::key::KdfParams::insecure_for_tests(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let control = vec![7u8; 8192];
        let table = vec![3u8; 200_000];
        // The manifest says the table holds other bytes than the backup does.
        let manifest = manifest_for(&[
            ("global/pg_control", &control, None),
            ("base/1/1259", &table, Some("00000000")),
        ]);
        let lock = LockGuard::acquire(&repo, LockKind::Shared, "backup", &LockOptions::default())
            .await
            .unwrap();
        let mut b = Backup::start(
            &repo,
            &lock,
            BackupOptions {
                engine: "postgres".into(),
                kind: SnapshotKind::Physical,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
        for (name, data) in [
            ("data/global/pg_control", control),
            ("data/base/1/1259", table),
            (MANIFEST, manifest),
        ] {
            b.add_bytes_cut(
                name,
                EntryType::File,
                data,
                None,
                None,
                Cutting::Fixed(65536),
            )
            .await
            .unwrap();
        }
        let (id, snap) = b.finish(Default::default()).await.unwrap();
        lock.release().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("data");
        let err = restore(
            &repo,
            &id.short(),
            &snap,
            &target,
            &RestoreOptions::default(),
            Default::default(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("CRC32C"), "{err}");
        assert!(
            target.join("base/1/1259").exists(),
            "the table was restored"
        );
        assert!(
            !target.join(CONTROL).exists(),
            "pg_control was written before the manifest check"
        );
    }

    fn manifest_for(files: &[(&str, &[u8], Option<&str>)]) -> Vec<u8> {
        use sha2::Digest;
        let mut text = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
        for (i, (path, data, crc)) in files.iter().enumerate() {
            let crc = crc.map_or_else(
                || hex::encode(crc32c::crc32c(data).to_le_bytes()),
                str::to_owned,
            );
            text.push_str(&format!(
                "{{ \"Path\": \"{path}\", \"Size\": {}, \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{crc}\" }}{}\n",
                data.len(),
                if i + 1 < files.len() { "," } else { "" }
            ));
        }
        text.push_str("],\n");
        let sum = hex::encode(sha2::Sha256::digest(text.as_bytes()));
        text.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
        text.into_bytes()
    }

    fn written(path: &str, data: &[u8]) -> tidemark_repo::ops::restore::RestoredFile {
        tidemark_repo::ops::restore::RestoredFile {
            path: path.into(),
            size: data.len() as u64,
            crc32c: crc32c::crc32c(data),
        }
    }

    #[test]
    fn the_manifest_catches_a_changed_file_a_missing_file_and_a_changed_manifest() {
        let files: [(&str, &[u8], Option<&str>); 2] = [
            ("PG_VERSION", b"15\n", None),
            ("global/1262", &[7u8; 8192], None),
        ];
        let good = manifest_for(&files);
        let ok = [
            written("PG_VERSION", b"15\n"),
            written("global/1262", &[7u8; 8192]),
        ];
        let parsed = parse_manifest(&good).unwrap();
        assert_eq!(check_files(&parsed, &ok).unwrap(), (2, 8195));

        let wrong_crc = manifest_for(&[("PG_VERSION", b"15\n", Some("00000000"))]);
        assert!(check_files(&parse_manifest(&wrong_crc).unwrap(), &ok)
            .unwrap_err()
            .contains("CRC32C"));

        let mut edited = good.clone();
        let at = edited.windows(4).position(|w| w == b"8192").unwrap();
        edited[at..at + 4].copy_from_slice(b"8193");
        assert!(parse_manifest(&edited)
            .unwrap_err()
            .contains("own checksum"));

        let short = [
            written("PG_VERSION", b"15\n"),
            written("global/1262", &[7u8; 100]),
        ];
        assert!(check_files(&parsed, &short)
            .unwrap_err()
            .contains("global/1262 has 100 bytes"));
        assert!(check_files(&parsed, &ok[..1])
            .unwrap_err()
            .contains("global/1262 is in the backup manifest but not in the backup"));
    }

    #[test]
    fn tablespaces_go_where_they_were_unless_mapped_by_oid_or_old_directory() {
        let link = |oid: &str, to: &str| StreamEntry {
            name: format!("{DATA}pg_tblspc/{oid}"),
            kind: EntryType::Symlink,
            size: 0,
            mode: None,
            mtime: None,
            target: Some(to.into()),
            chunks: vec![],
        };
        let snapshot = tidemark_repo::snapshot::Snapshot {
            version: 1,
            time: Utc::now(),
            time_end: Utc::now(),
            hostname: String::new(),
            username: String::new(),
            engine: "postgres".into(),
            kind: SnapshotKind::Physical,
            database: DatabaseIdentity::default(),
            tags: vec![],
            parent: None,
            streams: vec![link("16384", "/srv/a"), link("16385", "/srv/b/")],
            positions: BTreeMap::new(),
            summary: Default::default(),
        };
        let places = |map: &[(&str, &str)]| {
            let map: Vec<(String, std::path::PathBuf)> = map
                .iter()
                .map(|(f, t)| ((*f).to_owned(), t.into()))
                .collect();
            tablespace_places(&snapshot, &map).map(|v| {
                v.into_iter()
                    .map(|p| p.place.display().to_string())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(places(&[]).unwrap(), ["/srv/a", "/srv/b/"]);
        assert_eq!(
            places(&[("16384", "/new/a"), ("/srv/b", "/new/b")]).unwrap(),
            ["/new/a", "/new/b"]
        );
        let e = places(&[("1", "/x")]).unwrap_err();
        assert!(e.contains("16384 (/srv/a), 16385 (/srv/b/)"), "{e}");
        let e = places(&[("16384", "/srv/b/")]).unwrap_err();
        assert!(e.contains("both go to /srv/b/"), "{e}");
        let e = places(&[("16384", "rel")]).unwrap_err();
        assert!(e.contains("not an absolute path"), "{e}");
    }

    #[test]
    fn index_pages_are_cut_one_page_per_block() {
        let page = |special: u16| {
            let mut p = vec![0u8; 8192];
            p[16..18].copy_from_slice(&special.to_le_bytes());
            p[18..20].copy_from_slice(&0x2004u16.to_le_bytes());
            p
        };
        assert_eq!(cutting_for(&page(8176), 65536), Cutting::Fixed(8192));
        assert_eq!(cutting_for(&page(8192), 65536), Cutting::Fixed(65536));
        assert_eq!(cutting_for(&[0u8; 8192], 65536), Cutting::Fixed(65536));
        assert_eq!(cutting_for(b"15\n", 65536), Cutting::Fixed(65536));
    }

    #[test]
    fn sizes_parse_as_show_prints_them() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("8kB"), Some(8 << 10));
        assert_eq!(parse_size("lots"), None);
    }
}
