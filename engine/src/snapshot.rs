//! The [`SnapshotStore`] port: the latest state of an aggregate at a version.

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::SnapshotError;
use crate::stream_id::StreamId;

/// An aggregate's state encoded at a stream version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The stream.
    pub stream: StreamId,
    /// The stream version the state includes (every event up to it).
    pub version: u64,
    /// The state's own format version: a snapshot whose schema the
    /// aggregate does not know is ignored and the stream replayed.
    pub schema: u16,
    /// The encoded state.
    pub state: Bytes,
}

/// Keeps the latest snapshot per stream. Snapshots are an optimisation: a
/// lost or stale snapshot only makes a load replay more events.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Stores `snapshot` if it is newer than the one kept for its stream
    /// (an older one is ignored, so racing writers never go backwards).
    async fn save(&self, snapshot: Snapshot) -> Result<(), SnapshotError>;

    /// The latest snapshot of `stream`, if any.
    async fn load(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError>;

    /// Removes the snapshot of `stream`.
    async fn delete(&self, stream: &StreamId) -> Result<(), SnapshotError>;
}
