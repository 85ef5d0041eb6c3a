//! The clean-shutdown mark: lets an open skip checking the zero-filled
//! space after the end of the log.
//!
//! Recovery must read a whole preallocated segment to tell a torn tail from
//! damage (any non-zero byte after the last good frame matters). After a
//! clean shutdown nothing can have been torn, so the writer, once its last
//! batch is durable and nothing else will be written, leaves a small file
//! `CLEAN` naming the last segment, the end of its data, the head and the
//! next batch number. An open that finds the mark reads the last segment
//! only up to that end; if the frames end exactly there with the same head
//! and batch, the rest of the segment is not read. Anything else (a frame
//! missing or bad, more data than the mark says) falls back to the full
//! check.
//!
//! The mark is written without `fsync`: losing it only costs the full check,
//! and a torn or half-renamed mark fails its CRC. It must, however, be gone
//! *durably* before anything new is written (a stale mark whose end happens
//! to match a torn new frame would hide the torn bytes), so the writer
//! removes it and syncs the directory before its first write after an open.

use std::io::Write as _;
use std::path::Path;

use smartmsg_engine::bytes_in::Input;

use crate::error::{EmbeddedError, Result};

/// The mark's file name in the log directory.
pub const CLEAN_FILE: &str = "CLEAN";
/// Where the mark is written before it is renamed into place.
pub const CLEAN_TMP: &str = "CLEAN.tmp";

const MAGIC: &[u8; 4] = b"SMC1";
const LEN: usize = 4 + 4 * 8 + 4;

/// What a clean shutdown left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanMark {
    /// First position of the last segment (its name).
    pub segment_first: u64,
    /// Byte offset where the last segment's data ends.
    pub end: u64,
    /// The log's head.
    pub head: u64,
    /// The next group-commit batch number.
    pub next_batch: u64,
}

impl CleanMark {
    /// The mark's bytes: magic, four little-endian `u64`, CRC32C.
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..4].copy_from_slice(MAGIC);
        for (i, v) in [self.segment_first, self.end, self.head, self.next_batch]
            .into_iter()
            .enumerate()
        {
            b[4 + i * 8..12 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..LEN - 4]);
        b[LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a mark; `None` for anything that is not exactly a valid one.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != LEN || &b[..4] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[LEN - 4..].try_into().ok()?);
        if crc32c::crc32c(&b[..LEN - 4]) != crc {
            return None;
        }
        let mut i = Input::new(&b[4..LEN - 4]);
        Some(Self {
            segment_first: i.u64_le("segment_first").ok()?,
            end: i.u64_le("end").ok()?,
            head: i.u64_le("head").ok()?,
            next_batch: i.u64_le("next_batch").ok()?,
        })
    }
}

/// Reads the mark in `dir`, if there is a valid one.
pub fn read(dir: &Path) -> Option<CleanMark> {
    let bytes = std::fs::read(dir.join(CLEAN_FILE)).ok()?;
    let mark = CleanMark::decode(&bytes);
    if mark.is_none() {
        tracing::debug!(dir = %dir.display(), "ignoring an invalid clean-shutdown mark");
    }
    mark
}

/// Writes the mark (temporary file, then rename; no sync, see the module
/// docs).
pub fn write(dir: &Path, mark: &CleanMark) -> Result<()> {
    let tmp = dir.join(CLEAN_TMP);
    let mut f = std::fs::File::create(&tmp).map_err(|e| EmbeddedError::io("create", &tmp, e))?;
    f.write_all(&mark.encode())
        .map_err(|e| EmbeddedError::io("write", &tmp, e))?;
    drop(f);
    let path = dir.join(CLEAN_FILE);
    std::fs::rename(&tmp, &path).map_err(|e| EmbeddedError::io("rename", &path, e))
}

/// Removes the mark, if any, durably (the directory is synced, also when
/// there was no mark).
pub fn remove(dir: &Path) -> Result<()> {
    let path = dir.join(CLEAN_FILE);
    match std::fs::remove_file(&path) {
        // Sync the directory even when the mark is already gone: an earlier
        // removal whose sync failed may not be durable yet.
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(EmbeddedError::io("remove", &path, e)),
    }
    let d = std::fs::File::open(dir).map_err(|e| EmbeddedError::io("open", dir, e))?;
    d.sync_all()
        .map_err(|e| EmbeddedError::io("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_bit_is_refused() {
        let m = CleanMark {
            segment_first: 7,
            end: 4096,
            head: 99,
            next_batch: 12,
        };
        let b = m.encode();
        assert_eq!(CleanMark::decode(&b), Some(m));
        for i in 0..b.len() * 8 {
            let mut c = b;
            c[i / 8] ^= 1 << (i % 8);
            assert_eq!(CleanMark::decode(&c), None, "bit {i}");
        }
        assert_eq!(CleanMark::decode(&b[..LEN - 1]), None);
        assert_eq!(CleanMark::decode(&[]), None);
    }
}
