//! [`StreamRunner`]: a [`Task`] between a [`Source`] and a [`Sink`], with
//! exactly-once effects through one atomic store batch per commit.
//!
//! See [`StreamRunner`] for the commit protocol.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::codec::{Reader, StateCodec};
use super::headers::Headers;
use super::query::{CommitMark, QueryError, StoreReader, WindowStoreReader};
use super::store::{check_keyspace, scan_all, KeyValueStore, StoreError, WriteBatch};
use super::task::{EncodedRecord, StreamError, Task, TaskMeta};
use super::topology::{BuildError, Topology};
use crate::clock::Clock;
use crate::error::{AppendError, BackendError, ReadError};

/// The input name of a *punctuation*: a [`SourceRecord`] of this input
/// carries no data; it moves the task's stream time to its
/// `timestamp_ms` ([`Task::advance_time`]), closing the windows that are
/// due. Putting punctuations into the source, rather than calling the
/// task from outside, keeps everything that decides a runner's outputs in
/// its durable, replayable input: the same source gives the same outputs.
pub const PUNCTUATE: &str = "__punctuate";

/// One input record from a [`Source`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord {
    /// Its position in the source; strictly increasing across reads.
    pub position: u64,
    /// The topology input it belongs to (records of inputs the topology
    /// does not declare are skipped, their position still committed).
    pub input: String,
    /// The encoded key.
    pub key: Bytes,
    /// The encoded value.
    pub value: Bytes,
    /// Event time (drives stream time).
    pub timestamp_ms: u64,
    /// The record's headers.
    pub headers: Headers,
}

/// Why a source read failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The log read failed.
    #[error("source read failed: {0}")]
    Read(#[from] ReadError),
    /// Another backend failure.
    #[error("source failed: {0}")]
    Backend(BackendError),
}

/// Where a [`StreamRunner`] reads its input.
#[async_trait]
pub trait Source: Send {
    /// Records at positions ≥ `from`, at most `max`, in position order;
    /// empty when there are none yet. The same position must always hold
    /// the same record.
    async fn read(&mut self, from: u64, max: usize) -> Result<Vec<SourceRecord>, SourceError>;
}

/// Names an output record for idempotent delivery: the runner's commit
/// that produced it and its index among that commit's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutputId {
    /// The commit number (from 0, per runner).
    pub commit: u64,
    /// The index among the commit's outputs.
    pub index: u32,
}

/// An output record to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    /// Its id; the same output always has the same id, even when delivered
    /// again after a restart.
    pub id: OutputId,
    /// The topology output it was sent to.
    pub output: String,
    /// The encoded key.
    pub key: Vec<u8>,
    /// The encoded value.
    pub value: Vec<u8>,
    /// Its timestamp.
    pub timestamp_ms: u64,
    /// Its headers.
    pub headers: Headers,
}

/// Why a sink could not deliver.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The log append failed.
    #[error("sink append failed: {0}")]
    Append(#[from] AppendError),
    /// An output cannot be delivered by this sink (too large, a name the
    /// destination refuses). Retrying does not help.
    #[error("output {output:?} cannot be delivered: {reason}")]
    Invalid {
        /// The output.
        output: String,
        /// Why.
        reason: String,
    },
    /// Another backend failure.
    #[error("sink failed: {0}")]
    Backend(BackendError),
}

/// Where a [`StreamRunner`] delivers its outputs.
#[async_trait]
pub trait Sink: Send {
    /// Delivers `records` (the outputs of one commit of runner `runner`, in
    /// id order). Must be idempotent by `(runner, id)`: delivering the same
    /// records again, whole, after a crash must not duplicate them.
    async fn send(&mut self, runner: &str, records: &[OutputRecord]) -> Result<(), SinkError>;
}

/// Why a runner stopped.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// The topology is invalid.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Processing failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The sink failed (the outputs stay in the outbox; the next step or
    /// a reopen delivers them again).
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The runner's configuration is invalid.
    #[error("bad runner configuration: {0}")]
    Config(String),
    /// The runner's own records in the store do not decode.
    #[error("corrupt runner record: {0}")]
    Corrupt(String),
    /// An earlier processing or commit error left the in-memory task in an
    /// unknown state: reopen the runner (it restores the last commit).
    #[error("the runner failed earlier; reopen it")]
    Poisoned,
}

/// How a [`StreamRunner`] works.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunnerConfig {
    /// The runner's name: keys its checkpoint and outbox in the store, and
    /// the idempotency of its outputs (1 to 64 bytes of ASCII letters,
    /// digits and `-_.:/@`). Keep it stable across restarts.
    pub name: String,
    /// Most input records per step (one commit per step). Larger batches
    /// amortise the commit; default 5,000.
    pub batch: usize,
}

impl RunnerConfig {
    /// A configuration named `name` with default batch.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            batch: 5_000,
        }
    }

    /// Sets the batch size.
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }
}

/// What a step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Input records read (0: the source had nothing; nothing committed).
    pub records: usize,
    /// Records of inputs the topology does not declare (skipped).
    pub skipped: usize,
    /// Outputs delivered.
    pub outputs: usize,
    /// The committed input position after the step.
    pub position: u64,
    /// Global-table records applied by the step (from the global source,
    /// before the step's stream records; the bootstrap's are counted by
    /// the first step).
    pub global: usize,
}

const META_SPACE: &str = "__runner";
const MAX_NAME: usize = 64;
/// Most reads of the global source per step after the bootstrap (so a
/// global source that grows faster than it is read cannot stall the
/// stream: the rest is read by the next steps).
const MAX_GLOBAL_READS_PER_STEP: usize = 16;

/// A [`Task`] fed from a [`Source`], delivering to a [`Sink`], committing
/// to a [`KeyValueStore`].
///
/// # The commit protocol
///
/// A step reads up to [`RunnerConfig::batch`] records from the source at
/// the committed position and processes them. Then, in **one**
/// [`WriteBatch`] of the [`KeyValueStore`]:
///
/// 1. the task's state changes ([`Task::flush`]);
/// 2. the step's outputs, each under an [`OutputId`] `(commit, index)`, in
///    the runner's *outbox* keyspace;
/// 3. the checkpoint: the next input position, the next commit number, the
///    stream time and counters;
/// 4. the deletion of the previous commit's outbox entries (delivered).
///
/// Only then are the outputs handed to the [`Sink`], which must be
/// idempotent by output id (the [`EventLogSink`](super::EventLogSink)
/// derives each append's idempotency key from it).
///
/// After a crash anywhere, reopening restores the state and position of
/// the last commit and re-delivers its outbox: records processed after it
/// are processed again from the same state, producing the same effects once
/// (their earlier, uncommitted effects never became visible), and outputs
/// delivered twice are absorbed by the sink's idempotency. So every input
/// affects the state exactly once and every output appears exactly once.
///
/// The source must give the same records at the same positions on every
/// read (a log does).
///
/// # Global tables
///
/// A topology with [`GlobalKTable`](super::GlobalKTable)s reads their
/// records from a second source, [`StreamRunner::with_global_source`]
/// (records of inputs that are not global sources are ignored there, and
/// the main source's records of global sources are skipped). The first
/// step reads it from position 0 until it has nothing more (the
/// bootstrap) before reading any stream record; every later step first
/// reads what it gained since (at most 16 batches), then the stream
/// records. The global position lives in memory only: it is not in the
/// checkpoint, and reopening the runner rebuilds the tables from position
/// 0. See [`GlobalKTable`](super::GlobalKTable) for what a join sees.
///
/// # Repartitions
///
/// A repartition's internal stream ([`Task::repartitions`]) is an output
/// like any other: its records go into the commit's outbox and to the
/// sink. The runner reads them back only if its **source reads what its
/// sink writes**: an [`EventLogSink`](super::EventLogSink) and an
/// [`EventLogSource`](super::EventLogSource) on the same log (the internal
/// stream is then the log stream `<name>-repartition`). Appended after the
/// committed position under idempotency keys, each is read once in a
/// later step, and the checkpoint past it is committed with the
/// downstream's state: written once, processed once, across crashes. With
/// a source that does not read the sink's records back (a
/// `KafkaTopicSource` with a `KafkaTopicSink`), the downstream of a
/// repartition never receives anything.
///
/// # Interactive queries
///
/// [`StreamRunner::query_store`] and [`StreamRunner::query_window_store`]
/// give readers of the committed state of a store (see [`StoreReader`]),
/// usable from other threads while the runner steps.
pub struct StreamRunner<S, K> {
    name: String,
    outbox: String,
    task: Task,
    store: Arc<dyn KeyValueStore>,
    source: S,
    sink: K,
    batch: usize,
    position: u64,
    next_commit: u64,
    /// Outputs committed but not yet delivered.
    unsent: Vec<OutputRecord>,
    /// Outbox keys of delivered outputs, deleted by the next commit.
    delivered: Vec<Vec<u8>>,
    poisoned: bool,
    encoded: Vec<EncodedRecord>,
    clock: Option<Arc<dyn Clock>>,
    /// The global tables' source.
    global: Option<Box<dyn Source>>,
    /// The next position to read in the global source (in memory only).
    global_position: u64,
    /// Whether the global source was read to its head since the open.
    bootstrapped: bool,
}

impl<S, K> std::fmt::Debug for StreamRunner<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamRunner")
            .field("name", &self.name)
            .field("position", &self.position)
            .field("next_commit", &self.next_commit)
            .field("unsent", &self.unsent.len())
            .finish_non_exhaustive()
    }
}

fn outbox_key(id: OutputId) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    id.commit.encode(&mut k);
    id.index.encode(&mut k);
    k
}

/// The first byte of an outbox entry with headers. An entry without one
/// (written before headers existed) starts with the `u32` big-endian length
/// of its output's name, at most [`super::MAX_KEYSPACE_LEN`]: its first byte
/// is 0.
const OUTBOX_V2: u8 = 1;

/// An outbox entry: [`OUTBOX_V2`], the output's name, the key, the
/// timestamp, the headers (each length-prefixed), then the value.
fn encode_output(r: &OutputRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(r.key.len() + r.value.len() + r.output.len() + 32);
    v.push(OUTBOX_V2);
    r.output.encode_nested(&mut v);
    r.key.encode_nested(&mut v);
    r.timestamp_ms.encode(&mut v);
    r.headers.to_bytes().encode_nested(&mut v);
    r.value.encode(&mut v);
    v
}

/// Reads an outbox entry of either format.
fn decode_output(k: &[u8], v: &[u8]) -> Result<OutputRecord, RunnerError> {
    let bad = |e: super::codec::CodecError| RunnerError::Corrupt(format!("outbox entry: {e}"));
    let mut r = Reader::new(k);
    let commit = u64::decode_from(&mut r).map_err(bad)?;
    let index = u32::decode_from(&mut r).map_err(bad)?;
    r.finish("outbox key").map_err(bad)?;
    let mut r = Reader::new(v);
    let v2 = v.first() == Some(&OUTBOX_V2);
    if v2 {
        r.take(1, "outbox format").map_err(bad)?;
    }
    let output = String::decode_nested(&mut r).map_err(bad)?;
    let key = Vec::<u8>::decode_nested(&mut r).map_err(bad)?;
    let timestamp_ms = u64::decode_from(&mut r).map_err(bad)?;
    let headers = if v2 {
        Headers::decode(r.prefixed("outbox headers").map_err(bad)?).map_err(bad)?
    } else {
        Headers::new()
    };
    let value = r.rest().to_vec();
    Ok(OutputRecord {
        id: OutputId { commit, index },
        output,
        key,
        value,
        timestamp_ms,
        headers,
    })
}

/// The runner's checkpoint record.
struct Checkpoint {
    position: u64,
    next_commit: u64,
    meta: TaskMeta,
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48);
        self.position.encode(&mut v);
        self.next_commit.encode(&mut v);
        self.meta.encode(&mut v);
        v
    }

    fn decode(b: &[u8]) -> Result<Self, RunnerError> {
        let bad = |e: super::codec::CodecError| RunnerError::Corrupt(format!("checkpoint: {e}"));
        let mut r = Reader::new(b);
        let position = u64::decode_from(&mut r).map_err(bad)?;
        let next_commit = u64::decode_from(&mut r).map_err(bad)?;
        let meta = TaskMeta::decode(r.rest()).map_err(bad)?;
        Ok(Self {
            position,
            next_commit,
            meta,
        })
    }
}

/// Commits `batch` to `store`: on tokio's blocking pool when the store's
/// writes block (a file commit and its fsync must not hold an async worker
/// thread, where timers and other tasks run), in place for a store in
/// memory or outside a tokio runtime.
async fn commit_batch(store: Arc<dyn KeyValueStore>, batch: WriteBatch) -> Result<(), StoreError> {
    if !store.writes_block() {
        return store.write(&batch);
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return store.write(&batch);
    };
    match handle.spawn_blocking(move || store.write(&batch)).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(StoreError::Backend(BackendError::new(e))),
    }
}

impl<S: Source, K: Sink> StreamRunner<S, K> {
    /// Builds `topology`, restores its state and checkpoint from `store`,
    /// and prepares to re-deliver what the last commit left in the outbox
    /// (delivered by the first [`StreamRunner::step`]).
    pub fn open(
        topology: Topology,
        store: Arc<dyn KeyValueStore>,
        source: S,
        sink: K,
        config: RunnerConfig,
    ) -> Result<Self, RunnerError> {
        if config.name.len() > MAX_NAME {
            return Err(RunnerError::Config(format!(
                "name is {} bytes; the limit is {MAX_NAME}",
                config.name.len()
            )));
        }
        check_keyspace(&config.name).map_err(|e| RunnerError::Config(e.to_string()))?;
        if config.batch == 0 {
            return Err(RunnerError::Config("batch must be at least 1".into()));
        }
        let outbox = format!("__outbox.{}", config.name);
        let mut task = topology.build()?;
        task.restore(&*store)?;
        let (position, next_commit) = match store.get(META_SPACE, config.name.as_bytes())? {
            Some(b) => {
                let cp = Checkpoint::decode(&b)?;
                task.set_meta(cp.meta);
                (cp.position, cp.next_commit)
            }
            None => (0, 0),
        };
        let mut unsent = Vec::new();
        for (k, v) in scan_all(&*store, &outbox)? {
            unsent.push(decode_output(&k, &v)?);
        }
        Ok(Self {
            name: config.name,
            outbox,
            task,
            store,
            source,
            sink,
            batch: config.batch,
            position,
            next_commit,
            unsent,
            delivered: Vec::new(),
            poisoned: false,
            encoded: Vec::new(),
            clock: None,
            global: None,
            global_position: 0,
            bootstrapped: false,
        })
    }

    /// Feeds the topology's global tables from `source` (see "Global
    /// tables" above): read from position 0 to its head by the first step,
    /// before any stream record, then caught up at the start of each step.
    pub fn with_global_source(mut self, source: impl Source + 'static) -> Self {
        self.global = Some(Box::new(source));
        self
    }

    /// The next position the runner reads in its global source (0 after an
    /// open: the global tables are rebuilt from the start).
    pub fn global_position(&self) -> u64 {
        self.global_position
    }

    /// Whether the global tables were bootstrapped (their source read to
    /// its head) since the runner was opened.
    pub fn is_bootstrapped(&self) -> bool {
        self.bootstrapped
    }

    /// Reads the global source: to its head when not bootstrapped yet,
    /// else at most [`MAX_GLOBAL_READS_PER_STEP`] batches. Returns the
    /// global records applied.
    async fn update_globals(&mut self) -> Result<usize, RunnerError> {
        let Some(source) = self.global.as_mut() else {
            self.bootstrapped = true;
            return Ok(0);
        };
        let mut applied = 0;
        let mut reads = 0;
        loop {
            if self.bootstrapped && reads >= MAX_GLOBAL_READS_PER_STEP {
                return Ok(applied);
            }
            reads += 1;
            let records = source.read(self.global_position, self.batch).await?;
            if records.is_empty() {
                self.bootstrapped = true;
                return Ok(applied);
            }
            for r in records {
                if r.position < self.global_position {
                    continue;
                }
                self.global_position = r.position + 1;
                match self.task.process_global_encoded(
                    &r.input,
                    &r.key,
                    &r.value,
                    r.timestamp_ms,
                    r.headers,
                ) {
                    Ok(true) => applied += 1,
                    Ok(false) => {}
                    Err(e) => {
                        self.poisoned = true;
                        return Err(e.into());
                    }
                }
            }
        }
    }

    /// A reader of the committed state of the key-value store `name` (a
    /// table, a non-windowed aggregate, a processor's store): see
    /// [`StoreReader`]. Typed errors for an unknown name, another kind of
    /// store or other types, and a global table's store.
    pub fn query_store<KK, V>(&self, name: &str) -> Result<StoreReader<KK, V>, QueryError>
    where
        KK: Clone + Eq + std::hash::Hash + StateCodec + Send + 'static,
        V: StateCodec + Send + 'static,
    {
        StoreReader::new(&self.task, Arc::clone(&self.store), name)
    }

    /// A reader of the committed state of the window store `name` (a
    /// tumbling or hopping windowed aggregation): see [`WindowStoreReader`].
    pub fn query_window_store<KK, A>(
        &self,
        name: &str,
    ) -> Result<WindowStoreReader<KK, A>, QueryError>
    where
        KK: Clone + Eq + std::hash::Hash + StateCodec + Send + 'static,
        A: StateCodec + Send + 'static,
    {
        let mark = CommitMark {
            space: META_SPACE.to_owned(),
            key: self.name.as_bytes().to_vec(),
        };
        WindowStoreReader::new(&self.task, Arc::clone(&self.store), name, Some(mark))
    }

    /// Gives the task wall-clock time from `clock`: each step reads it
    /// after processing its records and fires the processors' wall-clock
    /// punctuators that are due ([`Task::punctuate_wall_clock`]); their
    /// effects are committed with the step. A step that reads no records
    /// commits (at the same input position) when a wall-clock punctuator
    /// fired. Wall-clock punctuations are not in the source, so unlike
    /// everything else they are not replayed identically after a crash:
    /// what one did is committed exactly once, or, if the runner crashed
    /// before committing it, never, and the next firing comes with the
    /// clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    fn tick_wall_clock(&mut self) -> Result<bool, RunnerError> {
        let Some(clock) = &self.clock else {
            return Ok(false);
        };
        match self.task.punctuate_wall_clock(clock.now_ms()) {
            Ok(fired) => Ok(fired),
            Err(e) => {
                self.poisoned = true;
                Err(e.into())
            }
        }
    }

    /// Delivers pending outputs, reads one batch, processes it and commits.
    /// Returns a report with `records == 0` when the source had nothing
    /// (then nothing is committed).
    pub async fn step(&mut self) -> Result<StepReport, RunnerError> {
        if self.poisoned {
            return Err(RunnerError::Poisoned);
        }
        let mut report = StepReport {
            position: self.position,
            ..StepReport::default()
        };
        report.outputs += self.deliver().await?;
        report.global = self.update_globals().await?;
        let records = self.source.read(self.position, self.batch).await?;
        let Some(last) = records.last().map(|r| r.position) else {
            if self.tick_wall_clock()? {
                report.outputs += self.commit(self.position).await?;
            }
            return Ok(report);
        };
        report.records = records.len();
        let mut next = self.position;
        for r in records {
            if r.position < next {
                continue; // a source that repeats: already processed
            }
            next = r.position + 1;
            let processed = if r.input == PUNCTUATE {
                self.task.advance_time(r.timestamp_ms).map(|()| true)
            } else {
                self.task
                    .process_encoded(&r.input, &r.key, &r.value, r.timestamp_ms, r.headers)
            };
            match processed {
                Ok(true) => {}
                Ok(false) => report.skipped += 1,
                Err(e) => {
                    self.poisoned = true;
                    return Err(e.into());
                }
            }
        }
        debug_assert!(next > last || next == self.position);
        self.tick_wall_clock()?;
        report.outputs += self.commit(next).await?;
        report.position = self.position;
        Ok(report)
    }

    /// Steps until the source has nothing more. Returns the totals.
    pub async fn run_until_idle(&mut self) -> Result<StepReport, RunnerError> {
        let mut total = StepReport::default();
        loop {
            let r = self.step().await?;
            total.records += r.records;
            total.skipped += r.skipped;
            total.outputs += r.outputs;
            total.global += r.global;
            total.position = r.position;
            if r.records == 0 {
                return Ok(total);
            }
        }
    }

    #[tracing::instrument(level = "debug", name = "stream_commit", skip(self))]
    async fn commit(&mut self, next_position: u64) -> Result<usize, RunnerError> {
        let mut batch = WriteBatch::new();
        for k in self.delivered.drain(..) {
            batch.delete(&self.outbox, k);
        }
        self.task.flush(&mut batch);
        self.encoded.clear();
        self.task.drain_outputs(&mut self.encoded);
        let commit = self.next_commit;
        let mut outputs = Vec::with_capacity(self.encoded.len());
        for (i, e) in self.encoded.drain(..).enumerate() {
            let r = OutputRecord {
                id: OutputId {
                    commit,
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                },
                output: e.output,
                key: e.key,
                value: e.value,
                timestamp_ms: e.timestamp_ms,
                headers: e.headers,
            };
            batch.put(&self.outbox, outbox_key(r.id), encode_output(&r));
            outputs.push(r);
        }
        let cp = Checkpoint {
            position: next_position,
            next_commit: commit + 1,
            meta: self.task.meta(),
        };
        batch.put(META_SPACE, self.name.as_bytes(), cp.encode());
        if let Err(e) = commit_batch(Arc::clone(&self.store), batch).await {
            self.poisoned = true;
            return Err(e.into());
        }
        self.position = next_position;
        self.next_commit = commit + 1;
        self.unsent = outputs;
        self.deliver().await
    }

    async fn deliver(&mut self) -> Result<usize, RunnerError> {
        if self.unsent.is_empty() {
            return Ok(0);
        }
        self.sink.send(&self.name, &self.unsent).await?;
        let n = self.unsent.len();
        self.delivered
            .extend(self.unsent.drain(..).map(|r| outbox_key(r.id)));
        Ok(n)
    }

    /// The committed input position (the next record to read).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The number of the next commit.
    pub fn next_commit(&self) -> u64 {
        self.next_commit
    }

    /// The task (to inspect its stores and counters).
    pub fn task(&self) -> &Task {
        &self.task
    }

    /// The sink.
    pub fn sink(&self) -> &K {
        &self.sink
    }

    /// The sink, mutably.
    pub fn sink_mut(&mut self) -> &mut K {
        &mut self.sink
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KeyValueStore> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox entry written before headers existed still reads, and the
    /// new format round-trips headers.
    #[test]
    fn outbox_entries_of_both_formats_decode() {
        let mut r = OutputRecord {
            id: OutputId {
                commit: 7,
                index: 3,
            },
            output: "out".into(),
            key: b"k".to_vec(),
            value: b"value".to_vec(),
            timestamp_ms: 42,
            headers: Headers::new(),
        };
        // The old format: output, key, timestamp, value.
        let mut old = Vec::new();
        r.output.encode_nested(&mut old);
        r.key.encode_nested(&mut old);
        r.timestamp_ms.encode(&mut old);
        r.value.encode(&mut old);
        assert_eq!(decode_output(&outbox_key(r.id), &old).unwrap(), r);
        r.headers = Headers::new().with("h", b"1".to_vec()).unwrap();
        let new = encode_output(&r);
        assert_eq!(decode_output(&outbox_key(r.id), &new).unwrap(), r);
        // Garbage is a typed error.
        assert!(decode_output(&outbox_key(r.id), &[OUTBOX_V2, 0, 0]).is_err());
        assert!(decode_output(&[1, 2], &new).is_err());
    }
}
