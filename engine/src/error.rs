//! Typed errors, one enum per operation.

use std::sync::Arc;

use crate::append::{ExpectedVersion, IdempotencyKey};
use crate::stream_id::StreamId;

/// A failure inside a backend (I/O, corruption, a broker error), kept as the
/// backend's own typed error behind a shared pointer so that one failure can
/// be reported to every waiter of a group commit. Downcast with
/// [`BackendError::downcast_ref`] to reach the backend's enum.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct BackendError(pub Arc<dyn std::error::Error + Send + Sync + 'static>);

impl BackendError {
    /// Wraps a backend's error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(e))
    }

    /// The backend's own error, if it is an `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref::<E>()
    }
}

/// A stated limit that a request exceeds, or a request shape no log accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// The transaction has no streams.
    #[error("transaction holds no streams")]
    EmptyTransaction,
    /// A stream in the transaction has no events.
    #[error("stream {stream} has no events in the transaction")]
    EmptyStreamAppend {
        /// The stream.
        stream: StreamId,
    },
    /// A stream appears twice in one transaction.
    #[error("stream {stream} appears twice in one transaction")]
    DuplicateStream {
        /// The stream.
        stream: StreamId,
    },
    /// Too many streams in one transaction.
    #[error("transaction touches {count} streams; the limit is {max}")]
    TooManyStreams {
        /// Streams in the transaction.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Too many events in one transaction.
    #[error("transaction holds {count} events; the limit is {max}")]
    TooManyEvents {
        /// Events in the transaction.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An event is larger than allowed.
    #[error("event is {size} bytes; the limit is {max}")]
    EventTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A transaction is larger than allowed.
    #[error("transaction is {size} bytes; the limit is {max}")]
    TransactionTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// An event kind is empty or too long.
    #[error("event kind is {len} bytes; it must be 1 to {max}")]
    BadKind {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A correlation, causation or idempotency id is too long.
    #[error("id is {len} bytes; the limit is {max}")]
    IdTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A read asks for more events than allowed.
    #[error("read asks for {requested} events; the limit is {max}")]
    ReadTooLarge {
        /// Events asked for.
        requested: usize,
        /// The limit.
        max: usize,
    },
}

/// Why an append failed. Nothing was written in every case.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// Optimistic concurrency: a stream is not at the expected version.
    #[error("stream {stream}: expected {expected}, actual version {actual}")]
    WrongExpectedVersion {
        /// The stream.
        stream: StreamId,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// Its actual current version (0 = no stream).
        actual: u64,
    },
    /// The idempotency key was used before by a transaction with different
    /// content.
    #[error("idempotency key {key} was already used by a different transaction")]
    IdempotencyKeyReused {
        /// The key.
        key: IdempotencyKey,
    },
    /// A limit is exceeded or the transaction is malformed.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The log is closed (its writer stopped).
    #[error("the event log is closed")]
    Closed,
    /// Another writer owns the log or partition (fenced out).
    #[error("fenced: another writer owns this log")]
    Fenced,
    /// The backend failed; whether the transaction was written is unknown
    /// (retry with the same idempotency key to find out safely).
    #[error("backend failure: {0}")]
    Backend(#[from] BackendError),
}

/// Why a read failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// A limit is exceeded.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The log is closed.
    #[error("the event log is closed")]
    Closed,
    /// The backend failed (I/O, corruption).
    #[error("backend failure: {0}")]
    Backend(#[from] BackendError),
}

/// Why a snapshot operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The snapshot is larger than the store accepts.
    #[error("snapshot is {size} bytes; the limit is {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The backend failed.
    #[error("backend failure: {0}")]
    Backend(#[from] BackendError),
}
