//! Opening a log directory: find the segments, check every frame, rebuild
//! the index, cut a torn tail.
//!
//! The rule that tells a torn write from damage: writes go out in
//! group-commit batches, and batch `n + 1` is written only after batch `n`
//! is durable. A crash can therefore tear only the final batch. When the
//! scan meets a bad or missing frame, recovery looks past it for any valid
//! frame of a *later* batch than the one that could have been torn; if one
//! exists the damage sits in durable data and opening fails with
//! [`EmbeddedError::Corrupt`] naming the file and offset. Otherwise the bad
//! bytes are the torn tail: they are zeroed and synced, and the log goes on
//! from the last good frame. Damage inside the final batch itself cannot be
//! told from a torn write and is cut the same way (with a warning).

use std::path::Path;

use bytes::Bytes;
use smartmsg_engine::index::LogIndex;
use smartmsg_engine::{AppendResult, StreamId};

use crate::clean::{self, CleanMark, CLEAN_FILE, CLEAN_TMP};
use crate::error::{EmbeddedError, Result};
use crate::frame::{self, BodyReader, FrameError, StreamCache, HEADER_LEN};
use crate::lock::LOCK_FILE;
use crate::segment::{self, Segment, SEGMENT_HEADER, TMP_SUFFIX};

/// Where a frame lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLoc {
    /// Position of its first event.
    pub first_position: u64,
    /// Index of its segment in the log's segment list.
    pub segment: u32,
    /// Byte offset of its header in the segment.
    pub offset: u64,
    /// Header + body length.
    pub len: u32,
    /// Number of events.
    pub count: u32,
}

impl FrameLoc {
    /// One past its last position.
    pub fn end_position(&self) -> u64 {
        self.first_position + u64::from(self.count)
    }
}

/// What recovery hands to the log.
pub struct Recovered {
    /// Segments in position order; the last is written to.
    pub segments: Vec<Segment>,
    /// Every frame, in position order.
    pub frames: Vec<FrameLoc>,
    /// The rebuilt index.
    pub index: LogIndex,
    /// Where the next frame goes in the last segment.
    pub write_offset: u64,
    /// The next group-commit batch number.
    pub next_batch: u64,
    /// Bytes of torn tail that were cut.
    pub torn_bytes: u64,
    /// Whether a clean-shutdown mark spared reading the end of the last
    /// segment.
    pub clean: bool,
}

/// Largest frame body a segment of `capacity` bytes can hold.
pub fn max_body(capacity: u64) -> usize {
    (capacity - SEGMENT_HEADER) as usize - HEADER_LEN
}

/// Opens (or initialises) the log in `dir`. The caller holds the lock.
///
/// After a clean shutdown (see [`crate::clean`]) the last segment is read
/// only up to the end its mark names; if the frames do not end exactly
/// there, the whole log is checked as after a crash.
pub fn recover(dir: &Path, segment_bytes: u64) -> Result<Recovered> {
    if let Some(mark) = clean::read(dir) {
        if let Some(rec) = recover_with(dir, segment_bytes, Some(mark))? {
            return Ok(rec);
        }
        tracing::info!(dir = %dir.display(), "the clean-shutdown mark does not match the log; checking all of it");
    }
    recover_with(dir, segment_bytes, None)?.ok_or_else(|| EmbeddedError::Corrupt {
        file: dir.to_owned(),
        offset: 0,
        reason: "recovery without a clean-shutdown mark gave no result".into(),
    })
}

/// [`recover`] trusting `mark` (if any) for the last segment. `Ok(None)`:
/// the mark does not match; nothing was changed on disk.
fn recover_with(
    dir: &Path,
    segment_bytes: u64,
    mark: Option<CleanMark>,
) -> Result<Option<Recovered>> {
    let mut names = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| EmbeddedError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| EmbeddedError::io("list", dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == LOCK_FILE || name == CLEAN_FILE || name == CLEAN_TMP {
            continue;
        }
        if name.ends_with(TMP_SUFFIX) {
            // A segment whose creation did not finish: never held data.
            std::fs::remove_file(&path).map_err(|e| EmbeddedError::io("remove", &path, e))?;
            continue;
        }
        match segment::parse_segment_name(&name) {
            Some(first) => names.push((first, path)),
            None => {
                return Err(EmbeddedError::NotASegment {
                    path,
                    reason:
                        "unexpected file in the log directory (segments are named <20 digits>.seg)"
                            .into(),
                })
            }
        }
    }
    names.sort();

    let mut rec = Recovered {
        segments: Vec::with_capacity(names.len()),
        frames: Vec::new(),
        index: LogIndex::new(),
        write_offset: SEGMENT_HEADER,
        next_batch: 0,
        torn_bytes: 0,
        clean: false,
    };
    if names.is_empty() {
        if mark.is_some() {
            return Ok(None);
        }
        rec.segments.push(segment::create(dir, 0, segment_bytes)?);
        return Ok(Some(rec));
    }
    let last = names.len() - 1;
    let mut last_batch: Option<u64> = None;
    for (i, (first, path)) in names.into_iter().enumerate() {
        let seg = segment::open(&path, first)?;
        if first != rec.index.head() {
            return Err(EmbeddedError::Corrupt {
                file: path,
                offset: 0,
                reason: format!(
                    "segment starts at position {first}, the log before it ends at {}",
                    rec.index.head()
                ),
            });
        }
        let trusted = mark.filter(|m| {
            i == last
                && m.segment_first == first
                && (SEGMENT_HEADER..=seg.capacity).contains(&m.end)
        });
        let data = match trusted {
            Some(m) => {
                let mut buf = vec![0u8; (m.end + HEADER_LEN as u64).min(seg.capacity) as usize];
                seg.read_at(&mut buf, 0)?;
                buf
            }
            None => std::fs::read(&path).map_err(|e| EmbeddedError::io("read", &path, e))?,
        };
        let data = Bytes::from(data);
        let (end, failure) = scan(&data, i as u32, seg.capacity, &mut rec, &mut last_batch);
        if let Some(m) = trusted {
            let next_batch = last_batch.map_or(0, |b| b + 1);
            if failure.is_some()
                || end != m.end
                || rec.index.head() != m.head
                || next_batch != m.next_batch
            {
                return Ok(None);
            }
            // Cleanly shut down: nothing after `end` can have been torn.
            rec.clean = true;
            rec.write_offset = end;
            rec.segments.push(seg);
            continue;
        }
        if mark.is_some() && i == last {
            // The mark names another segment than the last one.
            return Ok(None);
        }
        let tail_dirty = data[end as usize..].iter().any(|&b| b != 0);
        if failure.is_some() || tail_dirty {
            let reason =
                failure.unwrap_or_else(|| "non-zero bytes after the end of the log".into());
            let later = later_batch_after(&data, end, seg.capacity, last_batch);
            if i != last || later.is_some() {
                let reason = match later {
                    Some(off) => format!("{reason}; a later batch follows at byte {off}"),
                    None => format!("{reason}; later segments follow"),
                };
                return Err(EmbeddedError::Corrupt {
                    file: path,
                    offset: end,
                    reason,
                });
            }
            tracing::warn!(file = %path.display(), offset = end, %reason, "cutting the torn tail of the log");
            rec.torn_bytes = data.len() as u64 - end;
            segment::zero_fill(&seg.file, &path, end, data.len() as u64)?;
            seg.file
                .sync_data()
                .map_err(|e| EmbeddedError::io("fdatasync", &path, e))?;
        }
        rec.write_offset = end;
        rec.segments.push(seg);
    }
    rec.next_batch = last_batch.map_or(0, |b| b + 1);
    Ok(Some(rec))
}

/// Scans the frames of one segment into `rec`. Returns the end of the valid
/// data and, if the scan stopped at a bad frame rather than at the zero
/// end-marker, why.
fn scan(
    data: &Bytes,
    segment: u32,
    capacity: u64,
    rec: &mut Recovered,
    last_batch: &mut Option<u64>,
) -> (u64, Option<String>) {
    let max = max_body(capacity);
    let mut at = SEGMENT_HEADER as usize;
    loop {
        let range = match frame::check_frame(&data[at..], max) {
            Ok(r) => r,
            Err(FrameError::End) => return (at as u64, None),
            Err(FrameError::Truncated)
                if data.len() - at < HEADER_LEN && data[at..].iter().all(|&b| b == 0) =>
            {
                return (at as u64, None)
            }
            Err(FrameError::Truncated) => {
                return (
                    at as u64,
                    Some("frame runs past the end of the file".into()),
                )
            }
            Err(FrameError::Bad(why)) => return (at as u64, Some(why)),
        };
        let body = data.slice(at + range.start..at + range.end);
        match index_frame(body, rec, last_batch) {
            Ok(count) => {
                let len = range.end as u32;
                rec.frames.push(FrameLoc {
                    first_position: rec.index.head() - u64::from(count),
                    segment,
                    offset: at as u64,
                    len,
                    count,
                });
                at += range.end;
            }
            Err(why) => return (at as u64, Some(why)),
        }
    }
}

/// Checks a frame body against the index and applies it. Returns its event
/// count.
fn index_frame(
    body: Bytes,
    rec: &mut Recovered,
    last_batch: &mut Option<u64>,
) -> Result<u32, String> {
    let mut reader = BodyReader::new(body).map_err(|e| e.to_string())?;
    let info = reader.info.clone();
    if info.first_position != rec.index.head() {
        return Err(format!(
            "frame starts at position {}, expected {}",
            info.first_position,
            rec.index.head()
        ));
    }
    if let Some(b) = *last_batch {
        if info.batch < b {
            return Err(format!("batch {} after batch {b}", info.batch));
        }
    }
    let mut cache = StreamCache::default();
    let mut order: Vec<StreamId> = Vec::with_capacity(info.count as usize);
    let mut versions: Vec<(StreamId, u64)> = Vec::new();
    while let Some(e) = reader.next_event(&mut cache).map_err(|e| e.to_string())? {
        let before = match versions.iter().find(|(s, _)| *s == e.stream) {
            Some((_, v)) => *v,
            None => rec.index.version(&e.stream),
        };
        if e.version != before + 1 {
            return Err(format!(
                "event at position {} has version {} of stream {}, expected {}",
                e.position,
                e.version,
                e.stream,
                before + 1
            ));
        }
        match versions.iter_mut().find(|(s, _)| *s == e.stream) {
            Some((_, v)) => *v = e.version,
            None => versions.push((e.stream.clone(), e.version)),
        }
        order.push(e.stream);
    }
    let result = AppendResult {
        first_position: info.first_position,
        next_position: info.first_position + u64::from(info.count),
        versions,
    };
    rec.index.apply(
        &result,
        info.key.as_ref().map(|(k, fp)| (k, *fp)),
        order.iter(),
    );
    *last_batch = Some(info.batch);
    Ok(info.count)
}

/// Looks past `from` for a well-formed frame from a batch later than the
/// last one that could have been torn (`last_good + 1`). Returns its offset.
fn later_batch_after(data: &[u8], from: u64, capacity: u64, last_good: Option<u64>) -> Option<u64> {
    let torn_batch = last_good.map_or(0, |b| b + 1);
    let magic = frame::FRAME_MAGIC.to_le_bytes();
    let max = max_body(capacity);
    let mut at = from as usize + 1;
    while at + HEADER_LEN <= data.len() {
        let hit = data[at..].windows(4).position(|w| w == magic)?;
        let cand = at + hit;
        if let Ok(range) = frame::check_frame(&data[cand..], max) {
            let body = Bytes::copy_from_slice(&data[cand + range.start..cand + range.end]);
            if let Ok(r) = BodyReader::new(body) {
                if r.info.batch > torn_batch {
                    return Some(cand as u64);
                }
            }
        }
        at = cand + 1;
    }
    None
}
