//! [`KafkaEventLog`]: the engine's [`EventLog`] on a Kafka topic.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::producer::Producer;
use rdkafka::types::RDKafkaErrorCode;
use smartmsg_engine::{
    AppendError, AppendResult, AppendTx, BackendError, EventLog, HeadWatch, Limits, ReadError,
    RecordedEvent, StreamId,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::chain::{self, unpack, Resolved};
use crate::checkpoint;
use crate::config::KafkaConfig;
use crate::envelope;
use crate::error::KafkaLogError;
use crate::reader::{self, Readers, Want};
use crate::writer::{self, Append, Checkpoints, Counters, Request, Shared, State, Writer};

/// What the index rebuild at open found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RebuildStats {
    /// Records read from the events topic (with a checkpoint, only those
    /// after the offsets it covers).
    pub records: u64,
    /// Kafka transactions on the committed chain (with a checkpoint, the
    /// count it recorded plus those read after it).
    pub committed_batches: u64,
    /// Kafka transactions seen but not committed (aborted or cut short;
    /// visible only on brokers that show aborted records). With a
    /// checkpoint, its count plus those read after it, which may count an
    /// old aborted transaction twice.
    pub ignored_batches: u64,
    /// Events indexed (the head).
    pub events: u64,
    /// Events restored from a checkpoint rather than read from the topic
    /// (0: no checkpoint was used, a full rebuild). `events -
    /// checkpoint_events` events were read from the topic.
    pub checkpoint_events: u64,
    /// Size of the checkpoint used, in bytes.
    pub checkpoint_bytes: u64,
    /// Time spent finding, reading, decoding and checking checkpoints
    /// (part of `duration`).
    pub checkpoint_duration: Duration,
    /// Checkpoints found complete but refused (damaged, another log's,
    /// inconsistent with the topic); each is logged with its reason.
    pub checkpoints_rejected: u32,
    /// Time spent rebuilding the index once fenced: the checkpoint, reading
    /// the topic, resolving the chain (part of `duration`).
    pub rebuild_duration: Duration,
    /// How long `open` spent in `init_transactions`, loading a checkpoint
    /// and reading the topic.
    pub duration: Duration,
}

/// Counters of a [`KafkaEventLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KafkaLogStats {
    /// Kafka transactions committed by this handle.
    pub kafka_transactions: u64,
    /// `AppendTx`s written by this handle (idempotent retries excluded).
    pub appends_written: u64,
    /// Events written by this handle.
    pub events_written: u64,
    /// Kafka transactions aborted (or failed) by this handle.
    pub aborted_transactions: u64,
    /// Checkpoints this handle started writing.
    pub checkpoints_started: u64,
    /// Checkpoints this handle wrote.
    pub checkpoints_written: u64,
    /// Checkpoint writes that failed (each logged; the next is tried at the
    /// next interval).
    pub checkpoint_failures: u64,
    /// Events covered by the last checkpoint this handle wrote (0: none).
    pub checkpoint_events: u64,
    /// How long the writer spent encoding its last checkpoint: appends
    /// wait this long (the chunks are written by another thread).
    pub checkpoint_encode_time: Duration,
    /// The rebuild at open.
    pub rebuild: RebuildStats,
}

/// The writer's index state, for tests that compare two rebuilds.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexState {
    /// The index (streams, versions, positions, idempotency keys).
    pub index: smartmsg_engine::index::LogIndex,
    /// (partition, offset) of every position.
    pub locations: Vec<(i32, i64)>,
    /// The committed chain's tip.
    pub tip: u64,
}

/// An [`EventLog`] on Kafka. See the crate documentation for the design.
///
/// Opening it makes this process the log's single writer: it fences any
/// earlier writer of the same log (same `transactional.id`), then rebuilds
/// the index by reading the topic. Dropping it stops the writer; use
/// [`KafkaEventLog::close`] to wait for that.
pub struct KafkaEventLog {
    shared: Arc<Shared>,
    readers: Arc<Readers>,
    config: Arc<KafkaConfig>,
    requests: mpsc::Sender<Request>,
    head: watch::Receiver<u64>,
    thread: Option<std::thread::JoinHandle<()>>,
    rebuild: RebuildStats,
}

impl std::fmt::Debug for KafkaEventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaEventLog")
            .field("topic", &self.shared.topic)
            .field("partitions", &self.shared.partitions)
            .field("head", &*self.head.borrow())
            .finish()
    }
}

impl KafkaEventLog {
    /// Opens (creating the topic if needed) the log `config` names and
    /// becomes its writer.
    ///
    /// Must be called inside a tokio runtime (blocking librdkafka calls run
    /// on its blocking pool).
    pub async fn open(config: KafkaConfig) -> Result<Self, KafkaLogError> {
        config.validate()?;
        let config = Arc::new(config);
        let topic = config.topic();
        ensure_topic(&config, &topic).await?;
        if config.checkpoint_every_events > 0 {
            if let Err(e) = checkpoint::ensure_topic(&config).await {
                tracing::warn!(
                    topic = %config.checkpoint_topic(), error = %e,
                    "cannot create the checkpoints topic; checkpoint writes may fail"
                );
            }
        }

        let started = Instant::now();
        let cfg = config.clone();
        let t = topic.clone();
        let (producer, deliveries, opened) = tokio::task::spawn_blocking(move || {
            check_partitions(&cfg, &t)?;
            let (producer, deliveries) = writer::producer(&cfg)?;
            // Fences every earlier writer and settles its open transaction.
            producer
                .init_transactions(cfg.transaction_timeout)
                .map_err(|e| {
                    if crate::error::is_fenced(&e) {
                        KafkaLogError::Fenced
                    } else {
                        KafkaLogError::kafka("init_transactions", e)
                    }
                })?;
            let opened = rebuild(&cfg, &t)?;
            Ok::<_, KafkaLogError>((producer, deliveries, opened))
        })
        .await
        .map_err(|e| KafkaLogError::Poisoned(format!("open task failed: {e}")))??;

        let Opened {
            rebuild_duration,
            resolved,
            records,
            ends,
            checkpoint,
            checkpoint_duration,
            rejected,
        } = opened;
        let mut resolved = resolved;
        resolved
            .index
            .set_key_window(config.limits.idempotency_window);
        let head = resolved.index.head();
        let rebuild = RebuildStats {
            records,
            committed_batches: resolved.committed_batches,
            ignored_batches: resolved.ignored_batches,
            events: head,
            checkpoint_events: checkpoint.map_or(0, |c| c.events),
            checkpoint_bytes: checkpoint.map_or(0, |c| c.bytes),
            checkpoint_duration,
            checkpoints_rejected: rejected,
            rebuild_duration,
            duration: started.elapsed(),
        };
        tracing::info!(%topic, ?rebuild, "kafka event log opened");
        let shared = Arc::new(Shared {
            topic: topic.clone(),
            partitions: config.partitions,
            limits: config.limits,
            state: RwLock::new(State {
                index: resolved.index,
                locs: resolved.locs,
                committed: head,
                tip: resolved.tip,
            }),
            stats: Counters::default(),
        });
        let checkpoints = if config.checkpoint_every_events > 0 {
            // Write first to the slot the loaded checkpoint is not in, so
            // that it survives a torn write.
            let slot = checkpoint.map_or(0, |c| c.slot ^ 1);
            let (jobs, thread) =
                checkpoint::Checkpointer::spawn(config.clone(), shared.clone(), slot).map_err(
                    |e| KafkaLogError::Poisoned(format!("spawn the checkpoint thread: {e}")),
                )?;
            Some(Checkpoints {
                every: config.checkpoint_every_events,
                last: head,
                covered: ends,
                base_committed: resolved.committed_batches,
                base_ignored: resolved.ignored_batches,
                jobs: Some(jobs),
                thread: Some(thread),
            })
        } else {
            None
        };
        let (head_tx, head_rx) = watch::channel(head);
        let (req_tx, req_rx) = mpsc::channel(config.queue_capacity);
        let writer = Writer {
            shared: shared.clone(),
            config: config.clone(),
            producer,
            deliveries,
            rx: req_rx,
            head: head_tx,
            tip: resolved.tip,
            next_seq: resolved.next_seq,
            poison: None,
            carry: None,
            checkpoints,
        };
        let thread = std::thread::Builder::new()
            .name("smartmsg-kafka-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| KafkaLogError::Poisoned(format!("spawn the writer thread: {e}")))?;
        Ok(Self {
            readers: Arc::new(Readers::new(config.clone(), topic)),
            shared,
            config,
            requests: req_tx,
            head: head_rx,
            thread: Some(thread),
            rebuild,
        })
    }

    /// Writes a checkpoint of the index now (besides the ones written every
    /// [`KafkaConfig::checkpoint_every_events`]) and waits until it is on
    /// the checkpoints topic; returns the events it covers. Useful before a
    /// planned restart. Appends go on meanwhile (they wait only while the
    /// writer encodes the index).
    pub async fn checkpoint(&self) -> Result<u64, KafkaLogError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Checkpoint(reply))
            .await
            .map_err(|_| KafkaLogError::Poisoned("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| KafkaLogError::Poisoned("the writer has stopped".into()))?
    }

    /// A copy of the writer's index, locations and chain tip; for tests
    /// that compare a rebuild from a checkpoint with a full one. Call it
    /// when no append is in flight.
    #[doc(hidden)]
    pub fn index_state(&self) -> IndexState {
        let st = self.shared.state.read().expect("state lock");
        IndexState {
            index: st.index.clone(),
            locations: st.locs.iter().map(|&l| unpack(l)).collect(),
            tip: st.tip,
        }
    }

    /// Stops the writer and waits until it has released the producer.
    pub async fn close(mut self) {
        let thread = self.thread.take();
        drop(self);
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The events topic.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// The partition `stream`'s events go to.
    pub fn partition_of(&self, stream: &StreamId) -> i32 {
        envelope::partition_for(stream, self.shared.partitions)
    }

    /// Where the event at `position` is on the topic: (partition, offset),
    /// if it is committed.
    pub fn location(&self, position: u64) -> Option<(i32, i64)> {
        let st = self.shared.state.read().expect("state lock");
        st.locs.get(position as usize).map(|&l| unpack(l))
    }

    /// Counters.
    pub fn stats(&self) -> KafkaLogStats {
        let s = &self.shared.stats;
        KafkaLogStats {
            kafka_transactions: s.kafka_transactions.load(Ordering::Relaxed),
            appends_written: s.appends_written.load(Ordering::Relaxed),
            events_written: s.events_written.load(Ordering::Relaxed),
            aborted_transactions: s.aborted_transactions.load(Ordering::Relaxed),
            checkpoints_started: s.checkpoints_started.load(Ordering::Relaxed),
            checkpoints_written: s.checkpoints_written.load(Ordering::Relaxed),
            checkpoint_failures: s.checkpoint_failures.load(Ordering::Relaxed),
            checkpoint_events: s.checkpoint_events.load(Ordering::Relaxed),
            checkpoint_encode_time: Duration::from_nanos(
                s.checkpoint_encode_nanos.load(Ordering::Relaxed),
            ),
            rebuild: self.rebuild,
        }
    }

    fn wants(&self, positions: impl Iterator<Item = u64>) -> Vec<Want> {
        let st = self.shared.state.read().expect("state lock");
        positions
            .map(|position| {
                let (partition, offset) = unpack(st.locs[position as usize]);
                Want {
                    position,
                    partition,
                    offset,
                }
            })
            .collect()
    }

    async fn fetch(&self, wants: Vec<Want>) -> Result<Vec<RecordedEvent>, ReadError> {
        self.readers
            .fetch(wants)
            .await
            .map_err(|e| ReadError::Backend(BackendError::new(e)))
    }
}

/// The checkpoint `open` used.
#[derive(Clone, Copy)]
struct Used {
    events: u64,
    bytes: u64,
    slot: u8,
}

/// What the rebuild at open produced.
struct Opened {
    rebuild_duration: Duration,
    resolved: Resolved,
    /// Records read from the events topic.
    records: u64,
    /// End offset of every partition when the rebuild started.
    ends: Vec<i64>,
    checkpoint: Option<Used>,
    checkpoint_duration: Duration,
    rejected: u32,
}

/// Rebuilds the index: from the newest valid checkpoint and the records
/// after it, or else from the whole topic. Runs after `init_transactions`,
/// so no transaction of this log is open and the end offsets are final.
fn rebuild(config: &KafkaConfig, topic: &str) -> Result<Opened, KafkaLogError> {
    let begun = Instant::now();
    let ends = reader::end_offsets(config, topic, config.partitions)?;
    let started = Instant::now();
    let mut rejected = 0u32;
    let mut why_full = None;
    if config.checkpoint_every_events > 0 {
        match checkpoint::Finder::new(config) {
            Err(e) => why_full = Some(format!("cannot read checkpoints: {e}")),
            Ok(mut finder) => loop {
                let found = match finder.next() {
                    Ok(Some(f)) => f,
                    Ok(None) => {
                        rejected += finder.rejected;
                        if rejected > 0 || finder.garbage > 0 {
                            why_full = Some(format!(
                                "no valid checkpoint ({rejected} refused, {} records that are \
                                 not checkpoint chunks)",
                                finder.garbage
                            ));
                        }
                        break;
                    }
                    Err(e) => {
                        rejected += finder.rejected;
                        why_full = Some(format!("reading checkpoints failed: {e}"));
                        break;
                    }
                };
                let cp = found.checkpoint;
                let id = (cp.header.tip, cp.events());
                if let Err(reason) = consistent(config, topic, &cp, &ends) {
                    rejected += 1;
                    tracing::warn!(
                        %topic, tip = id.0, events = id.1, %reason,
                        "ignoring a checkpoint inconsistent with the topic"
                    );
                    continue;
                }
                let checkpoint_duration = started.elapsed();
                let from = cp.header.next_offsets.clone();
                let events = cp.events();
                let scan = reader::scan(config, topic, &from, &ends)?;
                match chain::resolve_from(topic, cp.into_resolved(), scan.metas) {
                    Ok(resolved) => {
                        rejected += finder.rejected;
                        return Ok(Opened {
                            rebuild_duration: begun.elapsed(),
                            resolved,
                            records: scan.records,
                            ends,
                            checkpoint: Some(Used {
                                events,
                                bytes: found.bytes,
                                slot: found.slot,
                            }),
                            checkpoint_duration,
                            rejected,
                        });
                    }
                    Err(e) => {
                        rejected += finder.rejected + 1;
                        why_full = Some(format!(
                            "the records after the checkpoint (tip {}, {} events) do not \
                             continue it: {e}",
                            id.0, id.1
                        ));
                        break;
                    }
                }
            },
        }
    }
    let checkpoint_duration = started.elapsed();
    match &why_full {
        Some(reason) => {
            tracing::warn!(%topic, %reason, "rebuilding the index from the whole topic")
        }
        None if config.checkpoint_every_events > 0 => {
            tracing::info!(%topic, "no checkpoint yet; rebuilding the index from the whole topic")
        }
        None => {}
    }
    let zeros = vec![0i64; ends.len()];
    let scan = reader::scan(config, topic, &zeros, &ends)?;
    let resolved = chain::resolve_from(topic, Resolved::default(), scan.metas)?;
    Ok(Opened {
        rebuild_duration: begun.elapsed(),
        resolved,
        records: scan.records,
        ends,
        checkpoint: None,
        checkpoint_duration,
        rejected,
    })
}

/// Whether checkpoint `cp` fits the events topic as it is: no covered
/// offset past a partition's end, and the record at its last position's
/// location holds that position in the tip's transaction (which also
/// tells a checkpoint of an earlier topic of the same name).
fn consistent(
    config: &KafkaConfig,
    topic: &str,
    cp: &checkpoint::Checkpoint,
    ends: &[i64],
) -> Result<(), String> {
    for (p, (&covered, &end)) in cp.header.next_offsets.iter().zip(ends).enumerate() {
        if covered > end {
            return Err(format!(
                "it covers partition {p} up to offset {covered}, but the partition ends at {end}"
            ));
        }
    }
    let last = cp.events() - 1;
    let (p, o) = cp.location(last).ok_or("it has no locations")?;
    match reader::fetch_framing(config, topic, p, o) {
        Err(e) => Err(format!(
            "cannot read partition {p} offset {o} to check it: {e}"
        )),
        Ok(None) => Err(format!(
            "position {last} is at partition {p} offset {o}, where no event of this log is"
        )),
        Ok(Some(f)) if f.position != last || f.batch_seq != cp.header.tip => Err(format!(
            "partition {p} offset {o} holds position {} of transaction {}, not position \
             {last} of transaction {}",
            f.position, f.batch_seq, cp.header.tip
        )),
        Ok(Some(_)) => Ok(()),
    }
}

/// Creates the topic with infinite retention, or accepts an existing one.
async fn ensure_topic(config: &KafkaConfig, topic: &str) -> Result<(), KafkaLogError> {
    let mut c = config.client();
    config.apply_overrides(&mut c);
    let admin: AdminClient<DefaultClientContext> = c
        .create()
        .map_err(|e| KafkaLogError::kafka("create admin client", e))?;
    let max_bytes = config.max_record_bytes().to_string();
    let new = NewTopic::new(
        topic,
        config.partitions as i32,
        TopicReplication::Fixed(config.replication_factor),
    )
    .set("cleanup.policy", "delete")
    .set("retention.ms", "-1")
    .set("retention.bytes", "-1")
    .set("max.message.bytes", &max_bytes);
    let opts = AdminOptions::new()
        .operation_timeout(Some(config.request_timeout))
        .request_timeout(Some(config.request_timeout));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| KafkaLogError::kafka("create topic", e))?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(%topic, partitions = config.partitions, "created events topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(KafkaLogError::kafka(
                    "create topic",
                    rdkafka::error::KafkaError::AdminOp(code),
                ))
            }
        }
    }
    Ok(())
}

/// Waits until the broker's metadata shows the topic, and checks its
/// partition count.
fn check_partitions(config: &KafkaConfig, topic: &str) -> Result<(), KafkaLogError> {
    let consumer = reader::consumer(config, "metadata", false)?;
    let deadline = Instant::now() + config.request_timeout;
    loop {
        let md = consumer
            .fetch_metadata(Some(topic), config.request_timeout)
            .map_err(|e| KafkaLogError::kafka("fetch metadata", e))?;
        let actual = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as u32);
        if actual == config.partitions {
            return Ok(());
        }
        if actual != 0 || Instant::now() >= deadline {
            return Err(KafkaLogError::PartitionCount {
                topic: topic.to_owned(),
                expected: config.partitions,
                actual,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[async_trait]
impl EventLog for KafkaEventLog {
    async fn append(&self, tx: AppendTx) -> Result<AppendResult, AppendError> {
        self.shared.limits.check_tx(&tx)?;
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Append(Append { tx, reply }))
            .await
            .map_err(|_| AppendError::Closed)?;
        answer.await.map_err(|_| AppendError::Closed)?
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.shared.limits.check_read(max)?;
        let positions = {
            let st = self.shared.state.read().expect("state lock");
            st.index
                .positions(stream, from_version, max, st.committed)
                .to_vec()
        };
        let events = self.fetch(self.wants(positions.into_iter())).await?;
        let first = from_version.max(1);
        for (i, e) in events.iter().enumerate() {
            if e.stream != *stream || e.version != first + i as u64 {
                let (partition, offset) = self.location(e.position).unwrap_or((-1, -1));
                return Err(ReadError::Backend(BackendError::new(
                    KafkaLogError::Corrupt {
                        topic: self.shared.topic.clone(),
                        partition,
                        offset,
                        reason: format!(
                            "holds {} version {}; the index says {stream} version {}",
                            e.stream,
                            e.version,
                            first + i as u64
                        ),
                    },
                )));
            }
        }
        Ok(events)
    }

    async fn read_all(
        &self,
        from_position: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.shared.limits.check_read(max)?;
        let head = self.shared.state.read().expect("state lock").committed;
        let end = head.min(from_position.saturating_add(max as u64));
        if from_position >= end {
            return Ok(Vec::new());
        }
        self.fetch(self.wants(from_position..end)).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
        let st = self.shared.state.read().expect("state lock");
        Ok(st.index.version_below(stream, st.committed))
    }

    async fn head(&self) -> Result<u64, ReadError> {
        Ok(self.shared.state.read().expect("state lock").committed)
    }

    fn watch_head(&self) -> HeadWatch {
        HeadWatch::new(self.head.clone())
    }

    fn limits(&self) -> Limits {
        self.shared.limits
    }
}
