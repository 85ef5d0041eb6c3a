//! [`TestDriver`]: run a topology in a test, with no disk, broker or real
//! clock.

use std::hash::Hash;
use std::sync::Arc;

use super::codec::StateCodec;
use super::headers::Headers;
use super::memory_store::InMemoryStore;
use super::query::{CommitMark, QueryError, StoreReader, WindowStoreReader};
use super::store::{KeyValueStore, WriteBatch};
use super::task::{StreamError, Task, TaskMetrics};
use super::topology::{BuildError, Topology};
use super::window::Windowed;
use super::Record;
use crate::clock::{Clock, ManualClock};

/// Drives a [`Topology`] in a test, like Kafka Streams' `TopologyTestDriver`:
/// pipe records in with their timestamps, move stream time, read what the
/// outputs received and look into the state stores. Everything happens in
/// memory, synchronously; stream time moves only with the records and
/// [`TestDriver::advance_time`].
///
/// Wall-clock time is a [`ManualClock`] (at 0 unless given with
/// [`TestDriver::with_clock`]): [`TestDriver::advance_wall_clock`] moves it
/// and fires the processors' wall-clock punctuators that are due, with no
/// sleeping.
///
/// [`TestDriver::commit`] writes the state changes to an in-memory
/// [`KeyValueStore`] (with its changelog), and [`TestDriver::restart`]
/// rebuilds the task from it, to test recovery.
///
/// Piping into the source of a [`super::GlobalKTable`] updates the table
/// at once (it does not move stream time). The driver keeps those records
/// as the global source's log, and a restart rebuilds the global tables by
/// applying them again, in order, before anything else: like a runner
/// reading its global source from the start (they are not lost with the
/// uncommitted stream records, being in their own source).
///
/// [`TestDriver::query_store`] and [`TestDriver::query_window_store`] read
/// the committed store, as a runner's interactive queries do.
///
/// A record written to a repartition's internal stream
/// ([`super::KStream::repartition`], [`super::KStream::group_by`]) is read
/// back at once, after the record (or the time move) that wrote it and
/// before the next, in the order written, with its timestamp and headers,
/// as if written to the internal stream and read back: nothing waits in an
/// internal stream across a [`TestDriver::commit`] or a restart.
#[derive(Debug)]
pub struct TestDriver {
    task: Task,
    store: Arc<InMemoryStore>,
    clock: ManualClock,
    /// What was piped into global sources: the global source's log.
    global_log: Vec<GlobalRecord>,
}

/// A record piped into a global table's source.
#[derive(Debug, Clone)]
struct GlobalRecord {
    input: String,
    key: Vec<u8>,
    value: Vec<u8>,
    timestamp_ms: u64,
    headers: Headers,
}

/// Most records a [`TestDriver`] keeps for its global sources.
const MAX_GLOBAL_LOG: usize = 1_000_000;

/// Why a [`TestDriver`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The topology is invalid.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Processing or restoring failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
}

const META_SPACE: &str = "__driver";

impl TestDriver {
    /// Builds `topology` over an empty in-memory store, with a wall clock
    /// at 0.
    pub fn new(topology: Topology) -> Result<Self, DriverError> {
        Self::with_clock(topology, ManualClock::new(0))
    }

    /// Builds `topology` over an empty in-memory store, with `clock` as the
    /// wall clock (a clone: moving either moves both). Initialises the
    /// processors at the clock's time.
    pub fn with_clock(topology: Topology, clock: ManualClock) -> Result<Self, DriverError> {
        let mut d = Self {
            task: topology.build()?,
            store: Arc::new(InMemoryStore::new()),
            clock,
            global_log: Vec::new(),
        };
        d.tick_wall_clock()?;
        Ok(d)
    }

    /// Moves the wall clock forward by `ms` and fires the wall-clock
    /// punctuators that are due.
    pub fn advance_wall_clock(&mut self, ms: u64) -> Result<(), StreamError> {
        self.clock.advance(ms);
        self.tick_wall_clock()
    }

    /// Reads the wall clock (moved by someone holding a clone of it) and
    /// fires the wall-clock punctuators that are due.
    pub fn tick_wall_clock(&mut self) -> Result<(), StreamError> {
        self.task.punctuate_wall_clock(self.clock.now_ms())?;
        self.pass_repartitions()
    }

    /// Brings the records written to the repartitions' internal streams
    /// back to the task as records of those inputs, in the order written,
    /// until none is left (a repartition downstream of another one is
    /// passed in the next round).
    fn pass_repartitions(&mut self) -> Result<(), StreamError> {
        let rounds = self.task.repartitions().len();
        let mut buf = Vec::new();
        // Each round reaches at least one repartition further downstream,
        // and no repartition feeds itself (its name is reserved): after
        // `rounds + 1` rounds nothing is left.
        for _ in 0..=rounds {
            self.task.drain_repartitions(&mut buf);
            if buf.is_empty() {
                return Ok(());
            }
            for r in buf.drain(..) {
                self.task.process_encoded(
                    &r.output,
                    &r.key,
                    &r.value,
                    r.timestamp_ms,
                    r.headers,
                )?;
            }
        }
        Err(StreamError::Internal(
            "repartition records written in a cycle",
        ))
    }

    /// The wall clock.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// Pipes one record with headers into input `input`.
    pub fn pipe_with_headers<K: 'static, V: 'static>(
        &mut self,
        input: &str,
        key: K,
        value: V,
        timestamp_ms: u64,
        headers: Headers,
    ) -> Result<(), StreamError> {
        self.pipe_record(
            input,
            Record::new(key, value, timestamp_ms).with_headers(headers),
        )
    }

    /// Pipes one record; a global source's is also kept for restarts.
    fn pipe_record<K: 'static, V: 'static>(
        &mut self,
        input: &str,
        record: Record<K, V>,
    ) -> Result<(), StreamError> {
        let h = self.task.input::<K, V>(input)?;
        if self.task.is_global_source(input) {
            if self.global_log.len() >= MAX_GLOBAL_LOG {
                return Err(StreamError::StateFull {
                    store: input.to_owned(),
                    max: MAX_GLOBAL_LOG,
                });
            }
            let (key, value) = self
                .task
                .encode_input(h, &record)
                .ok_or(StreamError::Internal("global source record type"))?;
            self.global_log.push(GlobalRecord {
                input: input.to_owned(),
                key,
                value,
                timestamp_ms: record.timestamp_ms,
                headers: record.headers.clone(),
            });
        }
        self.task.process(h, record)?;
        self.pass_repartitions()
    }

    /// Pipes one record into input `input` at `timestamp_ms` (or into
    /// the source of a global table: it updates the table at once).
    pub fn pipe<K: 'static, V: 'static>(
        &mut self,
        input: &str,
        key: K,
        value: V,
        timestamp_ms: u64,
    ) -> Result<(), StreamError> {
        self.pipe_record(input, Record::new(key, value, timestamp_ms))
    }

    /// Pipes records into input `input`, in order.
    pub fn pipe_all<K: 'static, V: 'static>(
        &mut self,
        input: &str,
        records: impl IntoIterator<Item = Record<K, V>>,
    ) -> Result<(), StreamError> {
        for r in records {
            self.pipe_record(input, r)?;
        }
        Ok(())
    }

    /// Moves stream time to `to_ms` (never back), closing due windows.
    pub fn advance_time(&mut self, to_ms: u64) -> Result<(), StreamError> {
        self.task.advance_time(to_ms)?;
        self.pass_repartitions()
    }

    /// The stream time.
    pub fn stream_time(&self) -> u64 {
        self.task.stream_time()
    }

    /// Takes the records output `name` received since the last read.
    pub fn read_output<K: 'static, V: 'static>(
        &mut self,
        name: &str,
    ) -> Result<Vec<Record<K, V>>, StreamError> {
        self.task.take_output(name)
    }

    /// Takes the `(key, value)` pairs output `name` received since the last
    /// read.
    pub fn read_key_values<K: 'static, V: 'static>(
        &mut self,
        name: &str,
    ) -> Result<Vec<(K, V)>, StreamError> {
        Ok(self
            .task
            .take_output::<K, V>(name)?
            .into_iter()
            .map(|r| (r.key, r.value))
            .collect())
    }

    /// The value of `key` in the table or aggregate store `store`.
    pub fn table_get<K, V>(&self, store: &str, key: &K) -> Result<Option<V>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        V: Clone + StateCodec + Send + 'static,
    {
        self.task.table_get(store, key)
    }

    /// Every entry of the table or aggregate store `store`.
    pub fn table_entries<K, V>(&self, store: &str) -> Result<Vec<(K, V)>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        V: Clone + StateCodec + Send + 'static,
    {
        self.task.table_entries(store)
    }

    /// The aggregate of `key` in the open window starting at `start_ms`.
    pub fn window_get<K, A>(
        &self,
        store: &str,
        key: &K,
        start_ms: u64,
    ) -> Result<Option<A>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        A: Clone + StateCodec + Send + 'static,
    {
        self.task.window_get(store, key, start_ms)
    }

    /// Every open window entry of the window store `store`.
    pub fn window_entries<K, A>(&self, store: &str) -> Result<Vec<(Windowed<K>, A)>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        A: Clone + StateCodec + Send + 'static,
    {
        self.task.window_entries(store)
    }

    /// Every open session of the session store `store`.
    pub fn session_entries<K, A>(&self, store: &str) -> Result<Vec<(Windowed<K>, A)>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        A: Clone + StateCodec + Send + 'static,
    {
        self.task.session_entries(store)
    }

    /// The records the stream-stream join store `store` keeps, as `(left,
    /// timestamp, key)`.
    pub fn join_buffer<K, VL, VR>(&self, store: &str) -> Result<Vec<(bool, u64, K)>, StreamError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        VL: StateCodec + Send + 'static,
        VR: StateCodec + Send + 'static,
    {
        self.task.join_buffer::<K, VL, VR>(store)
    }

    /// The task's counters (processed, late records).
    pub fn metrics(&self) -> TaskMetrics {
        self.task.metrics()
    }

    /// Writes the state changes (and stream time) to the in-memory store,
    /// atomically. Returns the number of changes written.
    pub fn commit(&mut self) -> Result<usize, StreamError> {
        let mut batch = WriteBatch::new();
        self.task.flush(&mut batch);
        batch.put(META_SPACE, b"meta".to_vec(), self.task.meta().to_bytes());
        let n = batch.len();
        self.store.write(&batch)?;
        Ok(n)
    }

    /// The committed store (every state store's keyspace, with changelog).
    pub fn store(&self) -> &InMemoryStore {
        &self.store
    }

    /// A reader of the committed state of the key-value store `name` (as
    /// of the last [`TestDriver::commit`]); see [`StoreReader`].
    pub fn query_store<K, V>(&self, name: &str) -> Result<StoreReader<K, V>, QueryError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        V: StateCodec + Send + 'static,
    {
        StoreReader::new(&self.task, self.shared_store(), name)
    }

    /// A reader of the committed state of the window store `name`; see
    /// [`WindowStoreReader`].
    pub fn query_window_store<K, A>(
        &self,
        name: &str,
    ) -> Result<WindowStoreReader<K, A>, QueryError>
    where
        K: Clone + Eq + Hash + StateCodec + Send + 'static,
        A: StateCodec + Send + 'static,
    {
        let mark = CommitMark {
            space: META_SPACE.to_owned(),
            key: b"meta".to_vec(),
        };
        WindowStoreReader::new(&self.task, self.shared_store(), name, Some(mark))
    }

    fn shared_store(&self) -> Arc<dyn KeyValueStore> {
        Arc::clone(&self.store) as Arc<dyn KeyValueStore>
    }

    /// The task.
    pub fn task(&mut self) -> &mut Task {
        &mut self.task
    }

    /// Closes the task's processors ([`Task::close`]).
    pub fn close(&mut self) -> Result<(), StreamError> {
        self.task.close()
    }

    /// Simulates a restart: drops the task (and whatever it did since the
    /// last [`TestDriver::commit`], outputs not yet read included) and
    /// builds `topology` again from the committed store; its global tables
    /// are rebuilt from what was piped into their sources.
    pub fn restart(self, topology: Topology) -> Result<Self, DriverError> {
        let mut task = topology.build()?;
        task.restore(&*self.store)?;
        for r in &self.global_log {
            task.process_global_encoded(
                &r.input,
                &r.key,
                &r.value,
                r.timestamp_ms,
                r.headers.clone(),
            )?;
        }
        if let Some(meta) = self
            .store
            .get(META_SPACE, b"meta")
            .map_err(StreamError::from)?
        {
            let meta =
                super::task::TaskMeta::decode(&meta).map_err(|source| StreamError::Decode {
                    what: "store",
                    name: META_SPACE.into(),
                    source,
                })?;
            task.set_meta(meta);
        }
        let mut d = Self {
            task,
            store: self.store,
            clock: self.clock,
            global_log: self.global_log,
        };
        d.tick_wall_clock()?;
        Ok(d)
    }
}
