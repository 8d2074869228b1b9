//! Streaming WAL archiving over the replication protocol, as `pg_receivewal` does, but into the
//! repository (pitr.md §8): a physical replication slot keeps the server from removing WAL the
//! archive does not have yet; the segment being written is stored every `flush_interval` as
//! pieces, so committed data is at most about that far behind; a finished segment is stored
//! whole and its pieces are removed.

use std::time::Duration;

use bytes::Bytes;
use tidemark_repo::log::{delete_segment, list_segments, segment_info, write_segment};
use tidemark_repo::Repository;
use tokio::sync::{mpsc, watch};

use super::wal::{self, SegmentName};
use super::wire::{Connection, WireError};
use super::Postgres;
use crate::{Error, Result};

/// How the streamer works.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// The physical replication slot (default `tidemark`).
    pub slot: String,
    /// Create the slot when it does not exist (default yes).
    pub create_slot: bool,
    /// How often the segment being written is stored (default 500 ms).
    pub flush_interval: Duration,
    /// How often the server hears where the archive is, at the least (default 10 s).
    pub status_interval: Duration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            slot: "tidemark".into(),
            create_slot: true,
            flush_interval: Duration::from_millis(500),
            status_interval: Duration::from_secs(10),
        }
    }
}

/// Why a streaming session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown was asked for; everything received is durable.
    Shutdown,
    /// The server's timeline ended (a promotion); stream again to follow the new one.
    TimelineSwitch(u32),
}

/// Where the streamer is, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The timeline being streamed.
    pub timeline: u32,
    /// The end of the WAL received.
    pub received_lsn: u64,
    /// The end of the WAL durable in the repository.
    pub durable_lsn: u64,
}

fn invalid_slot(slot: &str) -> bool {
    slot.is_empty()
        || slot.len() > 63
        || !slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Microseconds since 2000-01-01, PostgreSQL's epoch.
fn pg_now() -> i64 {
    const PG_EPOCH_UNIX: i64 = 946_684_800;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_micros() as i64) - PG_EPOCH_UNIX * 1_000_000
}

/// A standby status update: what was received (`write`) and what is durable (`flush`); the
/// slot keeps everything after `flush`.
fn status_update(write: u64, flush: u64, reply: bool) -> Vec<u8> {
    let mut m = Vec::with_capacity(34);
    m.push(b'r');
    m.extend_from_slice(&write.to_be_bytes());
    m.extend_from_slice(&flush.to_be_bytes());
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(&pg_now().to_be_bytes());
    m.push(u8::from(reply));
    m
}

fn u64_be(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// One object for the uploader, in order.
enum Job {
    /// Bytes `[offset, offset + data.len())` of `seg`, and the scan of the segment's records
    /// from its start to the piece's end.
    Piece {
        seg: SegmentName,
        offset: u64,
        data: Bytes,
        scan: Box<super::walscan::Scan>,
    },
    /// The whole of `seg`; the pieces named are removed once it is durable.
    Full {
        seg: SegmentName,
        data: Bytes,
        pieces: Vec<String>,
    },
}

fn meta(seg: SegmentName, seg_size: u64, offset: u64, len: usize) -> serde_json::Value {
    let start = seg.start_lsn(seg_size) + offset;
    serde_json::json!({
        "timeline": seg.timeline,
        "start_lsn": wal::lsn_string(start),
        "end_lsn": wal::lsn_string(start + len as u64),
        "seg_size": seg_size,
        "offset": offset,
    })
}

/// Store jobs in order; publish the durable LSN after each.
async fn upload(
    repo: Repository,
    stream: String,
    seg_size: u64,
    mut jobs: mpsc::Receiver<Job>,
    durable: watch::Sender<u64>,
) -> Result<()> {
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Piece {
                seg,
                offset,
                data,
                scan,
            } => {
                let len = data.len();
                let mut m = meta(seg, seg_size, offset, len);
                m[super::archive::SCAN] = serde_json::json!(scan);
                write_segment(&repo, &stream, &wal::piece_name(seg, offset), data, m).await?;
                durable.send_replace(seg.start_lsn(seg_size) + offset + len as u64);
            }
            Job::Full { seg, data, pieces } => {
                let mut m = meta(seg, seg_size, 0, seg_size as usize);
                let page = wal::long_header(&data).map_or(8192, |h| u64::from(h.block_size));
                m[super::archive::SCAN] = serde_json::json!(super::archive::scan_wal(
                    &seg.to_string(),
                    &data,
                    seg.start_lsn(seg_size),
                    page,
                    true,
                ));
                write_segment(&repo, &stream, &seg.to_string(), data, m).await?;
                durable.send_replace(seg.start_lsn(seg_size) + seg_size);
                for p in pieces {
                    if let Err(e) = delete_segment(&repo, &stream, &p).await {
                        tracing::warn!(piece = %p, error = %e, "a superseded piece was not removed");
                    }
                }
                tracing::debug!(segment = %seg, "streamed segment stored");
            }
        }
    }
    Ok(())
}

/// A piece already in the archive: its range and checksum, checked against what the server
/// sends again after a restart.
struct Known {
    offset: u64,
    len: u64,
    blake3: String,
}

/// The segment being received.
struct Current {
    seg: SegmentName,
    seg_size: u64,
    buf: Vec<u8>,
    /// Bytes from the start of the segment that are stored or queued as pieces.
    queued: u64,
    /// Pieces of this segment in the archive (stored before or during this session).
    pieces: Vec<String>,
    /// Pieces found at start, not yet compared with the re-sent bytes.
    known: Vec<Known>,
    system_id: u64,
}

impl Current {
    fn start(&self) -> u64 {
        self.seg.start_lsn(self.seg_size)
    }

    fn end(&self) -> u64 {
        self.start() + self.buf.len() as u64
    }

    /// The records received so far (pitr.md §7b): a piece's metadata carries them, so that
    /// the window and the target checks see WAL that is not yet a whole segment.
    fn scan(&self) -> super::walscan::Scan {
        let page = wal::long_header(&self.buf).map_or(8192, |h| u64::from(h.block_size));
        super::archive::scan_wal(&self.seg.to_string(), &self.buf, self.start(), page, false)
    }

    /// Check the re-sent bytes against pieces stored before a restart, as far as they go.
    fn check_known(&mut self, server: &str) -> Result<()> {
        while let Some(k) = self.known.first() {
            if (self.buf.len() as u64) < k.offset + k.len {
                break;
            }
            let got = blake3::hash(&self.buf[k.offset as usize..(k.offset + k.len) as usize]);
            if got.to_hex().as_str() != k.blake3 {
                return Err(Error::Database {
                    action: "stream WAL from",
                    database: server.to_owned(),
                    reason: format!(
                        "the archive's piece {} differs from the WAL the server sends for it: \
                         another cluster with the same system identifier writes to this archive",
                        wal::piece_name(self.seg, k.offset)
                    ),
                });
            }
            self.known.remove(0);
        }
        Ok(())
    }

    fn check_header(&self, server: &str) -> Result<()> {
        if self.buf.len() < 40 {
            return Ok(());
        }
        let bad = |reason: String| Error::Database {
            action: "stream WAL from",
            database: server.to_owned(),
            reason,
        };
        let h =
            wal::long_header(&self.buf).map_err(|e| bad(format!("segment {}: {e}", self.seg)))?;
        if h.system_id != self.system_id || h.page_addr != self.start() {
            return Err(bad(format!(
                "segment {} starts with the header of system {} at {}",
                self.seg,
                h.system_id,
                wal::lsn_string(h.page_addr)
            )));
        }
        Ok(())
    }
}

/// Stream WAL from `pg` into `repo` until `shutdown` turns true, the connection fails, or the
/// timeline ends. Everything received is stored before this returns, also on errors that
/// leave the repository reachable.
///
/// # Errors
/// `Database` for connection, slot and protocol failures (the caller retries with backoff),
/// repository errors.
pub async fn stream(
    pg: &Postgres,
    repo: &Repository,
    o: &StreamOptions,
    mut shutdown: watch::Receiver<bool>,
    progress: &watch::Sender<Progress>,
) -> Result<Ended> {
    if invalid_slot(&o.slot) {
        return Err(pg.db_error(
            "stream WAL from",
            format!(
                "{:?} is not a valid replication slot name: use 1 to 63 lower-case letters, digits and '_'",
                o.slot
            ),
        ));
    }
    let err = |e: WireError| pg.db_error("stream WAL from", e);
    let mut conn = Connection::connect(&pg.conn, true).await.map_err(err)?;
    let server = conn.server().to_owned();
    let ident = conn.query("IDENTIFY_SYSTEM").await.map_err(err)?;
    let row = ident.first().cloned().unwrap_or_default();
    let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let system_id: u64 = get(0).parse().map_err(|_| {
        pg.db_error(
            "stream WAL from",
            "IDENTIFY_SYSTEM gave no system identifier",
        )
    })?;
    let timeline: u32 = get(1)
        .parse()
        .map_err(|_| pg.db_error("stream WAL from", "IDENTIFY_SYSTEM gave no timeline"))?;
    let xlogpos = wal::parse_lsn(&get(2))
        .ok_or_else(|| pg.db_error("stream WAL from", "IDENTIFY_SYSTEM gave no position"))?;
    let seg_size = super::physical::wal_segment_size(&mut conn).await;
    let stream_name = wal::stream(system_id);

    let restart_lsn = slot(&mut conn, pg, o).await?;
    if timeline > 1 {
        let history = format!("{timeline:08X}.history");
        let have = list_segments(repo, &stream_name).await?;
        if !have.contains(&history) {
            let sql = format!("TIMELINE_HISTORY {timeline}");
            let rows = conn.query(&sql).await.map_err(err)?;
            let content = rows
                .first()
                .and_then(|r| r.get(1).cloned().flatten())
                .unwrap_or_default();
            write_segment(
                repo,
                &stream_name,
                &history,
                Bytes::from(content),
                serde_json::json!({}),
            )
            .await?;
            tracing::info!(timeline, "timeline history archived");
        }
    }

    // Where to start: after the last whole segment of this timeline in the archive, else where
    // the slot holds WAL from, else the server's current position; never past the server.
    let names = list_segments(repo, &stream_name).await?;
    let last_full = names
        .iter()
        .filter_map(|n| SegmentName::parse(n))
        .filter(|s| s.timeline == timeline)
        .max();
    let now_seg = SegmentName::containing(timeline, xlogpos, seg_size);
    let mut seg = match last_full {
        Some(s) => s.next(seg_size),
        None => SegmentName::containing(timeline, restart_lsn.unwrap_or(xlogpos), seg_size),
    };
    if seg > now_seg {
        seg = now_seg;
    }
    if let Some(r) = restart_lsn {
        let held = SegmentName::containing(timeline, r, seg_size);
        if held > seg {
            tracing::warn!(
                from = %seg, to = %held,
                "the archive lacks WAL the slot no longer holds; this shows as a gap in `pg window`"
            );
            seg = held;
        }
    }
    // Pieces of the start segment already stored (a restart); stale pieces of segments that
    // are now whole are removed.
    let mut known = Vec::new();
    let mut pieces = Vec::new();
    for n in &names {
        let Some((s, offset)) = wal::parse_piece(n) else {
            continue;
        };
        if s == seg {
            let info = segment_info(repo, &stream_name, n).await?;
            known.push(Known {
                offset,
                len: info.raw_size,
                blake3: info.blake3,
            });
            pieces.push(n.clone());
        } else if s < seg && names.binary_search(&s.to_string()).is_ok() {
            let _ = delete_segment(repo, &stream_name, n).await;
        }
    }
    known.sort_by_key(|k| k.offset);
    // Only a contiguous run from the start counts as stored.
    let mut queued = 0;
    known.retain(|k| {
        if k.offset <= queued {
            queued = queued.max(k.offset + k.len);
            true
        } else {
            false
        }
    });

    let start = seg.start_lsn(seg_size);
    let sql = format!(
        "START_REPLICATION SLOT {} PHYSICAL {} TIMELINE {timeline}",
        o.slot,
        wal::lsn_string(start)
    );
    conn.start_query(&sql).await.map_err(err)?;
    loop {
        let (tag, body) = conn.recv_frame().await.map_err(err)?;
        match tag {
            b'W' => break,
            b'E' => return Err(err(conn.frame_error(&sql, &body))),
            _ => {}
        }
    }
    tracing::info!(
        server = %server, slot = %o.slot, timeline, from = %wal::lsn_string(start),
        "streaming WAL"
    );

    let mut cur = Current {
        seg,
        seg_size,
        buf: Vec::with_capacity(seg_size as usize),
        queued,
        pieces,
        known,
        system_id,
    };
    let (jobs_tx, jobs_rx) = mpsc::channel(4);
    let (durable_tx, mut durable_rx) = watch::channel(start + queued);
    let uploader = tokio::spawn(upload(
        repo.clone(),
        stream_name.clone(),
        seg_size,
        jobs_rx,
        durable_tx,
    ));
    progress.send_replace(Progress {
        timeline,
        received_lsn: start,
        durable_lsn: start + queued,
    });

    let result = receive_loop(
        &mut conn,
        &mut cur,
        &jobs_tx,
        &mut durable_rx,
        &mut shutdown,
        o,
        progress,
        &sql,
    )
    .await;
    // Whatever was received is committed WAL: store it before going, also after an error.
    if cur.buf.len() as u64 > cur.queued {
        let offset = cur.queued;
        let data = Bytes::copy_from_slice(&cur.buf[offset as usize..]);
        let _ = jobs_tx
            .send(Job::Piece {
                seg: cur.seg,
                offset,
                data,
                scan: Box::new(cur.scan()),
            })
            .await;
    }
    drop(jobs_tx);
    let uploaded = uploader
        .await
        .map_err(|e| pg.db_error("stream WAL from", format!("the uploader failed: {e}")))?;
    let durable = *durable_rx.borrow();
    progress.send_modify(|p| p.durable_lsn = durable);
    if result.is_ok() {
        let _ = conn
            .send_copy_data(&status_update(cur.end(), durable, false))
            .await;
        conn.close().await;
    }
    uploaded?;
    let ended = result?;
    tracing::info!(durable = %wal::lsn_string(durable), ?ended, "streaming stopped");
    Ok(ended)
}

/// Find the slot, creating it when allowed; the LSN from which it holds WAL.
async fn slot(conn: &mut Connection, pg: &Postgres, o: &StreamOptions) -> Result<Option<u64>> {
    let err = |e: WireError| pg.db_error("stream WAL from", e);
    let read = |rows: Vec<Vec<Option<String>>>| -> Option<(String, Option<u64>)> {
        let row = rows.into_iter().next()?;
        let kind = row.first().cloned().flatten()?;
        let lsn = row
            .get(1)
            .cloned()
            .flatten()
            .and_then(|l| wal::parse_lsn(&l));
        Some((kind, lsn))
    };
    let sql = format!("READ_REPLICATION_SLOT {}", o.slot);
    let found = read(conn.query(&sql).await.map_err(err)?);
    match found {
        Some((kind, _)) if kind != "physical" => Err(pg.db_error(
            "stream WAL from",
            format!(
                "replication slot {:?} is a {kind} slot; name a physical slot with --slot",
                o.slot
            ),
        )),
        Some((_, lsn)) => Ok(lsn),
        None if o.create_slot => {
            let create = format!("CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL", o.slot);
            conn.query(&create).await.map_err(err)?;
            tracing::info!(slot = %o.slot, "replication slot created");
            Ok(read(conn.query(&sql).await.map_err(err)?).and_then(|(_, l)| l))
        }
        None => Err(pg.db_error(
            "stream WAL from",
            format!(
                "replication slot {:?} does not exist; create it (SELECT pg_create_physical_replication_slot('{}', true)) or let tidemark create it",
                o.slot, o.slot
            ),
        )),
    }
}

enum Event {
    Frame(std::result::Result<(u8, Bytes), WireError>),
    Flush,
    Status,
    Durable,
    Shutdown,
}

#[allow(clippy::too_many_arguments)]
async fn receive_loop(
    conn: &mut Connection,
    cur: &mut Current,
    jobs: &mpsc::Sender<Job>,
    durable: &mut watch::Receiver<u64>,
    shutdown: &mut watch::Receiver<bool>,
    o: &StreamOptions,
    progress: &watch::Sender<Progress>,
    sql: &str,
) -> Result<Ended> {
    let server = conn.server().to_owned();
    let protocol = |what: String| Error::Database {
        action: "stream WAL from",
        database: server.clone(),
        reason: what,
    };
    let gone = || protocol("the archive uploader stopped".into());
    let mut flush = tokio::time::interval(o.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = tokio::time::interval(o.status_interval);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *shutdown.borrow() {
            return Ok(Ended::Shutdown);
        }
        let event = tokio::select! {
            _ = shutdown.changed() => Event::Shutdown,
            f = conn.recv_frame() => Event::Frame(f),
            _ = flush.tick() => Event::Flush,
            _ = status.tick() => Event::Status,
            r = durable.changed() => if r.is_ok() { Event::Durable } else { return Err(gone()) },
        };
        match event {
            Event::Shutdown => {}
            Event::Frame(f) => {
                let (tag, body) = f.map_err(|e| protocol(e.to_string()))?;
                match (tag, body.first()) {
                    (b'd', Some(b'w')) => {
                        let at = u64_be(&body, 1)
                            .ok_or_else(|| protocol("a short WAL data message".into()))?;
                        let data = body.get(25..).unwrap_or_default();
                        if at != cur.end() {
                            return Err(protocol(format!(
                                "the server sent WAL at {}, expected {}",
                                wal::lsn_string(at),
                                wal::lsn_string(cur.end())
                            )));
                        }
                        let mut data = data;
                        while !data.is_empty() {
                            let room = (cur.seg_size as usize) - cur.buf.len();
                            let take = room.min(data.len());
                            cur.buf.extend_from_slice(&data[..take]);
                            data = &data[take..];
                            cur.check_known(&server)?;
                            cur.check_header(&server)?;
                            if cur.buf.len() as u64 == cur.seg_size {
                                let whole = Bytes::from(std::mem::replace(
                                    &mut cur.buf,
                                    Vec::with_capacity(cur.seg_size as usize),
                                ));
                                jobs.send(Job::Full {
                                    seg: cur.seg,
                                    data: whole,
                                    pieces: std::mem::take(&mut cur.pieces),
                                })
                                .await
                                .map_err(|_| gone())?;
                                cur.seg = cur.seg.next(cur.seg_size);
                                cur.queued = 0;
                            }
                        }
                        let end = cur.end();
                        progress.send_modify(|p| p.received_lsn = end);
                    }
                    (b'd', Some(b'k')) if body.get(17) == Some(&1) => {
                        let msg = status_update(cur.end(), *durable.borrow(), false);
                        conn.send_copy_data(&msg)
                            .await
                            .map_err(|e| protocol(e.to_string()))?;
                    }
                    (b'c', _) => {
                        // The server ended this timeline: it was promoted, or we asked for
                        // one that is now history.
                        conn.send_copy_done()
                            .await
                            .map_err(|e| protocol(e.to_string()))?;
                        let rows = conn
                            .finish_query(sql)
                            .await
                            .map_err(|e| protocol(e.to_string()))?;
                        let next = rows
                            .first()
                            .and_then(|r| r.first().cloned().flatten())
                            .and_then(|t| t.parse().ok());
                        return match next {
                            Some(t) => Ok(Ended::TimelineSwitch(t)),
                            None => Err(protocol("the server ended streaming".into())),
                        };
                    }
                    (b'E', _) => return Err(protocol(conn.frame_error(sql, &body).to_string())),
                    _ => {}
                }
            }
            Event::Flush => {
                if cur.buf.len() as u64 > cur.queued {
                    let offset = cur.queued;
                    let data = Bytes::copy_from_slice(&cur.buf[offset as usize..]);
                    cur.queued = cur.buf.len() as u64;
                    cur.pieces.push(wal::piece_name(cur.seg, offset));
                    jobs.send(Job::Piece {
                        seg: cur.seg,
                        offset,
                        data,
                        scan: Box::new(cur.scan()),
                    })
                    .await
                    .map_err(|_| gone())?;
                }
            }
            Event::Status | Event::Durable => {
                let d = *durable.borrow_and_update();
                progress.send_modify(|p| p.durable_lsn = d);
                conn.send_copy_data(&status_update(cur.end(), d, false))
                    .await
                    .map_err(|e| protocol(e.to_string()))?;
            }
        }
    }
}

/// Stream until `shutdown`, following timeline switches and reconnecting after failures with a
/// backoff from 1 s doubling to 30 s (back to 1 s after a minute of streaming). `on_error` hears
/// each failure and the wait before the next try; with `once` the first failure is returned.
///
/// # Errors
/// With `once`, the first failure; never otherwise.
pub async fn supervise(
    pg: &Postgres,
    repo: &Repository,
    o: &StreamOptions,
    shutdown: watch::Receiver<bool>,
    progress: &watch::Sender<Progress>,
    once: bool,
    mut on_error: impl FnMut(&Error, Duration),
) -> Result<()> {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = std::time::Instant::now();
        match stream(pg, repo, o, shutdown.clone(), progress).await {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::TimelineSwitch(t)) => {
                tracing::info!(timeline = t, "following the new timeline");
                continue;
            }
            Err(e) if once => return Err(e),
            Err(e) => {
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
                on_error(&e, backoff);
                let mut stop = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = async { while !*stop.borrow_and_update() { if stop.changed().await.is_err() { return; } } } => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_follow_postgresql_rules() {
        assert!(!invalid_slot("tidemark"));
        assert!(!invalid_slot("db_1"));
        for bad in ["", "Tidemark", "a-b", "x; DROP", &"a".repeat(64)] {
            assert!(invalid_slot(bad), "{bad}");
        }
    }

    #[test]
    fn a_status_update_has_the_layout_the_server_reads() {
        let m = status_update(0x1_0000_0010, 0x20, true);
        assert_eq!(m.len(), 34);
        assert_eq!(m[0], b'r');
        assert_eq!(u64_be(&m, 1), Some(0x1_0000_0010));
        assert_eq!(u64_be(&m, 9), Some(0x20));
        assert_eq!(u64_be(&m, 17), Some(0));
        assert_eq!(m[33], 1);
    }
}
