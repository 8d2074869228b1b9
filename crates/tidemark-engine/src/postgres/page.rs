//! Page checksums, checked while a local backup reads the data directory (pitr.md §9), as
//! `basebackup.c` checks them for BASE_BACKUP: the algorithm is PostgreSQL's
//! (`storage/checksum_impl.h`: 32 interleaved FNV-1a-like sums over the page read as 32-bit
//! words, the checksum field taken as zero, the block number mixed in), and so are the rules:
//! new pages and pages changed after the backup began are not checked (a concurrent write may
//! tear them; replay rewrites them from the full-page images the backup forces), and a page
//! that fails is read once more before it counts.

use std::sync::{Arc, Mutex};

/// PostgreSQL's page size (BLCKSZ).
pub(super) const PAGE: usize = 8192;
/// Pages per relation segment file (RELSEG_SIZE: 1 GiB of 8 KiB pages).
const SEGMENT_PAGES: u32 = 131_072;
const FNV_PRIME: u32 = 16_777_619;
const BASE: [u32; 32] = [
    0x5B1F_36E9,
    0xB852_5960,
    0x02AB_50AA,
    0x1DE6_6D2A,
    0x79FF_467A,
    0x9BB9_F8A3,
    0x217E_7CD2,
    0x83E1_3D2C,
    0xF8D4_474F,
    0xE39E_B970,
    0x42C6_AE16,
    0x9932_16FA,
    0x7B09_3B5D,
    0x98DA_FF3C,
    0xF718_902A,
    0x0B1C_9CDB,
    0xE58F_764B,
    0x1876_36BC,
    0x5D7B_3BB1,
    0xE73D_E7DE,
    0x92BE_C979,
    0xCCA6_C0B2,
    0x304A_0979,
    0x85AA_43D4,
    0x7831_25BB,
    0x6CA8_EAA2,
    0xE407_EAC6,
    0x4B5C_FC3E,
    0x9FBF_8C76,
    0x15CA_20BE,
    0xF2CA_9FD3,
    0x959B_D756,
];

#[inline(always)]
fn mix(sums: &mut [u32; 32], row: &[u8]) {
    for (j, s) in sums.iter_mut().enumerate() {
        let v = u32::from_ne_bytes(row[j * 4..j * 4 + 4].try_into().expect("4 bytes"));
        let t = *s ^ v;
        *s = t.wrapping_mul(FNV_PRIME) ^ (t >> 17);
    }
}

/// The checksum PostgreSQL stores in `pd_checksum` for `page` at block `blkno` of its relation.
pub(super) fn checksum(page: &[u8], blkno: u32) -> u16 {
    debug_assert_eq!(page.len(), PAGE);
    let mut sums = BASE;
    // The first row holds pd_checksum (bytes 8..10), which counts as zero.
    let mut first = [0u8; 128];
    first.copy_from_slice(&page[..128]);
    first[8..10].fill(0);
    mix(&mut sums, &first);
    for row in page[128..].chunks_exact(128) {
        mix(&mut sums, row);
    }
    let zeros = [0u8; 128];
    mix(&mut sums, &zeros);
    mix(&mut sums, &zeros);
    let folded = sums.iter().fold(0, |a, s| a ^ s) ^ blkno;
    (folded % 65_535 + 1) as u16
}

/// The number of the first block of a file whose pages carry checksums (`manifest` is its path
/// in the data directory), or None: relation files under `global/`, `base/` and `pg_tblspc/`,
/// not the few non-relation files there (`basebackup.c`'s `is_checksummed_file`).
pub(super) fn first_block(manifest: &str) -> Option<u32> {
    if !["global/", "base/", "pg_tblspc/"]
        .iter()
        .any(|d| manifest.starts_with(d))
    {
        return None;
    }
    let file = manifest.rsplit('/').next()?;
    if matches!(
        file,
        "pg_control" | "pg_filenode.map" | "PG_VERSION" | "pg_internal.init"
    ) || !file.bytes().next().is_some_and(|b| b.is_ascii_digit())
    {
        return None;
    }
    match file.split_once('.') {
        None => Some(0),
        Some((_, seg)) => seg.parse::<u32>().ok()?.checked_mul(SEGMENT_PAGES),
    }
}

/// A file whose pages failed their checksums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Failure {
    /// Its path in the data directory.
    pub(super) path: String,
    /// The failed blocks, numbered within the file.
    pub(super) blocks: Vec<u64>,
}

impl Failure {
    /// `base/5/16384: blocks 3, 7`, at most ten blocks named.
    pub(super) fn describe(&self) -> String {
        let mut named: Vec<String> = self.blocks.iter().take(10).map(u64::to_string).collect();
        if self.blocks.len() > 10 {
            named.push(format!("and {} more", self.blocks.len() - 10));
        }
        format!(
            "{}: block{} {}",
            self.path,
            if self.blocks.len() == 1 { "" } else { "s" },
            named.join(", ")
        )
    }
}

/// The checks of one backup: where it began, and the failures so far.
#[derive(Debug)]
pub(super) struct Checks {
    start_lsn: u64,
    failures: Mutex<Vec<Failure>>,
}

impl Checks {
    pub(super) fn new(start_lsn: u64) -> Arc<Checks> {
        Arc::new(Checks {
            start_lsn,
            failures: Mutex::new(Vec::new()),
        })
    }

    /// The check of one file, if its pages carry checksums.
    pub(super) fn file(self: &Arc<Self>, manifest: &str) -> Option<FileCheck> {
        Some(FileCheck {
            checks: self.clone(),
            path: manifest.to_owned(),
            first_block: first_block(manifest)?,
            next: 0,
            pending: Vec::new(),
            failed: Vec::new(),
        })
    }

    /// Every failure, in the order the files were finished.
    pub(super) fn failures(&self) -> Vec<Failure> {
        self.failures.lock().expect("not poisoned").clone()
    }
}

/// Checks one file's pages as its bytes pass by.
#[derive(Debug)]
pub(super) struct FileCheck {
    checks: Arc<Checks>,
    path: String,
    first_block: u32,
    /// The next page's number within the file.
    next: u64,
    /// The start of a page split between reads.
    pending: Vec<u8>,
    failed: Vec<u64>,
}

impl FileCheck {
    /// Check the whole pages in `data`, the next bytes of the file; `file` is read again for a
    /// page that fails.
    pub(super) fn feed(&mut self, mut data: &[u8], file: &std::fs::File) {
        if !self.pending.is_empty() {
            let take = (PAGE - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == PAGE {
                let page = std::mem::take(&mut self.pending);
                self.page(&page, file);
            }
        }
        let mut pages = data.chunks_exact(PAGE);
        for page in &mut pages {
            self.page(page, file);
        }
        self.pending.extend_from_slice(pages.remainder());
    }

    fn page(&mut self, page: &[u8], file: &std::fs::File) {
        let n = self.next;
        self.next += 1;
        if self.sound(page, n) {
            return;
        }
        // Read once more: a write may have torn the first read.
        let mut again = vec![0u8; PAGE];
        let reread = std::os::unix::fs::FileExt::read_exact_at(file, &mut again, n * PAGE as u64);
        if reread.is_ok() && self.sound(&again, n) {
            return;
        }
        self.failed.push(n);
    }

    fn sound(&self, page: &[u8], n: u64) -> bool {
        let word = |at: usize| u16::from_ne_bytes([page[at], page[at + 1]]);
        let half = |at: usize| u32::from_ne_bytes(page[at..at + 4].try_into().expect("4 bytes"));
        let lsn = (u64::from(half(0)) << 32) | u64::from(half(4));
        // pd_upper 0: a new page; a later LSN: changed during the backup.
        word(14) == 0
            || lsn >= self.checks.start_lsn
            || word(8) == checksum(page, self.first_block.wrapping_add(n as u32))
    }

    /// The file is read: record its failures. A partial last page is not checked (the file
    /// grew while it was read; replay extends it).
    pub(super) fn finish(self) {
        if !self.failed.is_empty() {
            self.checks
                .failures
                .lock()
                .expect("not poisoned")
                .push(Failure {
                    path: self.path,
                    blocks: self.failed,
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page with this LSN and pd_upper, the rest `fill`. (Pages PostgreSQL wrote are
    /// checked against the real server in the tests of tidemark-cli.)
    fn page_with(lsn: u64, upper: u16, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; PAGE];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_ne_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_ne_bytes());
        p[14..16].copy_from_slice(&upper.to_ne_bytes());
        p
    }

    #[test]
    fn relation_files_carry_checksums_and_segments_number_their_blocks() {
        assert_eq!(first_block("base/5/16384"), Some(0));
        assert_eq!(first_block("base/5/16384.2"), Some(2 * SEGMENT_PAGES));
        assert_eq!(first_block("base/5/16384_fsm"), Some(0));
        assert_eq!(
            first_block("pg_tblspc/16390/PG_15_1/5/16400.1"),
            Some(SEGMENT_PAGES)
        );
        assert_eq!(first_block("global/1262"), Some(0));
        for none in [
            "global/pg_control",
            "global/pg_filenode.map",
            "base/5/PG_VERSION",
            "base/5/pg_internal.init",
            "pg_xact/0000",
            "base/5/16384.x",
        ] {
            assert_eq!(first_block(none), None, "{none}");
        }
    }

    #[test]
    fn a_changed_byte_fails_the_check_and_new_or_later_pages_are_not_checked() {
        let checks = Checks::new(0x100_0000);
        let mut good = page_with(0x50_0000, 8000, 7);
        let sum = checksum(&good, 3);
        good[8..10].copy_from_slice(&sum.to_ne_bytes());
        // The stored checksum does not take part, and the block number does.
        let mut other = good.clone();
        other[8..10].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(checksum(&other, 3), sum);
        assert_ne!(checksum(&good, 4), sum);

        let mut bad = good.clone();
        bad[4000] ^= 1;
        let new = page_with(0x50_0000, 0, 9);
        let later = page_with(0x200_0000, 8000, 9);
        let mut file_bytes = Vec::new();
        for p in [&new, &later, &new, &good, &bad] {
            file_bytes.extend_from_slice(p);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("16384");
        std::fs::write(&path, &file_bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut check = checks.file("base/5/16384").unwrap();
        // Fed in pieces that split pages.
        for piece in file_bytes.chunks(5000) {
            check.feed(piece, &file);
        }
        check.finish();
        // Block 3 is good, block 4 holds block 3's bytes with a bit flipped (and would fail
        // at 4 anyway).
        let failures = checks.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].blocks, vec![4]);
        assert_eq!(failures[0].describe(), "base/5/16384: block 4");
    }
}
