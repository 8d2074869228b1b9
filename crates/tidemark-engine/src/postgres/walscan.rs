//! What a WAL segment holds for recovery targets (pitr.md §6a): its records are walked as
//! PostgreSQL's `xlogreader.c` walks them (page headers skipped, records MAXALIGNed, each
//! checked by its CRC32C and its link to the one before), and the ones a target can stop at
//! are kept: transaction commits and aborts (their xid and time) and named restore points.
//! The walk ends at the first record that is not whole, not valid or not linked, or after a
//! segment switch, so a recycled or partly written segment yields only what recovery would
//! replay.
//!
//! Only records without block references are read (commits, aborts and restore points have
//! none), so the block header formats, which differ between versions, do not matter. A record
//! that begins in one segment and ends in the next is kept as two halves, the first segment's
//! `tail` and the next one's `head` (up to `HALF` bytes each), and `join` reads it from both.

use chrono::{DateTime, Utc};

const SHORT_HEADER: u64 = 24;
const LONG_HEADER: u64 = 40;
const RECORD_HEADER: usize = 24;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const RM_XLOG: u8 = 0;
const RM_XACT: u8 = 1;
const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_END_OF_RECOVERY: u8 = 0x90;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XACT_OPMASK: u8 = 0x70;
const XACT_COMMIT: u8 = 0x00;
const XACT_ABORT: u8 = 0x20;
const XACT_COMMIT_PREPARED: u8 = 0x30;
const XACT_ABORT_PREPARED: u8 = 0x40;
/// The most bytes kept of each half of a record split between segments: commit and restore
/// point records are far smaller.
const HALF: usize = 512;
/// PostgreSQL's epoch, 2000-01-01 00:00 UTC, in Unix microseconds.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A named restore point (`pg_create_restore_point`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestorePoint {
    /// Its name.
    pub name: String,
    /// When it was made.
    pub time: DateTime<Utc>,
    /// Where its record begins.
    pub lsn: String,
}

/// Where a timeline began: the record a promotion writes first on its new timeline (an
/// end-of-recovery record, or a shutdown checkpoint whose timeline differs from the one
/// before it), with its time, when the server left recovery.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimelineBegin {
    /// The new timeline.
    pub timeline: u32,
    /// The timeline it branched from.
    pub parent: u32,
    /// When the server promoted.
    pub time: DateTime<Utc>,
    /// Where the record begins.
    pub lsn: String,
}

/// What one segment holds for recovery targets.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scan {
    /// Where the last whole, valid record ends: recovery from this segment reaches here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_lsn: Option<String>,
    /// Transactions that ended (committed or aborted) in the segment.
    #[serde(default)]
    pub xacts: u64,
    /// The first and last of their end times: a time target stops at the first transaction
    /// that ended after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_xact: Option<DateTime<Utc>>,
    /// See `first_xact`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_xact: Option<DateTime<Utc>>,
    /// The smallest and largest transaction id that ended here (not those of prepared
    /// transactions, whose id is in the record's body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xids: Option<(u32, u32)>,
    /// Prepared transactions that ended here (COMMIT/ROLLBACK PREPARED): their ids are not in
    /// `xids`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prepared: u64,
    /// Named restore points.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore_points: Vec<RestorePoint>,
    /// The start (hex) of a record a target may stop at that runs past the segment's end, and
    /// where it begins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<(String, String)>,
    /// The first bytes (hex) of the end of a record that began in the segment before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// A timeline that began in the segment (a promotion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub began: Option<TimelineBegin>,
    /// Why the walk of a whole segment ended before the segment did (a record it could not
    /// read, where PostgreSQL's own WAL goes on): what it found is true, but targets in the
    /// rest of the segment cannot be looked up here and are left to the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<String>,
}

impl Scan {
    /// Add what `other` found.
    pub fn absorb(&mut self, other: Scan) {
        self.xacts += other.xacts;
        self.first_xact = match (self.first_xact, other.first_xact) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_xact = self.last_xact.max(other.last_xact);
        self.xids = match (self.xids, other.xids) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (a, b) => a.or(b),
        };
        self.prepared += other.prepared;
        self.restore_points.extend(other.restore_points);
        self.began = self.began.take().or(other.began);
    }
}

/// The record split between the segment `prev` and the next one, `next`: what it means for
/// targets, when both halves were kept and it passes its CRC.
pub fn join(prev: &Scan, next: &Scan) -> Option<Scan> {
    let (tail, lsn) = prev.tail.as_ref()?;
    let mut rec = hex::decode(tail).ok()?;
    rec.extend(hex::decode(next.head.as_ref()?).ok()?);
    let total = u32_at(&rec, 0)? as usize;
    if total < RECORD_HEADER || rec.len() < total {
        return None;
    }
    rec.truncate(total);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[RECORD_HEADER..]), &rec[..20]);
    if crc != u32_at(&rec, 20)? {
        return None;
    }
    let mut scan = Scan::default();
    let lsn = super::wal::parse_lsn(lsn)?;
    record(
        &mut scan,
        lsn,
        u32_at(&rec, 4)?,
        rec[16],
        rec[17],
        &rec[RECORD_HEADER..],
    );
    Some(scan)
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A segment's bytes and where it starts.
struct Pages<'a> {
    data: &'a [u8],
    start: u64,
    page: u64,
}

impl Pages<'_> {
    /// Append `n` bytes of record data from `at` (never inside a page header) to `out`,
    /// skipping page headers, each checked to belong at its place; where the data continues.
    /// `rest`: how many bytes of the record remain from `at` (these `n` included), when known:
    /// each page the record runs onto must then say it continues a record with exactly that
    /// many bytes left (`xlp_rem_len`, as `xlogreader.c` checks), so a damaged length is caught
    /// at the next page instead of swallowing the records after it.
    /// `Err(true)` when it runs off the end of the data (what there was is in `out`),
    /// `Err(false)` when it runs into a page that is not in its place.
    fn read(
        &self,
        mut at: u64,
        n: usize,
        mut rest: Option<u64>,
        out: &mut Vec<u8>,
    ) -> Result<u64, bool> {
        let mut left = n as u64;
        let len = self.data.len() as u64;
        while left > 0 {
            let off = at.checked_sub(self.start).ok_or(false)?;
            if off >= len {
                // Past the end of the data (a record that ended exactly at its end is followed
                // by nothing here): nothing more to read.
                return Err(true);
            }
            let in_page = off % self.page;
            if in_page == 0 {
                let h = self.data.get(off as usize..off as usize + 20).ok_or(true)?;
                if u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")) != at {
                    return Err(false);
                }
                let info = u16::from_le_bytes([h[2], h[3]]);
                let rem = u64::from(u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")));
                if info & XLP_FIRST_IS_CONTRECORD == 0 || rest.is_some_and(|r| r != rem) {
                    return Err(false);
                }
                at += if off == 0 { LONG_HEADER } else { SHORT_HEADER };
                continue;
            }
            let take = left.min(self.page - in_page);
            let have = take.min(len - off);
            out.extend_from_slice(&self.data[off as usize..(off + have) as usize]);
            if have < take {
                return Err(true);
            }
            left -= take;
            rest = rest.map(|r| r.saturating_sub(take));
            at += take;
        }
        Ok(at)
    }
}

fn maxalign(lsn: u64) -> u64 {
    lsn.saturating_add(7) & !7
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn time_at(b: &[u8]) -> Option<DateTime<Utc>> {
    let micros = i64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    DateTime::from_timestamp_micros(PG_EPOCH_MICROS.checked_add(micros)?)
}

/// The main data of a record body without block references.
fn main_data(body: &[u8]) -> Option<&[u8]> {
    let mut i = 0;
    let len = loop {
        match *body.get(i)? {
            255 => break usize::from(*body.get(i + 1)?),
            254 => break u32_at(body, i + 1)? as usize,
            // Replication origin (2 bytes), top-level xid (4 bytes).
            253 => i += 3,
            252 => i += 5,
            _ => return None,
        }
    };
    body.get(body.len().checked_sub(len)?..)
}

/// Why a walk ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    /// At the end of the data: a record ended exactly there, or runs on past it.
    End,
    /// After a segment switch: the rest of the segment is padding.
    Switch,
    /// At a record that is not whole, valid or linked, at this LSN.
    Invalid(u64, &'static str),
}

/// Walk the records of one segment: `data` from its start (a whole segment, or a piece of one
/// from its start), beginning at LSN `start` with WAL pages of `page` bytes. Total: any bytes
/// give a scan (of what could be read), never a panic.
pub fn scan(data: &[u8], start: u64, page: u64) -> Scan {
    walk(data, start, page, &mut |_| {}).0
}

/// Where transaction `xid` ended in this segment: the LSN of its commit or abort record
/// (not of a prepared transaction's, whose id is in the record's body). A target by xid is
/// resolved to this, so that a transaction that began before a base backup and ended after
/// it picks that backup.
pub fn find_end(data: &[u8], start: u64, page: u64, xid: u32) -> Option<u64> {
    let mut found = None;
    walk(data, start, page, &mut |r| {
        if found.is_none() && r.xid == xid && is_end(r.rmid, r.info) {
            found = Some(r.lsn);
        }
    });
    found
}

/// Where transaction `xid` ended, when its record is the one split between segment `prev`
/// and the next, `next`.
pub fn find_end_split(prev: &Scan, next: &Scan, xid: u32) -> Option<u64> {
    let joined = join(prev, next)?;
    (joined.xids == Some((xid, xid)))
        .then(|| super::wal::parse_lsn(&prev.tail.as_ref()?.1))
        .flatten()
}

fn is_end(rmid: u8, info: u8) -> bool {
    rmid == RM_XACT && matches!(info & XACT_OPMASK, XACT_COMMIT | XACT_ABORT)
}

/// A valid record's header, as the walk hands it to a visitor.
struct Record {
    lsn: u64,
    xid: u32,
    info: u8,
    rmid: u8,
}

/// Walk a whole segment as `scan` does, and mark the scan `incomplete` when the walk ended
/// before the segment did: in a segment PostgreSQL archived, records run to its end, or to a
/// switch after which the rest is padding. Such a segment is still archived; only what its
/// records say for targets is partial.
pub fn scan_segment(data: &[u8], start: u64, page: u64) -> Scan {
    let (mut scan, stop) = walk(data, start, page, &mut |_| {});
    if let Stop::Invalid(at, why) = stop {
        scan.incomplete = Some(format!(
            "the walk of its records ended at {} ({why})",
            super::wal::lsn_string(at)
        ));
    }
    scan
}

fn walk(data: &[u8], start: u64, page: u64, visit: &mut dyn FnMut(Record)) -> (Scan, Stop) {
    let mut scan = Scan::default();
    if page < 64 || !page.is_power_of_two() {
        return (scan, Stop::Invalid(start, "not a WAL page size"));
    }
    // Every position below is at most a page past the data's end: one that could not be
    // represented is not WAL (found by fuzzing with overflow checks).
    if start.checked_add(data.len() as u64 + 2 * page).is_none() {
        return (
            scan,
            Stop::Invalid(start, "a position past the end of the WAL"),
        );
    }
    let pages = Pages { data, start, page };
    let Some(first) = data.get(..24) else {
        return (scan, Stop::End);
    };
    let info = u16::from_le_bytes([first[2], first[3]]);
    let mut pos = start + LONG_HEADER;
    let mut buf = Vec::new();
    if info & XLP_FIRST_IS_CONTRECORD != 0 {
        // The end of a record that began in the segment before.
        let rem = u32::from_le_bytes(first[16..20].try_into().expect("4 bytes"));
        let mut head = Vec::new();
        let _ = pages.read(
            pos,
            (rem as usize).min(HALF),
            Some(u64::from(rem)),
            &mut head,
        );
        scan.head = Some(hex::encode(head));
        match pages.read(pos, rem as usize, Some(u64::from(rem)), &mut buf) {
            Ok(p) => pos = p,
            // The record goes on past this segment (or this piece).
            Err(true) => return (scan, Stop::End),
            Err(false) => {
                return (
                    scan,
                    Stop::Invalid(pos, "a page of a continued record is not in its place"),
                )
            }
        }
    }
    let mut prev: Option<u64> = None;
    let stop = loop {
        pos = maxalign(pos);
        if pos - start >= data.len() as u64 {
            // The last record ended exactly at the end of the data.
            break Stop::End;
        }
        // A record that would begin where a page begins begins after the page's header.
        let in_segment = pos - start;
        if in_segment.is_multiple_of(page) {
            // Its header must be this page's, as for a page a record runs onto.
            let addr = data
                .get(in_segment as usize + 8..in_segment as usize + 16)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            match addr {
                None => break Stop::End,
                Some(a) if a != pos => break Stop::Invalid(pos, "a page is not in its place"),
                Some(_) => {}
            }
            pos += if in_segment == 0 {
                LONG_HEADER
            } else {
                SHORT_HEADER
            };
        }
        buf.clear();
        let after_header = match pages.read(pos, RECORD_HEADER, None, &mut buf) {
            Ok(a) => a,
            Err(true) => {
                if !buf.is_empty() {
                    // Even the header goes on in the next segment.
                    scan.tail = Some((hex::encode(&buf), super::wal::lsn_string(pos)));
                }
                break Stop::End;
            }
            Err(false) => break Stop::Invalid(pos, "a page is not in its place"),
        };
        let header: [u8; RECORD_HEADER] = buf[..RECORD_HEADER].try_into().expect("read");
        let total = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let xl_prev = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if total < RECORD_HEADER {
            break Stop::Invalid(pos, "no record begins here");
        }
        // The first record read names one in the segment before (the one a continuation at
        // the start belongs to): a damaged continuation length that happens to land on a
        // later record's start is caught here.
        if prev.map_or(xl_prev >= start, |p| p != xl_prev) {
            break Stop::Invalid(pos, "the record does not follow the one before");
        }
        buf.clear();
        let end = match pages.read(
            after_header,
            total - RECORD_HEADER,
            Some((total - RECORD_HEADER) as u64),
            &mut buf,
        ) {
            Ok(e) => e,
            Err(true) => {
                let (rmid, info) = (header[17], header[16]);
                let wanted =
                    rmid == RM_XACT || (rmid == RM_XLOG && info & 0xF0 == XLOG_RESTORE_POINT);
                if wanted && RECORD_HEADER + buf.len() <= HALF {
                    let mut tail = header.to_vec();
                    tail.extend_from_slice(&buf);
                    scan.tail = Some((hex::encode(tail), super::wal::lsn_string(pos)));
                }
                break Stop::End;
            }
            Err(false) => break Stop::Invalid(pos, "a page of the record is not in its place"),
        };
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf), &header[..20]);
        if crc != u32::from_le_bytes(header[20..24].try_into().expect("4 bytes")) {
            break Stop::Invalid(pos, "the record fails its CRC");
        }
        let (xid, info, rmid) = (
            u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")),
            header[16],
            header[17],
        );
        record(&mut scan, pos, xid, info, rmid, &buf);
        visit(Record {
            lsn: pos,
            xid,
            info,
            rmid,
        });
        scan.end_lsn = Some(super::wal::lsn_string(end));
        prev = Some(pos);
        pos = end;
        if rmid == RM_XLOG && info & 0xF0 == XLOG_SWITCH {
            break Stop::Switch;
        }
    };
    (scan, stop)
}

/// Note what one valid record means for targets.
fn record(scan: &mut Scan, lsn: u64, xid: u32, info: u8, rmid: u8, body: &[u8]) {
    match rmid {
        RM_XACT => {
            let op = info & XACT_OPMASK;
            if !matches!(
                op,
                XACT_COMMIT | XACT_ABORT | XACT_COMMIT_PREPARED | XACT_ABORT_PREPARED
            ) {
                return;
            }
            let Some(time) = main_data(body).and_then(time_at) else {
                return;
            };
            scan.xacts += 1;
            scan.first_xact = scan.first_xact.min(Some(time)).or(Some(time));
            scan.last_xact = scan.last_xact.max(Some(time));
            if matches!(op, XACT_COMMIT | XACT_ABORT) {
                scan.xids = Some(match scan.xids {
                    None => (xid, xid),
                    Some((lo, hi)) => (lo.min(xid), hi.max(xid)),
                });
            } else {
                scan.prepared += 1;
            }
        }
        RM_XLOG if matches!(info & 0xF0, XLOG_END_OF_RECOVERY | XLOG_CHECKPOINT_SHUTDOWN) => {
            let Some(main) = main_data(body) else { return };
            // xl_end_of_recovery: end_time (µs since 2000), ThisTimeLineID, PrevTimeLineID.
            // CheckPoint: ThisTimeLineID at 8, PrevTimeLineID at 12, time (seconds since
            // 1970) at 64.
            let (time, this, prev) = if info & 0xF0 == XLOG_END_OF_RECOVERY {
                (time_at(main), u32_at(main, 8), u32_at(main, 12))
            } else {
                let secs = main
                    .get(64..72)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")));
                (
                    secs.and_then(|s| DateTime::from_timestamp(s, 0)),
                    u32_at(main, 8),
                    u32_at(main, 12),
                )
            };
            if let (Some(time), Some(this), Some(prev)) = (time, this, prev) {
                if this != prev && scan.began.is_none() {
                    scan.began = Some(TimelineBegin {
                        timeline: this,
                        parent: prev,
                        time,
                        lsn: super::wal::lsn_string(lsn),
                    });
                }
            }
        }
        RM_XLOG if info & 0xF0 == XLOG_RESTORE_POINT => {
            let Some(main) = main_data(body) else { return };
            let (Some(time), Some(name)) = (time_at(main), main.get(8..)) else {
                return;
            };
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            scan.restore_points.push(RestorePoint {
                name: String::from_utf8_lossy(name).into_owned(),
                time,
                lsn: super::wal::lsn_string(lsn),
            });
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 8192;

    /// Writes records into a segment as PostgreSQL lays them out (page headers, MAXALIGN,
    /// CRC32C, xl_prev).
    struct Writer {
        seg: Vec<u8>,
        start: u64,
        pos: u64,
        prev: u64,
        /// Bytes per segment: pages at multiples of it get the long header.
        seg_size: u64,
    }

    impl Writer {
        fn new(start: u64, size: usize) -> Writer {
            Writer::segments(start, size, size as u64)
        }

        fn segments(start: u64, size: usize, seg_size: u64) -> Writer {
            Writer {
                seg: vec![0; size],
                start,
                pos: start + LONG_HEADER,
                prev: 0,
                seg_size,
            }
        }

        /// Write a page header at the current position (a page start); `rem` bytes of a
        /// record continue on it.
        fn page_header(&mut self, rem: usize) {
            let o = (self.pos - self.start) as usize;
            self.seg[o..o + 2].copy_from_slice(&0xD110u16.to_le_bytes());
            if rem > 0 {
                self.seg[o + 2..o + 4].copy_from_slice(&XLP_FIRST_IS_CONTRECORD.to_le_bytes());
                self.seg[o + 16..o + 20].copy_from_slice(&(rem as u32).to_le_bytes());
            }
            self.seg[o + 8..o + 16].copy_from_slice(&self.pos.to_le_bytes());
            self.pos += if (o as u64).is_multiple_of(self.seg_size) {
                LONG_HEADER
            } else {
                SHORT_HEADER
            };
        }

        /// Put a record's bytes at the current position, writing page headers where pages
        /// begin.
        fn put(&mut self, bytes: &[u8]) {
            for (i, &b) in bytes.iter().enumerate() {
                if (self.pos - self.start).is_multiple_of(PAGE) {
                    self.page_header(bytes.len() - i);
                }
                self.seg[(self.pos - self.start) as usize] = b;
                self.pos += 1;
            }
        }

        fn record(&mut self, xid: u32, rmid: u8, info: u8, main: &[u8]) -> u64 {
            let mut body = Vec::new();
            if main.len() < 256 {
                body.extend_from_slice(&[255, main.len() as u8]);
            } else {
                body.push(254);
                body.extend_from_slice(&(main.len() as u32).to_le_bytes());
            }
            body.extend_from_slice(main);
            let mut rec = Vec::new();
            rec.extend_from_slice(&((RECORD_HEADER + body.len()) as u32).to_le_bytes());
            rec.extend_from_slice(&xid.to_le_bytes());
            rec.extend_from_slice(&self.prev.to_le_bytes());
            rec.extend_from_slice(&[info, rmid, 0, 0]);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&body), &rec);
            rec.extend_from_slice(&crc.to_le_bytes());
            rec.extend_from_slice(&body);
            self.pos = maxalign(self.pos);
            if (self.pos - self.start).is_multiple_of(PAGE) {
                // A record that begins a page begins after its header.
                self.page_header(0);
            }
            let at = self.pos;
            self.put(&rec);
            self.prev = at;
            at
        }
    }

    /// A real segment written by PostgreSQL 15 (1 MiB segments, 8 KiB pages, data checksums),
    /// from tests/fixtures/wal (its README says what each holds and how they were made).
    fn real(name: &str) -> (Vec<u8>, u64) {
        let packed: &[u8] = match name {
            "0A" => include_bytes!("../../tests/fixtures/wal/00000001000000000000000A.zst"),
            "0B" => include_bytes!("../../tests/fixtures/wal/00000001000000000000000B.zst"),
            "0C" => include_bytes!("../../tests/fixtures/wal/00000001000000000000000C.zst"),
            _ => unreachable!("no such fixture"),
        };
        let data = zstd::decode_all(packed).expect("fixture decompresses");
        assert_eq!(data.len(), REAL_SEG as usize);
        let seg = u64::from_str_radix(name, 16).unwrap();
        (data, seg * REAL_SEG)
    }

    const REAL_SEG: u64 = 1 << 20;

    fn lsn(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    fn utc(t: &str) -> Option<DateTime<Utc>> {
        Some(t.parse().unwrap())
    }

    #[test]
    fn a_record_that_ends_exactly_at_the_segment_end_is_scanned_without_panic() {
        // 0A ends with a logical message sized to end at 0/B00000, the segment's end: the walk
        // used to read past the data there and panic (wal-push then failed forever).
        let (data, start) = real("0A");
        let s = scan_segment(&data, start, PAGE);
        assert_eq!(s.end_lsn, lsn("0/B00000"), "{s:?}");
        assert_eq!((s.xacts, s.xids), (2, Some((725, 726))));
        assert_eq!(s.last_xact, utc("2026-12-05T10:46:03.317235Z"));
        assert_eq!((s.tail.as_ref(), s.incomplete.as_ref()), (None, None));
        // It begins with the end of a record from 09: kept as its head.
        assert!(s.head.is_some());
    }

    #[test]
    fn a_segment_after_one_that_ended_on_its_boundary_starts_with_a_record() {
        // 0B: no continuation at its start; a restore point; a message ending exactly at the
        // first page's end, then a commit after the next page's header; and a commit whose
        // header is split with 0C (it begins 16 bytes before the end).
        let (data, start) = real("0B");
        let s = scan_segment(&data, start, PAGE);
        assert_eq!(s.head, None);
        assert_eq!((s.xacts, s.xids), (3, Some((727, 729))), "{s:?}");
        assert_eq!(s.last_xact, utc("2026-12-05T10:46:03.651300Z"));
        assert_eq!(s.restore_points.len(), 1);
        assert_eq!(
            (
                s.restore_points[0].name.as_str(),
                s.restore_points[0].lsn.as_str()
            ),
            ("fixture_point", "0/B00058")
        );
        assert_eq!(s.end_lsn, lsn("0/BFFFF0"));
        assert_eq!(s.tail.as_ref().map(|(_, l)| l.as_str()), Some("0/BFFFF0"));
        assert_eq!(s.incomplete, None);
    }

    #[test]
    fn a_record_spanning_into_the_next_segment_is_joined_and_a_zero_tail_after_a_switch_is_complete(
    ) {
        let (b, b_start) = real("0B");
        let (c, c_start) = real("0C");
        let first = scan_segment(&b, b_start, PAGE);
        let second = scan_segment(&c, c_start, PAGE);
        // 0C: the rest of 730's commit, commits 731 and 732, a switch, then zeros.
        assert_eq!(
            (second.xacts, second.xids),
            (2, Some((731, 732))),
            "{second:?}"
        );
        assert_eq!(second.end_lsn, lsn("0/C3ACF8"));
        assert_eq!(
            second.incomplete, None,
            "padding after a switch is no damage"
        );
        let joined = join(&first, &second).expect("the split commit is read from both halves");
        assert_eq!((joined.xacts, joined.xids), (1, Some((730, 730))));
    }

    #[test]
    fn a_piece_that_ends_where_a_record_ends_on_a_page_end_is_scanned_without_panic() {
        // What pg receive scans: the segment's data up to where the server has flushed, here
        // exactly the end of the record that ends the first page.
        let (data, start) = real("0B");
        let s = scan(&data[..PAGE as usize], start, PAGE);
        assert_eq!((s.xacts, s.xids), (2, Some((727, 728))), "{s:?}");
        assert_eq!(s.end_lsn, lsn("0/B02000"));
        // Cut inside the next page's header, then just after it: the same.
        for cut in [PAGE as usize + 10, PAGE as usize + 24] {
            assert_eq!(scan(&data[..cut], start, PAGE), s, "cut at {cut}");
        }
    }

    #[test]
    fn a_transaction_is_found_by_its_commit_record_even_when_split_between_segments() {
        let (b, b_start) = real("0B");
        let (c, c_start) = real("0C");
        assert_eq!(find_end(&b, b_start, PAGE, 728), Some(0xB000C0));
        assert_eq!(find_end(&b, b_start, PAGE, 729), Some(0xB02018));
        assert_eq!(find_end(&c, c_start, PAGE, 732), Some(0xC3ACB0));
        // In 0B's xid range but not ended there.
        assert_eq!(find_end(&b, b_start, PAGE, 730), None);
        let (first, second) = (scan(&b, b_start, PAGE), scan(&c, c_start, PAGE));
        assert_eq!(find_end_split(&first, &second, 730), Some(0xBFFFF0));
        assert_eq!(find_end_split(&first, &second, 731), None);
    }

    #[test]
    fn a_truncated_segment_gives_what_was_before_the_cut() {
        let (data, start) = real("0B");
        // Cut inside the commit after the page-end record: it is not counted.
        let s = scan(&data[..PAGE as usize + 40], start, PAGE);
        assert_eq!(s.xacts, 2);
        assert!(s.tail.is_some(), "a commit cut short is kept as a tail");
        assert_eq!(scan(&data[..10], start, PAGE), Scan::default());
        assert_eq!(scan(&[], start, PAGE), Scan::default());
    }

    #[test]
    fn damage_inside_a_whole_segment_marks_its_scan_incomplete() {
        let (mut data, start) = real("0B");
        // Zeros from the third page on, where PostgreSQL's records go on.
        data[2 * PAGE as usize..].fill(0);
        let s = scan_segment(&data, start, PAGE);
        assert_eq!(s.xacts, 3, "what was read before the damage is kept");
        let why = s.incomplete.expect("marked incomplete");
        assert!(why.contains("0/B02048"), "{why}");
        // The same bytes as a streamed piece (zeros where the server has not written yet)
        // are no damage: a piece is not marked.
        assert_eq!(scan(&data, start, PAGE).incomplete, None);
    }

    /// Every cut and a spread of flips of the real segments: the scanner gives a result for
    /// any bytes (never a panic); a cut never yields more than the whole segment; and damage
    /// before the last page never loses a transaction silently: the scan is the same, or it
    /// is marked incomplete. Cuts: every 8-byte boundary of the first two pages and of the
    /// pages around each record end the fixtures were made for, every page boundary and the
    /// bytes around it, and 1,000 more spread over the segment; flips: 1,500 spread bits,
    /// and every bit of the first page's header.
    #[test]
    fn the_scanner_is_total_over_every_cut_and_flip_of_real_segments() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for name in ["0A", "0B", "0C"] {
            let (data, start) = real(name);
            let len = data.len() as u64;
            let whole = scan_segment(&data, start, PAGE);
            let mut cuts: Vec<u64> = (0..2 * PAGE).step_by(8).collect();
            cuts.extend((PAGE..3 * PAGE).step_by(8));
            cuts.extend((len - 2 * PAGE..len).step_by(8));
            for p in (0..=len).step_by(PAGE as usize) {
                cuts.extend((p.saturating_sub(48)..(p + 48).min(len + 1)).filter(|c| c % 4 == 0));
            }
            cuts.extend((0..1000).map(|_| next(len)));
            for cut in cuts {
                let s = scan(&data[..cut as usize], start, PAGE);
                assert!(s.xacts <= whole.xacts, "{name} cut at {cut}");
                let end = s.end_lsn.as_deref().and_then(super::super::wal::parse_lsn);
                assert!(
                    end.is_none_or(|e| e <= start + cut),
                    "{name} cut at {cut}: {s:?}"
                );
            }
            let mut flips: Vec<(usize, u8)> = (0..1500)
                .map(|_| (next(len) as usize, 1u8 << next(8)))
                .collect();
            flips
                .extend((0..LONG_HEADER as usize).flat_map(|i| (0..8).map(move |b| (i, 1u8 << b))));
            let mut bad = data.clone();
            for (at, bit) in flips {
                bad[at] ^= bit;
                let s = scan_segment(&bad, start, PAGE);
                if (at as u64) < len - PAGE {
                    assert!(
                        s.incomplete.is_some() || s.xacts == whole.xacts,
                        "{name}: a flip at {at} lost a transaction silently: {s:?}"
                    );
                }
                let _ = scan(&bad[..at], start, PAGE);
                bad[at] ^= bit;
            }
        }
    }

    #[test]
    fn a_commit_split_between_two_segments_is_read_from_both_halves() {
        let start = 0x200_0000;
        let seg = 2 * PAGE;
        // Two segments of two pages each, written as one stream.
        let mut w = Writer::segments(start, 2 * seg as usize, seg);
        w.record(0, 10, 0, &[4u8; 16000]);
        let filler_end = w.pos;
        // A commit that starts 16 bytes before the second segment: even its header is split.
        let pad = (start + seg - 16) - maxalign(filler_end) - RECORD_HEADER as u64 - 2;
        w.record(0, 10, 0, &vec![5u8; pad as usize]);
        let (t, time) = pg_time("2026-11-20T16:00:00Z");
        let commit = w.record(950, RM_XACT, XACT_COMMIT, &t);
        assert_eq!(
            commit,
            start + seg - 16,
            "the commit straddles the boundary"
        );
        w.record(951, RM_XACT, XACT_ABORT, &t);
        let (a, b) = w.seg.split_at(seg as usize);
        let first = scan(a, start, PAGE);
        let second = scan(b, start + seg, PAGE);
        // Neither half alone holds the commit; joined, it is read (and the abort after it).
        assert_eq!(first.xacts, 0, "{first:?}");
        assert_eq!(second.xids, Some((951, 951)), "{second:?}");
        let joined = join(&first, &second).expect("joined");
        assert_eq!(
            (joined.xacts, joined.xids, joined.last_xact),
            (1, Some((950, 950)), Some(time))
        );
        // A half that is not the other's: nothing.
        let mut other = second.clone();
        other.head = Some(hex::encode([0u8; 40]));
        assert_eq!(join(&first, &other), None);
    }

    #[test]
    fn a_record_that_ends_a_page_is_followed_by_one_after_the_next_page_header() {
        let start = 0x100_0000;
        let mut w = Writer::new(start, 2 * PAGE as usize);
        // 40 + 8152 = one page: header 24, block id 254 and length 4, main data 8123.
        w.record(0, 10, 0, &[3u8; 8123]);
        assert_eq!(w.pos, start + PAGE);
        let (t, _) = pg_time("2026-11-20T15:00:00Z");
        let first = w.record(900, RM_XACT, XACT_COMMIT, &t);
        assert_eq!(first, start + PAGE + SHORT_HEADER);
        w.record(901, RM_XACT, XACT_COMMIT, &t);
        let s = scan(&w.seg, start, PAGE);
        assert_eq!((s.xacts, s.xids), (2, Some((900, 901))), "{s:?}");
    }

    fn pg_time(t: &str) -> (Vec<u8>, DateTime<Utc>) {
        let t: DateTime<Utc> = t.parse().unwrap();
        let micros = t.timestamp_micros() - PG_EPOCH_MICROS;
        (micros.to_le_bytes().to_vec(), t)
    }

    #[test]
    fn commits_aborts_and_restore_points_are_found_across_pages_and_the_walk_stops_at_damage() {
        let start = 0x300_0000;
        let mut w = Writer::new(start, 4 * PAGE as usize);
        // Filler records (an unrelated resource manager) push a commit across a page.
        for _ in 0..7 {
            w.record(0, 10, 0, &[1u8; 1100]);
        }
        let (t1, time1) = pg_time("2026-11-20T14:50:00.25Z");
        let first = w.record(700, RM_XACT, XACT_COMMIT, &t1);
        let (t2, time2) = pg_time("2026-11-20T14:50:01Z");
        let mut rp = t2.clone();
        let mut name = b"before_migration".to_vec();
        name.resize(64, 0);
        rp.extend_from_slice(&name);
        let rp_lsn = w.record(0, RM_XLOG, XLOG_RESTORE_POINT, &rp);
        let (t3, _) = pg_time("2026-11-20T14:50:02Z");
        let abort = w.record(705, RM_XACT, XACT_ABORT, &t3);
        // A large record that spans a whole page, then a last commit.
        w.record(0, 10, 0, &[2u8; 9000]);
        let (t4, time4) = pg_time("2026-11-20T14:50:03Z");
        w.record(702, RM_XACT, XACT_COMMIT | 0x80, &t4);
        let end = w.pos;
        assert!((first - start) / PAGE < (end - start) / PAGE, "spans pages");

        let s = scan(&w.seg, start, PAGE);
        assert_eq!(s.xacts, 3);
        assert_eq!((s.first_xact, s.last_xact), (Some(time1), Some(time4)));
        assert_eq!(s.xids, Some((700, 705)));
        assert_eq!(
            s.restore_points,
            vec![RestorePoint {
                name: "before_migration".into(),
                time: time2,
                lsn: crate::postgres::wal::lsn_string(rp_lsn),
            }]
        );
        assert_eq!(s.end_lsn, Some(crate::postgres::wal::lsn_string(end)));

        // A flipped bit in the abort's time: its CRC fails and the walk ends before it.
        let mut bad = w.seg.clone();
        bad[(abort - start) as usize + RECORD_HEADER + 4] ^= 1;
        let s = scan(&bad, start, PAGE);
        assert_eq!((s.xacts, s.last_xact), (1, Some(time1)));
        assert_eq!(s.restore_points.len(), 1);
        assert_eq!(
            s.end_lsn,
            Some(crate::postgres::wal::lsn_string(rp_lsn + 98))
        );

        // A page left from an older use of the file (another page address) ends it too: the
        // last commit is on it.
        let mut stale = w.seg.clone();
        let last_page = ((end - 1 - start) / PAGE * PAGE) as usize;
        stale[last_page + 8..last_page + 16].copy_from_slice(&0u64.to_le_bytes());
        let s = scan(&stale, start, PAGE);
        assert_eq!(s.xacts, 2, "{s:?}");

        // A piece of the segment from its start reads as far as it goes.
        let s = scan(&w.seg[..PAGE as usize], start, PAGE);
        let within = |lsn: u64| u64::from(lsn + 34 <= start + PAGE);
        assert_eq!(s.xacts, within(first) + within(abort));

        // A segment that begins with the end of a record from the one before: skipped.
        let mut w = Writer::new(start, 2 * PAGE as usize);
        w.seg[2..4].copy_from_slice(&XLP_FIRST_IS_CONTRECORD.to_le_bytes());
        w.seg[16..20].copy_from_slice(&100u32.to_le_bytes());
        w.pos += 100;
        let (t, time) = pg_time("2026-11-20T15:00:00Z");
        w.record(800, RM_XACT, XACT_COMMIT, &t);
        let s = scan(&w.seg, start, PAGE);
        assert_eq!(
            (s.xacts, s.last_xact, s.xids),
            (1, Some(time), Some((800, 800)))
        );
    }
}
