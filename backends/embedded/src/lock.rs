//! One process owns a data directory at a time: an advisory lock on a file
//! inside it, released when the owner drops it or dies.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{EmbeddedError, Result};

/// Name of the lock file inside a data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Holds the directory lock while alive.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock of `dir`, or fails with [`EmbeddedError::Locked`] if
    /// another process (or another handle in this one) holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| EmbeddedError::io("open", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(EmbeddedError::Locked { path }),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(EmbeddedError::io("lock", &path, e))
            }
        }
        // The owner's pid, for people looking at a locked directory.
        let _ = file.set_len(0);
        let _ = writeln!(file, "{}", std::process::id());
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
