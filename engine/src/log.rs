//! The [`EventLog`] port.

use async_trait::async_trait;

use crate::append::{AppendResult, AppendTx};
use crate::error::{AppendError, ReadError};
use crate::event::RecordedEvent;
use crate::limits::Limits;
use crate::stream_id::StreamId;

/// An append-only, totally ordered log of events grouped into streams.
///
/// Guarantees every implementation gives (checked by
/// `testkit::event_log_conformance`):
///
/// - `append` is atomic across the streams of a transaction; each stream's
///   [`crate::ExpectedVersion`] is checked against its current version and a
///   mismatch fails the whole transaction with
///   [`AppendError::WrongExpectedVersion`] carrying the actual version;
/// - a transaction's events take consecutive positions; positions are
///   0-based and gap-free; stream versions are 1-based and gap-free;
/// - an idempotency key makes a retry return the original [`AppendResult`]
///   and write nothing; reusing a key for different content is
///   [`AppendError::IdempotencyKeyReused`];
/// - `append` returns only when the transaction is durable (for durable
///   backends), and a read never shows part of a transaction;
/// - reads return at most `max` events and refuse a `max` above
///   [`Limits::max_read_events`].
///
/// The trait is dyn-compatible: services hold an `Arc<dyn EventLog>`.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Appends a transaction atomically.
    async fn append(&self, tx: AppendTx) -> Result<AppendResult, AppendError>;

    /// Events of `stream` with version ≥ `from_version` (1-based), at most
    /// `max`, in version order. An unknown stream reads as empty.
    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError>;

    /// Events with position ≥ `from_position`, at most `max`, in position
    /// order.
    async fn read_all(
        &self,
        from_position: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError>;

    /// The current version of `stream` (0 if it does not exist).
    async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError>;

    /// The head: one past the last committed position (0 for an empty log).
    async fn head(&self) -> Result<u64, ReadError>;

    /// A watch on the head, to wait for new events (catch-up subscriptions).
    fn watch_head(&self) -> HeadWatch;

    /// The limits this log enforces.
    fn limits(&self) -> Limits;

    /// What the log has written since it was opened, for a backend that
    /// counts (`None` by default: a broker keeps its own figures).
    fn counters(&self) -> Option<LogCounters> {
        None
    }
}

/// What a log has written since it was opened; see [`EventLog::counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogCounters {
    /// Transactions appended.
    pub appends: u64,
    /// Events appended.
    pub events: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Durable syncs (`fdatasync`): one per group commit of many appends.
    pub syncs: u64,
}

/// Follows a log's head; see [`EventLog::watch_head`].
#[derive(Debug, Clone)]
pub struct HeadWatch(tokio::sync::watch::Receiver<u64>);

impl HeadWatch {
    /// Wraps a watch receiver that a backend publishes its head on.
    pub fn new(rx: tokio::sync::watch::Receiver<u64>) -> Self {
        Self(rx)
    }

    /// The head last published.
    pub fn current(&self) -> u64 {
        *self.0.borrow()
    }

    /// Waits until the head is beyond `position` (an event at `position`
    /// exists) and returns the head. Returns [`ReadError::Closed`] when the
    /// log closes first.
    pub async fn wait_beyond(&mut self, position: u64) -> Result<u64, ReadError> {
        let head = self
            .0
            .wait_for(|&head| head > position)
            .await
            .map_err(|_| ReadError::Closed)?;
        Ok(*head)
    }
}
