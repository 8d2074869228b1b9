//! Writing large files around the page cache (`O_DIRECT`, Linux).
//!
//! Backups write packs and restores write data files once, then sync them; neither reads them
//! back soon. Through the page cache every byte is copied into freshly allocated pages first,
//! which measured here costs more CPU than decrypting and decompressing the same bytes
//! (docs/benchmarks.md). With `O_DIRECT` the kernel moves the bytes from our buffer to the
//! device. Direct I/O needs the buffer, the file offset and the length aligned, so whole
//! aligned blocks go direct and the last partial block goes through the page cache after
//! `O_DIRECT` is switched off. Where direct I/O is not supported (tmpfs, some network file
//! systems) the writer silently writes through the page cache: it is an optimization, never a
//! requirement. Durability is unchanged: callers still fsync (direct I/O alone does not flush
//! the device's cache or the file's metadata).

use std::fs::File;
use std::io::{self, Write};

use rustix::fs::OFlags;

/// Alignment for buffer address, offsets and lengths: covers 512-byte and 4 KiB sectors.
const ALIGN: usize = 4096;
/// Bytes gathered before a write.
const CAPACITY: usize = 1 << 20;

/// A buffered writer to a file that writes whole aligned blocks with `O_DIRECT`.
pub struct DirectWriter {
    file: File,
    /// Backing memory; the aligned window starts at `start`.
    mem: Vec<u8>,
    start: usize,
    len: usize,
    direct: bool,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter")
            .field("direct", &self.direct)
            .field("buffered", &self.len)
            .finish_non_exhaustive()
    }
}

fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(file)?;
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    rustix::fs::fcntl_setfl(file, flags)?;
    Ok(())
}

impl DirectWriter {
    /// Write to `file` (empty, at offset 0), with `O_DIRECT` where the file system allows it.
    pub fn new(file: File) -> DirectWriter {
        let direct = set_direct(&file, true).is_ok();
        let mem = vec![0u8; CAPACITY + ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN).min(ALIGN);
        DirectWriter {
            file,
            mem,
            start,
            len: 0,
            direct,
        }
    }

    /// Write the first `n` buffered bytes (a multiple of `ALIGN` in direct mode) and keep the
    /// rest at the front of the buffer.
    fn write_out(&mut self, n: usize) -> io::Result<()> {
        let window = self.start..self.start + n;
        match self.file.write_all(&self.mem[window.clone()]) {
            Ok(()) => {}
            // A device with larger sectors, or a file system that accepted the flag but not
            // the write: fall back to the page cache (a failed direct write wrote nothing).
            Err(e)
                if self.direct
                    && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
            {
                set_direct(&self.file, false)?;
                self.direct = false;
                self.file.write_all(&self.mem[window])?;
            }
            Err(e) => return Err(e),
        }
        self.mem
            .copy_within(self.start + n..self.start + self.len, self.start);
        self.len -= n;
        Ok(())
    }

    /// Write everything, the last partial block through the page cache, and return the file
    /// (not yet synced).
    ///
    /// # Errors
    /// Write errors.
    pub fn finish(mut self) -> io::Result<File> {
        self.flush()?;
        let file = self.file.try_clone()?;
        Ok(file)
    }
}

impl Write for DirectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len == CAPACITY {
            self.write_out(CAPACITY)?;
        }
        let n = buf.len().min(CAPACITY - self.len);
        let at = self.start + self.len;
        self.mem[at..at + n].copy_from_slice(&buf[..n]);
        self.len += n;
        Ok(n)
    }

    /// Writes everything buffered. After a flush that ended on a partial block the file is
    /// written through the page cache from then on (direct writes need aligned offsets).
    fn flush(&mut self) -> io::Result<()> {
        if self.direct {
            let aligned = self.len - self.len % ALIGN;
            if aligned > 0 {
                self.write_out(aligned)?;
            }
            if self.len == 0 {
                return Ok(());
            }
            set_direct(&self.file, false)?;
            self.direct = false;
        }
        if self.len > 0 {
            self.write_out(self.len)?;
        }
        Ok(())
    }
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        // As BufWriter: best effort; callers that care call `flush` or `finish`.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(sizes: &[usize], dir: &std::path::Path) {
        let path = dir.join(format!("f{}", sizes.len()));
        let mut expected = Vec::new();
        let mut w = DirectWriter::new(File::create(&path).unwrap());
        for (i, &n) in sizes.iter().enumerate() {
            let part: Vec<u8> = (0..n).map(|j| (i * 31 + j * 7) as u8).collect();
            w.write_all(&part).unwrap();
            expected.extend_from_slice(&part);
        }
        w.finish().unwrap().sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected, "{sizes:?}");
    }

    #[test]
    fn every_length_comes_back_exactly() {
        // /var/tmp is usually a disk file system (direct I/O), /tmp may be tmpfs (fallback).
        for base in ["/var/tmp", "/tmp"] {
            let Ok(dir) = tempfile::tempdir_in(base) else {
                continue;
            };
            roundtrip(&[], dir.path());
            roundtrip(&[1], dir.path());
            roundtrip(&[4096], dir.path());
            roundtrip(&[4095, 1, 4097], dir.path());
            roundtrip(&[CAPACITY + 3, 8192, CAPACITY * 2, 17], dir.path());
            roundtrip(&[65536; 40], dir.path());
        }
    }
}
