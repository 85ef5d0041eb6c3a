//! Stream processing: a small Kafka-Streams-like DSL and Processor API over
//! records with a key, a value, a timestamp and [`Headers`].
//!
//! - [`Topology`] declares inputs ([`Topology::stream`]) and chains
//!   operators on [`KStream`]s: [`KStream::filter`], [`KStream::map`],
//!   [`KStream::map_values`], [`KStream::flat_map`], [`KStream::branch`]
//!   (and [`KStream::split_result`] for valid / dead-letter splits),
//!   stream-table joins ([`KStream::join`], [`KStream::left_join`]) with a
//!   [`KTable`] materialised from a changelog stream
//!   ([`KStream::to_table`]), joins with a [`GlobalKTable`]
//!   ([`Topology::global_table`]: fed from its own source, replicated to
//!   every task, never committed but rebuilt from its source on start;
//!   [`KStream::join_global`], [`KStream::left_join_global`] by a key the
//!   stream computes), [`KStream::merge`], stream-stream joins
//!   within [`JoinWindows`] ([`KStream::join_stream`],
//!   [`KStream::left_join_stream`], [`KStream::outer_join_stream`]),
//!   [`KStream::group_by_key`], [`KStream::group_by`] a new key and
//!   [`KStream::repartition`] (below), tumbling and hopping [`Windows`] with a
//!   grace period, [`SessionWindows`] (an inactivity gap and a grace
//!   period; [`KGroupedStream::windowed_by_session`]), `aggregate` /
//!   `count` / `reduce`, and [`KStream::to`] an output.
//! - The **Processor API**: a [`Processor`] (init, process one
//!   [`Record`], punctuate, close) added with [`KStream::process`] into the
//!   same topology as the DSL; it forwards to named children
//!   ([`ProcessorContext::forward`], [`ProcessorContext::forward_to`];
//!   each [`ProcessorStream::child`] is a [`KStream`] feeding DSL operators,
//!   other processors or outputs), reads and writes the key-value stores
//!   attached to it by name ([`Topology::add_state_store`], or a DSL
//!   table's store; [`ProcessorStore`]), and schedules punctuators
//!   ([`ProcessorContext::schedule`]) on stream time or on wall-clock time
//!   ([`PunctuationType`]). The task never reads a clock: its driver passes
//!   wall-clock time from the [`crate::Clock`] port
//!   ([`Task::punctuate_wall_clock`]; [`TestDriver::advance_wall_clock`]
//!   with a [`crate::ManualClock`], [`StreamRunner::with_clock`]).
//! - **Headers**: every [`Record`] carries ordered, bounded [`Headers`].
//!   Sources read them ([`SourceRecord::headers`]; [`EventLogSource`] from
//!   [`envelope`] schema 2), sinks write them ([`OutputRecord::headers`];
//!   [`EventLogSink`] as envelope schema 2 when there are any, else the
//!   old schema-1 bytes), and the runner's outbox keeps them. Operators
//!   that pass a record on (filter, map, map_values, flat_map,
//!   with_timestamp, branch, split_result, merge, join, left_join, to, late
//!   records) keep its headers; a stream-stream join's pair has the
//!   headers of the record that completed it, an unmatched record its own;
//!   aggregations (aggregate, count, reduce, windowed or not) emit new
//!   records **without** headers, and tables keep values only.
//! - **Repartitions**: [`KStream::group_by`] (a new key, then an
//!   aggregation) and [`KStream::repartition`] split the topology, as in
//!   Kafka Streams, into an upstream and a downstream joined by an
//!   internal stream `<name>-repartition` ([`REPARTITION_SUFFIX`]), which
//!   is both an output and an input of the task ([`Task::repartitions`]).
//!   The [`TestDriver`] passes each record through it at once, in order;
//!   the [`StreamRunner`] writes it to its sink like any output (the
//!   commit's outbox, idempotency keys) and reads it back from its source
//!   (an [`EventLogSink`] and [`EventLogSource`] on the same log: an event
//!   stream of that log), exactly once; on Kafka it is the topic
//!   `<application>-<name>-repartition`. Records keep their timestamp and
//!   headers; stream time is the task's (one for both sides).
//! - **Stream time** is the largest record timestamp seen, never the wall
//!   clock. A window closes when stream time reaches its end plus grace;
//!   records for a closed window are late: counted and optionally sent to a
//!   late-records output with their [`LateReason`]. Results are emitted on
//!   every update or once when the window closes ([`EmitStrategy`]).
//! - [`Topology::build`] gives a [`Task`], the sans-I/O core: it keeps its
//!   state in memory and writes what changed into a [`WriteBatch`] on
//!   commit ([`Task::flush`]) — the write-behind cache of Kafka Streams, so
//!   a durable store sees one write per changed key per commit, not one per
//!   record.
//! - State lives behind the [`KeyValueStore`] port (keyspaces, atomic
//!   batches, a changelog for rebuilding): [`InMemoryStore`] and
//!   [`LogStore`] (commits as events of a log stream) here, redb in
//!   `smartmsg-embedded`, sled in `smartmsg-sled`. [`WindowStore`] reads
//!   window entries on top of it.
//! - [`StreamRunner`] runs a task between a [`Source`] and a [`Sink`] with
//!   exactly-once effects: each commit writes the state changes, the
//!   outputs (into an outbox) and the next input position in one atomic
//!   batch, then hands the outputs to the sink under idempotency keys.
//!   [`EventLogSource`] and [`EventLogSink`] connect it to any
//!   [`crate::EventLog`]. A second source feeds the global tables
//!   ([`StreamRunner::with_global_source`]): read to its head before the
//!   first stream record, then caught up at each step, outside the
//!   checkpoint.
//! - **Interactive queries**: [`StoreReader`] and [`WindowStoreReader`]
//!   ([`StreamRunner::query_store`], [`StreamRunner::query_window_store`],
//!   the same on [`TestDriver`]) read a store's last committed state
//!   (never the task's uncommitted working set) from any thread: key
//!   lookups, ranges in encoded-key order, window fetches; typed
//!   [`QueryError`]s.
//! - [`TestDriver`] runs a topology in a test with no disk or server.

mod codec;
mod driver;
mod headers;
mod io;
mod join;
mod join_store;
mod log_store;
mod memory_store;
mod processor;
mod query;
mod runner;
mod scoped_store;
mod session;
mod session_store;
mod store;
mod task;
mod topology;
mod window;
mod window_store;

pub use codec::{CodecError, Json, Reader, StateCodec};
pub use driver::{DriverError, TestDriver};
pub use headers::{HeaderError, Headers};
pub use io::{envelope, EventLogSink, EventLogSource, StreamNamer};
pub use join::JoinWindows;
pub use log_store::{LogStore, LogStoreError};
pub use memory_store::InMemoryStore;
pub use processor::{
    Processor, ProcessorContext, ProcessorStore, Punctuation, PunctuationType, PunctuatorId,
};
pub use query::{
    CommitMark, QueryError, StoreReader, WindowStoreReader, MAX_QUERY_TRIES, MAX_WINDOW_FETCH,
};
pub use runner::{
    OutputId, OutputRecord, RunnerConfig, RunnerError, Sink, SinkError, Source, SourceError,
    SourceRecord, StepReport, StreamRunner, PUNCTUATE,
};
pub use scoped_store::ScopedStore;
pub use session::{SessionWindowedStream, SessionWindows};
pub use store::{
    changelog_blob, check_keyspace, prefixed, restore_from_changelog, scan_all, BatchOp,
    ChangelogEntry, Entries, KeyValueStore, StoreError, StoreLimits, WriteBatch, MAX_KEYSPACE_LEN,
};
pub use task::{EncodedRecord, Input, StreamError, Task, TaskLimits, TaskMeta, TaskMetrics};
pub use topology::{
    BuildError, Data, GlobalKTable, KGroupedStream, KStream, KTable, Key, Predicate,
    ProcessorStream, TimeWindowedStream, Topology, REPARTITION_SUFFIX,
};
pub use window::{EmitStrategy, LateReason, LateRecord, Window, WindowError, Windowed, Windows};
pub use window_store::WindowStore;

/// A record: key, value, timestamp (milliseconds; it drives stream time)
/// and [`Headers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<K, V> {
    /// The key (joins and grouping use it).
    pub key: K,
    /// The value.
    pub value: V,
    /// Event time in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The headers (empty unless the source or a processor set some).
    pub headers: Headers,
}

impl<K, V> Record<K, V> {
    /// A record without headers.
    pub fn new(key: K, value: V, timestamp_ms: u64) -> Self {
        Self {
            key,
            value,
            timestamp_ms,
            headers: Headers::new(),
        }
    }

    /// This record with `headers` (replacing its own).
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// A record with another key and value and this record's timestamp and
    /// headers (what `map` does).
    pub fn with_key_value<K2, V2>(self, key: K2, value: V2) -> Record<K2, V2> {
        Record {
            key,
            value,
            timestamp_ms: self.timestamp_ms,
            headers: self.headers,
        }
    }

    /// A record with another value and this record's key, timestamp and
    /// headers (what `map_values` does).
    pub fn with_value<V2>(self, value: V2) -> Record<K, V2> {
        Record {
            key: self.key,
            value,
            timestamp_ms: self.timestamp_ms,
            headers: self.headers,
        }
    }
}
