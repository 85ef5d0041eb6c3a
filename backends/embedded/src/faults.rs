//! Faults that SIGKILL cannot make, for the embedded log's tests: short
//! writes, failed `fdatasync`s and power loss that drops, tears or garbles
//! what was written but not yet synced (as redb tests its storage with a
//! fault-injecting backend).
//!
//! A [`FaultyDisk`] sits between the log's writer and its segment files
//! ([`crate::EmbeddedLog::open_with_faults`]). Every write really goes to
//! the file, so recovery later reads real bytes; the disk remembers which
//! byte ranges were written since the file's last successful sync. A test
//! arms faults ([`FaultyDisk::short_write_after`],
//! [`FaultyDisk::fail_write_after`], [`FaultyDisk::fail_sync_after`]),
//! cuts the power ([`FaultyDisk::power_off`]: every later operation fails,
//! so the closing log writes nothing more, not even its clean-shutdown
//! mark), drops the log, makes the power loss happen to the files
//! ([`FaultyDisk::lose_unsynced`]) and opens the directory again without
//! faults. Public only with the `fault-injection` feature.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a power loss does to bytes written but not yet synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerLoss {
    /// They never reached the disk: the ranges read as zeros again (segment
    /// files are preallocated with zeros).
    Dropped,
    /// A random prefix of each write reached the disk, the rest did not
    /// (a torn write).
    Torn,
    /// They reached the disk as garbage (random bytes).
    Garbled,
}

#[derive(Debug, Default)]
struct State {
    /// Write and sync calls seen so far.
    ops: u64,
    short_write_at: Option<(u64, usize)>,
    fail_write_at: Option<u64>,
    fail_sync_at: Option<u64>,
    off: bool,
    /// Per file: (offset, len) written since its last successful sync.
    unsynced: BTreeMap<PathBuf, Vec<(u64, usize)>>,
    injected: u64,
}

/// The fault-injecting layer. See the [module docs](self).
#[derive(Debug, Default)]
pub struct FaultyDisk {
    state: Mutex<State>,
}

fn injected(kind: io::ErrorKind, what: &str) -> io::Error {
    io::Error::new(kind, format!("injected fault: {what}"))
}

impl FaultyDisk {
    /// A disk with no fault armed.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Operations (writes and syncs) seen so far.
    pub fn ops(&self) -> u64 {
        self.state().ops
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.state().injected
    }

    /// The write that is operation number `op` (counted from 0, see
    /// [`FaultyDisk::ops`]; later if that operation is a sync) writes only
    /// its first `keep` bytes and fails with "no space".
    pub fn short_write_after(&self, op: u64, keep: usize) {
        self.state().short_write_at = Some((op, keep));
    }

    /// The first write at or after operation `op` fails without writing.
    pub fn fail_write_after(&self, op: u64) {
        self.state().fail_write_at = Some(op);
    }

    /// The first sync at or after operation `op` fails; what it should have
    /// made durable stays unsynced (a later power loss may lose it).
    pub fn fail_sync_after(&self, op: u64) {
        self.state().fail_sync_at = Some(op);
    }

    /// Cuts the power: every later write or sync fails, and the log writes
    /// no clean-shutdown mark.
    pub fn power_off(&self) {
        self.state().off = true;
    }

    /// Whether the power is off.
    pub fn is_off(&self) -> bool {
        self.state().off
    }

    /// Makes the power loss happen to the files: every range written since
    /// its file's last successful sync is dropped, torn or garbled as
    /// `how` says, with random choices from `seed`. Returns the bytes
    /// touched. Call it after the log is dropped.
    pub fn lose_unsynced(&self, how: PowerLoss, seed: u64) -> io::Result<u64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let unsynced = std::mem::take(&mut self.state().unsynced);
        let mut touched = 0u64;
        for (path, writes) in unsynced {
            let file = OpenOptions::new().write(true).open(&path)?;
            for (offset, len) in writes {
                let (skip, bytes) = match how {
                    PowerLoss::Dropped => (0, vec![0u8; len]),
                    PowerLoss::Torn => {
                        let keep = rng.random_range(0..=len);
                        (keep, vec![0u8; len - keep])
                    }
                    PowerLoss::Garbled => {
                        let mut b = vec![0u8; len];
                        rng.fill(&mut b[..]);
                        (0, b)
                    }
                };
                file.write_all_at(&bytes, offset + skip as u64)?;
                touched += bytes.len() as u64;
            }
            file.sync_all()?;
        }
        Ok(touched)
    }

    /// Writes `buf` at `offset` of `file` (at `path`), or injects the armed
    /// fault.
    pub(crate) fn write_at(
        &self,
        file: &File,
        path: &Path,
        buf: &[u8],
        offset: u64,
    ) -> io::Result<()> {
        let mut s = self.state();
        let op = s.ops;
        s.ops += 1;
        if s.off {
            return Err(injected(io::ErrorKind::Other, "power is off"));
        }
        if s.fail_write_at.is_some_and(|at| op >= at) {
            s.fail_write_at = None;
            s.injected += 1;
            return Err(injected(io::ErrorKind::Other, "write failed"));
        }
        if let Some((at, keep)) = s.short_write_at {
            if op >= at {
                s.short_write_at = None;
                s.injected += 1;
                let keep = keep.min(buf.len().saturating_sub(1));
                file.write_all_at(&buf[..keep], offset)?;
                s.unsynced
                    .entry(path.to_owned())
                    .or_default()
                    .push((offset, keep));
                return Err(injected(io::ErrorKind::StorageFull, "short write"));
            }
        }
        file.write_all_at(buf, offset)?;
        s.unsynced
            .entry(path.to_owned())
            .or_default()
            .push((offset, buf.len()));
        Ok(())
    }

    /// Syncs `file`'s data, or injects the armed fault.
    pub(crate) fn sync_data(&self, file: &File, path: &Path) -> io::Result<()> {
        let mut s = self.state();
        let op = s.ops;
        s.ops += 1;
        if s.off {
            return Err(injected(io::ErrorKind::Other, "power is off"));
        }
        if s.fail_sync_at.is_some_and(|at| op >= at) {
            s.fail_sync_at = None;
            s.injected += 1;
            return Err(injected(io::ErrorKind::Other, "fdatasync failed"));
        }
        file.sync_data()?;
        s.unsynced.remove(path);
        Ok(())
    }
}
