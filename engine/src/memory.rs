//! In-memory backends: an [`EventLog`] and a [`SnapshotStore`] that keep
//! everything in process memory. For tests, simulations and as the
//! reference behaviour; nothing survives the process.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::append::{AppendResult, AppendTx};
use crate::error::{AppendError, ReadError, SnapshotError};
use crate::event::RecordedEvent;
use crate::index::{LogIndex, Verdict};
use crate::limits::Limits;
use crate::log::{EventLog, HeadWatch};
use crate::snapshot::{Snapshot, SnapshotStore};
use crate::stream_id::StreamId;

#[derive(Default)]
struct State {
    index: LogIndex,
    events: Vec<RecordedEvent>,
}

/// An [`EventLog`] in memory.
pub struct InMemoryLog {
    state: Mutex<State>,
    head: tokio::sync::watch::Sender<u64>,
    limits: Limits,
}

impl Default for InMemoryLog {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryLog {
    /// An empty log with default limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// An empty log with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        let mut state = State::default();
        state.index.set_key_window(limits.idempotency_window);
        Self {
            state: Mutex::new(state),
            head: tokio::sync::watch::channel(0).0,
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated
        // (every update is applied after its checks), so poisoning is benign.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl EventLog for InMemoryLog {
    async fn append(&self, tx: AppendTx) -> Result<AppendResult, AppendError> {
        let mut st = self.lock();
        let result = match st.index.check(&tx, &self.limits)? {
            Verdict::Duplicate(r) => return Ok(r),
            Verdict::Write(r) => r,
        };
        let mut position = result.first_position;
        for (s, (_, new_version)) in tx.streams.iter().zip(&result.versions) {
            let first_version = new_version - s.events.len() as u64 + 1;
            for (i, e) in s.events.iter().enumerate() {
                st.events.push(RecordedEvent {
                    position,
                    stream: s.stream.clone(),
                    version: first_version + i as u64,
                    kind: e.kind.clone(),
                    schema: e.schema,
                    timestamp_ms: e.timestamp_ms,
                    metadata: e.metadata.clone(),
                    payload: e.payload.clone(),
                });
                position += 1;
            }
        }
        st.index.apply_tx(&tx, &result);
        st.index.forget_expired_keys();
        // Published under the lock, so heads reach watchers in order.
        self.head.send_replace(st.index.head());
        drop(st);
        Ok(result)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.limits.check_read(max)?;
        let st = self.lock();
        let head = st.index.head();
        Ok(st
            .index
            .positions(stream, from_version, max, head)
            .iter()
            .map(|&p| st.events[p as usize].clone())
            .collect())
    }

    async fn read_all(
        &self,
        from_position: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.limits.check_read(max)?;
        let st = self.lock();
        let start = (from_position as usize).min(st.events.len());
        let end = start.saturating_add(max).min(st.events.len());
        Ok(st.events[start..end].to_vec())
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
        Ok(self.lock().index.version(stream))
    }

    async fn head(&self) -> Result<u64, ReadError> {
        Ok(self.lock().index.head())
    }

    fn watch_head(&self) -> HeadWatch {
        HeadWatch::new(self.head.subscribe())
    }

    fn limits(&self) -> Limits {
        self.limits
    }
}

/// A [`SnapshotStore`] in memory.
#[derive(Default)]
pub struct InMemorySnapshots {
    snapshots: Mutex<HashMap<StreamId, Snapshot>>,
}

impl InMemorySnapshots {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, Snapshot>> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl SnapshotStore for InMemorySnapshots {
    async fn save(&self, snapshot: Snapshot) -> Result<(), SnapshotError> {
        let mut m = self.lock();
        match m.get(&snapshot.stream) {
            Some(old) if old.version > snapshot.version => {}
            _ => {
                m.insert(snapshot.stream.clone(), snapshot);
            }
        }
        Ok(())
    }

    async fn load(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        Ok(self.lock().get(stream).cloned())
    }

    async fn delete(&self, stream: &StreamId) -> Result<(), SnapshotError> {
        self.lock().remove(stream);
        Ok(())
    }
}
