//! The campaign runtime's edge ports on Kafka: [`KafkaSender`] (planned
//! messages to a topic), [`KafkaReactionSource`] (reactions from a
//! topic) and [`KafkaReactionSink`] (reactions into a cluster's topic).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use smartmsg_domain::OutgoingBatch;
use smartmsg_service::cluster::{OpenError, ReactionSink, RoutedReaction};
use smartmsg_service::ingest::{Incoming, Polled, ReactionSource};
use smartmsg_service::sender::{records, SendError, Sender};

/// Most deliveries a [`KafkaSender`] awaits at once.
const IN_FLIGHT: usize = 10_000;

/// Sends each planned message as one record of a topic: key = the user id
/// (so one user's messages stay in order on one partition), value = the
/// message as JSON ([`smartmsg_service::sender::MessageRecord`]), header
/// `message-id` = its stable id. The producer is idempotent (`acks=all`,
/// `enable.idempotence`): a record is written once per send; a batch sent
/// again after a crash is written again with the same ids, which consumers
/// drop. `send` returns once the broker acknowledged every record.
pub struct KafkaSender {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl std::fmt::Debug for KafkaSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSender")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaSender {
    /// A sender to `topic` on the cluster at `bootstrap`.
    pub fn new(bootstrap: &str, topic: &str) -> Result<Self, KafkaError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            timeout: Duration::from_secs(30),
        })
    }
}

#[async_trait]
impl Sender for KafkaSender {
    fn name(&self) -> &str {
        "kafka"
    }

    async fn send(&self, batch: &OutgoingBatch) -> Result<(), SendError> {
        let unavailable = |reason: String| SendError::Unavailable {
            batch: batch.key(),
            reason,
        };
        let mut encoded = Vec::new();
        for r in records(batch) {
            let value = serde_json::to_vec(&r).map_err(|e| SendError::Rejected {
                batch: batch.key(),
                reason: e.to_string(),
            })?;
            encoded.push((r.user.to_string(), value, r.id));
        }
        let mut out = Vec::with_capacity(encoded.len());
        for (key, value, id) in &encoded {
            out.push(
                FutureRecord::to(&self.topic)
                    .key(key.as_str())
                    .payload(value.as_slice())
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "message-id",
                        value: Some(id.as_bytes()),
                    })),
            );
        }
        produce_all(&self.producer, out)
            .await
            .map_err(unavailable)?;
        self.producer
            .flush(self.timeout)
            .map_err(|e| unavailable(e.to_string()))
    }
}

/// Produces every record and returns once the broker acknowledged each
/// (at most [`IN_FLIGHT`] awaited at once; a full local queue waits for
/// the oldest delivery), or the first failure.
async fn produce_all<'a>(
    producer: &FutureProducer,
    records: Vec<FutureRecord<'a, str, [u8]>>,
) -> Result<(), String> {
    let mut pending = std::collections::VecDeque::new();
    for mut record in records {
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match pending.pop_front() {
                        Some(f) => settle(f.await)?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => return Err(e.to_string()),
            }
        }
        if pending.len() >= IN_FLIGHT {
            if let Some(f) = pending.pop_front() {
                settle(f.await)?;
            }
        }
    }
    while let Some(f) = pending.pop_front() {
        settle(f.await)?;
    }
    Ok(())
}

/// Takes the reactions posted to any instance of a cluster into the
/// reactions topic: each to its shard's partition (keyed by its campaign
/// id, so Kafka's default partitioner would put it there too), with an
/// idempotent producer (`acks=all`); `publish` returns once every record is
/// acknowledged. Each shard's runtime reads its partition
/// ([`KafkaReactionSource::with_partitions`]).
pub struct KafkaReactionSink {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for KafkaReactionSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReactionSink")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaReactionSink {
    /// A sink into `topic` on the cluster at `bootstrap`.
    pub fn new(bootstrap: &str, topic: &str) -> Result<Self, KafkaError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
        })
    }
}

#[async_trait]
impl ReactionSink for KafkaReactionSink {
    async fn publish(&self, reactions: Vec<RoutedReaction>) -> Result<(), OpenError> {
        let mut records = Vec::with_capacity(reactions.len());
        for r in &reactions {
            records.push(
                FutureRecord::to(&self.topic)
                    .partition(i32::try_from(r.shard)?)
                    .key(r.campaign.as_str())
                    .payload(&r.payload[..]),
            );
        }
        Ok(produce_all(&self.producer, records).await?)
    }
}

fn settle<E>(
    r: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
) -> Result<(), String> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("the producer was dropped".into()),
    }
}

/// Reads reaction messages from every partition of a topic (or those
/// [`KafkaReactionSource::with_partitions`] names), with a cursor
/// (`{"<partition>": <next offset>}`, JSON) that the runtime stores in the
/// log together with the messages it took: a restart resumes exactly there,
/// so each record enters the log once. No consumer group and no offset
/// commits are used. Each message's offset is its record's offset; its
/// arrival time the record's timestamp.
pub struct KafkaReactionSource {
    name: String,
    topic: String,
    consumer: Arc<Mutex<BaseConsumer>>,
    assigned: Option<BTreeMap<i32, i64>>,
    /// The partitions read (`None`: all of the topic's).
    partitions: Option<Vec<i32>>,
    wait: Duration,
}

impl std::fmt::Debug for KafkaReactionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReactionSource")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaReactionSource {
    /// A source named `name` (it names the cursor's stream) reading
    /// `topic` on the cluster at `bootstrap`.
    pub fn new(name: &str, bootstrap: &str, topic: &str) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("smartmsg-source-{name}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            // A cursor below the topic's start (retention removed the
            // records): read from the first record still there.
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("max.poll.interval.ms", "7000")
            .create()?;
        Ok(Self {
            name: name.to_owned(),
            topic: topic.to_owned(),
            consumer: Arc::new(Mutex::new(consumer)),
            assigned: None,
            partitions: None,
            wait: Duration::from_millis(50),
        })
    }

    /// Reads only these partitions of the topic (a cluster shard reads the
    /// partition its campaigns' reactions are keyed to). Partitions the
    /// topic does not have are ignored.
    pub fn with_partitions(mut self, partitions: impl IntoIterator<Item = i32>) -> Self {
        let mut ps: Vec<i32> = partitions.into_iter().collect();
        ps.sort_unstable();
        ps.dedup();
        self.partitions = Some(ps);
        self
    }
}

type Cursor = BTreeMap<i32, i64>;

fn poll_blocking(
    consumer: &BaseConsumer,
    topic: &str,
    only: Option<&[i32]>,
    assigned: &mut Option<Cursor>,
    cursor: Cursor,
    max: usize,
    wait: Duration,
) -> Result<(Vec<Incoming>, Cursor), String> {
    let mut cursor = cursor;
    if assigned.as_ref() != Some(&cursor) {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| format!("metadata of {topic}: {e}"))?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .filter(|p| only.is_none_or(|only| only.binary_search(p).is_ok()))
            .collect();
        if partitions.is_empty() {
            return Ok((Vec::new(), cursor));
        }
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let next = *cursor.entry(p).or_insert(0);
            tpl.add_partition_offset(topic, p, Offset::Offset(next))
                .map_err(|e| e.to_string())?;
        }
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        *assigned = Some(cursor.clone());
    }
    let mut out = Vec::new();
    while out.len() < max {
        let w = if out.is_empty() { wait } else { Duration::ZERO };
        match consumer.poll(w) {
            None => break,
            Some(Err(e)) => {
                // Keep what was read (the cursor covers exactly it); the
                // next poll seeks again from the cursor.
                *assigned = None;
                if out.is_empty() {
                    return Err(e.to_string());
                }
                return Ok((out, cursor));
            }
            Some(Ok(m)) => {
                cursor.insert(m.partition(), m.offset() + 1);
                out.push(Incoming {
                    payload: Bytes::copy_from_slice(m.payload().unwrap_or(&[])),
                    arrival_ms: m
                        .timestamp()
                        .to_millis()
                        .and_then(|t| u64::try_from(t).ok()),
                    offset: u64::try_from(m.offset()).ok(),
                });
            }
        }
    }
    *assigned = Some(cursor.clone());
    Ok((out, cursor))
}

#[async_trait]
impl ReactionSource for KafkaReactionSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn poll(&mut self, cursor: Option<&[u8]>, max: usize) -> Result<Polled, String> {
        let cursor: Cursor = match cursor {
            None => Cursor::new(),
            Some(c) => serde_json::from_slice(c).map_err(|e| format!("bad cursor: {e}"))?,
        };
        let consumer = Arc::clone(&self.consumer);
        let topic = self.topic.clone();
        let mut assigned = self.assigned.take();
        let wait = self.wait;
        let only = self.partitions.clone();
        // librdkafka's calls block: off the async threads.
        let (r, assigned) = tokio::task::spawn_blocking(move || {
            let c = consumer.lock().unwrap_or_else(|e| e.into_inner());
            let r = poll_blocking(
                &c,
                &topic,
                only.as_deref(),
                &mut assigned,
                cursor,
                max,
                wait,
            );
            (r, assigned)
        })
        .await
        .map_err(|e| e.to_string())?;
        self.assigned = assigned;
        let (messages, cursor) = r?;
        Ok(Polled {
            messages,
            cursor: serde_json::to_vec(&cursor).unwrap_or_default(),
        })
    }
}
