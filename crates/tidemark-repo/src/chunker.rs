//! Content-defined chunking of a byte stream with FastCDC 2020 and a key-seeded gear table (§4).

use std::io::Read;

use bytes::{Bytes, BytesMut};
use fastcdc::v2020::{cut_gear, get_gear_with_seed, logarithm2, MASKS};

use crate::config::ChunkerParams;

/// Finds cut points: FastCDC 2020, normalisation level 1, key-seeded gear table (format §4).
pub struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    masks: [u64; 4],
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
}

impl Cutter {
    /// A cutter for `params` and the repository's gear seed.
    pub fn new(params: ChunkerParams, seed: u64) -> Self {
        let bits = logarithm2(params.avg);
        let (mask_s, mask_l) = (MASKS[(bits + 1) as usize], MASKS[(bits - 1) as usize]);
        let (gear, gear_ls) = get_gear_with_seed(seed);
        Cutter {
            min: params.min as usize,
            avg: params.avg as usize,
            max: params.max as usize,
            masks: [mask_s, mask_l, mask_s << 1, mask_l << 1],
            gear,
            gear_ls,
        }
    }

    /// Length of the chunk that starts `buf`. `buf` must hold a maximal chunk or end the stream.
    pub fn cut(&self, buf: &[u8]) -> usize {
        let [ms, ml, msl, mll] = self.masks;
        let (_, len) = cut_gear(
            buf,
            self.min,
            self.avg,
            self.max,
            ms,
            ml,
            msl,
            mll,
            &self.gear,
            &self.gear_ls,
        );
        len.max(1).min(buf.len())
    }

    /// Cut a whole in-memory stream; the same boundaries as `Chunker` gives.
    pub fn cut_all<'a>(&'a self, mut data: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        std::iter::from_fn(move || {
            if data.is_empty() {
                return None;
            }
            let (chunk, rest) = data.split_at(self.cut(data));
            data = rest;
            Some(chunk)
        })
    }
}

/// Cuts a `Read` into chunks without holding more than a few maximal chunks in memory.
pub struct Chunker<R> {
    reader: R,
    buf: BytesMut,
    eof: bool,
    max: usize,
    cutter: Cutter,
    /// Bytes read from the source so far.
    pub bytes_read: u64,
}

impl<R: Read> Chunker<R> {
    /// A chunker over `reader` with `params` and the repository's gear seed.
    pub fn new(reader: R, params: ChunkerParams, seed: u64) -> Self {
        Chunker {
            reader,
            buf: BytesMut::with_capacity(4 * params.max as usize),
            eof: false,
            max: params.max as usize,
            cutter: Cutter::new(params, seed),
            bytes_read: 0,
        }
    }

    /// Read until the buffer holds a maximal chunk or the source ends.
    fn fill(&mut self) -> std::io::Result<()> {
        let want = 4 * self.max;
        while !self.eof && self.buf.len() < self.max {
            let old = self.buf.len();
            if self.buf.capacity() < want {
                self.buf.reserve(want - old);
            }
            self.buf.resize(want.max(old + 1), 0);
            let n = loop {
                match self.reader.read(&mut self.buf[old..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.buf.truncate(old);
                        return Err(e);
                    }
                }
            };
            self.buf.truncate(old + n);
            self.bytes_read += n as u64;
            if n == 0 {
                self.eof = true;
            }
        }
        Ok(())
    }

    /// The next chunk, or `None` at the end of the stream.
    ///
    /// # Errors
    /// Errors of the underlying reader.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        self.fill()?;
        if self.buf.is_empty() {
            return Ok(None);
        }
        let len = self.cutter.cut(&self.buf);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    fn chunks(input: &[u8], seed: u64) -> Vec<Bytes> {
        let mut c = Chunker::new(input, ChunkerParams::default(), seed);
        let mut out = Vec::new();
        while let Some(ch) = c.next_chunk().unwrap() {
            out.push(ch);
        }
        out
    }

    #[test]
    fn chunks_concatenate_to_the_input_and_respect_the_bounds() {
        let input = data(5 << 20, 1);
        let cs = chunks(&input, 42);
        assert_eq!(cs.concat(), input);
        let p = ChunkerParams::default();
        for c in &cs[..cs.len() - 1] {
            assert!(
                c.len() >= p.min as usize && c.len() <= p.max as usize,
                "{}",
                c.len()
            );
        }
        let avg = input.len() / cs.len();
        assert!(avg > 128 << 10 && avg < 512 << 10, "average {avg}");
    }

    #[test]
    fn an_insertion_changes_only_nearby_chunks() {
        let a = data(4 << 20, 2);
        let mut b = a.clone();
        b.splice(2_000_000..2_000_000, b"inserted bytes".iter().copied());
        let (ca, cb) = (chunks(&a, 7), chunks(&b, 7));
        let shared = ca.iter().filter(|c| cb.contains(c)).count();
        assert!(
            shared + 3 >= ca.len(),
            "{shared} of {} chunks shared",
            ca.len()
        );
    }

    #[test]
    fn the_seed_moves_the_boundaries() {
        let input = data(2 << 20, 3);
        let (a, b) = (chunks(&input, 1), chunks(&input, 2));
        assert_ne!(
            a.iter().map(|c| c.len()).collect::<Vec<_>>(),
            b.iter().map(|c| c.len()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn cutting_in_memory_gives_the_same_chunks_as_streaming() {
        let input = data(3 << 20, 4);
        let cutter = Cutter::new(ChunkerParams::default(), 9);
        let a: Vec<&[u8]> = cutter.cut_all(&input).collect();
        let b = chunks(&input, 9);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| *x == &y[..]));
    }

    #[test]
    fn empty_input_has_no_chunks_and_small_input_has_one() {
        assert!(chunks(b"", 1).is_empty());
        assert_eq!(chunks(b"tiny", 1).len(), 1);
    }
}
