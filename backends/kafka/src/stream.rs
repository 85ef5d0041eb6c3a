//! Stream processing on Kafka topics: a topic [`Source`] and [`Sink`] for
//! the engine's [`StreamRunner`](smartmsg_engine::stream::StreamRunner),
//! and [`KafkaStreamProcessor`], an exactly-once processing step in the
//! Kafka Streams style.
//!
//! # The exactly-once step
//!
//! [`KafkaStreamProcessor`] runs an engine [`Task`] (a built
//! [`Topology`]) between input topics and output topics. Each [`KafkaStreamProcessor::step`] processes a batch of input
//! records (in timestamp order, below), then in **one Kafka transaction**
//! produces
//!
//! - the task's outputs (output `name` goes to topic
//!   `<output_prefix><name>`, key and value as the topology encodes them),
//! - the task's state changes ([`Task::flush`] into a [`WriteBatch`]) as
//!   records of the changelog topic, one record per change (key = keyspace
//!   and key, value = the new value, a tombstone for a delete), plus one
//!   record with the task's stream time and counters,
//! - and the consumer group's offsets, with `send_offsets_to_transaction`:
//!   per input partition, the offset of the first record not processed.
//!
//! The transactional id is fixed per application, so opening a processor
//! fences the previous instance (`init_transactions`). On open the state
//! is restored by reading the changelog topic to its end (`read_committed`)
//! and the consumer resumes from the group's committed offsets: outputs,
//! state and offsets move together, so a restart neither loses nor repeats
//! an output.
//!
//! The consumer is **assigned** every partition of the inputs (it does
//! not join the group: the group only keeps the committed offsets), so an
//! open takes no rebalance: about 1.3 s on tansu against about 4 s with a
//! subscription, whose group join took 2.6–3.2 s at the first step. The
//! transactional id, not the group generation, fences an older instance.
//! Partitions added to an input while the processor runs are picked up at
//! its next open.
//!
//! Conditions: the broker must hide aborted records from `read_committed`
//! consumers (Apache Kafka does; tansu 0.6 does not — there, an aborted
//! step's changelog records would be restored and its outputs seen). One
//! processor instance per application: it owns every partition of its
//! inputs and the changelog topic has one partition (state is not split
//! by input partition yet, so several instances of one group would each
//! hold part of the input but restore the whole changelog).
//!
//! Any topology runs (several input topics, as the two sides of a
//! stream-stream join; several stores; windows and sessions).
//!
//! # Input order
//!
//! As Kafka Streams' task (its `PartitionGroup`), the processor keeps a
//! buffer of fetched records per input partition, at most
//! [`ProcessorConfig::input_buffer`] (a full buffer stops the polling;
//! what the consumer fetched beyond it waits in librdkafka's own bounded
//! queue), and processes next the head
//! of the partition whose head has the lowest timestamp; equal timestamps
//! go to the input added first ([`ProcessorConfig::with_input`] order),
//! then to the lower partition; the repartition topics (below) are inputs
//! too, after the configured ones, by name (one task reads them, where
//! Kafka Streams would give the downstream sub-topology its own tasks).
//! Every partition of the inputs counts from the open. A partition with nothing buffered holds
//! the others back as [`ProcessorConfig::input_idle`] says
//! ([`InputIdle`], Kafka Streams' `max.task.idle.ms`): by default not at
//! all (what is buffered is processed, in timestamp order); with
//! `InputIdle::Wait(d)` while the broker holds records of it not fetched
//! yet and then for `d` — so input already written is processed in the
//! same order whatever the fetch timing, on every run and across
//! restarts, at the cost of a fetch per empty partition and step. Idle time
//! runs on the processor's [`Clock`]
//! ([`KafkaStreamProcessor::with_clock`]).
//!
//! Buffered records are not committed: each step commits, per partition,
//! the offset of its buffer's head (or the consumer's position, past any
//! transaction marker, when the buffer is empty), so a restart reads
//! exactly the records not processed again. Global tables stay outside the buffers: bootstrapped
//! before any input, then caught up at the start of each step.
//!
//! # Repartitions
//!
//! A topology's repartitions ([`Task::repartitions`]:
//! `KStream::repartition(name)` and `KStream::group_by`, which repartitions
//! before its aggregation) go through internal topics
//! `<application>-<name>-repartition` ([`ProcessorConfig::repartition_topic`]),
//! created on open (`repartition_partitions` partitions, 1 by default) and
//! read with the inputs. A step produces the upstream's records
//! into them, keyed by the new key (partitioned by it: librdkafka's
//! `murmur2_random`, the Java client's partitioner), with their timestamps
//! and headers, **in the step's transaction**; a later step of the same
//! processor reads them (`read_committed`: only once that transaction
//! committed) as the downstream's input and commits their offsets in its
//! own transaction with the downstream's outputs and state. So a record
//! is written to the repartition topic once and aggregated once, across
//! restarts. Repartition topics are not purged after their records are
//! consumed (Kafka Streams deletes consumed records); give them a
//! retention.
//!
//! # Punctuators and interactive queries
//!
//! Stream-time punctuators fire as records move stream time. Wall-clock
//! punctuators fire on the processor's [`Clock`]
//! ([`KafkaStreamProcessor::with_clock`], the system clock by default),
//! read after each step's records: their effects commit in the step's
//! transaction, and a step that processed no record commits when one
//! fired. Like the runner's, they are not replayed after a crash.
//!
//! With [`ProcessorConfig::with_interactive_queries`] the processor keeps
//! a copy of its committed state (restored on open, then each step's
//! changes once its transaction committed), and
//! [`KafkaStreamProcessor::query_store`] /
//! [`KafkaStreamProcessor::query_window_store`] give the engine's
//! [`StoreReader`] / [`WindowStoreReader`] over it, usable from other
//! threads while the processor steps.
//!
//! # Headers
//!
//! Records keep their headers both ways, as Kafka record headers (see
//! [`crate::headers`]: a null value reads as empty; headers past the
//! engine's limits leave one header saying why).
//!
//! # Source and sink for the runner
//!
//! [`KafkaTopicSource`] reads one partition of a topic; the record's offset
//! is its position (the runner keeps the position in its own store, so no
//! group offsets are committed). [`KafkaTopicSink`] produces each runner
//! commit's outputs in one transaction together with a progress record
//! (the runner's last delivered commit, in a compacted topic), each output
//! with its own headers followed by two naming the runner and the output id
//! (`smartmsg-runner`, `smartmsg-output`); a commit re-delivered after a crash (the runner's
//! outbox) is recognised from the progress record and produced no second
//! time, which is the exactly-once contract of [`Sink`]. Same condition on
//! aborted records as above.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use smartmsg_engine::stream::{
    BuildError, CommitMark, InMemoryStore, KeyValueStore, OutputRecord, QueryError, Sink,
    SinkError, Source, SourceError, SourceRecord, StateCodec, StoreError, StoreReader, StreamError,
    Task, TaskMeta, Topology, WindowStoreReader, WriteBatch,
};
use smartmsg_engine::{BackendError, Clock, SystemClock};

mod partition_group;

pub use partition_group::InputIdle;
use partition_group::{BufferedRecord, Choice, Lag, PartitionGroup, PartitionKey};

/// The keyspace of the changelog record holding the task's [`TaskMeta`].
pub const META_SPACE: &str = "__task_meta";

/// The key, in [`META_SPACE`] of the copy kept for interactive queries
/// (never in the changelog), that every commit rewrites with its count.
const COMMIT_MARK_KEY: &[u8] = b"commit";

/// Why a Kafka stream component failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaStreamError {
    /// A call into librdkafka failed.
    #[error("kafka {op}: {source}")]
    Kafka {
        /// What was being done.
        op: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The topology is invalid.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Processing failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Restoring state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A changelog record cannot be read.
    #[error("corrupt changelog record at offset {offset}: {reason}")]
    Corrupt {
        /// Its offset.
        offset: i64,
        /// Why.
        reason: String,
    },
    /// Restoring did not reach the end of the changelog in time.
    #[error("changelog restore timed out at offset {at} of {end}")]
    RestoreTimeout {
        /// Offset reached.
        at: i64,
        /// The end to reach (−1 for a global topic, read to the EOF its
        /// fetches report).
        end: i64,
    },
    /// An earlier step failed after processing records whose transaction
    /// did not commit: the task's memory is ahead of Kafka. Reopen.
    #[error("the processor failed in an earlier step; reopen it")]
    Poisoned,
    /// The component was used outside what it supports.
    #[error("{0}")]
    Config(String),
}

impl KafkaStreamError {
    fn kafka(op: &'static str, source: KafkaError) -> Self {
        Self::Kafka { op, source }
    }
}

/// Configuration of a [`KafkaStreamProcessor`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProcessorConfig {
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// The application: names the transactional id
    /// (`smartmsg.<application>.processor`) and the default changelog
    /// topic.
    pub application: String,
    /// The consumer group (`group.id`) whose committed offsets the
    /// processor resumes from and commits to; defaults to the
    /// application. The processor does not join it as a member.
    pub group_id: String,
    /// Input topics and the topology input each feeds: `(topic, input)`.
    pub inputs: Vec<(String, String)>,
    /// Global tables' source topics and the topology's global source each
    /// feeds: `(topic, source)` (see [`ProcessorConfig::with_global_input`]).
    pub global_inputs: Vec<(String, String)>,
    /// Output `name` goes to topic `<output_prefix><name>`.
    pub output_prefix: String,
    /// The changelog topic (one partition);
    /// `smartmsg.<application>.changelog` by default.
    pub changelog_topic: String,
    /// Most input records per step (per transaction).
    pub max_batch: usize,
    /// `transaction.timeout.ms`.
    pub transaction_timeout: Duration,
    /// Timeout of each blocking Kafka call (init, commit, offsets).
    pub request_timeout: Duration,
    /// How long restoring may take to reach the changelog's end.
    pub restore_timeout: Duration,
    /// Partitions of the repartition topics the processor creates (1 by
    /// default; see [`ProcessorConfig::repartition_topic`]).
    pub repartition_partitions: i32,
    /// Most records buffered per input partition, fetched but not yet
    /// processed (Kafka Streams' `buffered.records.per.partition`, 1000
    /// by default): a buffer that is full stops the polling, and what the
    /// consumer fetched beyond it waits in librdkafka's own queue (bounded
    /// by `queued.max.messages.kbytes`). While another partition holds the
    /// others back ([`InputIdle::Wait`]) a buffer may pass this bound by
    /// what that queue holds. (Not paused at the consumer: librdkafka
    /// drops a paused partition's fetched records and fetches them again
    /// on resume, which cut throughput tenfold on tansu.)
    pub input_buffer: usize,
    /// Whether and how long an input partition with nothing buffered
    /// holds back the others (Kafka Streams' `max.task.idle.ms`; see
    /// [`InputIdle`]). Default: `InputIdle::ProcessBuffered` (what is
    /// buffered, in timestamp order). `InputIdle::Wait(Duration::ZERO)`,
    /// Kafka Streams' default, processes records already written to the
    /// inputs in timestamp order whatever the fetch timing, but finds out
    /// whether an empty partition is behind with a fetch per empty
    /// partition and step (about 0.25 s on tansu): choose it where a
    /// repeatable order matters more than throughput.
    pub input_idle: InputIdle,
    /// Whether the processor keeps a copy of its committed state for
    /// interactive queries ([`KafkaStreamProcessor::query_store`]); off by
    /// default, as it holds the task's state a second time in memory.
    pub interactive_queries: bool,
}

impl ProcessorConfig {
    /// A configuration with defaults: group = application, outputs to
    /// topics named as the outputs, batches of 500.
    pub fn new(bootstrap: impl Into<String>, application: impl Into<String>) -> Self {
        let application = application.into();
        Self {
            bootstrap: bootstrap.into(),
            group_id: application.clone(),
            changelog_topic: format!("smartmsg.{application}.changelog"),
            application,
            inputs: Vec::new(),
            global_inputs: Vec::new(),
            output_prefix: String::new(),
            max_batch: 500,
            transaction_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            restore_timeout: Duration::from_secs(60),
            repartition_partitions: 1,
            input_buffer: 1000,
            input_idle: InputIdle::default(),
            interactive_queries: false,
        }
    }

    /// The internal topic of the repartition whose internal stream is
    /// `internal` (`<name>-repartition`, see [`Task::repartitions`]):
    /// `<application>-<name>-repartition`, as Kafka Streams names it.
    pub fn repartition_topic(&self, internal: &str) -> String {
        format!("{}-{internal}", self.application)
    }

    /// Sets the partitions of the repartition topics the processor creates
    /// (an existing topic keeps its own).
    pub fn with_repartition_partitions(mut self, partitions: i32) -> Self {
        self.repartition_partitions = partitions.max(1);
        self
    }

    /// Reads `topic` as the topology input `input`.
    pub fn with_input(mut self, topic: impl Into<String>, input: impl Into<String>) -> Self {
        self.inputs.push((topic.into(), input.into()));
        self
    }

    /// Reads every partition of `topic` as the source `source` of a global
    /// table ([`Topology::global_table`]): from its beginning to its end
    /// when the processor opens, before any input record (the bootstrap;
    /// bounded by `restore_timeout`), then, at the start of each step,
    /// what it gained since (at most `max_batch` records per step). Its
    /// offsets are never committed: every open reads it again from the
    /// beginning (the table has no changelog). Values are the engine's
    /// encoding of the source's value type (`Option<V>` for
    /// [`Topology::global_table_with_deletes`]); a tombstone (a record
    /// with no value) removes its key from the table, as in Kafka
    /// Streams.
    pub fn with_global_input(
        mut self,
        topic: impl Into<String>,
        source: impl Into<String>,
    ) -> Self {
        self.global_inputs.push((topic.into(), source.into()));
        self
    }

    /// Sets the consumer group.
    pub fn with_group(mut self, group_id: impl Into<String>) -> Self {
        self.group_id = group_id.into();
        self
    }

    /// Sets the output topics' prefix.
    pub fn with_output_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.output_prefix = prefix.into();
        self
    }

    /// Sets the most input records per step.
    pub fn with_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    /// Sets the most records buffered per input partition (at least 1).
    pub fn with_input_buffer(mut self, records: usize) -> Self {
        self.input_buffer = records.max(1);
        self
    }

    /// Sets how an input partition with nothing buffered holds back the
    /// others (see [`InputIdle`]).
    pub fn with_input_idle(mut self, idle: InputIdle) -> Self {
        self.input_idle = idle;
        self
    }

    /// Keeps a copy of the committed state for interactive queries
    /// ([`KafkaStreamProcessor::query_store`],
    /// [`KafkaStreamProcessor::query_window_store`]).
    pub fn with_interactive_queries(mut self) -> Self {
        self.interactive_queries = true;
        self
    }

    /// The producer's transactional id.
    pub fn transactional_id(&self) -> String {
        format!("smartmsg.{}.processor", self.application)
    }
}

/// What one [`KafkaStreamProcessor::step`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessorStep {
    /// Input records processed and committed.
    pub records: usize,
    /// Output records produced.
    pub outputs: usize,
    /// Changelog records produced (state changes plus the meta record).
    pub changelog: usize,
}

/// What restoring from the changelog found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Changelog records read.
    pub records: u64,
    /// The changelog's end offset.
    pub end: i64,
}

/// Encodes the changelog record key of `key` in `space`.
pub fn changelog_key(space: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + space.len() + key.len());
    k.extend_from_slice(&(space.len() as u32).to_be_bytes());
    k.extend_from_slice(space.as_bytes());
    k.extend_from_slice(key);
    k
}

/// Splits a changelog record key into keyspace and key.
pub fn decode_changelog_key(k: &[u8]) -> Option<(&str, &[u8])> {
    let mut r = smartmsg_engine::bytes_in::Input::new(k);
    let space = std::str::from_utf8(r.prefixed_u32_be("keyspace").ok()?).ok()?;
    Some((space, r.rest()))
}

/// Creates the topics that do not exist yet (`(name, partitions)`).
pub async fn ensure_topics(
    bootstrap: &str,
    topics: &[(&str, i32)],
) -> Result<(), KafkaStreamError> {
    create_topics(bootstrap, topics, &[]).await
}

async fn create_topics(
    bootstrap: &str,
    topics: &[(&str, i32)],
    configs: &[(&str, &str)],
) -> Result<(), KafkaStreamError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| KafkaStreamError::kafka("create admin client", e))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, p)| {
            configs.iter().fold(
                NewTopic::new(t, *p, TopicReplication::Fixed(1)),
                |n, (k, v)| n.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|e| KafkaStreamError::kafka("create topics", e))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(KafkaStreamError::kafka(
                    "create topics",
                    KafkaError::AdminOp(code),
                ))
            }
        }
    }
    Ok(())
}

/// An exactly-once processing step on Kafka (see the [module](self) docs).
pub struct KafkaStreamProcessor {
    config: ProcessorConfig,
    task: Task,
    consumer: BaseConsumer,
    producer: BaseProducer,
    /// The topics read (every partition assigned) and the task input each
    /// feeds: the configured inputs, then the repartition topics (by
    /// name). A partition's [`PartitionKey`] starts with its topic's
    /// place here.
    inputs: Vec<(String, String)>,
    /// Repartition internal stream → its topic.
    repartition_topics: HashMap<String, String>,
    /// Input topic → its place in `inputs`.
    topic_index: HashMap<String, usize>,
    /// Fetched input records not processed yet, per owned partition.
    group: PartitionGroup,
    /// Measures how long an empty partition has held the others back, and
    /// gives the task wall-clock time for its punctuators.
    clock: Arc<dyn Clock>,
    /// The committed state, for interactive queries (when enabled): the
    /// restored state, then each committed step's changes.
    committed: Option<Arc<InMemoryStore>>,
    /// Steps committed since the open (written to `committed` as its
    /// [`CommitMark`]).
    commits: u64,
    /// Partitions found caught up (nothing more on the broker) in this
    /// step.
    caught_up: HashSet<PartitionKey>,
    /// The end (`read_committed`) last read from the broker, per
    /// partition.
    known_end: HashMap<PartitionKey, i64>,
    /// Where a partition the consumer has returned nothing of yet starts
    /// (the group's committed offset, else the partition's beginning).
    start_offset: HashMap<PartitionKey, i64>,
    /// Fetches from an empty partition's position to see whether the
    /// broker holds more of it (made at the first need).
    probe: Option<BaseConsumer>,
    restore: RestoreStats,
    poisoned: bool,
    /// The global tables' sources, when the topology has any.
    global: Option<GlobalReader>,
}

/// Reads the global tables' source topics (assigned, no group offsets).
struct GlobalReader {
    consumer: BaseConsumer,
    /// Topic → global source name.
    inputs: HashMap<String, String>,
}

impl GlobalReader {
    /// Reads every partition of the global topics from the beginning to
    /// its end and applies them to `task`, one topic after the other; then
    /// assigns them all from where it stopped, for the catch-up.
    ///
    /// The end is the partition EOF the fetches report (`read_committed`:
    /// the last stable offset), not `ListOffsets` (`fetch_watermarks`):
    /// tansu 0.6 answers that with the end of the first batch (1 for 30
    /// records written in one batch), which stopped the bootstrap early.
    /// One topic at a time because librdkafka's EOF event names the
    /// partition but not its topic.
    fn bootstrap(
        config: &ProcessorConfig,
        task: &mut Task,
    ) -> Result<Option<Self>, KafkaStreamError> {
        if config.global_inputs.is_empty() {
            return Ok(None);
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap)
            .set("group.id", format!("{}.global", config.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()
            .map_err(|e| KafkaStreamError::kafka("create global consumer", e))?;
        let reader = Self {
            consumer,
            inputs: config.global_inputs.iter().cloned().collect(),
        };
        let deadline = Instant::now() + config.restore_timeout;
        // Where the catch-up starts: after the last record read, per
        // partition (the beginning when none was).
        let mut resume = TopicPartitionList::new();
        for (topic, _) in &config.global_inputs {
            let md = reader
                .consumer
                .fetch_metadata(Some(topic), config.request_timeout)
                .map_err(|e| KafkaStreamError::kafka("global topic metadata", e))?;
            let partitions: Vec<i32> = md
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                return Err(KafkaStreamError::Config(format!(
                    "global topic {topic:?} has no partitions (does it exist?)"
                )));
            }
            let mut tpl = TopicPartitionList::new();
            for &p in &partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning)
                    .map_err(|e| KafkaStreamError::kafka("assign global topic", e))?;
            }
            reader
                .consumer
                .assign(&tpl)
                .map_err(|e| KafkaStreamError::kafka("assign global topic", e))?;
            // Partition → the offset after its last record read.
            let mut next: HashMap<i32, i64> = HashMap::new();
            let mut pending: HashSet<i32> = partitions.iter().copied().collect();
            while !pending.is_empty() {
                if Instant::now() >= deadline {
                    let at = pending
                        .iter()
                        .map(|p| next.get(p).copied().unwrap_or(0))
                        .min()
                        .unwrap_or(0);
                    return Err(KafkaStreamError::RestoreTimeout { at, end: -1 });
                }
                match reader.consumer.poll(Duration::from_millis(200)) {
                    None => {}
                    Some(Err(KafkaError::PartitionEOF(p))) => {
                        pending.remove(&p);
                    }
                    Some(Err(e)) => return Err(KafkaStreamError::kafka("read global topic", e)),
                    Some(Ok(m)) => {
                        next.insert(m.partition(), m.offset() + 1);
                        reader.apply(task, &m)?;
                    }
                }
            }
            for p in partitions {
                let at = next
                    .get(&p)
                    .map_or(Offset::Beginning, |&o| Offset::Offset(o));
                resume
                    .add_partition_offset(topic, p, at)
                    .map_err(|e| KafkaStreamError::kafka("assign global topics", e))?;
            }
        }
        reader
            .consumer
            .assign(&resume)
            .map_err(|e| KafkaStreamError::kafka("assign global topics", e))?;
        Ok(Some(reader))
    }

    /// Applies what the global topics gained (at most `max` records, no
    /// waiting).
    fn catch_up(&mut self, task: &mut Task, max: usize) -> Result<usize, KafkaStreamError> {
        let mut n = 0;
        while n < max {
            match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => return Err(KafkaStreamError::kafka("read global topic", e)),
                Some(Ok(m)) => {
                    self.apply(task, &m)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn apply(
        &self,
        task: &mut Task,
        m: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Result<(), KafkaStreamError> {
        let Some(source) = self.inputs.get(m.topic()) else {
            return Ok(());
        };
        let key = m.key().unwrap_or(&[]);
        let Some(value) = m.payload() else {
            // A tombstone: the key leaves the table.
            task.delete_global_encoded(source, key)?;
            return Ok(());
        };
        let ts = m.timestamp().to_millis().unwrap_or(0).max(0) as u64;
        task.process_global_encoded(
            source,
            key,
            value,
            ts,
            crate::headers::from_kafka(m.headers()),
        )?;
        Ok(())
    }
}

impl std::fmt::Debug for KafkaStreamProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaStreamProcessor")
            .field("application", &self.config.application)
            .field("group", &self.config.group_id)
            .field("restore", &self.restore)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl KafkaStreamProcessor {
    /// Builds `topology`, creates the changelog topic if needed, fences an
    /// earlier instance, restores the state from the changelog topic (read
    /// to its end), rebuilds the global tables from their topics (read
    /// from the beginning to their end: see
    /// [`ProcessorConfig::with_global_input`]) and assigns itself every
    /// partition of the inputs (resuming from the group's committed
    /// offsets; from the beginning when it has none).
    ///
    /// Blocks on Kafka calls; call it off an async executor's threads.
    pub async fn open(
        topology: Topology,
        config: ProcessorConfig,
    ) -> Result<Self, KafkaStreamError> {
        let mut task = topology.build()?;
        // Compacted: restoring reads the latest value of each key.
        create_topics(
            &config.bootstrap,
            &[(&config.changelog_topic, 1)],
            &[("cleanup.policy", "compact")],
        )
        .await?;
        // Repartition topics: written by the upstream of each repartition,
        // read back as an input by this processor.
        let repartition_topics: HashMap<String, String> = task
            .repartitions()
            .iter()
            .map(|r| (r.clone(), config.repartition_topic(r)))
            .collect();
        let internal: Vec<(&str, i32)> = repartition_topics
            .values()
            .map(|t| (t.as_str(), config.repartition_partitions))
            .collect();
        if !internal.is_empty() {
            create_topics(&config.bootstrap, &internal, &[]).await?;
        }

        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap)
            .set("transactional.id", config.transactional_id())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Records keyed alike go to the same partition as with the
            // Java client (repartition topics are partitioned by key).
            .set("partitioner", "murmur2_random")
            .set(
                "transaction.timeout.ms",
                config.transaction_timeout.as_millis().to_string(),
            )
            .create()
            .map_err(|e| KafkaStreamError::kafka("create producer", e))?;
        producer
            .init_transactions(config.request_timeout)
            .map_err(|e| KafkaStreamError::kafka("init_transactions", e))?;

        let (restore, restored) = restore(&config, &mut task)?;
        let committed = config.interactive_queries.then(|| Arc::new(restored));
        let global = GlobalReader::bootstrap(&config, &mut task)?;

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create()
            .map_err(|e| KafkaStreamError::kafka("create consumer", e))?;
        let mut inputs: Vec<(String, String)> = config.inputs.clone();
        let mut internal: Vec<(String, String)> = repartition_topics
            .iter()
            .map(|(name, topic)| (topic.clone(), name.clone()))
            .collect();
        internal.sort();
        inputs.extend(internal);
        let mut topic_index = HashMap::new();
        for (i, (topic, _)) in inputs.iter().enumerate() {
            topic_index.insert(topic.clone(), i);
        }
        // Every partition of the inputs counts from the start, assigned
        // yet or not (the processor owns them all): records of the first
        // topic assigned must not run ahead of the others'.
        let mut group = PartitionGroup::new(config.input_buffer);
        let mut owned = TopicPartitionList::new();
        for (topic, &i) in &topic_index {
            let md = consumer
                .fetch_metadata(Some(topic), config.request_timeout)
                .map_err(|e| KafkaStreamError::kafka("input topic metadata", e))?;
            for t in md.topics().iter().filter(|t| t.error().is_none()) {
                for p in t.partitions() {
                    group.assign((i, p.id()));
                    owned
                        .add_partition_offset(topic, p.id(), Offset::Stored)
                        .map_err(|e| KafkaStreamError::kafka("assign inputs", e))?;
                }
            }
        }
        consumer
            .assign(&owned)
            .map_err(|e| KafkaStreamError::kafka("assign inputs", e))?;
        Ok(Self {
            group,
            config,
            task,
            consumer,
            producer,
            inputs,
            repartition_topics,
            topic_index,
            clock: Arc::new(SystemClock),
            committed,
            commits: 0,
            caught_up: HashSet::new(),
            known_end: HashMap::new(),
            start_offset: HashMap::new(),
            probe: None,
            restore,
            poisoned: false,
            global,
        })
    }

    /// Measures input idleness ([`ProcessorConfig::input_idle`]) and
    /// fires the processors' wall-clock punctuators on `clock` instead of
    /// the system clock (tests move a
    /// [`ManualClock`](smartmsg_engine::ManualClock) by hand).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Input records fetched but not processed yet, all partitions
    /// together.
    pub fn buffered(&self) -> usize {
        self.group.len()
    }

    /// The task (its stores hold the restored and processed state).
    pub fn task(&self) -> &Task {
        &self.task
    }

    /// What the restore on open found.
    pub fn restored(&self) -> RestoreStats {
        self.restore
    }

    /// A reader of the committed state of the key-value store `name` (a
    /// table, a non-windowed aggregate, a processor's store): the state
    /// restored on open and then as of each committed step, never what a
    /// step processed before its transaction committed. Cloneable, usable
    /// from any thread while the processor steps. Needs
    /// [`ProcessorConfig::with_interactive_queries`]
    /// ([`QueryError::NotEnabled`] otherwise); see [`StoreReader`].
    pub fn query_store<K, V>(&self, name: &str) -> Result<StoreReader<K, V>, QueryError>
    where
        K: Clone + Eq + std::hash::Hash + StateCodec + Send + 'static,
        V: StateCodec + Send + 'static,
    {
        StoreReader::new(&self.task, self.committed_store()?, name)
    }

    /// A reader of the committed state of the window store `name` (a
    /// tumbling or hopping windowed aggregation): as
    /// [`query_store`](Self::query_store); a fetch sees one commit (see
    /// [`WindowStoreReader`]).
    pub fn query_window_store<K, A>(
        &self,
        name: &str,
    ) -> Result<WindowStoreReader<K, A>, QueryError>
    where
        K: Clone + Eq + std::hash::Hash + StateCodec + Send + 'static,
        A: StateCodec + Send + 'static,
    {
        let mark = CommitMark::new(META_SPACE, COMMIT_MARK_KEY);
        WindowStoreReader::new(&self.task, self.committed_store()?, name, Some(mark))
    }

    fn committed_store(&self) -> Result<Arc<dyn KeyValueStore>, QueryError> {
        match &self.committed {
            Some(s) => Ok(Arc::clone(s) as Arc<dyn KeyValueStore>),
            None => Err(QueryError::NotEnabled {
                hint: "open the processor with ProcessorConfig::with_interactive_queries",
            }),
        }
    }

    /// Processes up to `max_batch` input records, in timestamp order
    /// across the input partitions (see [Input order](self#input-order);
    /// polling the consumer into the buffers, waiting at most `wait` for
    /// the first record the order lets through, then 200 ms at a time for
    /// more), fires the wall-clock punctuators that are due, and commits
    /// outputs, state changes and consumer offsets in one transaction.
    /// Returns zero records when none could be processed (none came, or
    /// an empty partition held the buffered ones back); it then commits
    /// only if a wall-clock punctuator fired.
    /// After an error the processor is poisoned: reopen it.
    ///
    /// Blocks (up to `wait` plus the Kafka calls).
    pub fn step(&mut self, wait: Duration) -> Result<ProcessorStep, KafkaStreamError> {
        if self.poisoned {
            return Err(KafkaStreamError::Poisoned);
        }
        self.poisoned = true;
        let r = self.step_inner(wait, true);
        if r.is_ok() {
            self.poisoned = false;
        } else {
            let _ = self.producer.flush(self.config.request_timeout);
            let _ = self.producer.abort_transaction(self.config.request_timeout);
        }
        r
    }

    /// Like [`step`](Self::step) but aborts the transaction instead of
    /// committing it (after producing everything and sending the offsets),
    /// as a crash before the commit would; the processor is poisoned
    /// afterwards. For tests of the exactly-once guarantee.
    #[doc(hidden)]
    pub fn step_and_abort(&mut self, wait: Duration) -> Result<ProcessorStep, KafkaStreamError> {
        if self.poisoned {
            return Err(KafkaStreamError::Poisoned);
        }
        self.poisoned = true;
        self.step_inner(wait, false)
    }

    fn step_inner(
        &mut self,
        wait: Duration,
        commit: bool,
    ) -> Result<ProcessorStep, KafkaStreamError> {
        if let Some(global) = self.global.as_mut() {
            global.catch_up(&mut self.task, self.config.max_batch)?;
        }
        let deadline = Instant::now() + wait;
        // What was found caught up in an earlier step may have grown.
        self.caught_up.clear();
        let mut records = 0usize;
        while records < self.config.max_batch {
            if self.group.any_empty() {
                // Take what the consumer holds already.
                self.fill(Duration::ZERO)?;
            }
            match self.choose()? {
                Choice::Process(k) => {
                    self.process_head(k)?;
                    records += 1;
                }
                choice => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let timeout = match choice {
                        // Nothing buffered: wait for the first record up
                        // to `wait`; after some, a little for more.
                        _ if records > 0 => Duration::from_millis(200),
                        Choice::Empty => left,
                        // Held back: look again soon (the idle time runs
                        // on the clock, the step's wait on this one).
                        _ => left.min(Duration::from_millis(50)),
                    };
                    let got = self.fill(timeout)?;
                    if (records > 0 && !got) || (records == 0 && Instant::now() >= deadline) {
                        break;
                    }
                }
            }
        }
        // Wall-clock punctuators fire after the step's records, and their
        // effects commit with them (or alone, when no record came).
        let punctuated = self.task.punctuate_wall_clock(self.clock.now_ms())?;
        if records == 0 && !punctuated {
            return Ok(ProcessorStep::default());
        }

        // Per partition, the offset of the first record not processed:
        // the head of its buffer, or, with nothing buffered, the
        // consumer's position (which also passes transaction markers).
        // Buffered records are not committed: a restart reads them again.
        let mut offsets = TopicPartitionList::new();
        let position = self
            .consumer
            .position()
            .map_err(|e| KafkaStreamError::kafka("position", e))?;
        for e in position.elements() {
            let head = self
                .topic_index
                .get(e.topic())
                .and_then(|&t| self.group.head_offset((t, e.partition())));
            let next = match (head, e.offset()) {
                (Some(h), _) => h,
                (None, Offset::Offset(o)) => o,
                _ => continue,
            };
            offsets
                .add_partition_offset(e.topic(), e.partition(), Offset::Offset(next))
                .map_err(|e| KafkaStreamError::kafka("offsets", e))?;
        }
        let group = self
            .consumer
            .group_metadata()
            .ok_or(KafkaStreamError::Kafka {
                op: "group metadata",
                source: KafkaError::ConsumerCommit(RDKafkaErrorCode::InvalidGroupId),
            })?;

        let mut outputs = Vec::new();
        self.task.drain_outputs(&mut outputs);
        let mut batch = WriteBatch::new();
        self.task.flush(&mut batch);
        let meta = self.task.meta().to_bytes();
        if let Some(committed) = &self.committed {
            // Checked before the transaction, so that applying it to the
            // copy after the commit cannot fail on a limit.
            committed.limits().check_batch(&batch)?;
        }

        self.producer
            .begin_transaction()
            .map_err(|e| KafkaStreamError::kafka("begin_transaction", e))?;
        for o in &outputs {
            // A repartition's records go to its topic, partitioned by key.
            let topic = match self.repartition_topics.get(&o.output) {
                Some(t) => t.clone(),
                None => format!("{}{}", self.config.output_prefix, o.output),
            };
            let mut rec = BaseRecord::<[u8], [u8]>::to(&topic)
                .key(o.key.as_slice())
                .payload(o.value.as_slice())
                .timestamp(o.timestamp_ms as i64);
            if !o.headers.is_empty() {
                rec = rec.headers(crate::headers::to_kafka(&o.headers, &[]));
            }
            self.send(rec)?;
        }
        let mut changelog = 0usize;
        for (space, key, value) in batch.iter() {
            let k = changelog_key(space, key);
            let mut rec = BaseRecord::<[u8], [u8]>::to(&self.config.changelog_topic)
                .key(k.as_slice())
                .partition(0);
            if let Some(v) = value {
                rec = rec.payload(v);
            }
            self.send(rec)?;
            changelog += 1;
        }
        let mk = changelog_key(META_SPACE, &[]);
        let rec = BaseRecord::<[u8], [u8]>::to(&self.config.changelog_topic)
            .key(mk.as_slice())
            .payload(meta.as_slice())
            .partition(0);
        self.send(rec)?;
        changelog += 1;

        self.producer
            .send_offsets_to_transaction(&offsets, &group, self.config.request_timeout)
            .map_err(|e| KafkaStreamError::kafka("send_offsets_to_transaction", e))?;
        // Delivery reports are polled here (a BaseProducer has no thread
        // for them), so the commit or abort finds nothing outstanding.
        // Not with `flush`: rust-rdkafka's polls in 100 ms steps, which
        // made every step take at least 100 ms; this answers within 1 ms.
        let deadline = Instant::now() + self.config.request_timeout;
        while self.producer.in_flight_count() > 0 {
            if Instant::now() >= deadline {
                return Err(KafkaStreamError::kafka(
                    "flush",
                    KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut),
                ));
            }
            self.producer.poll(Duration::from_millis(1));
        }
        if !commit {
            self.producer
                .abort_transaction(self.config.request_timeout)
                .map_err(|e| KafkaStreamError::kafka("abort_transaction", e))?;
            return Ok(ProcessorStep {
                records,
                outputs: outputs.len(),
                changelog,
            });
        }
        self.producer
            .commit_transaction(self.config.request_timeout)
            .map_err(|e| KafkaStreamError::kafka("commit_transaction", e))?;
        if let Some(committed) = &self.committed {
            self.commits += 1;
            batch.put(META_SPACE, COMMIT_MARK_KEY, self.commits.to_be_bytes());
            committed.write(&batch)?;
        }
        Ok(ProcessorStep {
            records,
            outputs: outputs.len(),
            changelog,
        })
    }

    /// Polls the input consumer (waiting up to `timeout` for the first
    /// event, then taking what is there) into the buffers, stopping at the
    /// first buffer that fills. True when a record came.
    fn fill(&mut self, timeout: Duration) -> Result<bool, KafkaStreamError> {
        let mut got = false;
        let mut wait = timeout;
        // Bounded: it ends at the consumer's empty queue, or at the first
        // record that fills its partition's buffer.
        loop {
            let polled = match self.consumer.poll(wait) {
                None => None,
                Some(Err(KafkaError::PartitionEOF(_))) => Some(None),
                Some(Err(e)) => return Err(KafkaStreamError::kafka("consume", e)),
                Some(Ok(m)) => Some(self.topic_index.get(m.topic()).map(|&t| {
                    let record = BufferedRecord {
                        offset: m.offset(),
                        key: m.key().unwrap_or(&[]).to_vec(),
                        value: m.payload().unwrap_or(&[]).to_vec(),
                        timestamp_ms: m.timestamp().to_millis().unwrap_or(0).max(0) as u64,
                        headers: crate::headers::from_kafka(m.headers()),
                    };
                    ((t, m.partition()), record)
                })),
            };
            wait = Duration::ZERO;
            let (k, record) = match polled {
                None => break,
                Some(None) => continue,
                Some(Some(r)) => r,
            };
            got = true;
            if self.group.push(k, record) {
                // A full buffer stops the polling: what else the consumer
                // fetched waits in its own queue (bounded by librdkafka's
                // `queued.max.messages.kbytes`). Not `pause`: librdkafka
                // drops a paused partition's fetched records and fetches
                // them again on `resume`, a broker round trip per
                // half-buffer (the Kafka stream benchmark fell from 18,173
                // to 1,954 records/s with it).
                break;
            }
        }
        Ok(got)
    }

    /// The next partition to process, by the buffers' head timestamps and
    /// the input idle rule.
    fn choose(&mut self) -> Result<Choice, KafkaStreamError> {
        let now = self.clock.now_ms();
        let idle = self.config.input_idle;
        let bound = self.config.request_timeout;
        let mut group = std::mem::replace(&mut self.group, PartitionGroup::new(1));
        let r = group.choose(now, idle, bound, |k| self.lag(k));
        self.group = group;
        r
    }

    /// Whether the broker holds records of `k` (empty in its buffer) the
    /// consumer has not fetched. Found by fetching from the consumer's
    /// position with the probe consumer (`read_committed`): a record
    /// means behind, the partition's end (EOF) caught up. (Not with
    /// `ListOffsets`, as `fetch_watermarks` asks: tansu 0.6 answers it
    /// wrongly, e.g. 1 for a partition of 30 records written in one
    /// batch.) A record seen at offset `o` is remembered: until the
    /// position passes `o`, `k` is behind without asking again.
    fn lag(&mut self, k: PartitionKey) -> Result<Lag, KafkaStreamError> {
        if self.caught_up.contains(&k) {
            return Ok(Lag::CaughtUp);
        }
        let topic = self.inputs[k.0].0.clone();
        let timeout = self.config.request_timeout;
        let position = self
            .consumer
            .position()
            .map_err(|e| KafkaStreamError::kafka("position", e))?;
        let next = match position.find_partition(&topic, k.1).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Offset::Offset(o),
            _ => match self.start_offset.get(&k) {
                Some(&o) => Offset::Offset(o),
                None => {
                    // Nothing returned yet: the group's committed offset,
                    // else (auto.offset.reset = earliest) the beginning.
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&topic, k.1);
                    let committed = self
                        .consumer
                        .committed_offsets(tpl, timeout)
                        .map_err(|e| KafkaStreamError::kafka("committed offsets", e))?;
                    match committed.find_partition(&topic, k.1).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => {
                            self.start_offset.insert(k, o);
                            Offset::Offset(o)
                        }
                        _ => Offset::Beginning,
                    }
                }
            },
        };
        if let (Offset::Offset(n), Some(&end)) = (next, self.known_end.get(&k)) {
            if n < end {
                return Ok(Lag::Behind);
            }
        }
        match self.probe(&topic, k.1, next)? {
            Some(o) => {
                self.known_end.insert(k, o + 1);
                if next == Offset::Beginning {
                    self.start_offset.insert(k, o);
                }
                Ok(Lag::Behind)
            }
            None => {
                self.caught_up.insert(k);
                Ok(Lag::CaughtUp)
            }
        }
    }

    /// The offset of the first record of `topic`/`partition` from `from`
    /// on, or `None` at its end (`read_committed`) or when the probe gets
    /// no answer within the request timeout (logged).
    fn probe(
        &mut self,
        topic: &str,
        partition: i32,
        from: Offset,
    ) -> Result<Option<i64>, KafkaStreamError> {
        let kafka = |e| KafkaStreamError::kafka("probe input", e);
        if self.probe.is_none() {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &self.config.bootstrap)
                .set("group.id", format!("{}.probe", self.config.group_id))
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "true")
                .set("isolation.level", "read_committed")
                .set("fetch.wait.max.ms", "10")
                .create()
                .map_err(kafka)?;
            self.probe = Some(c);
        }
        let Some(c) = self.probe.as_ref() else {
            return Ok(None);
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, from)
            .map_err(kafka)?;
        c.assign(&tpl).map_err(kafka)?;
        let deadline = Instant::now() + self.config.request_timeout;
        let found = loop {
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) if m.topic() == topic && m.partition() == partition => {
                    break Some(m.offset());
                }
                Some(Ok(_)) => {}
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition => break None,
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => return Err(kafka(e)),
                None if Instant::now() >= deadline => {
                    tracing::warn!(
                        topic,
                        partition,
                        "no answer probing an empty input partition: taken as caught up for this step"
                    );
                    break None;
                }
                None => {}
            }
        };
        c.unassign().map_err(kafka)?;
        Ok(found)
    }

    /// Processes the head record of partition `k`.
    fn process_head(&mut self, k: PartitionKey) -> Result<(), KafkaStreamError> {
        let Some(r) = self.group.pop(k) else {
            return Ok(());
        };
        let input = &self.inputs[k.0].1;
        self.task
            .process_encoded(input, &r.key, &r.value, r.timestamp_ms, r.headers)?;
        Ok(())
    }

    fn send(&self, mut rec: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaStreamError> {
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(KafkaStreamError::kafka("produce", e)),
            }
        }
    }

    /// Steps until a step finds no input within `idle`; the total.
    pub fn run_until_idle(&mut self, idle: Duration) -> Result<ProcessorStep, KafkaStreamError> {
        let mut total = ProcessorStep::default();
        loop {
            let s = self.step(idle)?;
            if s.records == 0 {
                return Ok(total);
            }
            total.records += s.records;
            total.outputs += s.outputs;
            total.changelog += s.changelog;
        }
    }
}

/// Reads the changelog topic to its end into an in-memory store and loads
/// it into `task`.
/// Restores `task` from the changelog topic; returns what it read and the
/// restored state.
fn restore(
    config: &ProcessorConfig,
    task: &mut Task,
) -> Result<(RestoreStats, InMemoryStore), KafkaStreamError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("group.id", format!("{}.restore", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|e| KafkaStreamError::kafka("create restore consumer", e))?;
    let topic = config.changelog_topic.as_str();
    let (_, end) = consumer
        .fetch_watermarks(topic, 0, config.request_timeout)
        .map_err(|e| KafkaStreamError::kafka("changelog watermarks", e))?;
    let mut stats = RestoreStats { records: 0, end };
    let store = InMemoryStore::without_changelog_retention();
    if end <= 0 {
        return Ok((stats, store));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| KafkaStreamError::kafka("assign changelog", e))?;
    consumer
        .assign(&tpl)
        .map_err(|e| KafkaStreamError::kafka("assign changelog", e))?;
    let mut meta = None;
    let mut batch = WriteBatch::new();
    let mut at = 0i64;
    let deadline = Instant::now() + config.restore_timeout;
    loop {
        if Instant::now() >= deadline {
            return Err(KafkaStreamError::RestoreTimeout { at, end });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => {
                // The end of what read_committed shows; transaction markers
                // may sit between it and the high watermark. (Not the
                // watermark itself: tansu 0.6 may answer it with the end of
                // the first batch.)
                break;
            }
            Some(Err(e)) => return Err(KafkaStreamError::kafka("read changelog", e)),
            Some(Ok(m)) => {
                at = m.offset() + 1;
                stats.records += 1;
                let k = m.key().unwrap_or(&[]);
                let (space, key) =
                    decode_changelog_key(k).ok_or_else(|| KafkaStreamError::Corrupt {
                        offset: m.offset(),
                        reason: "bad key".into(),
                    })?;
                if space == META_SPACE {
                    let v = m.payload().unwrap_or(&[]);
                    meta = Some(TaskMeta::decode(v).map_err(|e| KafkaStreamError::Corrupt {
                        offset: m.offset(),
                        reason: e.to_string(),
                    })?);
                } else {
                    match m.payload() {
                        Some(v) => batch.put(space, key, v),
                        None => batch.delete(space, key),
                    }
                    if batch.len() >= 1000 {
                        store.write(&std::mem::take(&mut batch))?;
                    }
                }
            }
        }
    }
    if !batch.is_empty() {
        store.write(&batch)?;
    }
    task.restore(&store)?;
    if let Some(meta) = meta {
        task.set_meta(meta);
    }
    Ok((stats, store))
}

/// A [`Source`] over one partition of a topic: the offset is the position.
pub struct KafkaTopicSource {
    consumer: BaseConsumer,
    topic: String,
    partition: i32,
    input: String,
    next: Option<u64>,
    poll: Duration,
}

impl std::fmt::Debug for KafkaTopicSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTopicSource")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}

impl KafkaTopicSource {
    /// A source reading `topic`'s `partition` as the topology input
    /// `input`, with consumer group `group_id` (`read_committed`; the
    /// session and poll timeouts tansu needs).
    pub fn new(
        bootstrap: &str,
        group_id: &str,
        topic: &str,
        partition: i32,
        input: &str,
    ) -> Result<Self, KafkaStreamError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", "6000")
            .set("max.poll.interval.ms", "7000")
            .create()
            .map_err(|e| KafkaStreamError::kafka("create consumer", e))?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            partition,
            input: input.to_owned(),
            next: None,
            poll: Duration::from_millis(200),
        })
    }

    fn seek(&mut self, from: u64) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(from as i64))?;
        self.consumer.assign(&tpl)?;
        self.next = Some(from);
        Ok(())
    }
}

#[async_trait]
impl Source for KafkaTopicSource {
    /// Blocks the calling thread for up to one poll interval (200 ms) when
    /// nothing is waiting.
    async fn read(&mut self, from: u64, max: usize) -> Result<Vec<SourceRecord>, SourceError> {
        let backend = |e: KafkaError| SourceError::Backend(BackendError::new(e));
        if self.next != Some(from) {
            self.seek(from).map_err(backend)?;
        }
        let mut out = Vec::new();
        while out.len() < max {
            let wait = if out.is_empty() {
                self.poll
            } else {
                Duration::ZERO
            };
            match self.consumer.poll(wait) {
                None => break,
                Some(Err(e)) => return Err(backend(e)),
                Some(Ok(m)) => {
                    let position = m.offset() as u64;
                    self.next = Some(position + 1);
                    out.push(SourceRecord {
                        position,
                        input: self.input.clone(),
                        key: Bytes::copy_from_slice(m.key().unwrap_or(&[])),
                        value: Bytes::copy_from_slice(m.payload().unwrap_or(&[])),
                        timestamp_ms: m.timestamp().to_millis().unwrap_or(0).max(0) as u64,
                        headers: crate::headers::from_kafka(m.headers()),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// A [`Sink`] producing each output to topic `<prefix><output>`,
/// exactly once per `(runner, output id)` as the [`Sink`] contract asks.
///
/// Each `send` (one runner commit's outputs) is one Kafka transaction
/// holding the outputs and a progress record (key: the runner, value: the
/// commit number) in the runner's own compacted topic
/// `<prefix>__sink_progress.<runner>`. At its first `send` the sink reads
/// the runner's last delivered commit from that topic (`read_committed`,
/// after `init_transactions` settled any transaction of an earlier sink)
/// and from then on skips outputs of commits not after it: a commit
/// re-delivered after a crash (the runner's outbox is kept until its next
/// commit) produces nothing. The producer's `transactional.id` is
/// `smartmsg.sink:<prefix>:<runner>`, so a second sink for the same
/// runner fences the first, and a fenced sink fails every later `send`
/// (make a new one). One sink serves one runner; runner names must be
/// valid in topic names (`[A-Za-z0-9._-]`).
///
/// Condition: the broker hides aborted transactions from `read_committed`
/// readers (Apache Kafka does; tansu 0.6 does not, so there a transaction
/// aborted after producing could count as delivered).
pub struct KafkaTopicSink {
    bootstrap: String,
    prefix: String,
    timeout: Duration,
    /// Set up at the first `send`, for its runner.
    state: Option<SinkState>,
    /// Fenced by a newer sink, or its producer broke: every `send` fails.
    failed: Option<String>,
}

struct SinkState {
    runner: String,
    progress_topic: String,
    producer: BaseProducer,
    /// The last commit whose outputs are delivered.
    delivered: Option<u64>,
}

impl std::fmt::Debug for KafkaTopicSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTopicSink")
            .field("prefix", &self.prefix)
            .field("runner", &self.state.as_ref().map(|s| &s.runner))
            .field("delivered", &self.state.as_ref().map(|s| s.delivered))
            .finish_non_exhaustive()
    }
}

impl KafkaTopicSink {
    /// A sink producing to `<prefix><output>` topics (nothing is contacted
    /// before the first `send`).
    pub fn new(bootstrap: &str, prefix: &str) -> Result<Self, KafkaStreamError> {
        Ok(Self {
            bootstrap: bootstrap.to_owned(),
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(30),
            state: None,
            failed: None,
        })
    }

    /// The last commit of `runner` whose outputs this sink (or an earlier
    /// one) delivered, once the sink has served `runner`.
    pub fn delivered(&self, runner: &str) -> Option<u64> {
        self.state
            .as_ref()
            .filter(|s| s.runner == runner)
            .and_then(|s| s.delivered)
    }

    /// Sets up the producer for `runner` (fencing an earlier sink of the
    /// same runner) and reads what was delivered.
    async fn start(&mut self, runner: &str) -> Result<(), KafkaStreamError> {
        if let Some(why) = &self.failed {
            return Err(KafkaStreamError::Config(format!(
                "this sink can no longer deliver ({why}); create a new one"
            )));
        }
        if let Some(s) = &self.state {
            if s.runner == runner {
                return Ok(());
            }
            return Err(KafkaStreamError::Config(format!(
                "this sink serves runner `{}`, not `{runner}`",
                s.runner
            )));
        }
        if runner.is_empty()
            || !runner
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(KafkaStreamError::Config(format!(
                "runner name `{runner}` cannot name a topic (use [A-Za-z0-9._-])"
            )));
        }
        let progress_topic = format!("{}__sink_progress.{runner}", self.prefix);
        create_topics(
            &self.bootstrap,
            &[(&progress_topic, 1)],
            &[("cleanup.policy", "compact")],
        )
        .await?;
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set(
                "transactional.id",
                format!("smartmsg.sink:{}:{runner}", self.prefix),
            )
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| KafkaStreamError::kafka("create sink producer", e))?;
        producer
            .init_transactions(self.timeout)
            .map_err(|e| KafkaStreamError::kafka("init_transactions", e))?;
        // After init_transactions: an earlier sink's open transaction is
        // aborted (or committed) by now, so its progress is settled.
        let delivered = self.read_progress(&progress_topic, runner)?;
        self.state = Some(SinkState {
            runner: runner.to_owned(),
            progress_topic,
            producer,
            delivered,
        });
        Ok(())
    }

    /// The last progress value of `runner` in its progress topic (only its
    /// own sinks write there, and `init_transactions` has settled their
    /// transactions, so `read_committed` reads to the end).
    fn read_progress(&self, topic: &str, runner: &str) -> Result<Option<u64>, KafkaStreamError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set(
                "group.id",
                format!("smartmsg.sink:{}:{runner}", self.prefix),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .create()
            .map_err(|e| KafkaStreamError::kafka("create progress consumer", e))?;
        let (_, end) = consumer
            .fetch_watermarks(topic, 0, self.timeout)
            .map_err(|e| KafkaStreamError::kafka("progress watermarks", e))?;
        if end <= 0 {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .map_err(|e| KafkaStreamError::kafka("assign progress", e))?;
        consumer
            .assign(&tpl)
            .map_err(|e| KafkaStreamError::kafka("assign progress", e))?;
        let deadline = Instant::now() + self.timeout;
        let mut last = None;
        loop {
            if Instant::now() >= deadline {
                return Err(KafkaStreamError::kafka(
                    "read sink progress",
                    KafkaError::Global(RDKafkaErrorCode::OperationTimedOut),
                ));
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(KafkaStreamError::kafka("read sink progress", e)),
                Some(Ok(m)) => {
                    if m.key() == Some(runner.as_bytes()) {
                        let v = m.payload().unwrap_or(&[]);
                        let bytes: [u8; 8] =
                            v.try_into().map_err(|_| KafkaStreamError::Corrupt {
                                offset: m.offset(),
                                reason: format!("sink progress of {} bytes, expected 8", v.len()),
                            })?;
                        last = Some(u64::from_be_bytes(bytes));
                    }
                    if m.offset() + 1 >= end {
                        break;
                    }
                }
            }
        }
        Ok(last)
    }

    /// Produces `records` and the progress record in one transaction.
    fn deliver(
        &mut self,
        runner: &str,
        records: &[&OutputRecord],
        commit: u64,
    ) -> Result<(), KafkaError> {
        let timeout = self.timeout;
        let prefix = self.prefix.clone();
        let Some(st) = self.state.as_mut() else {
            return Err(KafkaError::Global(RDKafkaErrorCode::State));
        };
        let progress_topic = st.progress_topic.clone();
        let p = &st.producer;
        p.begin_transaction()?;
        let result = (|| {
            for r in records {
                let topic = format!("{prefix}{}", r.output);
                let id = format!("{}:{}", r.id.commit, r.id.index);
                let headers = crate::headers::to_kafka(
                    &r.headers,
                    &[("smartmsg-runner", runner), ("smartmsg-output", &id)],
                );
                let rec = BaseRecord::<[u8], [u8]>::to(&topic)
                    .key(r.key.as_slice())
                    .payload(r.value.as_slice())
                    .timestamp(r.timestamp_ms as i64)
                    .headers(headers);
                send_blocking(p, rec)?;
            }
            let progress = commit.to_be_bytes();
            send_blocking(
                p,
                BaseRecord::<[u8], [u8]>::to(&progress_topic)
                    .key(runner.as_bytes())
                    .payload(&progress[..]),
            )?;
            // Delivery reports are polled here (see `step_inner`: not with
            // `flush`, which waits in 100 ms steps).
            let deadline = Instant::now() + timeout;
            while p.in_flight_count() > 0 {
                if Instant::now() >= deadline {
                    return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
                }
                p.poll(Duration::from_millis(1));
            }
            p.commit_transaction(timeout)
        })();
        match result {
            Ok(()) => {
                st.delivered = Some(commit);
                Ok(())
            }
            Err(e) => {
                let fenced = matches!(
                    &e,
                    KafkaError::Transaction(t) if t.is_fatal()
                ) || matches!(
                    e.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::Fenced)
                );
                if fenced || p.abort_transaction(timeout).is_err() {
                    // Fenced by a newer sink (or broken): never set up
                    // again, which would fence the newer one in turn.
                    self.failed = Some(e.to_string());
                    self.state = None;
                }
                Err(e)
            }
        }
    }
}

/// Produces `rec`, waiting while the producer's queue is full.
fn send_blocking(p: &BaseProducer, mut rec: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                p.poll(Duration::from_millis(50));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[async_trait]
impl Sink for KafkaTopicSink {
    /// Blocks the calling thread until the transaction is committed.
    async fn send(&mut self, runner: &str, records: &[OutputRecord]) -> Result<(), SinkError> {
        let backend = |e: KafkaStreamError| SinkError::Backend(BackendError::new(e));
        self.start(runner).await.map_err(backend)?;
        let delivered = self.delivered(runner);
        if let (Some(d), Some(c)) = (delivered, records.iter().map(|r| r.id.commit).min()) {
            if c < d {
                tracing::warn!(
                    runner,
                    commit = c,
                    delivered = d,
                    "outputs of a commit before the last delivered one are skipped: was the runner's store reset?"
                );
            }
        }
        let fresh: Vec<&OutputRecord> = records
            .iter()
            .filter(|r| delivered.is_none_or(|d| r.id.commit > d))
            .collect();
        let Some(commit) = fresh.iter().map(|r| r.id.commit).max() else {
            return Ok(());
        };
        self.deliver(runner, &fresh, commit)
            .map_err(|e| backend(KafkaStreamError::kafka("deliver", e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changelog_keys_round_trip() {
        let k = changelog_key("counts", b"a\0b");
        assert_eq!(decode_changelog_key(&k), Some(("counts", &b"a\0b"[..])));
        let m = changelog_key(META_SPACE, &[]);
        assert_eq!(decode_changelog_key(&m), Some((META_SPACE, &[][..])));
        assert_eq!(decode_changelog_key(&[0, 0, 0, 9, b'x']), None);
        assert_eq!(decode_changelog_key(&[0, 0]), None);
    }
}
