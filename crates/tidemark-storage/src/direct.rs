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
//!
//! A direct write returns only when the device has the bytes, so a writer that fills a buffer
//! and then waits for it leaves the device idle while it fills the next. `DirectWriter::
//! pipelined` hands full buffers to I/O threads that write them at their offsets, several at
//! once, while the caller fills the next: a restore's largest file is one stream written in
//! order, and this is what keeps the device busy under it.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use rustix::fs::OFlags;

/// Alignment for buffer address, offsets and lengths: covers 512-byte and 4 KiB sectors.
const ALIGN: usize = 4096;
/// Bytes gathered before a write.
const CAPACITY: usize = 1 << 20;

/// Memory aligned for direct I/O, holding up to `CAPACITY` bytes.
struct Block {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

/// Spare blocks, shared by every writer of the process: a restore writes a thousand files,
/// most smaller than one block, and a fresh zeroed megabyte for each cost more than writing
/// them. Bounded, so the pool never holds more than a few writers' worth.
static SPARE: Mutex<Vec<Block>> = Mutex::new(Vec::new());
const SPARE_MAX: usize = 8;

impl Block {
    fn new() -> Block {
        if let Some(b) = SPARE.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return b;
        }
        let mem = vec![0u8; CAPACITY + ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN).min(ALIGN);
        Block { mem, start, len: 0 }
    }

    /// Give a block's memory back to the pool.
    fn recycle(mut self) {
        if self.mem.is_empty() {
            return;
        }
        self.len = 0;
        let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_MAX {
            spare.push(self);
        }
    }

    /// A placeholder that holds no memory.
    fn new_empty() -> Block {
        Block {
            mem: Vec::new(),
            start: 0,
            len: 0,
        }
    }

    fn bytes(&self, n: usize) -> &[u8] {
        &self.mem[self.start..self.start + n]
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

/// Write `data` at `offset`; a direct write the device or file system refuses (a device with
/// larger sectors, or a file system that accepted the flag but not the write) is retried
/// through the page cache, and the file stays there (a failed direct write wrote nothing).
fn write_block(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    match file.write_all_at(data, offset) {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            if !rustix::fs::fcntl_getfl(file)?.contains(OFlags::DIRECT) {
                return Err(e);
            }
            set_direct(file, false)?;
            file.write_all_at(data, offset)
        }
        r => r,
    }
}

/// I/O threads writing full blocks at their offsets, and the blocks they give back.
struct Pipeline {
    jobs: Option<SyncSender<(Block, u64)>>,
    done: Receiver<io::Result<Block>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Blocks handed out and not yet given back.
    in_flight: usize,
    /// Blocks made beside the writer's first (at most one per thread).
    made: usize,
    /// The first failed write, reported by every later call.
    failed: Option<io::ErrorKind>,
}

impl Pipeline {
    fn new(file: &Arc<File>, threads: usize) -> Pipeline {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<(Block, u64)>(threads);
        let (done_tx, done) = std::sync::mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..threads)
            .map(|_| {
                let (rx, done_tx, file) = (rx.clone(), done_tx.clone(), file.clone());
                std::thread::spawn(move || loop {
                    let job = rx
                        .lock()
                        .map_err(|_| ())
                        .and_then(|r| r.recv().map_err(|_| ()));
                    let Ok((block, offset)) = job else { return };
                    let r = write_block(&file, block.bytes(block.len), offset).map(|()| block);
                    if done_tx.send(r).is_err() {
                        return;
                    }
                })
            })
            .collect();
        Pipeline {
            jobs: Some(jobs),
            done,
            threads,
            in_flight: 0,
            made: 0,
            failed: None,
        }
    }

    fn check(&self) -> io::Result<()> {
        match self.failed {
            Some(kind) => Err(io::Error::new(kind, "an earlier write of this file failed")),
            None => Ok(()),
        }
    }

    /// One finished write's block back (or its error).
    fn collect(&mut self) -> io::Result<Block> {
        let r = self
            .done
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the file's I/O thread stopped")));
        self.in_flight -= 1;
        if let Err(e) = &r {
            self.failed.get_or_insert(e.kind());
        }
        r
    }

    /// Send a full block to be written at `offset`; returns an empty block to fill next.
    fn submit(&mut self, block: Block, offset: u64) -> io::Result<Block> {
        self.check()?;
        let jobs = self.jobs.as_ref().expect("open until dropped");
        jobs.send((block, offset))
            .map_err(|_| io::Error::other("the file's I/O thread stopped"))?;
        self.in_flight += 1;
        if self.made < self.threads.len() {
            self.made += 1;
            return Ok(Block::new());
        }
        let mut b = self.collect()?;
        b.len = 0;
        Ok(b)
    }

    /// Wait for every write in flight.
    fn drain(&mut self) -> io::Result<()> {
        while self.in_flight > 0 {
            self.collect()?.recycle();
        }
        self.check()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        while let Ok(Ok(b)) = self.done.try_recv() {
            b.recycle();
        }
    }
}

/// A buffered writer to a file that writes whole aligned blocks with `O_DIRECT`.
pub struct DirectWriter {
    file: Arc<File>,
    block: Block,
    /// File offset of the block being filled.
    offset: u64,
    direct: bool,
    pipeline: Option<Pipeline>,
    /// Whether a full block was written yet (direct I/O is switched on then).
    started: bool,
    /// Writes in flight once the first block is full (the I/O threads start then, so a file
    /// smaller than a block never starts any).
    writes: usize,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter")
            .field("direct", &self.direct)
            .field("buffered", &self.block.len)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl DirectWriter {
    /// Write to `file` (empty, at offset 0), with `O_DIRECT` where the file system allows it;
    /// each block is written by the caller's thread. A file that never fills one block is
    /// written through the page cache: a direct write waits for the device, and a restore's
    /// hundreds of 8 KiB catalog files then took 0.3 ms each where a buffered write takes
    /// microseconds and the final sync writes them together.
    pub fn new(file: File) -> DirectWriter {
        DirectWriter {
            file: Arc::new(file),
            block: Block::new(),
            offset: 0,
            direct: false,
            started: false,
            pipeline: None,
            writes: 0,
        }
    }

    /// As `new`, with up to `writes` blocks written at once by as many I/O threads while the
    /// caller fills the next (`writes + 1` blocks of memory).
    pub fn pipelined(file: File, writes: usize) -> DirectWriter {
        let mut w = DirectWriter::new(file);
        w.writes = writes;
        w
    }

    /// As `pipelined`, writing from `offset` on: several writers fill one file in parts,
    /// each through its own descriptor. An offset not aligned for direct I/O writes through
    /// the page cache.
    pub fn pipelined_at(file: File, offset: u64, writes: usize) -> DirectWriter {
        let mut w = DirectWriter::pipelined(file, writes);
        w.offset = offset;
        if !offset.is_multiple_of(ALIGN as u64) {
            // Direct writes need aligned offsets: this part stays in the page cache.
            w.started = true;
        }
        w
    }

    /// Make the file's data durable (`fdatasync`), after writing everything buffered: a
    /// restore syncs its large files as each one ends, so the device works on them while
    /// the rest is still being decoded.
    ///
    /// # Errors
    /// Write and sync errors.
    pub fn sync_data(&mut self) -> io::Result<()> {
        self.flush()?;
        self.file.sync_data()
    }

    /// Write the full block: to an I/O thread when pipelined (taking back an empty one),
    /// else here.
    fn write_full(&mut self) -> io::Result<()> {
        if !self.started {
            self.started = true;
            self.direct =
                self.offset.is_multiple_of(ALIGN as u64) && set_direct(&self.file, true).is_ok();
        }
        if self.pipeline.is_none() && self.writes > 0 {
            self.pipeline = Some(Pipeline::new(&self.file, self.writes));
        }
        let Some(p) = &mut self.pipeline else {
            return self.write_out(CAPACITY);
        };
        let full = std::mem::replace(&mut self.block, Block::new_empty());
        self.block = p.submit(full, self.offset)?;
        self.offset += CAPACITY as u64;
        Ok(())
    }

    /// Write the first `n` bytes of the block here (a multiple of `ALIGN` in direct mode),
    /// after every write in flight, and keep the rest at the front of it.
    fn write_out(&mut self, n: usize) -> io::Result<()> {
        if let Some(p) = &mut self.pipeline {
            p.drain()?;
        }
        write_block(&self.file, self.block.bytes(n), self.offset)?;
        let b = &mut self.block;
        b.mem.copy_within(b.start + n..b.start + b.len, b.start);
        b.len -= n;
        self.offset += n as u64;
        Ok(())
    }

    /// Write everything, the last partial block through the page cache, and return the file
    /// (not yet synced).
    ///
    /// # Errors
    /// Write errors.
    pub fn finish(mut self) -> io::Result<File> {
        self.flush()?;
        self.pipeline = None;
        let file = self.file.try_clone()?;
        Ok(file)
    }
}

impl Write for DirectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.block.len == CAPACITY {
            self.write_full()?;
        }
        let b = &mut self.block;
        let n = buf.len().min(CAPACITY - b.len);
        let at = b.start + b.len;
        b.mem[at..at + n].copy_from_slice(&buf[..n]);
        b.len += n;
        Ok(n)
    }

    /// Writes everything buffered and waits for every write in flight. After a flush that
    /// ended on a partial block the file is written through the page cache from then on
    /// (direct writes need aligned offsets).
    fn flush(&mut self) -> io::Result<()> {
        if let Some(p) = &mut self.pipeline {
            p.drain()?;
        }
        if self.direct {
            let len = self.block.len;
            let aligned = len - len % ALIGN;
            if aligned > 0 {
                self.write_out(aligned)?;
            }
            if self.block.len == 0 {
                return Ok(());
            }
            set_direct(&self.file, false)?;
            self.direct = false;
        }
        if self.block.len > 0 {
            self.write_out(self.block.len)?;
        }
        Ok(())
    }
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        // As BufWriter: best effort; callers that care call `flush` or `finish`.
        let _ = self.flush();
        self.pipeline = None;
        std::mem::replace(&mut self.block, Block::new_empty()).recycle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(sizes: &[usize], dir: &std::path::Path) {
        for writes in [0, 1, 3] {
            roundtrip_with(sizes, dir, writes);
        }
    }

    fn roundtrip_with(sizes: &[usize], dir: &std::path::Path, writes: usize) {
        let path = dir.join(format!("f{}-{writes}", sizes.len()));
        let mut expected = Vec::new();
        let mut w = DirectWriter::pipelined(File::create(&path).unwrap(), writes);
        for (i, &n) in sizes.iter().enumerate() {
            let part: Vec<u8> = (0..n).map(|j| (i * 31 + j * 7) as u8).collect();
            w.write_all(&part).unwrap();
            expected.extend_from_slice(&part);
        }
        w.finish().unwrap().sync_all().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            expected,
            "{sizes:?} {writes}"
        );
    }

    #[test]
    fn a_flush_between_blocks_keeps_the_order() {
        // Partial flushes switch to the page cache while earlier blocks may be in flight.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        let mut w = DirectWriter::pipelined(File::create(&path).unwrap(), 2);
        let mut expected = Vec::new();
        for i in 0..7u8 {
            let part = vec![i; CAPACITY * 2 + 100 * usize::from(i)];
            w.write_all(&part).unwrap();
            expected.extend_from_slice(&part);
            if i % 3 == 1 {
                w.flush().unwrap();
            }
        }
        drop(w.finish().unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn a_failed_write_is_reported_not_dropped() {
        // /dev/full refuses every write: the pipelined writer must say so by the flush.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let mut w = DirectWriter::pipelined(f, 2);
        let r = (0..8)
            .try_for_each(|_| w.write_all(&vec![1u8; CAPACITY]))
            .and_then(|()| w.flush());
        assert!(r.is_err(), "writes to a full device succeeded");
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
