//! A push parser for the ustar archives BASE_BACKUP sends: fed arbitrary pieces of the stream,
//! it yields member headers and data without buffering more than one header.

use bytes::Bytes;

/// What a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (the typeflag), which PostgreSQL does not send.
    Other(u8),
}

/// A member header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Path inside the archive (no trailing `/` for directories).
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Bytes of content.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// A symlink's target.
    pub link: String,
}

/// One thing the parser found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member starts; its data follows as `Data` events totalling `size` bytes.
    Member(Header),
    /// Content of the current member.
    Data(Bytes),
    /// The end-of-archive marker (a zero block).
    End,
}

#[derive(Debug)]
enum State {
    Header,
    /// Content bytes left, then padding bytes.
    Data(u64, u64),
    Pad(u64),
    Done,
}

/// The parser.
#[derive(Debug)]
pub struct Parser {
    state: State,
    header: Vec<u8>,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            state: State::Header,
            header: Vec::with_capacity(512),
        }
    }
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn octal(b: &[u8]) -> Result<u64, String> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        // base-256 (GNU) for values that do not fit in octal
        let mut v: u64 = u64::from(b[0] & 0x7F);
        for &c in &b[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(c)))
                .ok_or("a base-256 number overflows")?;
        }
        return Ok(v);
    }
    let s = cstr(b);
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| format!("{s:?} is not an octal number"))
}

fn parse_header(h: &[u8]) -> Result<Option<Header>, String> {
    if h.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let stored = octal(&h[148..156])?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    if sum != stored {
        return Err(format!(
            "tar header checksum mismatch ({sum} computed, {stored} stored)"
        ));
    }
    let mut name = cstr(&h[0..100]);
    if &h[257..262] == b"ustar" {
        let prefix = cstr(&h[345..500]);
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
    }
    let kind = match h[156] {
        b'0' | 0 => Kind::File,
        b'5' => Kind::Dir,
        b'2' => Kind::Symlink,
        other => Kind::Other(other),
    };
    // PostgreSQL writes some members as `./pg_wal/…`.
    while let Some(rest) = name.strip_prefix("./") {
        name = rest.to_owned();
    }
    if name.is_empty() || name.starts_with('/') || name.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!(
            "tar member name {name:?} is not a safe relative path"
        ));
    }
    Ok(Some(Header {
        name: name.trim_end_matches('/').to_owned(),
        kind,
        size: if kind == Kind::File {
            octal(&h[124..136])?
        } else {
            0
        },
        mode: octal(&h[100..108])? as u32 & 0o7777,
        mtime: octal(&h[136..148])? as i64,
        link: cstr(&h[157..257]),
    }))
}

impl Parser {
    /// Feed the next piece of the archive; events in order.
    ///
    /// # Errors
    /// A message for a damaged header or data after the end marker.
    pub fn feed(&mut self, mut input: Bytes) -> Result<Vec<Event>, String> {
        let mut out = Vec::new();
        while !input.is_empty() {
            match self.state {
                State::Header => {
                    let take = (512 - self.header.len()).min(input.len());
                    self.header.extend_from_slice(&input[..take]);
                    input = input.slice(take..);
                    if self.header.len() < 512 {
                        continue;
                    }
                    let parsed = parse_header(&self.header)?;
                    self.header.clear();
                    match parsed {
                        None => {
                            self.state = State::Done;
                            out.push(Event::End);
                        }
                        Some(h) => {
                            let size = h.size;
                            out.push(Event::Member(h));
                            let pad = (512 - size % 512) % 512;
                            self.state = if size > 0 {
                                State::Data(size, pad)
                            } else {
                                State::Header
                            };
                        }
                    }
                }
                State::Data(left, pad) => {
                    let take = left.min(input.len() as u64) as usize;
                    out.push(Event::Data(input.slice(..take)));
                    input = input.slice(take..);
                    let left = left - take as u64;
                    self.state = match (left, pad) {
                        (0, 0) => State::Header,
                        (0, pad) => State::Pad(pad),
                        (left, pad) => State::Data(left, pad),
                    };
                }
                State::Pad(left) => {
                    let take = left.min(input.len() as u64) as usize;
                    input = input.slice(take..);
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::Header
                    } else {
                        State::Pad(left)
                    };
                }
                State::Done => {
                    // Zero blocks after the end marker are allowed; anything else is not.
                    if input.iter().any(|&b| b != 0) {
                        return Err("data after the end of the tar archive".into());
                    }
                    input.clear();
                }
            }
        }
        Ok(out)
    }

    /// Whether the archive ended cleanly: at a member boundary (PostgreSQL may omit the
    /// end-of-archive blocks).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header | State::Done) && self.header.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, kind: u8, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000600");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"14500000000");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    #[test]
    fn members_come_out_whole_whatever_the_piece_sizes() {
        let mut tar = header("base", b'5', 0);
        tar.extend(header("base/1/1259", b'0', 700));
        tar.extend((0..700u32).map(|i| i as u8));
        tar.extend(vec![0u8; 512 - 700 % 512]);
        tar.extend(header("PG_VERSION", b'0', 3));
        tar.extend(b"15\n");
        tar.extend(vec![0u8; 509]);
        tar.extend(vec![0u8; 1024]);
        for piece in [1usize, 7, 512, 513, 4096] {
            let mut p = Parser::default();
            let mut events = Vec::new();
            for c in tar.chunks(piece) {
                events.extend(p.feed(Bytes::copy_from_slice(c)).unwrap());
            }
            let mut files: Vec<(String, Vec<u8>)> = Vec::new();
            for e in events {
                match e {
                    Event::Member(h) => files.push((h.name, Vec::new())),
                    Event::Data(d) => files.last_mut().unwrap().1.extend_from_slice(&d),
                    Event::End => {}
                }
            }
            assert_eq!(files.len(), 3, "piece {piece}");
            assert_eq!(files[1].1, (0..700u32).map(|i| i as u8).collect::<Vec<_>>());
            assert_eq!(files[2], ("PG_VERSION".into(), b"15\n".to_vec()));
            assert!(p.at_boundary());
        }
    }

    #[test]
    fn a_damaged_header_or_an_unsafe_name_is_refused() {
        let mut h = header("base/1/1259", b'0', 0);
        h[0] ^= 1;
        assert!(Parser::default()
            .feed(Bytes::from(h))
            .unwrap_err()
            .contains("checksum"));
        let h = header("../etc/passwd", b'0', 0);
        assert!(Parser::default()
            .feed(Bytes::from(h))
            .unwrap_err()
            .contains("safe"));
    }
}
