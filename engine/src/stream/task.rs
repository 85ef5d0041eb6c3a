//! [`Task`]: a built topology, ready to process records. Sans-I/O: it is fed
//! records and stream time, keeps its state in memory, and hands its dirty
//! state to a [`WriteBatch`] when asked to commit.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::marker::PhantomData;

use super::codec::{CodecError, StateCodec};
use super::store::{scan_all, KeyValueStore, StoreError, WriteBatch};
use super::window::{Window, Windowed, Windows};
use super::Record;

/// Why processing failed. After an error the task's in-memory state may hold
/// part of the failed record's effects: discard the task and build a new one
/// from the last commit (the runner does this by returning the error).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// No input of this name in the topology.
    #[error("the topology has no input {name:?}")]
    UnknownInput {
        /// The name.
        name: String,
    },
    /// No output of this name in the topology.
    #[error("the topology has no output {name:?}")]
    UnknownOutput {
        /// The name.
        name: String,
    },
    /// No state store of this name in the topology.
    #[error("the topology has no state store {name:?}")]
    UnknownStore {
        /// The name.
        name: String,
    },
    /// An input, output or store was asked for with other types than it
    /// was declared with.
    #[error("{what} {name:?} was declared with other key/value types")]
    WrongType {
        /// `input`, `output` or `store`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// An input record's or a stored entry's bytes could not be decoded.
    #[error("{what} {name:?}: {source}")]
    Decode {
        /// `input` or `store`.
        what: &'static str,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// A state store holds [`TaskLimits::max_state_entries`] entries.
    #[error("state store {store:?} is full ({max} entries)")]
    StateFull {
        /// The store.
        store: String,
        /// The limit.
        max: usize,
    },
    /// [`TaskLimits::max_pending_outputs`] outputs wait to be drained:
    /// commit more often.
    #[error("{max} output records are pending; commit (drain outputs) more often")]
    OutputsFull {
        /// The limit.
        max: usize,
    },
    /// The state store failed.
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    /// A processor forwarded to a child it does not have.
    #[error("processor {processor:?} has no child {child:?}")]
    UnknownChild {
        /// The processor.
        processor: String,
        /// The child asked for.
        child: String,
    },
    /// A processor asked for a store that is not attached to it.
    #[error("store {store:?} is not attached to processor {processor:?}")]
    StoreNotAttached {
        /// The processor.
        processor: String,
        /// The store asked for.
        store: String,
    },
    /// A punctuator could not be scheduled.
    #[error("processor {processor:?}: bad punctuator: {reason}")]
    BadPunctuator {
        /// The processor.
        processor: String,
        /// Why.
        reason: String,
    },
    /// A processor's own error (see [`StreamError::processor`]).
    #[error("processor {processor:?}: {reason}")]
    Processor {
        /// The processor.
        processor: String,
        /// Why.
        reason: String,
    },
    /// The task was closed ([`Task::close`]): it handles nothing more.
    #[error("the task is closed")]
    Closed,
    /// A record's headers are over the limits.
    #[error(transparent)]
    Headers(#[from] super::headers::HeaderError),
    /// A broken internal invariant (a bug): never caused by input.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl StreamError {
    /// A processor's own error, for a [`super::Processor`] to return.
    pub fn processor(processor: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Processor {
            processor: processor.into(),
            reason: reason.into(),
        }
    }
}

/// The maxima a task enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskLimits {
    /// Most entries in one state store (open window × key pairs for a
    /// window store).
    pub max_state_entries: usize,
    /// Most output records buffered between two drains.
    pub max_pending_outputs: usize,
    /// Most punctuators one processor may have scheduled at once.
    pub max_punctuators: usize,
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            max_state_entries: 50_000_000,
            max_pending_outputs: 1_000_000,
            max_punctuators: 1_024,
        }
    }
}

/// Counters a task keeps (persisted with its checkpoint by the runner).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskMetrics {
    /// Input records processed.
    pub processed: u64,
    /// Record × window pairs dropped because the window had closed (one
    /// per late record with tumbling windows).
    pub late_records: u64,
}

/// What a task must remember across restarts besides its stores: stream
/// time and its counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskMeta {
    /// The stream time reached.
    pub stream_time_ms: u64,
    /// The counters.
    pub metrics: TaskMetrics,
}

impl StateCodec for TaskMeta {
    fn encode(&self, out: &mut Vec<u8>) {
        self.stream_time_ms.encode(out);
        self.metrics.processed.encode(out);
        self.metrics.late_records.encode(out);
    }
    fn decode_from(r: &mut super::codec::Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            stream_time_ms: u64::decode_from(r)?,
            metrics: TaskMetrics {
                processed: u64::decode_from(r)?,
                late_records: u64::decode_from(r)?,
            },
        })
    }
}

/// An output record encoded for a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRecord {
    /// The output's name.
    pub output: String,
    /// The encoded key.
    pub key: Vec<u8>,
    /// The encoded value.
    pub value: Vec<u8>,
    /// The record's timestamp.
    pub timestamp_ms: u64,
    /// The record's headers.
    pub headers: super::headers::Headers,
}

// ---------------------------------------------------------------------------
// Hashing

/// FxHash (the rustc hasher): fast and deterministic. Operator state maps
/// use it; their iteration order is never observable (emissions are
/// sorted).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FxBuild;

pub(crate) struct Fx(u64);

impl Fx {
    #[inline]
    fn add(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for Fx {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            self.add(u64::from_le_bytes(a));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut a = [0u8; 8];
            a[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(a) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

impl BuildHasher for FxBuild {
    type Hasher = Fx;
    #[inline]
    fn build_hasher(&self) -> Fx {
        Fx(0)
    }
}

pub(crate) type FxMap<K, V> = HashMap<K, V, FxBuild>;

// ---------------------------------------------------------------------------
// The processing context and state slots

/// What every node of a running task can reach.
pub(crate) struct Ctx {
    pub(crate) stream_time: u64,
    /// The earliest stream time at which some window closes.
    pub(crate) next_deadline: u64,
    pub(crate) states: Vec<Box<dyn StateSlot>>,
    pub(crate) outputs: Vec<Box<dyn OutputAny>>,
    pub(crate) pending_outputs: usize,
    pub(crate) metrics: TaskMetrics,
    pub(crate) limits: TaskLimits,
    /// Why the nodes' `advance` is being called.
    pub(crate) signal: Signal,
    /// The last wall-clock time the task was given.
    pub(crate) wall_time: Option<u64>,
    /// The earliest wall-clock time at which some punctuator is due (0: a
    /// punctuator waits for the first wall-clock time to start counting).
    pub(crate) next_wall: u64,
    /// The earliest stream time at which some punctuator is due.
    pub(crate) punct_deadline: u64,
    /// Punctuations fired.
    pub(crate) punctuations: u64,
}

/// Why a task walks its nodes' `advance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Stream time moved: close due windows, fire stream-time punctuators.
    StreamTime,
    /// Wall-clock time moved: fire wall-clock punctuators.
    WallClock,
    /// Before the first record: initialise processors.
    Init,
    /// The task is closing: close processors.
    Close,
}

impl Ctx {
    #[inline]
    pub(crate) fn state_mut<S: 'static>(&mut self, id: usize) -> Result<&mut S, StreamError> {
        self.states
            .get_mut(id)
            .and_then(|s| s.downcast_mut::<S>())
            .ok_or(StreamError::Internal("state slot of another type"))
    }

    #[inline]
    pub(crate) fn emit<K: 'static, V: 'static>(
        &mut self,
        id: usize,
        rec: Record<K, V>,
    ) -> Result<(), StreamError> {
        if self.pending_outputs >= self.limits.max_pending_outputs {
            return Err(StreamError::OutputsFull {
                max: self.limits.max_pending_outputs,
            });
        }
        let buf = self
            .outputs
            .get_mut(id)
            .and_then(|o| o.as_any_mut().downcast_mut::<OutputBuf<K, V>>())
            .ok_or(StreamError::Internal("output buffer of another type"))?;
        buf.records.push(rec);
        self.pending_outputs += 1;
        Ok(())
    }
}

/// A state store's in-memory working set, type-erased (`dyn StateSlot`'s
/// `downcast_ref` and `downcast_mut` give it back typed).
pub(crate) trait StateSlot: Any + Send {
    fn name(&self) -> &str;
    /// Writes every change since the last flush into `batch`.
    fn flush(&mut self, batch: &mut WriteBatch);
    /// Empties the working set (before a restore).
    fn reset(&mut self);
    /// Adds one stored entry, as [`flush`](StateSlot::flush) wrote it, to
    /// the working set (during a restore).
    fn load_entry(&mut self, key: &[u8], value: &[u8]) -> Result<(), CodecError>;
    /// Replaces the working set with the store's contents.
    fn restore(&mut self, store: &dyn KeyValueStore) -> Result<(), StreamError> {
        self.reset();
        for (k, v) in scan_all(store, self.name())? {
            self.load_entry(&k, &v)
                .map_err(|source| StreamError::Decode {
                    what: "store",
                    name: self.name().to_owned(),
                    source,
                })?;
        }
        Ok(())
    }
    /// The earliest stream time at which this slot has work to do.
    fn next_deadline(&self) -> u64 {
        u64::MAX
    }
    fn len(&self) -> usize;
}

impl dyn StateSlot {
    /// The working set as its own type, if it is an `S`.
    pub(crate) fn downcast_ref<S: 'static>(&self) -> Option<&S> {
        (self as &dyn Any).downcast_ref()
    }

    /// The working set as its own type, if it is an `S`.
    pub(crate) fn downcast_mut<S: 'static>(&mut self) -> Option<&mut S> {
        (self as &mut dyn Any).downcast_mut()
    }
}

struct KvEntry<V> {
    v: V,
    dirty: bool,
}

/// A key-value state (a table or a non-windowed aggregate): the whole
/// table in memory, changes written behind at commit.
pub(crate) struct KvState<K, V> {
    name: String,
    map: FxMap<K, KvEntry<V>>,
    dirty: Vec<K>,
    deleted: Vec<K>,
    max_entries: usize,
    /// Whether commits write it to the store (false for a global table,
    /// rebuilt from its source instead).
    persist: bool,
}

impl<K, V> KvState<K, V>
where
    K: Clone + Eq + Hash + StateCodec + Send + 'static,
    V: StateCodec + Send + 'static,
{
    pub(crate) fn new(name: &str, max_entries: usize) -> Self {
        Self {
            name: name.to_owned(),
            map: FxMap::default(),
            dirty: Vec::new(),
            deleted: Vec::new(),
            max_entries,
            persist: true,
        }
    }

    /// A table that is never written to the store nor restored from it:
    /// a global table's working set, rebuilt from its source.
    pub(crate) fn global(name: &str, max_entries: usize) -> Self {
        Self {
            persist: false,
            ..Self::new(name, max_entries)
        }
    }

    /// Whether commits write it to the store (false for a global table).
    pub(crate) fn persisted(&self) -> bool {
        self.persist
    }

    #[inline]
    pub(crate) fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|e| &e.v)
    }

    #[inline]
    pub(crate) fn upsert(&mut self, k: K, v: V) -> Result<(), StreamError> {
        if let Some(e) = self.map.get_mut(&k) {
            e.v = v;
            if !e.dirty {
                e.dirty = true;
                self.dirty.push(k);
            }
            return Ok(());
        }
        self.check_room()?;
        self.dirty.push(k.clone());
        self.map.insert(k, KvEntry { v, dirty: true });
        Ok(())
    }

    /// Updates the value of `k` in place (creating it with `init` first),
    /// and returns it.
    #[inline]
    pub(crate) fn update(
        &mut self,
        k: &K,
        init: impl FnOnce() -> V,
        f: impl FnOnce(&mut V),
    ) -> Result<&V, StreamError> {
        if !self.map.contains_key(k) {
            self.check_room()?;
            self.map.insert(
                k.clone(),
                KvEntry {
                    v: init(),
                    dirty: false,
                },
            );
        }
        let e = self
            .map
            .get_mut(k)
            .ok_or(StreamError::Internal("entry vanished"))?;
        f(&mut e.v);
        if !e.dirty {
            e.dirty = true;
            self.dirty.push(k.clone());
        }
        Ok(&e.v)
    }

    pub(crate) fn remove(&mut self, k: &K) -> Option<V> {
        let e = self.map.remove(k)?;
        self.deleted.push(k.clone());
        Some(e.v)
    }

    fn check_room(&self) -> Result<(), StreamError> {
        if self.map.len() >= self.max_entries {
            return Err(StreamError::StateFull {
                store: self.name.clone(),
                max: self.max_entries,
            });
        }
        Ok(())
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().map(|(k, e)| (k, &e.v))
    }
}

impl<K, V> StateSlot for KvState<K, V>
where
    K: Clone + Eq + Hash + StateCodec + Send + 'static,
    V: StateCodec + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn flush(&mut self, batch: &mut WriteBatch) {
        if !self.persist {
            // A global table has no changelog: forget what changed.
            for k in self.dirty.drain(..) {
                if let Some(e) = self.map.get_mut(&k) {
                    e.dirty = false;
                }
            }
            self.deleted.clear();
            return;
        }
        for k in self.deleted.drain(..) {
            batch.delete(&self.name, k.to_bytes());
        }
        for k in self.dirty.drain(..) {
            if let Some(e) = self.map.get_mut(&k) {
                if e.dirty {
                    e.dirty = false;
                    batch.put(&self.name, k.to_bytes(), e.v.to_bytes());
                }
            }
        }
    }
    fn reset(&mut self) {
        self.map.clear();
        self.dirty.clear();
        self.deleted.clear();
    }
    fn load_entry(&mut self, k: &[u8], v: &[u8]) -> Result<(), CodecError> {
        let k = K::decode(k)?;
        let v = V::decode(v)?;
        self.map.insert(k, KvEntry { v, dirty: false });
        Ok(())
    }
    fn restore(&mut self, store: &dyn KeyValueStore) -> Result<(), StreamError> {
        if !self.persist {
            // A global table is rebuilt from its source, never from the
            // store: it keeps what it holds.
            return Ok(());
        }
        self.reset();
        for (k, v) in scan_all(store, &self.name)? {
            self.load_entry(&k, &v)
                .map_err(|source| StreamError::Decode {
                    what: "store",
                    name: self.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

pub(crate) struct WSlot<A> {
    pub(crate) agg: A,
    pub(crate) max_ts: u64,
    dirty: bool,
    persisted: bool,
}

/// The open windows of a windowed aggregation: window start → key →
/// aggregate. Closed windows are removed (and deleted from the store).
pub(crate) struct WindowState<K, A> {
    name: String,
    windows: Windows,
    open: BTreeMap<u64, FxMap<K, WSlot<A>>>,
    dirty: Vec<(u64, K)>,
    deleted: Vec<(u64, K)>,
    entries: usize,
    max_entries: usize,
}

/// The stored key of a window entry: start (big-endian) then the key.
fn window_key<K: StateCodec>(start: u64, k: &K) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&start.to_be_bytes());
    k.encode(&mut b);
    b
}

impl<K, A> WindowState<K, A>
where
    K: Clone + Eq + Hash + StateCodec + Send + 'static,
    A: StateCodec + Send + 'static,
{
    pub(crate) fn new(name: &str, windows: Windows, max_entries: usize) -> Self {
        Self {
            name: name.to_owned(),
            windows,
            open: BTreeMap::new(),
            dirty: Vec::new(),
            deleted: Vec::new(),
            entries: 0,
            max_entries,
        }
    }

    /// Applies `f` to the aggregate of `(start, k)`, creating it with
    /// `init` first. Returns the slot and whether the window start is new.
    #[inline]
    pub(crate) fn update(
        &mut self,
        start: u64,
        k: &K,
        ts: u64,
        init: impl FnOnce() -> A,
        f: impl FnOnce(&mut A),
    ) -> Result<(&WSlot<A>, bool), StreamError> {
        let keys = self.open.entry(start).or_default();
        // A window start's map only empties when the window closes (and is
        // removed), so an empty one was just created.
        let new_start = keys.is_empty();
        if !keys.contains_key(k) {
            if self.entries >= self.max_entries {
                return Err(StreamError::StateFull {
                    store: self.name.clone(),
                    max: self.max_entries,
                });
            }
            self.entries += 1;
            keys.insert(
                k.clone(),
                WSlot {
                    agg: init(),
                    max_ts: ts,
                    dirty: false,
                    persisted: false,
                },
            );
        }
        let slot = keys
            .get_mut(k)
            .ok_or(StreamError::Internal("window entry vanished"))?;
        f(&mut slot.agg);
        slot.max_ts = slot.max_ts.max(ts);
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push((start, k.clone()));
        }
        Ok((slot, new_start))
    }

    /// Removes the windows closed at `stream_time` and returns their
    /// entries, each window's sorted by encoded key.
    pub(crate) fn close(&mut self, stream_time: u64, out: &mut Vec<(Windowed<K>, A, u64)>) {
        while let Some(entry) = self.open.first_entry() {
            let start = *entry.key();
            if self.windows.close_ms(start) > stream_time {
                break;
            }
            let keys = entry.remove();
            let window = self.windows.window_at(start);
            let mut closed: Vec<(Vec<u8>, K, WSlot<A>)> = keys
                .into_iter()
                .map(|(k, s)| (k.to_bytes(), k, s))
                .collect();
            closed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            self.entries -= closed.len();
            for (_, key, slot) in closed {
                if slot.persisted {
                    self.deleted.push((start, key.clone()));
                }
                out.push((Windowed { key, window }, slot.agg, slot.max_ts));
            }
        }
    }

    /// The windows this store aggregates over.
    pub(crate) fn windows(&self) -> Windows {
        self.windows
    }

    pub(crate) fn get(&self, start: u64, k: &K) -> Option<&A> {
        self.open.get(&start)?.get(k).map(|s| &s.agg)
    }

    pub(crate) fn entries(&self) -> Vec<(Windowed<K>, &A)> {
        let mut v = Vec::new();
        for (&start, keys) in &self.open {
            for (k, s) in keys {
                v.push((
                    Windowed {
                        key: k.clone(),
                        window: self.windows.window_at(start),
                    },
                    &s.agg,
                ));
            }
        }
        v
    }
}

impl<K, A> StateSlot for WindowState<K, A>
where
    K: Clone + Eq + Hash + StateCodec + Send + 'static,
    A: StateCodec + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn flush(&mut self, batch: &mut WriteBatch) {
        for (start, k) in self.deleted.drain(..) {
            batch.delete(&self.name, window_key(start, &k));
        }
        for (start, k) in self.dirty.drain(..) {
            let Some(slot) = self.open.get_mut(&start).and_then(|m| m.get_mut(&k)) else {
                continue; // closed since: deleted above if it was ever stored
            };
            if slot.dirty {
                slot.dirty = false;
                slot.persisted = true;
                let mut v = Vec::with_capacity(16);
                slot.max_ts.encode(&mut v);
                slot.agg.encode(&mut v);
                batch.put(&self.name, window_key(start, &k), v);
            }
        }
    }
    fn reset(&mut self) {
        self.open.clear();
        self.dirty.clear();
        self.deleted.clear();
        self.entries = 0;
    }
    fn load_entry(&mut self, k: &[u8], v: &[u8]) -> Result<(), CodecError> {
        let mut r = super::codec::Reader::new(k);
        let start = u64::decode_from(&mut r)?;
        let key = K::decode(r.rest())?;
        let mut r = super::codec::Reader::new(v);
        let max_ts = u64::decode_from(&mut r)?;
        let agg = A::decode(r.rest())?;
        self.entries += 1;
        self.open.entry(start).or_default().insert(
            key,
            WSlot {
                agg,
                max_ts,
                dirty: false,
                persisted: true,
            },
        );
        Ok(())
    }
    fn next_deadline(&self) -> u64 {
        self.open
            .keys()
            .next()
            .map_or(u64::MAX, |&s| self.windows.close_ms(s))
    }
    fn len(&self) -> usize {
        self.entries
    }
}

// ---------------------------------------------------------------------------
// Outputs

/// An output's buffered records, type-erased.
pub(crate) trait OutputAny: Send {
    fn name(&self) -> &str;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn len(&self) -> usize;
    fn drain_encoded(&mut self, out: &mut Vec<EncodedRecord>);
}

pub(crate) struct OutputBuf<K, V> {
    pub(crate) name: String,
    pub(crate) records: Vec<Record<K, V>>,
}

impl<K: StateCodec + Send + 'static, V: StateCodec + Send + 'static> OutputAny for OutputBuf<K, V> {
    fn name(&self) -> &str {
        &self.name
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn len(&self) -> usize {
        self.records.len()
    }
    fn drain_encoded(&mut self, out: &mut Vec<EncodedRecord>) {
        for r in self.records.drain(..) {
            out.push(EncodedRecord {
                output: self.name.clone(),
                key: r.key.to_bytes(),
                value: r.value.to_bytes(),
                timestamp_ms: r.timestamp_ms,
                headers: r.headers,
            });
        }
    }
}

// ---------------------------------------------------------------------------
// Inputs and the task

/// A node of a running topology: receives records of type `(K, V)`.
pub(crate) trait Node<K, V>: Send {
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError>;
    /// Stream time moved to `ctx.stream_time`: close what is due, then
    /// tell the children.
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError>;
}

/// An input of a running task, type-erased.
pub(crate) trait InputAny: Send {
    fn as_any_mut(&mut self) -> &mut dyn Any;
    fn process_bytes(
        &mut self,
        ctx: &mut Ctx,
        key: &[u8],
        value: &[u8],
        ts: u64,
        headers: super::headers::Headers,
    ) -> Result<(), StreamError>;
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError>;
    /// Encodes `rec` if it is a `Record` of this input's types.
    fn encode_record(&self, rec: &dyn Any) -> Option<(Vec<u8>, Vec<u8>)>;
    /// Removes the encoded key `key` from the table this input writes (a
    /// global table's source given a tombstone). Returns `false` for an
    /// input that writes no table.
    fn delete_bytes(&mut self, _ctx: &mut Ctx, _key: &[u8]) -> Result<bool, StreamError> {
        Ok(false)
    }
}

/// The source of a global table: its [`Root`] (typed records go through
/// it) and the table's state slot (tombstones remove keys from it).
pub(crate) struct GlobalRoot<K, V, VT> {
    pub(crate) root: Root<K, V>,
    pub(crate) state: usize,
    pub(crate) _t: PhantomData<fn(VT)>,
}

impl<K, V, VT> InputAny for GlobalRoot<K, V, VT>
where
    K: Clone + Eq + Hash + StateCodec + Send + 'static,
    V: StateCodec + Send + 'static,
    VT: StateCodec + Send + 'static,
{
    fn as_any_mut(&mut self) -> &mut dyn Any {
        &mut self.root
    }
    fn process_bytes(
        &mut self,
        ctx: &mut Ctx,
        key: &[u8],
        value: &[u8],
        ts: u64,
        headers: super::headers::Headers,
    ) -> Result<(), StreamError> {
        self.root.process_bytes(ctx, key, value, ts, headers)
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.root.advance(ctx)
    }
    fn encode_record(&self, rec: &dyn Any) -> Option<(Vec<u8>, Vec<u8>)> {
        self.root.encode_record(rec)
    }
    fn delete_bytes(&mut self, ctx: &mut Ctx, key: &[u8]) -> Result<bool, StreamError> {
        let key = K::decode(key).map_err(|source| StreamError::Decode {
            what: "input",
            name: self.root.name.clone(),
            source,
        })?;
        ctx.state_mut::<KvState<K, VT>>(self.state)?.remove(&key);
        Ok(true)
    }
}

pub(crate) struct Root<K, V> {
    pub(crate) name: String,
    pub(crate) node: Box<dyn Node<K, V>>,
}

impl<K, V> InputAny for Root<K, V>
where
    K: StateCodec + Send + 'static,
    V: StateCodec + Send + 'static,
{
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn process_bytes(
        &mut self,
        ctx: &mut Ctx,
        key: &[u8],
        value: &[u8],
        ts: u64,
        headers: super::headers::Headers,
    ) -> Result<(), StreamError> {
        let dec = |source| StreamError::Decode {
            what: "input",
            name: self.name.clone(),
            source,
        };
        let key = K::decode(key).map_err(dec)?;
        let value = V::decode(value).map_err(dec)?;
        self.node.process(
            ctx,
            Record {
                key,
                value,
                timestamp_ms: ts,
                headers,
            },
        )
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.node.advance(ctx)
    }
    fn encode_record(&self, rec: &dyn Any) -> Option<(Vec<u8>, Vec<u8>)> {
        let rec = rec.downcast_ref::<Record<K, V>>()?;
        Some((rec.key.to_bytes(), rec.value.to_bytes()))
    }
}

/// A typed handle on an input of a [`Task`] (see [`Task::input`]).
#[derive(Debug)]
pub struct Input<K, V> {
    index: usize,
    /// Whether it is the source of a global table.
    global: bool,
    _t: PhantomData<fn(K, V)>,
}

impl<K, V> Clone for Input<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, V> Copy for Input<K, V> {}

/// A built topology, ready to process records: the sans-I/O core that the
/// [`super::TestDriver`] and the [`super::StreamRunner`] drive.
///
/// Stream time is the largest timestamp of any record processed (or
/// [`Task::advance_time`] given); it never reads a clock. State lives in
/// memory while the task runs; [`Task::flush`] writes what changed since the
/// last flush into a [`WriteBatch`], and [`Task::restore`] loads it back.
pub struct Task {
    pub(crate) ctx: Ctx,
    pub(crate) inputs: Vec<Box<dyn InputAny>>,
    pub(crate) input_names: HashMap<String, usize>,
    pub(crate) input_types: Vec<std::any::TypeId>,
    /// The sources of global tables: not stream inputs (they never move
    /// stream time), each writing one global table.
    pub(crate) global_inputs: Vec<Box<dyn InputAny>>,
    pub(crate) global_names: HashMap<String, usize>,
    pub(crate) global_types: Vec<std::any::TypeId>,
    /// Global-table updates applied since the task was built.
    pub(crate) global_updates: u64,
    /// The internal streams of repartitions: each is both an output and
    /// an input of the task.
    pub(crate) repartitions: Vec<String>,
    /// Whether the processors were initialised.
    pub(crate) initialized: bool,
    /// Whether the task was closed.
    pub(crate) closed: bool,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("stream_time", &self.ctx.stream_time)
            .field("inputs", &self.input_names.keys().collect::<Vec<_>>())
            .field(
                "global_sources",
                &self.global_names.keys().collect::<Vec<_>>(),
            )
            .field(
                "stores",
                &self.ctx.states.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .field(
                "outputs",
                &self
                    .ctx
                    .outputs
                    .iter()
                    .map(|o| o.name())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Task {
    /// A typed handle on the input `name` (declared with
    /// [`super::Topology::stream`] with the same types), or on the source
    /// of a global table (declared with [`super::Topology::global_table`]).
    pub fn input<K: 'static, V: 'static>(&self, name: &str) -> Result<Input<K, V>, StreamError> {
        let (index, global, ty) = if let Some(&i) = self.input_names.get(name) {
            (i, false, self.input_types.get(i))
        } else if let Some(&i) = self.global_names.get(name) {
            (i, true, self.global_types.get(i))
        } else {
            return Err(StreamError::UnknownInput {
                name: name.to_owned(),
            });
        };
        if ty != Some(&std::any::TypeId::of::<(K, V)>()) {
            return Err(StreamError::WrongType {
                what: "input",
                name: name.to_owned(),
            });
        }
        Ok(Input {
            index,
            global,
            _t: PhantomData,
        })
    }

    /// Whether `name` is the source of a global table.
    pub fn is_global_source(&self, name: &str) -> bool {
        self.global_names.contains_key(name)
    }

    /// The names of the global tables' sources.
    pub fn global_sources(&self) -> Vec<&str> {
        self.global_names.keys().map(String::as_str).collect()
    }

    /// Global-table updates applied since the task was built (not
    /// persisted: a restart applies the whole source again).
    pub fn global_updates(&self) -> u64 {
        self.global_updates
    }

    /// Applies an encoded record of the global table source `name` to its
    /// table (a [`super::GlobalKTable`]): it neither moves stream time nor
    /// counts as processed, and it is not part of any commit. Returns
    /// `false` (and does nothing) when `name` is not a global source.
    pub fn process_global_encoded(
        &mut self,
        name: &str,
        key: &[u8],
        value: &[u8],
        timestamp_ms: u64,
        headers: super::headers::Headers,
    ) -> Result<bool, StreamError> {
        let Some(&index) = self.global_names.get(name) else {
            return Ok(false);
        };
        if self.closed {
            return Err(StreamError::Closed);
        }
        let root = self
            .global_inputs
            .get_mut(index)
            .ok_or(StreamError::Internal("global input missing"))?;
        root.process_bytes(&mut self.ctx, key, value, timestamp_ms, headers)?;
        self.global_updates += 1;
        Ok(true)
    }

    /// Applies a **tombstone** (a record with no value, as a Kafka topic
    /// holds them) of the global table source `name`: removes the encoded
    /// key `key` from its table, whatever the table's value type (plain
    /// or with deletes). Returns `false` (and does nothing) when `name` is
    /// not a global source.
    pub fn delete_global_encoded(&mut self, name: &str, key: &[u8]) -> Result<bool, StreamError> {
        let Some(&index) = self.global_names.get(name) else {
            return Ok(false);
        };
        if self.closed {
            return Err(StreamError::Closed);
        }
        let root = self
            .global_inputs
            .get_mut(index)
            .ok_or(StreamError::Internal("global input missing"))?;
        if !root.delete_bytes(&mut self.ctx, key)? {
            return Err(StreamError::Internal("global source writes no table"));
        }
        self.global_updates += 1;
        Ok(true)
    }

    /// Encodes `record` as input `input` would read it (for a driver that
    /// keeps a global source's records to replay them).
    pub(crate) fn encode_input<K: 'static, V: 'static>(
        &self,
        input: Input<K, V>,
        record: &Record<K, V>,
    ) -> Option<(Vec<u8>, Vec<u8>)> {
        let roots = if input.global {
            &self.global_inputs
        } else {
            &self.inputs
        };
        roots.get(input.index)?.encode_record(record)
    }

    /// Processes one record of `input`: advances stream time to its
    /// timestamp if that is later (closing due windows first), then passes
    /// it through the topology. A record of a global table's source
    /// updates that table only (see [`Task::process_global_encoded`]).
    #[inline]
    pub fn process<K: 'static, V: 'static>(
        &mut self,
        input: Input<K, V>,
        record: Record<K, V>,
    ) -> Result<(), StreamError> {
        if input.global {
            return self.process_global(input, record);
        }
        self.ensure_init()?;
        self.observe(record.timestamp_ms)?;
        self.ctx.metrics.processed += 1;
        let root = self
            .inputs
            .get_mut(input.index)
            .and_then(|r| r.as_any_mut().downcast_mut::<Root<K, V>>())
            .ok_or(StreamError::Internal("input of another type"))?;
        root.node.process(&mut self.ctx, record)
    }

    fn process_global<K: 'static, V: 'static>(
        &mut self,
        input: Input<K, V>,
        record: Record<K, V>,
    ) -> Result<(), StreamError> {
        if self.closed {
            return Err(StreamError::Closed);
        }
        let root = self
            .global_inputs
            .get_mut(input.index)
            .and_then(|r| r.as_any_mut().downcast_mut::<Root<K, V>>())
            .ok_or(StreamError::Internal("global input of another type"))?;
        root.node.process(&mut self.ctx, record)?;
        self.global_updates += 1;
        Ok(())
    }

    /// Processes an encoded record of the input `name`, without headers.
    /// Returns `false` (and does nothing) when the topology has no such
    /// input.
    pub fn process_bytes(
        &mut self,
        name: &str,
        key: &[u8],
        value: &[u8],
        timestamp_ms: u64,
    ) -> Result<bool, StreamError> {
        self.process_encoded(
            name,
            key,
            value,
            timestamp_ms,
            super::headers::Headers::new(),
        )
    }

    /// Processes an encoded record of the input `name` with its headers.
    /// Returns `false` (and does nothing) when the topology has no such
    /// input. A global table's source is not an input here: its records
    /// are skipped too (they go to [`Task::process_global_encoded`]).
    pub fn process_encoded(
        &mut self,
        name: &str,
        key: &[u8],
        value: &[u8],
        timestamp_ms: u64,
        headers: super::headers::Headers,
    ) -> Result<bool, StreamError> {
        let Some(&index) = self.input_names.get(name) else {
            return Ok(false);
        };
        self.ensure_init()?;
        self.observe(timestamp_ms)?;
        self.ctx.metrics.processed += 1;
        self.inputs[index].process_bytes(&mut self.ctx, key, value, timestamp_ms, headers)?;
        Ok(true)
    }

    /// Moves stream time forward to `to_ms` (never back), closing the
    /// windows and firing the stream-time punctuators that are due.
    pub fn advance_time(&mut self, to_ms: u64) -> Result<(), StreamError> {
        self.ensure_init()?;
        self.observe(to_ms)
    }

    /// Tells the task the wall-clock time (read by its driver from a
    /// [`crate::Clock`]; the task itself never reads one) and fires the
    /// wall-clock punctuators that are due. An earlier time than the last
    /// one given is ignored.
    ///
    /// Returns whether a punctuator fired.
    pub fn punctuate_wall_clock(&mut self, now_ms: u64) -> Result<bool, StreamError> {
        self.ensure_init()?;
        if self.ctx.wall_time.is_some_and(|w| now_ms <= w) {
            return Ok(false);
        }
        self.ctx.wall_time = Some(now_ms);
        let before = self.ctx.punctuations;
        if now_ms >= self.ctx.next_wall {
            self.signal(Signal::WallClock)?;
        }
        Ok(self.ctx.punctuations != before)
    }

    /// Punctuations fired since the task was built (not persisted).
    pub fn punctuations(&self) -> u64 {
        self.ctx.punctuations
    }

    /// The last wall-clock time given to [`Task::punctuate_wall_clock`].
    pub fn wall_clock_ms(&self) -> Option<u64> {
        self.ctx.wall_time
    }

    /// Closes the task's processors ([`super::Processor::close`]); the task
    /// handles nothing more ([`StreamError::Closed`]). Idempotent.
    pub fn close(&mut self) -> Result<(), StreamError> {
        if self.initialized && !self.closed {
            self.closed = true;
            self.signal(Signal::Close)?;
        }
        self.closed = true;
        Ok(())
    }

    /// Initialises the processors, once, before the first thing they
    /// handle (after any restore).
    #[inline]
    fn ensure_init(&mut self) -> Result<(), StreamError> {
        if self.closed {
            return Err(StreamError::Closed);
        }
        if !self.initialized {
            self.initialized = true;
            self.signal(Signal::Init)?;
        }
        Ok(())
    }

    #[inline]
    fn observe(&mut self, ts: u64) -> Result<(), StreamError> {
        if ts > self.ctx.stream_time {
            self.ctx.stream_time = ts;
            if ts >= self.ctx.next_deadline {
                self.signal(Signal::StreamTime)?;
            }
        }
        Ok(())
    }

    /// Walks every node's `advance` for `signal`, then recomputes the
    /// deadlines.
    fn signal(&mut self, signal: Signal) -> Result<(), StreamError> {
        self.ctx.signal = signal;
        self.ctx.punct_deadline = u64::MAX;
        self.ctx.next_wall = u64::MAX;
        for root in &mut self.inputs {
            root.advance(&mut self.ctx)?;
        }
        self.ctx.next_deadline = self.states_deadline().min(self.ctx.punct_deadline);
        Ok(())
    }

    fn states_deadline(&self) -> u64 {
        self.ctx
            .states
            .iter()
            .map(|s| s.next_deadline())
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The stream time.
    pub fn stream_time(&self) -> u64 {
        self.ctx.stream_time
    }

    /// The counters.
    pub fn metrics(&self) -> TaskMetrics {
        self.ctx.metrics
    }

    /// Stream time and counters, to persist with a checkpoint.
    pub fn meta(&self) -> TaskMeta {
        TaskMeta {
            stream_time_ms: self.ctx.stream_time,
            metrics: self.ctx.metrics,
        }
    }

    /// Sets stream time and counters from a checkpoint (before processing).
    pub fn set_meta(&mut self, meta: TaskMeta) {
        self.ctx.stream_time = meta.stream_time_ms;
        self.ctx.metrics = meta.metrics;
        self.ctx.next_deadline = self.states_deadline().min(self.ctx.punct_deadline);
    }

    /// Takes the records buffered for output `name`.
    pub fn take_output<K: 'static, V: 'static>(
        &mut self,
        name: &str,
    ) -> Result<Vec<Record<K, V>>, StreamError> {
        let out = self
            .ctx
            .outputs
            .iter_mut()
            .find(|o| o.name() == name)
            .ok_or_else(|| StreamError::UnknownOutput {
                name: name.to_owned(),
            })?;
        let n = out.len();
        let buf = out
            .as_any_mut()
            .downcast_mut::<OutputBuf<K, V>>()
            .ok_or_else(|| StreamError::WrongType {
                what: "output",
                name: name.to_owned(),
            })?;
        self.ctx.pending_outputs -= n;
        Ok(std::mem::take(&mut buf.records))
    }

    /// Takes every buffered output record, encoded (grouped by output, in
    /// the order outputs were declared).
    pub fn drain_outputs(&mut self, out: &mut Vec<EncodedRecord>) {
        for o in &mut self.ctx.outputs {
            o.drain_encoded(out);
        }
        self.ctx.pending_outputs = 0;
    }

    /// The internal streams of the topology's repartitions
    /// ([`super::KStream::repartition`], [`super::KStream::group_by`]),
    /// named `<name>-repartition`: each is an output of the task (what
    /// the upstream writes) and an input (what the downstream reads). A
    /// driver must bring each record written to one back to the task
    /// through [`Task::process_encoded`] under the same name, once: the
    /// [`super::TestDriver`] does it at once, the
    /// [`super::StreamRunner`] through its sink and source (the same
    /// [`crate::EventLog`]), Kafka through an internal topic.
    pub fn repartitions(&self) -> &[String] {
        &self.repartitions
    }

    /// Whether `name` is the internal stream of a repartition.
    pub fn is_repartition(&self, name: &str) -> bool {
        self.repartitions.iter().any(|r| r == name)
    }

    /// Takes the buffered records of the repartitions' internal streams
    /// only, encoded (the other outputs stay buffered).
    pub fn drain_repartitions(&mut self, out: &mut Vec<EncodedRecord>) {
        if self.repartitions.is_empty() {
            return;
        }
        for o in &mut self.ctx.outputs {
            if self.repartitions.iter().any(|r| r == o.name()) {
                self.ctx.pending_outputs -= o.len();
                o.drain_encoded(out);
            }
        }
    }

    /// Output records waiting to be taken.
    pub fn pending_outputs(&self) -> usize {
        self.ctx.pending_outputs
    }

    /// Writes every state change since the last flush into `batch` (one
    /// keyspace per store, named as the store).
    pub fn flush(&mut self, batch: &mut WriteBatch) {
        for s in &mut self.ctx.states {
            s.flush(batch);
        }
    }

    /// Replaces every store's working set with what `store` holds.
    pub fn restore(&mut self, store: &dyn KeyValueStore) -> Result<(), StreamError> {
        for s in &mut self.ctx.states {
            s.restore(store)?;
        }
        self.set_meta(self.meta());
        Ok(())
    }

    /// The names of the task's state stores.
    pub fn store_names(&self) -> Vec<&str> {
        self.ctx.states.iter().map(|s| s.name()).collect()
    }

    /// Entries in store `name` (open window × key pairs for a window store).
    pub fn store_len(&self, name: &str) -> Result<usize, StreamError> {
        Ok(self.slot(name)?.len())
    }

    fn slot(&self, name: &str) -> Result<&dyn StateSlot, StreamError> {
        self.ctx
            .states
            .iter()
            .find(|s| s.name() == name)
            .map(|s| &**s)
            .ok_or_else(|| StreamError::UnknownStore {
                name: name.to_owned(),
            })
    }

    pub(crate) fn typed<S: 'static>(&self, name: &str) -> Result<&S, StreamError> {
        self.slot(name)?
            .downcast_ref::<S>()
            .ok_or_else(|| StreamError::WrongType {
                what: "store",
                name: name.to_owned(),
            })
    }

    /// The value of `key` in the table or aggregate store `name`.
    pub fn table_get<K, V>(&self, name: &str, key: &K) -> Result<Option<V>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        V: Clone + StateCodec + Send + 'static,
    {
        Ok(self.typed::<KvState<K, V>>(name)?.get(key).cloned())
    }

    /// Every entry of the table or aggregate store `name`, sorted by
    /// encoded key.
    pub fn table_entries<K, V>(&self, name: &str) -> Result<Vec<(K, V)>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        V: Clone + StateCodec + Send + 'static,
    {
        let mut v: Vec<(Vec<u8>, K, V)> = self
            .typed::<KvState<K, V>>(name)?
            .entries()
            .map(|(k, v)| (k.to_bytes(), k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v.into_iter().map(|(_, k, v)| (k, v)).collect())
    }

    /// The aggregate of `key` in the open window starting at `start_ms` of
    /// the window store `name` (`None` once the window closed).
    pub fn window_get<K, A>(
        &self,
        name: &str,
        key: &K,
        start_ms: u64,
    ) -> Result<Option<A>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        A: Clone + StateCodec + Send + 'static,
    {
        Ok(self
            .typed::<WindowState<K, A>>(name)?
            .get(start_ms, key)
            .cloned())
    }

    /// Every open session of the session store `name` (of a
    /// [`super::SessionWindowedStream`] aggregation), by session end, then
    /// encoded key.
    pub fn session_entries<K, A>(&self, name: &str) -> Result<Vec<(Windowed<K>, A)>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        A: Clone + StateCodec + Send + 'static,
    {
        Ok(self
            .typed::<super::session_store::SessionState<K, A>>(name)?
            .entries()
            .into_iter()
            .map(|(w, a)| (w, a.clone()))
            .collect())
    }

    /// The records a stream-stream join's store `name` keeps, as `(left,
    /// timestamp, key)` (`left` false for the right side), left side first,
    /// each side by timestamp then arrival.
    pub fn join_buffer<K, VL, VR>(&self, name: &str) -> Result<Vec<(bool, u64, K)>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        VL: StateCodec + Send + 'static,
        VR: StateCodec + Send + 'static,
    {
        Ok(self
            .typed::<super::join_store::JoinState<K, VL, VR>>(name)?
            .records()
            .into_iter()
            .map(|(side, ts, k)| (side == 0, ts, k))
            .collect())
    }

    /// Every open window entry of the window store `name`, sorted by window
    /// then encoded key.
    pub fn window_entries<K, A>(&self, name: &str) -> Result<Vec<(Windowed<K>, A)>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        A: Clone + StateCodec + Send + 'static,
    {
        let mut v: Vec<(Window, Vec<u8>, Windowed<K>, A)> = self
            .typed::<WindowState<K, A>>(name)?
            .entries()
            .into_iter()
            .map(|(w, a)| (w.window, w.key.to_bytes(), w, a.clone()))
            .collect();
        v.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(v.into_iter().map(|(_, _, w, a)| (w, a)).collect())
    }
}
