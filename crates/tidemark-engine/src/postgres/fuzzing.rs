//! Entry points for fuzzing what PostgreSQL and the archive hand us (see
//! `tidemark_repo::fuzzing`): WAL bytes, BASE_BACKUP's tar stream, and the backup manifest.
//! Each must return, never panic, whatever the bytes are.

use bytes::Bytes;

/// WAL: the scanner over a segment and from a page inside it, and the end-of-xid searches,
/// with 8 KiB pages. The first eight input bytes are the LSN the data starts at (little
/// endian), since page headers must name their own address.
pub fn wal_scan(data: &[u8]) {
    const PAGE: u64 = 8192;
    let (start, wal) = match data.split_first_chunk::<8>() {
        Some((s, rest)) => (u64::from_le_bytes(*s), rest),
        None => (0, data),
    };
    let whole = super::walscan::scan_segment(wal, start, PAGE);
    let part = super::walscan::scan(
        wal.get(PAGE as usize..).unwrap_or_default(),
        start.wrapping_add(PAGE),
        PAGE,
    );
    let _ = super::walscan::join(&whole, &part);
    let _ = super::walscan::find_end(wal, start, PAGE, start as u32);
    let _ = super::walscan::find_end_split(&whole, &part, 1);
}

/// The tar stream, fed in pieces whose sizes come from the input itself (the server's
/// CopyData messages split members anywhere).
pub fn tar(data: &[u8]) {
    let mut p = super::tar::Parser::default();
    let mut rest = Bytes::copy_from_slice(data);
    let mut step = 1 + data.first().copied().unwrap_or(0) as usize * 7;
    while !rest.is_empty() {
        let n = step.min(rest.len());
        if p.feed(rest.split_to(n)).is_err() {
            return;
        }
        step = step * 5 % 1021 + 1;
    }
    let _ = p.at_boundary();
}

/// The backup manifest PostgreSQL writes (JSON), as a restore reads it.
pub fn pg_manifest(data: &[u8]) {
    let _ = super::physical::parse_manifest(data);
}

/// A fuzz target: arbitrary bytes in, and it returns whatever they are.
pub type Target = fn(&[u8]);

/// Every target by name, for the harnesses.
pub const TARGETS: &[(&str, Target)] = &[
    ("wal_scan", wal_scan),
    ("tar", tar),
    ("pg_manifest", pg_manifest),
];
