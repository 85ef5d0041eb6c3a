//! Segment files: a 16-byte header, then frames, then zeros to the end.
//!
//! A segment is created full size and zero-filled (written and synced once,
//! through a temporary file renamed into place), so the appends that follow
//! never change the file's size and `fdatasync` has no block allocation to
//! commit. The end of the written data is the first all-zero frame header.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{EmbeddedError, Result};

/// First 8 bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SMSGSEG1";
/// Bytes before the first frame: magic and first position.
pub const SEGMENT_HEADER: u64 = 16;
/// Segment file name suffix.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of a segment being created.
pub const TMP_SUFFIX: &str = ".seg.tmp";

/// An open segment file.
#[derive(Debug)]
pub struct Segment {
    /// Its path.
    pub path: PathBuf,
    /// The open file (read and write).
    pub file: File,
    /// Position of its first event.
    pub first_position: u64,
    /// Its size in bytes.
    pub capacity: u64,
}

impl Segment {
    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| EmbeddedError::io("read", &self.path, e))
    }
}

/// The file name of the segment starting at `first_position`.
pub fn segment_name(first_position: u64) -> String {
    format!("{first_position:020}{SEGMENT_SUFFIX}")
}

/// The first position encoded in a segment file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Creates a zero-filled segment of `capacity` bytes starting at
/// `first_position`, durable (file and directory synced) before it returns.
pub fn create(dir: &Path, first_position: u64, capacity: u64) -> Result<Segment> {
    let path = dir.join(segment_name(first_position));
    let tmp = dir.join(format!("{first_position:020}{TMP_SUFFIX}"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&tmp)
        .map_err(|e| EmbeddedError::io("create", &tmp, e))?;
    let mut header = [0u8; SEGMENT_HEADER as usize];
    header[..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..].copy_from_slice(&first_position.to_le_bytes());
    file.write_all_at(&header, 0)
        .map_err(|e| EmbeddedError::io("write", &tmp, e))?;
    zero_fill(&file, &tmp, SEGMENT_HEADER, capacity)?;
    file.sync_all()
        .map_err(|e| EmbeddedError::io("fsync", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| EmbeddedError::io("rename", &tmp, e))?;
    sync_dir(dir)?;
    Ok(Segment {
        path,
        file,
        first_position,
        capacity,
    })
}

/// Writes zeros over `[from, to)`.
pub fn zero_fill(file: &File, path: &Path, from: u64, to: u64) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(CHUNK);
        file.write_all_at(&zeros[..n], at)
            .map_err(|e| EmbeddedError::io("write", path, e))?;
        at += n as u64;
    }
    Ok(())
}

/// Makes a directory's entries (created, renamed files) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| EmbeddedError::io("fsync", dir, e))
}

/// Opens an existing segment and checks its header.
pub fn open(path: &Path, expected_first: u64) -> Result<Segment> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| EmbeddedError::io("open", path, e))?;
    let capacity = file
        .metadata()
        .map_err(|e| EmbeddedError::io("stat", path, e))?
        .len();
    let not_segment = |reason: String| EmbeddedError::NotASegment {
        path: path.to_owned(),
        reason,
    };
    if capacity < SEGMENT_HEADER {
        return Err(not_segment(format!(
            "{capacity} bytes is shorter than a segment header"
        )));
    }
    let mut header = [0u8; SEGMENT_HEADER as usize];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| EmbeddedError::io("read", path, e))?;
    if header[..8] != SEGMENT_MAGIC {
        return Err(not_segment(
            "no segment magic at the start of the file".into(),
        ));
    }
    let first = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    if first != expected_first {
        return Err(not_segment(format!(
            "header says first position {first}, file name says {expected_first}"
        )));
    }
    Ok(Segment {
        path: path.to_owned(),
        file,
        first_position: first,
        capacity,
    })
}
