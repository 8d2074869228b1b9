//! WAL files as PostgreSQL names them, the headers tidemark reads without a connection, and the
//! archive's log stream (pitr.md §4–7).

use std::fmt;
use std::path::Path;

/// A WAL segment's position: timeline, log and segment number (`TTTTTTTTLLLLLLLLSSSSSSSS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    /// Timeline.
    pub timeline: u32,
    /// High 32 bits of the LSN.
    pub log: u32,
    /// Segment number within the log.
    pub seg: u32,
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline, self.log, self.seg)
    }
}

fn hex8(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

impl SegmentName {
    /// Parse 24 hex digits.
    pub fn parse(s: &str) -> Option<SegmentName> {
        if s.len() != 24 {
            return None;
        }
        Some(SegmentName {
            timeline: hex8(&s[0..8])?,
            log: hex8(&s[8..16])?,
            seg: hex8(&s[16..24])?,
        })
    }

    /// The LSN where this segment starts, for a segment size in bytes.
    pub fn start_lsn(&self, seg_size: u64) -> u64 {
        let per_log = 0x1_0000_0000 / seg_size;
        (u64::from(self.log) * per_log + u64::from(self.seg)) * seg_size
    }

    /// The segment holding `lsn` on `timeline`.
    pub fn containing(timeline: u32, lsn: u64, seg_size: u64) -> SegmentName {
        let per_log = 0x1_0000_0000 / seg_size;
        let n = lsn / seg_size;
        SegmentName {
            timeline,
            log: (n / per_log) as u32,
            seg: (n % per_log) as u32,
        }
    }

    /// The next segment on the same timeline.
    pub fn next(&self, seg_size: u64) -> SegmentName {
        SegmentName::containing(self.timeline, self.start_lsn(seg_size) + seg_size, seg_size)
    }
}

/// The kinds of file PostgreSQL archives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFile {
    /// A whole segment.
    Segment(SegmentName),
    /// The last, partial segment of a timeline, archived at promotion (`….partial`).
    Partial(SegmentName),
    /// A timeline history file (`TTTTTTTT.history`).
    History(u32),
    /// A backup history file (`…SEGMENT.OFFSET.backup`).
    BackupLabel(SegmentName),
}

impl WalFile {
    /// Recognize a file name PostgreSQL hands to `archive_command` or `restore_command`.
    pub fn parse(name: &str) -> Option<WalFile> {
        if let Some(s) = SegmentName::parse(name) {
            return Some(WalFile::Segment(s));
        }
        if let Some(base) = name.strip_suffix(".partial") {
            return SegmentName::parse(base).map(WalFile::Partial);
        }
        if let Some(tli) = name.strip_suffix(".history") {
            return hex8(tli).map(WalFile::History);
        }
        if let Some(base) = name.strip_suffix(".backup") {
            let (seg, off) = base.split_once('.')?;
            hex8(off)?;
            return SegmentName::parse(seg).map(WalFile::BackupLabel);
        }
        None
    }

    /// Whether the file starts with a WAL page header (segments and partial segments).
    pub fn has_page_header(&self) -> bool {
        matches!(self, WalFile::Segment(_) | WalFile::Partial(_))
    }
}

/// The name of a streamed piece of a segment: the bytes from `offset` on (pitr.md §8).
pub fn piece_name(seg: SegmentName, offset: u64) -> String {
    format!("{seg}.s{offset:08X}")
}

/// The segment and offset of a piece name.
pub fn parse_piece(name: &str) -> Option<(SegmentName, u64)> {
    let (seg, off) = name.split_once(".s")?;
    Some((SegmentName::parse(seg)?, u64::from(hex8(off)?)))
}

/// What the first page of a segment says (its long page header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongHeader {
    /// The cluster's system identifier.
    pub system_id: u64,
    /// Timeline of the first page.
    pub timeline: u32,
    /// LSN of the first page.
    pub page_addr: u64,
    /// Segment size in bytes.
    pub seg_size: u32,
    /// WAL block size in bytes.
    pub block_size: u32,
}

const XLP_LONG_HEADER: u16 = 0x0002;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Read the long page header at the start of a segment.
///
/// # Errors
/// A message saying why this is not the start of a WAL segment.
pub fn long_header(data: &[u8]) -> Result<LongHeader, String> {
    if data.len() < 40 {
        return Err(format!(
            "only {} bytes, shorter than a WAL page header",
            data.len()
        ));
    }
    let magic = u16_at(data, 0);
    // PostgreSQL 9.4 (0xD07E) to 17 (0xD116) use magics in this range.
    if !(0xD000..=0xD1FF).contains(&magic) {
        return Err(format!("bad WAL page magic {magic:#06x}"));
    }
    if u16_at(data, 2) & XLP_LONG_HEADER == 0 {
        return Err("the first page has no long header".into());
    }
    let h = LongHeader {
        timeline: u32_at(data, 4),
        page_addr: u64_at(data, 8),
        system_id: u64_at(data, 24),
        seg_size: u32_at(data, 32),
        block_size: u32_at(data, 36),
    };
    if !h.seg_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&h.seg_size) {
        return Err(format!("implausible segment size {}", h.seg_size));
    }
    if !h.block_size.is_power_of_two() || !(1024..=65536).contains(&h.block_size) {
        return Err(format!("implausible WAL block size {}", h.block_size));
    }
    Ok(h)
}

/// The system identifier in `global/pg_control` of a data directory (its first field).
///
/// # Errors
/// A message naming the file.
pub fn control_system_id(data_dir: &Path) -> Result<u64, String> {
    let p = data_dir.join("global/pg_control");
    let b = std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    if b.len() < 8 {
        return Err(format!("{} is too short", p.display()));
    }
    Ok(u64_at(&b, 0))
}

/// The archive's log stream of a cluster.
pub fn stream(system_id: u64) -> String {
    format!("pg/{system_id}/wal")
}

/// Format an LSN as PostgreSQL does (`16/B374D848`).
pub fn lsn_string(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parse an LSN written as PostgreSQL does.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= 0xFFFF_FFFF && lo <= 0xFFFF_FFFF).then_some((hi << 32) | lo)
}

/// One line of a timeline history file: the parent timeline and where the child branched off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The parent timeline.
    pub parent: u32,
    /// The first LSN that is not on the parent.
    pub switch_lsn: u64,
    /// PostgreSQL's reason text.
    pub reason: String,
}

/// Parse a `.history` file (comments and blank lines skipped).
///
/// # Errors
/// A message naming the bad line.
pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, char::is_whitespace);
        let parent = parts.next().and_then(|p| p.parse().ok());
        let lsn = parts.next().and_then(|l| parse_lsn(l.trim()));
        match (parent, lsn) {
            (Some(parent), Some(switch_lsn)) => out.push(HistoryEntry {
                parent,
                switch_lsn,
                reason: parts.next().unwrap_or("").trim().to_owned(),
            }),
            _ => {
                return Err(format!(
                    "line {} of the history file is not valid: {line:?}",
                    n + 1
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_positions_follow_the_segment_size() {
        let s = SegmentName::parse("00000002000000010000003F").unwrap();
        assert_eq!((s.timeline, s.log, s.seg), (2, 1, 0x3F));
        assert_eq!(s.to_string(), "00000002000000010000003F");
        let mib16 = 16 << 20;
        assert_eq!(lsn_string(s.start_lsn(mib16)), "1/3F000000");
        assert_eq!(s.next(mib16).to_string(), "000000020000000100000040");
        let last = SegmentName::parse("0000000100000001000000FF").unwrap();
        assert_eq!(last.next(mib16).to_string(), "000000010000000200000000");
        assert_eq!(
            SegmentName::containing(1, parse_lsn("2/0000ABCD").unwrap(), mib16).to_string(),
            "000000010000000200000000"
        );
        assert_eq!(
            WalFile::parse("00000003.history"),
            Some(WalFile::History(3))
        );
        assert!(matches!(
            WalFile::parse("000000010000000000000005.partial"),
            Some(WalFile::Partial(_))
        ));
        assert!(matches!(
            WalFile::parse("000000010000000000000002.00000028.backup"),
            Some(WalFile::BackupLabel(_))
        ));
        let p = piece_name(s, 0x12_3400);
        assert_eq!(p, "00000002000000010000003F.s00123400");
        assert_eq!(parse_piece(&p), Some((s, 0x12_3400)));
        assert_eq!(
            WalFile::parse(&p),
            None,
            "pieces are never what PostgreSQL asks for"
        );
        assert_eq!(parse_piece("00000002000000010000003F.partial"), None);
        for bad in ["", "0000000100000000000000G5", "x.history", "../etc/passwd"] {
            assert_eq!(WalFile::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn history_files_parse_and_bad_lines_are_named() {
        let h = parse_history(
            "1\t0/3000160\tno recovery target specified\n\n2\t0/5000000\tat restore point \"x\"\n",
        )
        .unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[1].parent, lsn_string(h[1].switch_lsn)),
            (2, "0/5000000".into())
        );
        assert!(parse_history("1 zz").unwrap_err().contains("line 1"));
    }

    #[test]
    fn a_page_header_is_checked_before_it_is_trusted() {
        let mut page = vec![0u8; 8192];
        page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        page[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        page[4..8].copy_from_slice(&1u32.to_le_bytes());
        page[24..32].copy_from_slice(&7_300_000_000_000_000_000u64.to_le_bytes());
        page[32..36].copy_from_slice(&(16u32 << 20).to_le_bytes());
        page[36..40].copy_from_slice(&8192u32.to_le_bytes());
        let h = long_header(&page).unwrap();
        assert_eq!((h.system_id, h.timeline), (7_300_000_000_000_000_000, 1));
        page[1] = 0;
        assert!(long_header(&page).unwrap_err().contains("magic"));
        assert!(long_header(&page[..10]).is_err());
    }
}
