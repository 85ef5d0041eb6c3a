//! The embedded backend's typed errors.

use std::path::PathBuf;

/// What went wrong in the embedded backend. Reaches callers of the engine's
/// traits inside [`smartmsg_engine::BackendError`]; downcast to match on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedError {
    /// An I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`open`, `write`, `fdatasync`, …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Damage before the log's final batch: a record that fails its checks
    /// and is followed by later, valid records. Never skipped silently.
    #[error("corrupt log: {file} at byte {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the bad record in that file.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// Another process (or another handle in this one) holds the directory.
    #[error("data directory {path} is locked by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A file in the log directory that is not one of the log's own.
    #[error("{path} is not a segment of this log: {reason}")]
    NotASegment {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// An earlier write or sync failed; the log refuses further appends
    /// until it is reopened (recovery then decides what is durable).
    #[error("log is poisoned by an earlier write failure; reopen it")]
    Poisoned,
    /// The redb database failed.
    #[error("redb {path}: {reason}")]
    Redb {
        /// The database file.
        path: PathBuf,
        /// redb's error, as text.
        reason: String,
    },
    /// The storage library (redb) panicked while using a file: the file is
    /// most likely damaged. The panic was contained; the handle that hit it
    /// refuses further work.
    #[error("redb {path}: the storage library failed ({message}); the file may be damaged")]
    StoragePanicked {
        /// The database file.
        path: PathBuf,
        /// The panic's message.
        message: String,
    },
    /// A configuration value is out of range.
    #[error("bad configuration: {0}")]
    Config(String),
}

impl EmbeddedError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand.
pub type Result<T, E = EmbeddedError> = std::result::Result<T, E>;
