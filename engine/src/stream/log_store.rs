//! [`LogStore`]: a [`KeyValueStore`] whose commits are events in an
//! [`EventLog`] stream, materialised in memory.
//!
//! A stream runner's state normally lives in a local file (redb). When the
//! work moves between machines (a shard of campaigns taken over by another
//! instance), the state must move with it, and must not be writable by the
//! instance that lost it. `LogStore` keeps the state where the rest of the
//! shard already is, in the shard's own event log: each committed
//! [`WriteBatch`] is one log transaction on one stream (split into parts
//! when it is larger than an event may be), appended with the stream's
//! exact expected version. Opening the store reads the stream back and
//! applies every batch in order: the changelog of Kafka Streams, with the
//! log's guarantees:
//!
//! - **atomic**: a batch is one transaction, so a commit is in the log
//!   whole or not at all, and the materialisation is updated only after
//!   the append succeeded;
//! - **single writer**: a second store on the same stream, or a log writer
//!   that was fenced (a Kafka log reopened elsewhere), cannot commit: its
//!   append fails with a version conflict or `Fenced`, reported as
//!   [`StoreError::Backend`];
//! - **replayable**: the state is a fold over the stream, like every
//!   aggregate.
//!
//! Reads answer from memory. Truncating the changelog
//! ([`KeyValueStore::truncate_changelog`]) is recorded too, so a reopened
//! store reports the same bounds.
//!
//! Limits: the whole state is held in memory, and the stream keeps every
//! batch (opening reads all of them); a batch must fit one log transaction
//! ([`crate::Limits::max_tx_bytes`], 8 MiB by default).

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake};

use super::memory_store::InMemoryStore;
use super::store::{
    changelog_blob, ChangelogEntry, Entries, KeyValueStore, StoreError, StoreLimits, WriteBatch,
};
use crate::{AppendTx, BackendError, EventLog, ExpectedVersion, NewEvent, ReadError, StreamId};

/// Event kind of a batch's part.
pub const BATCH_KIND: &str = "store-batch";
/// Event kind of a changelog truncation.
pub const TRUNCATE_KIND: &str = "store-truncate";
/// Room left in each part for the event's kind and envelope.
const PART_OVERHEAD: usize = 512;
/// Bytes of a part's header: index and count, u32 big-endian each.
const PART_HEADER: usize = 8;

/// Why a [`LogStore`] could not be opened or written, before it is mapped
/// to a [`StoreError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogStoreError {
    /// Reading the stream failed.
    #[error("reading the store's stream {stream}: {source}")]
    Read {
        /// The stream.
        stream: String,
        /// The log's error.
        #[source]
        source: ReadError,
    },
    /// An event of the stream is not one this store writes, or the parts
    /// of a batch do not follow each other.
    #[error("store stream {stream} at version {version}: {reason}")]
    Corrupt {
        /// The stream.
        stream: String,
        /// The event's version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// The restored batches do not fit the materialisation's limits.
    #[error("restoring {stream}: {source}")]
    Restore {
        /// The stream.
        stream: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
}

/// A [`KeyValueStore`] kept as a stream of an [`EventLog`] (see the
/// module documentation).
pub struct LogStore {
    log: Arc<dyn EventLog>,
    stream: StreamId,
    memory: InMemoryStore,
    /// The stream's version this store has written or read up to; held
    /// while a batch is appended and applied, so the log's order is the
    /// materialisation's.
    version: Mutex<u64>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("stream", &self.stream.as_str())
            .field("version", &*self.lock())
            .field("memory", &self.memory)
            .finish()
    }
}

impl LogStore {
    /// Opens the store kept in `stream` of `log` with default limits: reads
    /// every batch the stream holds and applies them in order.
    pub async fn open(log: Arc<dyn EventLog>, stream: StreamId) -> Result<Self, LogStoreError> {
        Self::open_with_limits(log, stream, StoreLimits::default()).await
    }

    /// [`LogStore::open`] with the materialisation's limits.
    pub async fn open_with_limits(
        log: Arc<dyn EventLog>,
        stream: StreamId,
        limits: StoreLimits,
    ) -> Result<Self, LogStoreError> {
        let memory = InMemoryStore::with_limits(limits);
        let name = stream.as_str().to_owned();
        let page = log.limits().max_read_events.clamp(1, 10_000);
        let corrupt = |version: u64, reason: String| LogStoreError::Corrupt {
            stream: name.clone(),
            version,
            reason,
        };
        let mut version = 0u64;
        // The batch being reassembled: (parts, next part, bytes so far).
        let mut pending: Option<(u32, u32, Vec<u8>)> = None;
        loop {
            let events = log
                .read_stream(&stream, version + 1, page)
                .await
                .map_err(|source| LogStoreError::Read {
                    stream: name.clone(),
                    source,
                })?;
            if events.is_empty() {
                break;
            }
            for e in events {
                version = e.version;
                match e.kind.as_str() {
                    BATCH_KIND => {
                        let (index, count, body) = split_part(&e.payload).ok_or_else(|| {
                            corrupt(e.version, "a part shorter than its header".into())
                        })?;
                        let (n, next, mut bytes) = pending.take().unwrap_or((count, 0, Vec::new()));
                        if count != n || index != next || index >= count {
                            return Err(corrupt(
                                e.version,
                                format!("part {index} of {count} where part {next} of {n} was due"),
                            ));
                        }
                        bytes.extend_from_slice(body);
                        if index + 1 < count {
                            pending = Some((count, index + 1, bytes));
                            continue;
                        }
                        let batch = decode_batch(&bytes).map_err(|r| corrupt(e.version, r))?;
                        memory
                            .write(&batch)
                            .map_err(|source| LogStoreError::Restore {
                                stream: name.clone(),
                                source,
                            })?;
                    }
                    TRUNCATE_KIND => {
                        if pending.is_some() {
                            return Err(corrupt(e.version, "a truncation inside a batch".into()));
                        }
                        let before = <[u8; 8]>::try_from(&e.payload[..])
                            .map(u64::from_be_bytes)
                            .map_err(|_| {
                                corrupt(e.version, "a truncation of the wrong size".into())
                            })?;
                        memory.truncate_changelog(before).map_err(|source| {
                            LogStoreError::Restore {
                                stream: name.clone(),
                                source,
                            }
                        })?;
                    }
                    other => {
                        return Err(corrupt(e.version, format!("an event of kind {other:?}")));
                    }
                }
            }
        }
        if pending.is_some() {
            return Err(corrupt(version, "the stream ends inside a batch".into()));
        }
        Ok(Self {
            log,
            stream,
            memory,
            version: Mutex::new(version),
        })
    }

    /// The log the store is kept in.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    /// The store's stream.
    pub fn stream(&self) -> &StreamId {
        &self.stream
    }

    /// The stream's version this store holds (0 for an empty store).
    pub fn version(&self) -> u64 {
        *self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        // A panic while the lock was held cannot leave the count behind the
        // materialisation: both change together after the append.
        self.version.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `events` at the expected `version` and returns the new
    /// version.
    fn append(&self, version: u64, events: Vec<NewEvent>) -> Result<u64, StoreError> {
        let n = events.len() as u64;
        let tx = AppendTx::single(self.stream.clone(), ExpectedVersion::Exact(version), events);
        block_on(self.log.append(tx)).map_err(|e| StoreError::Backend(BackendError::new(e)))?;
        Ok(version + n)
    }
}

fn split_part(payload: &[u8]) -> Option<(u32, u32, &[u8])> {
    if payload.len() < PART_HEADER {
        return None;
    }
    let index = u32::from_be_bytes(payload[0..4].try_into().ok()?);
    let count = u32::from_be_bytes(payload[4..8].try_into().ok()?);
    Some((index, count, &payload[PART_HEADER..]))
}

fn decode_batch(blob: &[u8]) -> Result<WriteBatch, String> {
    let count = changelog_blob::count(blob).map_err(|e| e.to_string())?;
    let mut entries = Vec::new();
    changelog_blob::decode_into(0, blob, 0, count, usize::MAX, &mut entries)
        .map_err(|e| e.to_string())?;
    if entries.len() as u64 != count {
        return Err(format!(
            "a batch of {} changes claims {count}",
            entries.len()
        ));
    }
    let mut batch = WriteBatch::new();
    for ChangelogEntry {
        space, key, value, ..
    } in entries
    {
        match value {
            Some(v) => batch.put(&space, key, v),
            None => batch.delete(&space, key),
        }
    }
    Ok(batch)
}

impl KeyValueStore for LogStore {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.memory.get(space, key)
    }

    fn range(
        &self,
        space: &str,
        start: std::ops::Bound<&[u8]>,
        end: std::ops::Bound<&[u8]>,
        max: usize,
    ) -> Result<Entries, StoreError> {
        self.memory.range(space, start, end, max)
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.memory.limits().check_batch(batch)?;
        if batch.is_empty() {
            return Ok(());
        }
        let limits = self.log.limits();
        let blob = changelog_blob::encode(batch);
        let part = limits
            .max_event_bytes
            .saturating_sub(PART_OVERHEAD + PART_HEADER)
            .max(1);
        let parts = blob.len().div_ceil(part).max(1);
        let framed = blob.len() + parts * (PART_HEADER + PART_OVERHEAD);
        if parts > limits.max_tx_events || framed > limits.max_tx_bytes {
            return Err(StoreError::EncodedTooLarge {
                bytes: blob.len(),
                max: limits
                    .max_tx_bytes
                    .saturating_sub(parts * (PART_HEADER + PART_OVERHEAD)),
            });
        }
        let count = parts as u32;
        let events = blob
            .chunks(part)
            .enumerate()
            .map(|(i, body)| {
                let mut payload = Vec::with_capacity(PART_HEADER + body.len());
                payload.extend_from_slice(&(i as u32).to_be_bytes());
                payload.extend_from_slice(&count.to_be_bytes());
                payload.extend_from_slice(body);
                NewEvent::new(BATCH_KIND, 1, 0, payload)
            })
            .collect();
        let mut version = self.lock();
        *version = self.append(*version, events)?;
        self.memory.write(batch)
    }

    fn changelog(&self, from: u64, max: usize) -> Result<Vec<ChangelogEntry>, StoreError> {
        self.memory.changelog(from, max)
    }

    fn changelog_bounds(&self) -> Result<(u64, u64), StoreError> {
        self.memory.changelog_bounds()
    }

    fn truncate_changelog(&self, before: u64) -> Result<(), StoreError> {
        let (_, head) = self.memory.changelog_bounds()?;
        if before > head {
            // Let the materialisation refuse it with its typed error.
            return self.memory.truncate_changelog(before);
        }
        let mut version = self.lock();
        let event = NewEvent::new(TRUNCATE_KIND, 1, 0, before.to_be_bytes().to_vec());
        *version = self.append(*version, vec![event])?;
        self.memory.truncate_changelog(before)
    }

    fn limits(&self) -> StoreLimits {
        self.memory.limits()
    }

    fn writes_block(&self) -> bool {
        // Every write waits for the log's commit.
        true
    }
}

/// Runs `future` to completion on this thread.
///
/// [`KeyValueStore`] is synchronous and the log is not: a write waits for
/// its append here. The logs' appends only wait on a channel to their
/// writer thread (the embedded log's, the Kafka log's), so no reactor is
/// needed, and blocking is what the trait promises ([`LogStore`]'s
/// `writes_block` is true: the stream runner commits on tokio's blocking
/// pool). Not `tokio::runtime::Handle::block_on`, which panics when called
/// from an async context.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}
