//! Reads by offset: a pool of assigned consumers that fetch exactly the
//! records the index names, and the rebuild's full scan of the topic.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use smartmsg_engine::RecordedEvent;

use crate::chain::Meta;
use crate::config::KafkaConfig;
use crate::envelope;
use crate::error::KafkaLogError;

/// One record a read wants: where it is and which position it must hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Want {
    pub position: u64,
    pub partition: i32,
    pub offset: i64,
}

/// Creates a consumer for assigned (never subscribed) reads. It has a
/// `group.id` only because librdkafka refuses `assign` without one; it never
/// joins the group and never commits.
pub(crate) fn consumer(
    config: &KafkaConfig,
    role: &str,
    committed: bool,
) -> Result<BaseConsumer, KafkaLogError> {
    let mut c = config.client();
    c.set("group.id", format!("smartmsg.{}.{role}", config.log_name))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A wanted offset that no longer exists is an error, never a jump.
        .set("auto.offset.reset", "error")
        .set(
            "isolation.level",
            if committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .set(
            "enable.partition.eof",
            if committed { "true" } else { "false" },
        )
        // Reads are for records known to exist: do not let the broker sit
        // on a fetch waiting for more.
        .set("fetch.wait.max.ms", "5")
        .set("queued.max.messages.kbytes", "16384")
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "7000")
        .set("socket.timeout.ms", config.request_ms().to_string());
    config.apply_overrides(&mut c);
    c.create()
        .map_err(|e| KafkaLogError::kafka("create consumer", e))
}

/// Drops a consumer on a thread of its own: closing one takes librdkafka
/// about 100 ms (its threads wake up to notice), which `open` need not
/// wait for.
pub(crate) fn discard(consumer: BaseConsumer) {
    if let Err(e) = std::thread::Builder::new()
        .name("smartmsg-kafka-close".into())
        .spawn(move || drop(consumer))
    {
        tracing::debug!(error = %e, "closing a consumer inline");
    }
}

fn fatal_consume_error(e: &KafkaError) -> bool {
    matches!(e, KafkaError::MessageConsumptionFatal(_))
        || matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::AutoOffsetReset
                    | RDKafkaErrorCode::OffsetOutOfRange
                    | RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::TopicAuthorizationFailed
            )
        )
}

/// A pool of read consumers.
pub(crate) struct Readers {
    config: Arc<KafkaConfig>,
    topic: String,
    idle: Mutex<Vec<BaseConsumer>>,
    permits: tokio::sync::Semaphore,
}

impl Readers {
    pub(crate) fn new(config: Arc<KafkaConfig>, topic: String) -> Self {
        let permits = tokio::sync::Semaphore::new(config.readers);
        Self {
            config,
            topic,
            idle: Mutex::new(Vec::new()),
            permits,
        }
    }

    /// Fetches the wanted records and returns their events in the order of
    /// `wants`.
    pub(crate) async fn fetch(
        self: &Arc<Self>,
        wants: Vec<Want>,
    ) -> Result<Vec<RecordedEvent>, KafkaLogError> {
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| KafkaLogError::Poisoned("reader pool closed".into()))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let consumer = match this.idle.lock().expect("reader pool lock").pop() {
                Some(c) => c,
                None => consumer(&this.config, "reader", false)?,
            };
            let result = this.fetch_with(&consumer, &wants);
            let _ = consumer.unassign();
            if result.is_ok() {
                this.idle.lock().expect("reader pool lock").push(consumer);
            }
            result
        })
        .await
        .map_err(|e| KafkaLogError::Poisoned(format!("read task failed: {e}")))?
    }

    fn fetch_with(
        &self,
        consumer: &BaseConsumer,
        wants: &[Want],
    ) -> Result<Vec<RecordedEvent>, KafkaLogError> {
        // Per partition, wanted offsets in order, cut into runs wherever the
        // gap is wider than `seek_gap`.
        let mut by_partition: BTreeMap<i32, Vec<(i64, usize)>> = BTreeMap::new();
        for (slot, w) in wants.iter().enumerate() {
            by_partition
                .entry(w.partition)
                .or_default()
                .push((w.offset, slot));
        }
        let mut runs: BTreeMap<i32, Vec<Vec<(i64, usize)>>> = BTreeMap::new();
        for (p, mut offsets) in by_partition {
            offsets.sort_unstable();
            let mut list: Vec<Vec<(i64, usize)>> = Vec::new();
            for o in offsets {
                match list.last_mut() {
                    Some(run)
                        if o.0 - run.last().expect("non-empty run").0 <= self.config.seek_gap =>
                    {
                        run.push(o)
                    }
                    _ => list.push(vec![o]),
                }
            }
            runs.insert(p, list);
        }
        let waves = runs.values().map(Vec::len).max().unwrap_or(0);
        let mut out: Vec<Option<RecordedEvent>> = vec![None; wants.len()];
        for wave in 0..waves {
            let mut tpl = TopicPartitionList::new();
            let mut pending: HashMap<(i32, i64), usize> = HashMap::new();
            for (&p, list) in &runs {
                if let Some(run) = list.get(wave) {
                    tpl.add_partition_offset(&self.topic, p, Offset::Offset(run[0].0))
                        .map_err(|e| KafkaLogError::kafka("assign", e))?;
                    pending.extend(run.iter().map(|&(o, slot)| ((p, o), slot)));
                }
            }
            consumer
                .assign(&tpl)
                .map_err(|e| KafkaLogError::kafka("assign", e))?;
            let mut last_progress = Instant::now();
            while !pending.is_empty() {
                if last_progress.elapsed() > self.config.request_timeout {
                    let ((p, o), _) = pending.iter().next().expect("pending");
                    return Err(KafkaLogError::Timeout {
                        what: format!(
                            "fetching {} record(s) of {} (e.g. partition {p} offset {o})",
                            pending.len(),
                            self.topic
                        ),
                        after_ms: self.config.request_ms(),
                    });
                }
                match consumer.poll(Duration::from_millis(100)) {
                    None => {}
                    Some(Ok(m)) => {
                        let (p, o) = (m.partition(), m.offset());
                        let Some(slot) = pending.remove(&(p, o)) else {
                            continue;
                        };
                        last_progress = Instant::now();
                        let want = wants[slot];
                        let corrupt = |reason: String| KafkaLogError::Corrupt {
                            topic: self.topic.clone(),
                            partition: p,
                            offset: o,
                            reason,
                        };
                        let d = envelope::decode(m.key(), m.payload()).map_err(corrupt)?;
                        if d.framing.position != want.position {
                            return Err(corrupt(format!(
                                "holds position {}; the index says {}",
                                d.framing.position, want.position
                            )));
                        }
                        out[slot] = Some(d.into_recorded());
                    }
                    Some(Err(e)) if fatal_consume_error(&e) => {
                        return Err(KafkaLogError::kafka("fetch", e));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "transient consumer error during a read");
                    }
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|e| e.expect("every wanted record fetched"))
            .collect())
    }
}

/// What the rebuild scan found.
pub(crate) struct Scan {
    pub metas: Vec<Meta>,
    pub records: u64,
}

/// The end offset (high watermark) of every partition of `topic`, checking
/// that none lost records (`DataDeleted` if a partition no longer starts at
/// offset 0).
pub(crate) fn end_offsets(
    config: &KafkaConfig,
    topic: &str,
    partitions: u32,
) -> Result<Vec<i64>, KafkaLogError> {
    let consumer = consumer(config, "rebuild", true)?;
    let ends = (0..partitions as i32)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, config.request_timeout)
                .map_err(|e| KafkaLogError::kafka("fetch watermarks", e))?;
            if low > 0 {
                return Err(KafkaLogError::DataDeleted {
                    topic: topic.to_owned(),
                    partition: p,
                    low,
                });
            }
            Ok(high)
        })
        .collect();
    discard(consumer);
    ends
}

/// The framing of the record at `partition`/`offset` of `topic`, or `None`
/// if there is no such record (it cannot be read: the next record read has
/// a higher offset, or the partition ends first).
pub(crate) fn fetch_framing(
    config: &KafkaConfig,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<envelope::Framing>, KafkaLogError> {
    let consumer = consumer(config, "rebuild", true)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .map_err(|e| KafkaLogError::kafka("assign", e))?;
    consumer
        .assign(&tpl)
        .map_err(|e| KafkaLogError::kafka("assign", e))?;
    let started = Instant::now();
    let result = loop {
        if started.elapsed() > config.request_timeout {
            break Err(KafkaLogError::Timeout {
                what: format!("reading {topic} partition {partition} offset {offset}"),
                after_ms: config.request_ms(),
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) if m.partition() != partition || m.offset() < offset => {}
            Some(Ok(m)) if m.offset() > offset => break Ok(None),
            Some(Ok(m)) => {
                break Ok(envelope::decode_framing(m.key(), m.payload())
                    .ok()
                    .map(|(f, _, _)| f))
            }
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition => break Ok(None),
            Some(Err(e)) if fatal_consume_error(&e) => {
                break Err(KafkaLogError::kafka("fetch", e));
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "transient consumer error during a read");
            }
        }
    };
    discard(consumer);
    result
}

/// Reads every partition `p` of `topic` from offset `from[p]` to `to[p]`
/// (its end as of the open) with a `read_committed` consumer and decodes
/// every record's framing.
pub(crate) fn scan(
    config: &KafkaConfig,
    topic: &str,
    from: &[i64],
    to: &[i64],
) -> Result<Scan, KafkaLogError> {
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for (p, (&start, &high)) in from.iter().zip(to).enumerate() {
        let p = p as i32;
        if high > start {
            tpl.add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(|e| KafkaLogError::kafka("assign", e))?;
            ends.insert(p, high);
        }
    }
    if ends.is_empty() {
        return Ok(Scan {
            metas: Vec::new(),
            records: 0,
        });
    }
    let consumer = consumer(config, "rebuild", true)?;
    let result = consumer
        .assign(&tpl)
        .map_err(|e| KafkaLogError::kafka("assign", e))
        .and_then(|()| scan_with(&consumer, config, topic, from, ends));
    discard(consumer);
    result
}

fn scan_with(
    consumer: &BaseConsumer,
    config: &KafkaConfig,
    topic: &str,
    from: &[i64],
    mut ends: HashMap<i32, i64>,
) -> Result<Scan, KafkaLogError> {
    let timeout = config.request_timeout;
    let mut scan = Scan {
        metas: Vec::new(),
        records: 0,
    };
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        if last_progress.elapsed() > timeout {
            return Err(KafkaLogError::Timeout {
                what: format!(
                    "reading {topic} to its end for the rebuild (partitions {:?} unfinished)",
                    ends.keys().collect::<Vec<_>>()
                ),
                after_ms: config.request_ms(),
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let (p, o) = (m.partition(), m.offset());
                if from.get(p as usize).is_none_or(|&f| o < f) {
                    continue;
                }
                last_progress = Instant::now();
                scan.records += 1;
                let (framing, stream, idempotency) = envelope::decode_framing(m.key(), m.payload())
                    .map_err(|reason| KafkaLogError::Corrupt {
                        topic: topic.to_owned(),
                        partition: p,
                        offset: o,
                        reason,
                    })?;
                scan.metas.push(Meta {
                    partition: p,
                    offset: o,
                    framing,
                    stream,
                    idempotency,
                });
                if ends.get(&p).is_some_and(|&high| o + 1 >= high) {
                    ends.remove(&p);
                }
            }
            // The end of a partition: with read_committed the last offsets
            // may be transaction markers that are never delivered.
            Some(Err(KafkaError::PartitionEOF(p))) => {
                last_progress = Instant::now();
                ends.remove(&p);
            }
            Some(Err(e)) if fatal_consume_error(&e) => {
                return Err(KafkaLogError::kafka("rebuild scan", e));
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "transient consumer error during the rebuild");
            }
        }
    }
    Ok(scan)
}
