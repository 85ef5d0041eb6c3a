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

use crate::chain::{self, unpack};
use crate::config::KafkaConfig;
use crate::envelope;
use crate::error::KafkaLogError;
use crate::reader::{self, Readers, Want};
use crate::writer::{self, Counters, Request, Shared, State, Writer};

/// What the index rebuild at open found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RebuildStats {
    /// Records read from the topic.
    pub records: u64,
    /// Kafka transactions on the committed chain.
    pub committed_batches: u64,
    /// Kafka transactions seen but not committed (aborted or cut short;
    /// visible only on brokers that show aborted records).
    pub ignored_batches: u64,
    /// Events indexed (the head).
    pub events: u64,
    /// How long `open` spent in `init_transactions` and the scan.
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
    /// The rebuild at open.
    pub rebuild: RebuildStats,
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

        let started = Instant::now();
        let cfg = config.clone();
        let t = topic.clone();
        let (producer, deliveries, resolved, records) = tokio::task::spawn_blocking(move || {
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
            let scan = reader::scan(&cfg, &t, cfg.partitions)?;
            let resolved = chain::resolve(&t, scan.metas)?;
            Ok::<_, KafkaLogError>((producer, deliveries, resolved, scan.records))
        })
        .await
        .map_err(|e| KafkaLogError::Poisoned(format!("open task failed: {e}")))??;

        let head = resolved.index.head();
        let rebuild = RebuildStats {
            records,
            committed_batches: resolved.committed_batches,
            ignored_batches: resolved.ignored_batches,
            events: head,
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
            }),
            stats: Counters::default(),
        });
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
            .send(Request { tx, reply })
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
