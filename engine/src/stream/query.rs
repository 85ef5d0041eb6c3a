//! Interactive queries: [`StoreReader`] and [`WindowStoreReader`] read a
//! task's state stores from outside the topology, as of the last commit.
//!
//! A reader reads the [`KeyValueStore`] the task commits to, never the
//! task's working set: it sees committed state only, never what the task
//! processed since its last commit (the write-behind cache). It holds an
//! `Arc` of the store and a name, so it is cheap to clone and can be used
//! from any thread or tokio task while the runner steps (every store is
//! `Send + Sync`, and each commit is one atomic batch).
//!
//! **Consistency.** A single key lookup or range read is one store read,
//! so it sees exactly one commit. A [`WindowStoreReader::fetch`], which
//! reads one entry per window, checks a key that every commit rewrites
//! (the runner's checkpoint) before and after its reads and reads again
//! when a commit came between (at most [`MAX_QUERY_TRIES`] times, then
//! [`QueryError::Busy`]), so it too sees one commit.

use std::marker::PhantomData;
use std::ops::Bound;
use std::sync::Arc;

use super::codec::{CodecError, Reader, StateCodec};
use super::store::{KeyValueStore, StoreError};
use super::task::{KvState, StreamError, Task, WindowState};
use super::window::{Window, Windowed, Windows};

/// Most windows one [`WindowStoreReader::fetch`] may span (one read each).
pub const MAX_WINDOW_FETCH: u64 = 10_000;

/// Most times a multi-read query starts again because a commit came
/// between its reads.
pub const MAX_QUERY_TRIES: usize = 16;

/// Why a query failed. Nothing panics on a bad name or type.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The task has no state store of this name.
    #[error("the topology has no state store {name:?}")]
    UnknownStore {
        /// The name.
        name: String,
    },
    /// The store is of another kind (a window store asked for as a
    /// key-value store, a session or join store) or was declared with
    /// other key/value types.
    #[error("state store {name:?} is of another kind or other key/value types")]
    WrongType {
        /// The name.
        name: String,
    },
    /// The store is a global table's: it is never committed (it is rebuilt
    /// from its source), so there is no committed state to read.
    #[error("state store {name:?} is a global table's; it has no committed state")]
    GlobalStore {
        /// The name.
        name: String,
    },
    /// The driver keeps no copy of its committed state to query (the
    /// Kafka processor keeps one only when asked to).
    #[error("interactive queries are not enabled: {hint}")]
    NotEnabled {
        /// How to enable them.
        hint: &'static str,
    },
    /// The window range spans more than [`MAX_WINDOW_FETCH`] windows.
    #[error("the range spans {windows} windows; the limit is {max}")]
    TooWide {
        /// Windows in the range.
        windows: u64,
        /// The limit.
        max: u64,
    },
    /// Commits kept coming between the reads of one query
    /// ([`MAX_QUERY_TRIES`] times); try again.
    #[error("the store changed during each of {tries} tries")]
    Busy {
        /// Tries made.
        tries: usize,
    },
    /// A stored entry does not decode as the store's types.
    #[error("state store {name:?}: {source}")]
    Decode {
        /// The store.
        name: String,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// The store failed (a range larger than its `max_read` included).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A key that every commit rewrites with new bytes (the runner's
/// checkpoint): a multi-read query compares it before and after.
#[derive(Debug, Clone)]
pub struct CommitMark {
    pub(crate) space: String,
    pub(crate) key: Vec<u8>,
}

impl CommitMark {
    /// The key `key` of keyspace `space`, which the driver rewrites with
    /// new bytes in every commit's batch.
    pub fn new(space: impl Into<String>, key: impl Into<Vec<u8>>) -> Self {
        Self {
            space: space.into(),
            key: key.into(),
        }
    }
}

fn typed_err(e: StreamError) -> QueryError {
    match e {
        StreamError::UnknownStore { name } => QueryError::UnknownStore { name },
        StreamError::WrongType { name, .. } => QueryError::WrongType { name },
        StreamError::Store(e) => QueryError::Store(e),
        other => QueryError::Store(StoreError::Corrupt(other.to_string())),
    }
}

/// Reads a key-value store (a table, a non-windowed aggregate, a
/// processor's store) of a task as of its last commit.
///
/// **Order**: ranges are in the order of the keys' encoded bytes
/// ([`StateCodec`], compared byte by byte): unsigned integers (big-endian)
/// in numeric order, strings in byte (UTF-8) order, tuples field by field
/// with variable-length fields length-prefixed (so shorter strings first).
pub struct StoreReader<K, V> {
    store: Arc<dyn KeyValueStore>,
    space: String,
    _t: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for StoreReader<K, V> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            space: self.space.clone(),
            _t: PhantomData,
        }
    }
}

impl<K, V> std::fmt::Debug for StoreReader<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReader")
            .field("store", &self.space)
            .finish_non_exhaustive()
    }
}

impl<K, V> StoreReader<K, V>
where
    K: Clone + Eq + std::hash::Hash + StateCodec + Send + 'static,
    V: StateCodec + Send + 'static,
{
    /// A reader of `task`'s store `name`, committed to `store`. For
    /// drivers of a [`Task`] that keep its committed state in a store of
    /// their own (the runner, the `TestDriver` and the Kafka processor
    /// give readers through their `query_store`).
    pub fn new(task: &Task, store: Arc<dyn KeyValueStore>, name: &str) -> Result<Self, QueryError> {
        let slot = task.typed::<KvState<K, V>>(name).map_err(typed_err)?;
        if !slot.persisted() {
            return Err(QueryError::GlobalStore {
                name: name.to_owned(),
            });
        }
        Ok(Self {
            store,
            space: name.to_owned(),
            _t: PhantomData,
        })
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.space
    }

    /// The committed value of `key`.
    pub fn get(&self, key: &K) -> Result<Option<V>, QueryError> {
        self.store
            .get(&self.space, &key.to_bytes())?
            .map(|v| V::decode(&v).map_err(|e| self.dec(e)))
            .transpose()
    }

    /// The committed entries with keys between `from` and `to` (compared
    /// as encoded bytes), at most `max` (no more than the store's
    /// `max_read`), in encoded-key order. One store read: one commit.
    pub fn range(
        &self,
        from: Bound<&K>,
        to: Bound<&K>,
        max: usize,
    ) -> Result<Vec<(K, V)>, QueryError> {
        let enc = |b: Bound<&K>| match b {
            Bound::Included(k) => Bound::Included(k.to_bytes()),
            Bound::Excluded(k) => Bound::Excluded(k.to_bytes()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let (lo, hi) = (enc(from), enc(to));
        let entries = self
            .store
            .range(&self.space, as_ref(&lo), as_ref(&hi), max)?;
        entries
            .into_iter()
            .map(|(k, v)| {
                let k = K::decode(&k).map_err(|e| self.dec(e))?;
                let v = V::decode(&v).map_err(|e| self.dec(e))?;
                Ok((k, v))
            })
            .collect()
    }

    /// The first `max` committed entries, in encoded-key order.
    pub fn all(&self, max: usize) -> Result<Vec<(K, V)>, QueryError> {
        self.range(Bound::Unbounded, Bound::Unbounded, max)
    }

    fn dec(&self, source: CodecError) -> QueryError {
        QueryError::Decode {
            name: self.space.clone(),
            source,
        }
    }
}

fn as_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(k) => Bound::Included(k),
        Bound::Excluded(k) => Bound::Excluded(k),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// Reads a time-windowed aggregation's store (tumbling or hopping
/// [`Windows`]) of a task as of its last commit.
///
/// The store holds **open windows only**: a window's entries are deleted
/// by the commit after it closes (its final result was emitted). So a
/// query sees the windows that were open at the last commit.
pub struct WindowStoreReader<K, A> {
    store: Arc<dyn KeyValueStore>,
    space: String,
    windows: Windows,
    mark: Option<CommitMark>,
    _t: PhantomData<fn() -> (K, A)>,
}

impl<K, A> Clone for WindowStoreReader<K, A> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            space: self.space.clone(),
            windows: self.windows,
            mark: self.mark.clone(),
            _t: PhantomData,
        }
    }
}

impl<K, A> std::fmt::Debug for WindowStoreReader<K, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowStoreReader")
            .field("store", &self.space)
            .field("windows", &self.windows)
            .finish_non_exhaustive()
    }
}

impl<K, A> WindowStoreReader<K, A>
where
    K: Clone + Eq + std::hash::Hash + StateCodec + Send + 'static,
    A: StateCodec + Send + 'static,
{
    /// A reader of `task`'s window store `name`, committed to `store`;
    /// `mark` is rewritten by every commit (without one, a fetch may see
    /// parts of two commits). For drivers of a [`Task`], as
    /// [`StoreReader::new`].
    pub fn new(
        task: &Task,
        store: Arc<dyn KeyValueStore>,
        name: &str,
        mark: Option<CommitMark>,
    ) -> Result<Self, QueryError> {
        let windows = task
            .typed::<WindowState<K, A>>(name)
            .map_err(typed_err)?
            .windows();
        Ok(Self {
            store,
            space: name.to_owned(),
            windows,
            mark,
            _t: PhantomData,
        })
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.space
    }

    /// The windows the store aggregates over.
    pub fn windows(&self) -> Windows {
        self.windows
    }

    /// The committed aggregates of `key` in the windows that **start** in
    /// `[from_ms, to_ms]` (both inclusive, as Kafka Streams'
    /// `WindowStore::fetch(key, timeFrom, timeTo)`), by window start.
    /// Reads one entry per window start in the range (at most
    /// [`MAX_WINDOW_FETCH`], else [`QueryError::TooWide`]), all of one
    /// commit.
    pub fn fetch(&self, key: &K, from_ms: u64, to_ms: u64) -> Result<Vec<(Window, A)>, QueryError> {
        let step = self.windows.advance_ms();
        let Some(first) = from_ms.div_ceil(step).checked_mul(step) else {
            return Ok(Vec::new());
        };
        if first > to_ms {
            return Ok(Vec::new());
        }
        let n = (to_ms - first) / step + 1;
        if n > MAX_WINDOW_FETCH {
            return Err(QueryError::TooWide {
                windows: n,
                max: MAX_WINDOW_FETCH,
            });
        }
        let kb = key.to_bytes();
        self.consistent(|| {
            let mut out = Vec::new();
            for i in 0..n {
                let start = first + i * step;
                let mut k = Vec::with_capacity(8 + kb.len());
                k.extend_from_slice(&start.to_be_bytes());
                k.extend_from_slice(&kb);
                if let Some(v) = self.store.get(&self.space, &k)? {
                    out.push((self.windows.window_at(start), self.decode_value(&v)?));
                }
            }
            Ok(out)
        })
    }

    /// The committed entries of every key in the windows that start in
    /// `[from_ms, to_ms]`, at most `max` (no more than the store's
    /// `max_read`), by window start then encoded key. One store read.
    pub fn fetch_all(
        &self,
        from_ms: u64,
        to_ms: u64,
        max: usize,
    ) -> Result<Vec<(Windowed<K>, A)>, QueryError> {
        if from_ms > to_ms {
            return Ok(Vec::new());
        }
        let lo = from_ms.to_be_bytes();
        let hi = to_ms.checked_add(1).map(u64::to_be_bytes);
        let hi = match &hi {
            Some(h) => Bound::Excluded(&h[..]),
            None => Bound::Unbounded,
        };
        let entries = self
            .store
            .range(&self.space, Bound::Included(&lo[..]), hi, max)?;
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let mut r = Reader::new(&k);
            let start = u64::decode_from(&mut r).map_err(|e| self.dec(e))?;
            let key = K::decode(r.rest()).map_err(|e| self.dec(e))?;
            out.push((
                Windowed {
                    key,
                    window: self.windows.window_at(start),
                },
                self.decode_value(&v)?,
            ));
        }
        Ok(out)
    }

    /// Runs `f` until no commit came between its start and its end.
    fn consistent<T>(&self, mut f: impl FnMut() -> Result<T, QueryError>) -> Result<T, QueryError> {
        let Some(mark) = &self.mark else {
            return f();
        };
        for _ in 0..MAX_QUERY_TRIES {
            let before = self.store.get(&mark.space, &mark.key)?;
            let out = f()?;
            if self.store.get(&mark.space, &mark.key)? == before {
                return Ok(out);
            }
        }
        Err(QueryError::Busy {
            tries: MAX_QUERY_TRIES,
        })
    }

    /// A stored value: the largest record timestamp, then the aggregate.
    fn decode_value(&self, v: &[u8]) -> Result<A, QueryError> {
        let mut r = Reader::new(v);
        u64::decode_from(&mut r).map_err(|e| self.dec(e))?;
        A::decode(r.rest()).map_err(|e| self.dec(e))
    }

    fn dec(&self, source: CodecError) -> QueryError {
        QueryError::Decode {
            name: self.space.clone(),
            source,
        }
    }
}
