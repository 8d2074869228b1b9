//! Log segments (WAL, binlog, oplog slices): whole objects named by stream and position, made of
//! independently sealed zstd frames so that any range can be read in parallel (format §7).

use std::ops::Range;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tidemark_storage::{ErrorKind, PutMode};

use crate::error::{Error, Result};
use crate::repository::Repository;

const MAGIC: &[u8; 4] = b"TMLS";
/// Raw bytes per frame (1 MiB): a 16 MiB WAL segment is 16 frames.
pub const FRAME_SIZE: usize = 1 << 20;
/// Frames read at once.
const READ_CONCURRENCY: usize = 4;

/// The footer of a segment: its size, checksum, frame table and the engine's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentInfo {
    /// Bytes of content.
    pub raw_size: u64,
    /// Raw bytes per frame.
    pub frame_size: u64,
    /// BLAKE3 of the content, hex.
    pub blake3: String,
    /// `[offset, stored_length, raw_length]` per frame.
    pub frames: Vec<[u64; 3]>,
    /// Engine-defined: start and end positions and times.
    #[serde(default)]
    pub meta: serde_json::Value,
}

/// What `write_segment` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The segment was stored.
    Stored,
    /// An identical segment was already there (an archiver retried after a crash).
    AlreadyPresent,
}

fn valid_stream(s: &str) -> bool {
    !s.is_empty()
        && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn path(stream: &str, name: &str) -> Result<String> {
    if !valid_stream(stream) || !valid_name(name) {
        return Err(Error::Invalid(format!(
            "log segment {stream:?}/{name:?} has an invalid name: use letters, digits, '.', '_', '-' (and '/' in the stream)"
        )));
    }
    Ok(format!("logs/{stream}/{name}"))
}

fn frame_aad(stream: &str, name: &str, n: u32) -> Vec<u8> {
    let mut a = format!("tidemark/log-frame/v1/{stream}/{name}/").into_bytes();
    a.extend_from_slice(&n.to_le_bytes());
    a
}

fn footer_aad(stream: &str, name: &str) -> Vec<u8> {
    format!("tidemark/log-footer/v1/{stream}/{name}").into_bytes()
}

/// Store one log segment. Idempotent for identical content; an error for different content.
///
/// # Errors
/// `Invalid` for bad names, `Corrupt` when a different segment of that name exists, storage errors.
pub async fn write_segment(
    repo: &Repository,
    stream: &str,
    name: &str,
    data: Bytes,
    meta: serde_json::Value,
) -> Result<Written> {
    let path = path(stream, name)?;
    let keys = repo.keys().clone();
    let level = repo.config().compression.level;
    let (s, n) = (stream.to_owned(), name.to_owned());
    let (object, checksum) = tokio::task::spawn_blocking(move || {
        let frames: Vec<&[u8]> = data.chunks(FRAME_SIZE).collect();
        // Compress and seal frames on all cores.
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .min(frames.len().max(1));
        let mut sealed: Vec<Vec<u8>> = vec![Vec::new(); frames.len()];
        std::thread::scope(|scope| {
            for (t, out) in sealed
                .chunks_mut(frames.len().div_ceil(threads).max(1))
                .enumerate()
            {
                let (keys, frames, s, n) = (&keys, &frames, &s, &n);
                scope.spawn(move || {
                    let per = frames.len().div_ceil(threads).max(1);
                    for (i, slot) in out.iter_mut().enumerate() {
                        let idx = t * per + i;
                        let z = zstd::bulk::compress(frames[idx], level)
                            .expect("zstd compresses in memory");
                        *slot = keys.seal(&frame_aad(s, n, idx as u32), &z);
                    }
                });
            }
        });
        let mut object = Vec::with_capacity(data.len() / 2 + 1024);
        object.extend_from_slice(MAGIC);
        object.push(1);
        let mut table = Vec::new();
        for (f, raw) in sealed.iter().zip(&frames) {
            table.push([object.len() as u64, f.len() as u64, raw.len() as u64]);
            object.extend_from_slice(f);
        }
        let checksum = blake3::hash(&data).to_hex().to_string();
        let info = SegmentInfo {
            raw_size: data.len() as u64,
            frame_size: FRAME_SIZE as u64,
            blake3: checksum.clone(),
            frames: table,
            meta,
        };
        let footer = keys.seal(
            &footer_aad(&s, &n),
            &serde_json::to_vec(&info).expect("footer serializes"),
        );
        object.extend_from_slice(&footer);
        object.extend_from_slice(&(footer.len() as u32).to_le_bytes());
        (Bytes::from(object), checksum)
    })
    .await
    .map_err(|e| Error::Invalid(format!("log segment task failed: {e}")))?;
    match repo.storage().put(&path, object, PutMode::CreateNew).await {
        Ok(()) => Ok(Written::Stored),
        Err(e) if e.kind == ErrorKind::AlreadyExists => {
            let existing = segment_info_here(repo, stream, name).await?;
            if existing.blake3 == checksum {
                Ok(Written::AlreadyPresent)
            } else {
                Err(Error::corrupt(
                    path,
                    "a different segment with this name is already archived",
                ))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// `read` at the repository's own location; when that fails and the repository has fallback
/// locations (format §9a), at each of them in turn, the first success standing, with a warning
/// naming both. The first location's error stands when none succeeds.
async fn here_or_elsewhere<T, F, Fut>(repo: &Repository, what: String, read: F) -> Result<T>
where
    F: Fn(Repository) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let e = match read(repo.clone()).await {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    for other in repo.fallback_repositories() {
        if let Ok(v) = read(other.clone()).await {
            let state = match &e {
                Error::Storage(s) if s.kind == tidemark_storage::ErrorKind::NotFound => {
                    "missing".to_owned()
                }
                e => format!("unreadable ({e})"),
            };
            tracing::warn!(
                "{what} was {state} at {} and was read, verified, from {}",
                repo.location(),
                other.location()
            );
            return Ok(v);
        }
    }
    Err(e)
}

/// Read a segment's footer (from a fallback location when it is missing or damaged here).
///
/// # Errors
/// `Corrupt` when the trailer or footer fails verification; storage errors (NotFound if absent).
pub async fn segment_info(repo: &Repository, stream: &str, name: &str) -> Result<SegmentInfo> {
    here_or_elsewhere(repo, path(stream, name)?, |r| async move {
        segment_info_here(&r, stream, name).await
    })
    .await
}

/// A segment's footer at the repository's own location.
async fn segment_info_here(repo: &Repository, stream: &str, name: &str) -> Result<SegmentInfo> {
    let path = path(stream, name)?;
    let size = repo.storage().head(&path).await?.size;
    let (end, footer) = repo.sealed_tail(&path, size, 5, "log segment").await?;
    let plain = repo
        .keys()
        .open(&footer_aad(stream, name), &footer)
        .map_err(|_| Error::corrupt(&path, "footer authentication failed"))?;
    footer_info(&plain, end, &path)
}

/// Decode an opened footer of a segment whose frames end at byte `end`, and check that its
/// frame table fits (with no arithmetic a hostile table can overflow).
///
/// # Errors
/// `Corrupt` naming `path`.
pub(crate) fn footer_info(plain: &[u8], end: u64, path: &str) -> Result<SegmentInfo> {
    let info: SegmentInfo =
        serde_json::from_slice(plain).map_err(|e| Error::corrupt(path, format!("footer: {e}")))?;
    let fits = info
        .frames
        .iter()
        .all(|[off, len, _]| off.checked_add(*len).is_some_and(|e| e <= end));
    let raw = info
        .frames
        .iter()
        .try_fold(0u64, |sum, f| sum.checked_add(f[2]));
    if !fits || raw != Some(info.raw_size) {
        return Err(Error::corrupt(path, "frame table does not fit the segment"));
    }
    Ok(info)
}

/// Read the raw bytes in `range` of a segment, fetching only the frames that overlap it.
///
/// # Errors
/// `Invalid` for a range beyond the segment, `Corrupt` for a damaged frame, storage errors.
pub async fn read_segment_range(
    repo: &Repository,
    stream: &str,
    name: &str,
    range: Range<u64>,
) -> Result<Bytes> {
    here_or_elsewhere(repo, path(stream, name)?, |r| {
        let range = range.clone();
        async move {
            let info = segment_info_here(&r, stream, name).await?;
            read_frames(&r, stream, name, &info, range).await
        }
    })
    .await
}

/// Read a whole segment and verify it against its checksum (from a fallback location when it
/// is missing or damaged here).
///
/// # Errors
/// As for `read_segment_range`, and `Corrupt` when the checksum differs.
pub async fn read_segment(repo: &Repository, stream: &str, name: &str) -> Result<Bytes> {
    Ok(read_segment_whole(repo, stream, name).await?.1)
}

/// `read_segment`, with the segment's footer (its metadata).
///
/// # Errors
/// As for `read_segment`.
pub async fn read_segment_whole(
    repo: &Repository,
    stream: &str,
    name: &str,
) -> Result<(SegmentInfo, Bytes)> {
    here_or_elsewhere(repo, path(stream, name)?, |r| async move {
        let info = segment_info_here(&r, stream, name).await?;
        let data = read_frames(&r, stream, name, &info, 0..info.raw_size).await?;
        if blake3::hash(&data).to_hex().as_str() != info.blake3 {
            return Err(Error::corrupt(
                path(stream, name)?,
                "content does not match its checksum",
            ));
        }
        Ok((info, data))
    })
    .await
}

async fn read_frames(
    repo: &Repository,
    stream: &str,
    name: &str,
    info: &SegmentInfo,
    range: Range<u64>,
) -> Result<Bytes> {
    let path = path(stream, name)?;
    if range.start > range.end || range.end > info.raw_size {
        return Err(Error::Invalid(format!(
            "range {range:?} is outside log segment {path} of {} bytes",
            info.raw_size
        )));
    }
    let mut raw_start = 0u64;
    let mut wanted = Vec::new();
    for (i, [off, len, raw]) in info.frames.iter().copied().enumerate() {
        let raw_end = raw_start + raw;
        if raw_end > range.start && raw_start < range.end {
            wanted.push((i as u32, off, len, raw, raw_start));
        }
        raw_start = raw_end;
    }
    let parts: Vec<(u64, Bytes)> = futures::stream::iter(wanted)
        .map(|(i, off, len, raw, raw_start)| {
            let (repo, path) = (repo.clone(), path.clone());
            let aad = frame_aad(stream, name, i);
            async move {
                let sealed = repo.storage().get_range(&path, off..off + len).await?;
                let keys = repo.keys().clone();
                let frame = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
                    let z = keys.open(&aad, &sealed).map_err(|_| {
                        Error::corrupt(&path, format!("frame {i} failed authentication"))
                    })?;
                    let d = zstd::bulk::decompress(&z, raw as usize).map_err(|_| {
                        Error::corrupt(&path, format!("frame {i} is not valid zstd"))
                    })?;
                    if d.len() as u64 != raw {
                        return Err(Error::corrupt(
                            &path,
                            format!("frame {i} has the wrong length"),
                        ));
                    }
                    Ok(d)
                })
                .await
                .map_err(|e| Error::Invalid(format!("log frame task failed: {e}")))??;
                Ok::<_, Error>((raw_start, Bytes::from(frame)))
            }
        })
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await?;
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    for (start, frame) in parts {
        let from = range.start.saturating_sub(start) as usize;
        let to = ((range.end - start) as usize).min(frame.len());
        out.extend_from_slice(&frame[from..to]);
    }
    Ok(Bytes::from(out))
}

/// Names of the segments of `stream`, in position order (byte order of names).
///
/// # Errors
/// `Invalid` for a bad stream name, storage errors.
pub async fn list_segments(repo: &Repository, stream: &str) -> Result<Vec<String>> {
    list_segments_starting(repo, stream, "").await
}

/// Names of the segments of `stream` that begin with `start`, in byte order.
///
/// # Errors
/// `Invalid` for a bad stream name or prefix, storage errors.
pub async fn list_segments_starting(
    repo: &Repository,
    stream: &str,
    start: &str,
) -> Result<Vec<String>> {
    if !valid_stream(stream) || (!start.is_empty() && !valid_name(start)) {
        return Err(Error::Invalid(format!(
            "log stream {stream:?} (names from {start:?}) has an invalid name"
        )));
    }
    let dir = format!("logs/{stream}/");
    let prefix = format!("{dir}{start}");
    let mut names: Vec<String> = repo
        .storage()
        .list(&prefix)
        .await?
        .into_iter()
        .filter_map(|m| {
            m.path
                .strip_prefix(&dir)
                .filter(|n| !n.contains('/') && n.starts_with(start))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Delete one segment (for superseded pieces of a streamed segment). Absent is success.
///
/// # Errors
/// `Invalid` for bad names, storage errors.
pub async fn delete_segment(repo: &Repository, stream: &str, name: &str) -> Result<()> {
    let path = path(stream, name)?;
    repo.storage().delete(&path).await?;
    Ok(())
}
