//! Checkpoints of the writer's index, so that `open` reads only the end of
//! the events topic instead of all of it.
//!
//! # What a checkpoint holds
//!
//! Everything the rebuild ([`crate::chain`]) produces, as of the commit of
//! one Kafka transaction: the engine's [`LogIndex`] (stream positions and
//! versions, idempotency keys with fingerprints and results), the location
//! (partition, offset) of every position, the committed chain's tip and
//! the next transaction sequence number, and for every partition of the
//! events topic the offset the checkpoint covers up to: at least one past
//! each of its committed records, and at least the partition's end when the
//! writer opened. Every Kafka transaction that links to the tip was
//! attempted after the tip committed, so all its records lie at or after
//! those offsets: reading from them and continuing the chain from the tip
//! gives exactly the full rebuild's index.
//!
//! # Where: `smartmsg.<log_name>.checkpoints`
//!
//! One partition, `cleanup.policy=compact`. A checkpoint is many MB for a
//! large log, so it is cut into chunks of at most
//! [`KafkaConfig::checkpoint_chunk_bytes`], one record each, keyed
//! `<slot>/<chunk index>` with two slots used in turn: compaction keeps the
//! latest record of each key, so storage stays at about two checkpoints
//! however often they are written, and a write torn by a crash damages only
//! its own slot, never the other slot's complete checkpoint (a writer whose
//! write failed retries the same slot; a new writer starts with the slot
//! its `open` did not load). Compaction is not needed for correctness: a
//! broker that never compacts (tansu) just keeps every checkpoint, and
//! `open` still reads only the newest ones, backwards from the end. The
//! chunks are written with an idempotent, non-transactional producer, off
//! the writer thread; a zombie writer's late checkpoint is still a true
//! prefix of the committed chain.
//!
//! # Chunk record (value; integers little-endian)
//!
//! | field | size | meaning |
//! |---|---|---|
//! | magic | 4 | `b"SKCC"` |
//! | version | 1 | `1` |
//! | slot | 1 | 0 or 1 |
//! | id | 8 | the checkpoint's id (unique per write) |
//! | index, count | 4 + 4 | this chunk's index and the number of chunks |
//! | body length | 8 | bytes of the whole checkpoint |
//! | body CRC32C | 4 | of the whole checkpoint, on the last chunk (0 on others) |
//! | data length | 4 | then the data |
//! | chunk CRC32C | 4 | of every byte of the record before it |
//!
//! # Checkpoint body, version 1 (integers little-endian; varints LEB128)
//!
//! Magic `b"SKCP"`, version `1`; the log name and the events topic (each a
//! `u16` length and UTF-8); the partition count (`u32`); the tip, next
//! sequence number, committed and ignored Kafka transactions (`u64` each);
//! the covered offset of each partition (`i64` each); the number of
//! positions (varint), then per position its partition (varint) and its
//! offset as a zigzag varint difference to the previous offset in that
//! partition (the first from -1); the length of the index (`u64`) and
//! [`LogIndex::encode`]'s bytes.
//!
//! # Loading
//!
//! `open` reads the checkpoints topic backwards from its end in growing
//! windows, grouping chunks by id. The newest complete set (all chunks,
//! consistent headers, every chunk CRC and the body CRC right, a body that
//! decodes and is internally consistent, this log's name, topic and
//! partition count) is then checked against the events topic: no covered
//! offset may be past a partition's end, and the record at the last
//! position's location must hold that position in the tip's transaction.
//! A checkpoint failing any check is logged with the reason and the next
//! older one is tried (at most eight); with none left, `open` rebuilds from
//! the whole topic.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};
use smartmsg_engine::bytes_in::{Input, InputError};
use smartmsg_engine::index::LogIndex;
use tokio::sync::oneshot;

use crate::chain::{pack, unpack, Resolved};
use crate::config::KafkaConfig;
use crate::error::KafkaLogError;
use crate::writer::Shared;

/// Magic bytes of a checkpoint body.
pub const BODY_MAGIC: [u8; 4] = *b"SKCP";
/// The body version this crate writes.
pub const BODY_VERSION: u8 = 1;
/// Magic bytes of a chunk record.
pub const CHUNK_MAGIC: [u8; 4] = *b"SKCC";
/// The chunk version this crate writes.
pub const CHUNK_VERSION: u8 = 1;

/// Most complete checkpoints `open` tries before it gives up and rebuilds
/// from the whole topic.
const MAX_TRIES: u32 = 8;

/// A checkpoint's fields other than its index and locations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The log's name.
    pub log_name: String,
    /// The events topic.
    pub topic: String,
    /// Partitions of the events topic.
    pub partitions: u32,
    /// `batch_seq` of the committed chain's last transaction.
    pub tip: u64,
    /// The next `batch_seq` to use.
    pub next_seq: u64,
    /// Kafka transactions on the committed chain (a statistic).
    pub committed_batches: u64,
    /// Kafka transactions seen but not committed (a statistic).
    pub ignored_batches: u64,
    /// Per partition of the events topic, the offset the checkpoint covers
    /// up to: the rebuild reads from here.
    pub next_offsets: Vec<i64>,
}

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Identity, chain state and covered offsets.
    pub header: Header,
    /// Location of every position, packed `partition << 48 | offset`.
    pub locations: Vec<u64>,
    /// The index.
    pub index: LogIndex,
}

impl Checkpoint {
    /// The events the checkpoint covers (its head).
    pub fn events(&self) -> u64 {
        self.index.head()
    }

    /// (partition, offset) of `position`.
    pub fn location(&self, position: u64) -> Option<(i32, i64)> {
        self.locations.get(position as usize).map(|&l| unpack(l))
    }

    /// Encodes the checkpoint (see [`encode`]).
    #[cfg(any(test, feature = "internals"))]
    pub fn encode(&self) -> Vec<u8> {
        encode(&self.header, &self.locations, &self.index)
    }

    /// The rebuild state it holds.
    pub(crate) fn into_resolved(self) -> Resolved {
        Resolved {
            index: self.index,
            locs: self.locations,
            tip: self.header.tip,
            next_seq: self.header.next_seq,
            committed_batches: self.header.committed_batches,
            ignored_batches: self.header.ignored_batches,
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

/// Encodes a checkpoint body from borrowed parts (the writer encodes its
/// live index without copying it). `locations` are packed as in
/// [`Checkpoint::locations`] and must name partitions below
/// `header.partitions`.
pub fn encode(header: &Header, locations: &[u64], index: &LogIndex) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 3 * locations.len() + 3 * index.head() as usize);
    out.extend_from_slice(&BODY_MAGIC);
    out.push(BODY_VERSION);
    put_str16(&mut out, &header.log_name);
    put_str16(&mut out, &header.topic);
    out.extend_from_slice(&header.partitions.to_le_bytes());
    for v in [
        header.tip,
        header.next_seq,
        header.committed_batches,
        header.ignored_batches,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for o in &header.next_offsets {
        out.extend_from_slice(&o.to_le_bytes());
    }
    put_varint(&mut out, locations.len() as u64);
    let mut prev = vec![-1i64; header.partitions as usize];
    for &l in locations {
        let (p, o) = unpack(l);
        put_varint(&mut out, p as u64);
        let slot = &mut prev[p as usize];
        let d = o - *slot;
        put_varint(&mut out, ((d << 1) ^ (d >> 63)) as u64);
        *slot = o;
    }
    let at = out.len();
    out.extend_from_slice(&0u64.to_le_bytes());
    index.encode(&mut out);
    let len = (out.len() - at - 8) as u64;
    out[at..at + 8].copy_from_slice(&len.to_le_bytes());
    out
}

/// The checkpoint's fields over the shared [`Input`] (little-endian).
struct Cursor<'a>(Input<'a>);

fn err(e: InputError) -> String {
    match e {
        InputError::Short { what, at, .. } => format!("truncated in {what} at byte {at}"),
        InputError::BadVarint { what, at } => format!("bad varint in {what} at byte {at}"),
        other => other.to_string(),
    }
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], String> {
        self.0.take(n, what).map_err(err)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, String> {
        self.0.u8(what).map_err(err)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, String> {
        self.0.u32_le(what).map_err(err)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, String> {
        self.0.u64_le(what).map_err(err)
    }

    fn str16(&mut self, what: &'static str) -> Result<String, String> {
        let b = self.0.prefixed_u16_le(what).map_err(err)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, String> {
        self.0.varint(what).map_err(err)
    }

    fn left(&self) -> usize {
        self.0.remaining()
    }
}

/// Decodes a checkpoint body, checking that it is internally consistent:
/// known magic and version, one covered offset per partition, one location
/// per position of the index, every location in range and below its
/// partition's covered offset, the tip below the next sequence number, a
/// valid index ([`LogIndex::decode`]), and nothing after it. Never panics.
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
    let mut r = Cursor(Input::new(bytes));
    if r.take(4, "magic")? != BODY_MAGIC {
        return Err("not a checkpoint (bad magic)".into());
    }
    let version = r.u8("version")?;
    if version != BODY_VERSION {
        return Err(format!("checkpoint version {version} is not supported"));
    }
    let log_name = r.str16("log name")?;
    let topic = r.str16("topic")?;
    let partitions = r.u32("partitions")?;
    if partitions == 0 || partitions > u32::from(u16::MAX) {
        return Err(format!("{partitions} partitions"));
    }
    let tip = r.u64("tip")?;
    let next_seq = r.u64("next sequence number")?;
    let committed_batches = r.u64("committed transactions")?;
    let ignored_batches = r.u64("ignored transactions")?;
    if tip >= next_seq {
        return Err(format!(
            "tip {tip} is not below the next sequence {next_seq}"
        ));
    }
    if r.left() < partitions as usize * 8 {
        return Err("truncated in the covered offsets".into());
    }
    let mut next_offsets = Vec::with_capacity(partitions as usize);
    for _ in 0..partitions {
        let o = r.u64("covered offsets")? as i64;
        if !(0..1i64 << 48).contains(&o) {
            return Err(format!("covered offset {o} out of range"));
        }
        next_offsets.push(o);
    }
    let n = r.varint("location count")?;
    if n > (r.left() / 2) as u64 {
        return Err(format!("{n} locations in {} bytes", r.left()));
    }
    let mut locations = Vec::with_capacity(n as usize);
    let mut prev = vec![-1i64; partitions as usize];
    for i in 0..n {
        let p = r.varint("location partition")?;
        if p >= u64::from(partitions) {
            return Err(format!("position {i} in partition {p} of {partitions}"));
        }
        let z = r.varint("location offset")?;
        let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
        let slot = &mut prev[p as usize];
        let o = slot
            .checked_add(d)
            .filter(|o| (0..next_offsets[p as usize]).contains(o))
            .ok_or_else(|| {
                format!(
                    "position {i} at an offset outside partition {p}'s covered 0..{}",
                    next_offsets[p as usize]
                )
            })?;
        *slot = o;
        locations.push(pack(p as i32, o).expect("checked range"));
    }
    let len = r.u64("index length")?;
    if len != r.left() as u64 {
        return Err(format!(
            "index of {len} bytes where {} bytes are left",
            r.left()
        ));
    }
    let index = LogIndex::decode(r.0.rest()).map_err(|e| e.to_string())?;
    if index.head() != n {
        return Err(format!(
            "{n} locations for an index of {} events",
            index.head()
        ));
    }
    if (n == 0) != (tip == 0) {
        return Err(format!("tip {tip} with {n} events"));
    }
    Ok(Checkpoint {
        header: Header {
            log_name,
            topic,
            partitions,
            tip,
            next_seq,
            committed_batches,
            ignored_batches,
            next_offsets,
        },
        locations,
        index,
    })
}

/// One record of a checkpoint on the checkpoints topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The checkpoint's id.
    pub id: u64,
    /// The slot (0 or 1) it is written to.
    pub slot: u8,
    /// This chunk's index.
    pub index: u32,
    /// Chunks in the checkpoint.
    pub count: u32,
    /// Bytes of the whole checkpoint body.
    pub body_len: u64,
    /// CRC32C of the whole body on the last chunk, 0 on the others.
    pub body_crc: u32,
    /// This chunk's part of the body.
    pub data: Vec<u8>,
}

const CHUNK_HEADER: usize = 4 + 1 + 1 + 8 + 4 + 4 + 8 + 4 + 4;

impl Chunk {
    /// The record key: `<slot>/<index>` (compaction keeps the latest of
    /// each).
    pub fn key(&self) -> String {
        format!("{}/{}", self.slot, self.index)
    }

    /// The record value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHUNK_HEADER + 4 + self.data.len());
        out.extend_from_slice(&CHUNK_MAGIC);
        out.push(CHUNK_VERSION);
        out.push(self.slot);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.body_len.to_le_bytes());
        out.extend_from_slice(&self.body_crc.to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.data);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a record value, checking its CRC. Never panics.
    pub fn decode(value: &[u8]) -> Result<Chunk, String> {
        if value.len() < CHUNK_HEADER + 4 {
            return Err(format!("a chunk of {} bytes is too short", value.len()));
        }
        let (body, crc) = value.split_at(value.len() - 4);
        let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        let mut r = Cursor(Input::new(body));
        if r.take(4, "magic")? != CHUNK_MAGIC {
            return Err("not a checkpoint chunk (bad magic)".into());
        }
        let version = r.u8("version")?;
        if version != CHUNK_VERSION {
            return Err(format!("chunk version {version} is not supported"));
        }
        if crc32c::crc32c(body) != crc {
            return Err("chunk CRC mismatch".into());
        }
        let slot = r.u8("slot")?;
        let id = r.u64("id")?;
        let index = r.u32("index")?;
        let count = r.u32("count")?;
        let body_len = r.u64("body length")?;
        let body_crc = r.u32("body CRC")?;
        let n = r.u32("data length")? as usize;
        if n != r.left() {
            return Err(format!("data of {n} bytes where {} are left", r.left()));
        }
        if slot > 1 || index >= count {
            return Err(format!("slot {slot}, chunk {index} of {count}"));
        }
        Ok(Chunk {
            id,
            slot,
            index,
            count,
            body_len,
            body_crc,
            data: r.take(n, "data")?.to_vec(),
        })
    }
}

/// Cuts a checkpoint body into chunks of at most `chunk_bytes` bytes (at
/// least one chunk).
pub fn split(body: &[u8], id: u64, slot: u8, chunk_bytes: usize) -> Vec<Chunk> {
    let size = chunk_bytes.max(1);
    let count = body.len().div_ceil(size).max(1);
    let crc = crc32c::crc32c(body);
    (0..count)
        .map(|i| {
            let data = &body[(i * size).min(body.len())..((i + 1) * size).min(body.len())];
            Chunk {
                id,
                slot,
                index: i as u32,
                count: count as u32,
                body_len: body.len() as u64,
                body_crc: if i + 1 == count { crc } else { 0 },
                data: data.to_vec(),
            }
        })
        .collect()
}

/// Joins the chunks of one checkpoint (in any order) into its body,
/// checking that they are all there, agree with each other, and that the
/// body's CRC32C is the one the last chunk carries.
pub fn assemble(chunks: &[Chunk]) -> Result<Vec<u8>, String> {
    let first = chunks.first().ok_or("no chunks")?;
    let mut by_index: BTreeMap<u32, &Chunk> = BTreeMap::new();
    for c in chunks {
        if (c.id, c.count, c.body_len, c.slot)
            != (first.id, first.count, first.body_len, first.slot)
        {
            return Err(format!(
                "chunk {} disagrees with chunk {}",
                c.index, first.index
            ));
        }
        if by_index.insert(c.index, c).is_some() {
            return Err(format!("chunk {} appears twice", c.index));
        }
    }
    if by_index.len() as u64 != u64::from(first.count) {
        return Err(format!("{} of {} chunks", by_index.len(), first.count));
    }
    let total: u64 = by_index.values().map(|c| c.data.len() as u64).sum();
    if total != first.body_len {
        return Err(format!(
            "chunks hold {total} bytes of a {}-byte checkpoint",
            first.body_len
        ));
    }
    let mut body = Vec::with_capacity(total as usize);
    for c in by_index.values() {
        body.extend_from_slice(&c.data);
    }
    let last = by_index.values().next_back().expect("at least one chunk");
    if crc32c::crc32c(&body) != last.body_crc {
        return Err("checkpoint CRC mismatch".into());
    }
    Ok(body)
}

/// A unique id for a checkpoint write.
fn new_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ (u64::from(std::process::id()) << 40)
        ^ N.fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Creates the checkpoints topic (one partition, compacted) or accepts an
/// existing one. A failure is returned for the caller to log: checkpoints
/// are an optimisation and never stop the log from opening.
pub(crate) async fn ensure_topic(config: &KafkaConfig) -> Result<(), KafkaLogError> {
    let topic = config.checkpoint_topic();
    let mut c = config.client();
    config.apply_overrides(&mut c);
    let admin: AdminClient<DefaultClientContext> = c
        .create()
        .map_err(|e| KafkaLogError::kafka("create admin client", e))?;
    let max_bytes = config.max_checkpoint_record_bytes().to_string();
    let new = NewTopic::new(
        &topic,
        1,
        TopicReplication::Fixed(config.replication_factor),
    )
    .set("cleanup.policy", "compact")
    .set("max.message.bytes", &max_bytes);
    let opts = AdminOptions::new()
        .operation_timeout(Some(config.request_timeout))
        .request_timeout(Some(config.request_timeout));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| KafkaLogError::kafka("create checkpoints topic", e))?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(%topic, "created checkpoints topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(KafkaLogError::kafka(
                    "create checkpoints topic",
                    KafkaError::AdminOp(code),
                ))
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ loading

/// A checkpoint found on the topic, complete and valid on its own.
pub(crate) struct Found {
    pub checkpoint: Checkpoint,
    pub slot: u8,
    pub bytes: u64,
}

struct Set {
    count: u32,
    slot: u8,
    body_len: u64,
    /// Highest offset of a chunk of it: the newest set is tried first.
    newest: i64,
    /// Offset of its last chunk, once read: how far back its first is.
    last_chunk_at: Option<i64>,
    chunks: BTreeMap<u32, Chunk>,
    /// Tried already, or its chunks contradict each other.
    done: bool,
}

/// Finds checkpoints on the checkpoints topic, newest first, reading it
/// backwards from its end.
pub(crate) struct Finder<'a> {
    config: &'a KafkaConfig,
    topic: String,
    /// Always `Some` until dropped.
    consumer: Option<BaseConsumer>,
    low: i64,
    /// Everything from here to the end has been read (`None`: nothing yet).
    start: Option<i64>,
    high: i64,
    window: i64,
    sets: HashMap<u64, Set>,
    tried: u32,
    /// Complete checkpoints refused (logged with the reason).
    pub rejected: u32,
    /// Records that are not checkpoint chunks.
    pub garbage: u64,
    /// Bytes of chunk records read.
    pub bytes_read: u64,
}

impl<'a> Finder<'a> {
    pub(crate) fn new(config: &'a KafkaConfig) -> Result<Self, KafkaLogError> {
        let topic = config.checkpoint_topic();
        let consumer = crate::reader::consumer(config, "checkpoints", true)?;
        let (low, high) = match consumer.fetch_watermarks(&topic, 0, config.request_timeout) {
            Ok(w) => w,
            Err(e)
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition
                            | RDKafkaErrorCode::UnknownPartition
                    )
                ) =>
            {
                (0, 0)
            }
            Err(e) => return Err(KafkaLogError::kafka("fetch checkpoint watermarks", e)),
        };
        Ok(Self {
            config,
            topic,
            consumer: Some(consumer),
            low,
            start: None,
            high,
            window: 16,
            sets: HashMap::new(),
            tried: 0,
            rejected: 0,
            garbage: 0,
            bytes_read: 0,
        })
    }

    /// The next newest complete checkpoint that decodes and belongs to this
    /// log, or `None` when there is none left (or enough were tried).
    pub(crate) fn next(&mut self) -> Result<Option<Found>, KafkaLogError> {
        loop {
            if self.tried >= MAX_TRIES {
                return Ok(None);
            }
            let best = self
                .sets
                .iter()
                .filter(|(_, s)| !s.done && s.chunks.len() as u64 == u64::from(s.count))
                .max_by_key(|(_, s)| s.newest)
                .map(|(&id, _)| id);
            if let Some(id) = best {
                self.tried += 1;
                let set = self.sets.get_mut(&id).expect("a known set");
                set.done = true;
                let chunks: Vec<Chunk> = std::mem::take(&mut set.chunks).into_values().collect();
                let slot = set.slot;
                match self.check(&chunks) {
                    Ok((checkpoint, bytes)) => {
                        return Ok(Some(Found {
                            checkpoint,
                            slot,
                            bytes,
                        }))
                    }
                    Err(reason) => {
                        self.rejected += 1;
                        tracing::warn!(
                            topic = %self.topic, checkpoint = id, %reason,
                            "ignoring a checkpoint"
                        );
                        continue;
                    }
                }
            }
            if self.high <= self.low || self.start.is_some_and(|s| s <= self.low) {
                return Ok(None);
            }
            let start = self.start.unwrap_or(self.high);
            let mut from = start.saturating_sub(self.window).max(self.low);
            for s in self.sets.values().filter(|s| !s.done) {
                if let Some(at) = s.last_chunk_at {
                    from = from.min(at.saturating_sub(i64::from(s.count) - 1).max(self.low));
                }
            }
            // The first window reads to the partition's end rather than to
            // the high watermark: some brokers (tansu 0.6) report the base
            // offset of the last record batch plus one, short of the end
            // when that batch holds several records.
            let to = self.start;
            self.read(from, to)?;
            self.start = Some(from);
            self.window = self.window.saturating_mul(2);
        }
    }

    fn check(&self, chunks: &[Chunk]) -> Result<(Checkpoint, u64), String> {
        let body = assemble(chunks)?;
        let checkpoint = decode(&body)?;
        let h = &checkpoint.header;
        let want_topic = self.config.topic();
        if h.log_name != self.config.log_name
            || h.topic != want_topic
            || h.partitions != self.config.partitions
        {
            return Err(format!(
                "it is of log {:?}, topic {:?} with {} partitions, not {:?}, {want_topic:?} \
                 with {}",
                h.log_name, h.topic, h.partitions, self.config.log_name, self.config.partitions
            ));
        }
        if checkpoint.events() == 0 {
            return Err("it covers no events".into());
        }
        Ok((checkpoint, body.len() as u64))
    }

    /// Reads offsets `from..to` of the checkpoints topic into `sets`
    /// (`None`: to its end).
    fn read(&mut self, from: i64, to: Option<i64>) -> Result<(), KafkaLogError> {
        let consumer = self.consumer.take().expect("consumer until dropped");
        let result = self.read_with(&consumer, from, to);
        self.consumer = Some(consumer);
        result
    }

    fn read_with(
        &mut self,
        consumer: &BaseConsumer,
        from: i64,
        to: Option<i64>,
    ) -> Result<(), KafkaLogError> {
        let end = to.unwrap_or(i64::MAX);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, 0, Offset::Offset(from))
            .map_err(|e| KafkaLogError::kafka("assign", e))?;
        consumer
            .assign(&tpl)
            .map_err(|e| KafkaLogError::kafka("assign", e))?;
        let mut last_progress = Instant::now();
        loop {
            if last_progress.elapsed() > self.config.request_timeout {
                return Err(KafkaLogError::Timeout {
                    what: format!("reading {} from offset {from}", self.topic),
                    after_ms: self.config.request_ms(),
                });
            }
            match consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(m)) => {
                    last_progress = Instant::now();
                    let o = m.offset();
                    if o >= end {
                        break;
                    }
                    if o < from {
                        continue;
                    }
                    let value = m.payload().unwrap_or_default();
                    self.bytes_read += value.len() as u64;
                    match Chunk::decode(value) {
                        Ok(c) => self.add(o, c),
                        Err(reason) => {
                            self.garbage += 1;
                            tracing::debug!(topic = %self.topic, offset = o, %reason, "not a checkpoint chunk");
                        }
                    }
                    if o + 1 >= end {
                        break;
                    }
                }
                // Only a read to the topic's end can meet its end; an
                // earlier window has records up to `to`.
                Some(Err(KafkaError::PartitionEOF(_))) if to.is_none() => break,
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => {
                    return Err(KafkaLogError::kafka("read checkpoints", e));
                }
            }
        }
        Ok(())
    }

    fn add(&mut self, offset: i64, c: Chunk) {
        let set = self.sets.entry(c.id).or_insert_with(|| Set {
            count: c.count,
            slot: c.slot,
            body_len: c.body_len,
            newest: offset,
            last_chunk_at: None,
            chunks: BTreeMap::new(),
            done: false,
        });
        if set.done {
            return;
        }
        if (set.count, set.slot, set.body_len) != (c.count, c.slot, c.body_len) {
            tracing::warn!(topic = %self.topic, checkpoint = c.id, "chunks of one checkpoint disagree; ignoring it");
            set.done = true;
            set.chunks.clear();
            return;
        }
        set.newest = set.newest.max(offset);
        if c.index + 1 == c.count {
            set.last_chunk_at = Some(set.last_chunk_at.map_or(offset, |a| a.max(offset)));
        }
        set.chunks.insert(c.index, c);
    }
}

impl Drop for Finder<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.consumer.take() {
            crate::reader::discard(c);
        }
    }
}

// ------------------------------------------------------------------ writing

/// A checkpoint to write: its encoded body and the events it covers.
pub(crate) struct Job {
    pub body: Vec<u8>,
    pub events: u64,
    pub reply: Option<oneshot::Sender<Result<u64, KafkaLogError>>>,
}

#[derive(Clone, Default)]
struct Acks(Arc<Mutex<(u64, Option<KafkaError>)>>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut a = self.0.lock().expect("acks lock");
        match result {
            Ok(_) => a.0 += 1,
            Err((e, _)) => a.1 = Some(e.clone()),
        }
    }
}

/// The thread that writes checkpoints, so that the writer thread only
/// encodes them.
pub(crate) struct Checkpointer {
    config: Arc<KafkaConfig>,
    shared: Arc<Shared>,
    topic: String,
    producer: Option<(BaseProducer<Acks>, Acks)>,
    slot: u8,
}

impl Checkpointer {
    /// Starts the thread; `slot` is the slot to write first.
    pub(crate) fn spawn(
        config: Arc<KafkaConfig>,
        shared: Arc<Shared>,
        slot: u8,
    ) -> std::io::Result<(mpsc::Sender<Job>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel::<Job>();
        let me = Self {
            topic: config.checkpoint_topic(),
            config,
            shared,
            producer: None,
            slot,
        };
        let thread = std::thread::Builder::new()
            .name("smartmsg-kafka-checkpoint".into())
            .spawn(move || me.run(rx))?;
        Ok((tx, thread))
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            let started = Instant::now();
            let result = self.write(&job);
            let s = &self.shared.stats;
            let answer = match result {
                Ok(chunks) => {
                    s.checkpoints_written.fetch_add(1, Ordering::Relaxed);
                    s.checkpoint_events.store(job.events, Ordering::Relaxed);
                    tracing::info!(
                        topic = %self.topic, slot = self.slot, events = job.events,
                        bytes = job.body.len(), chunks, took = ?started.elapsed(),
                        "checkpoint written"
                    );
                    self.slot ^= 1;
                    Ok(job.events)
                }
                Err(e) => {
                    s.checkpoint_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        topic = %self.topic, events = job.events, error = %e,
                        "checkpoint write failed; retrying at the next interval"
                    );
                    // Start over with a fresh producer next time.
                    self.producer = None;
                    Err(e)
                }
            };
            s.checkpoints_in_flight.fetch_sub(1, Ordering::Relaxed);
            if let Some(reply) = job.reply {
                let _ = reply.send(answer);
            }
        }
        // Every write was acknowledged; closing the producer takes
        // librdkafka about 100 ms, which `close` need not wait for.
        if let Some(p) = self.producer.take() {
            let _ = std::thread::Builder::new()
                .name("smartmsg-kafka-close".into())
                .spawn(move || drop(p));
        }
    }

    fn producer(&mut self) -> Result<&(BaseProducer<Acks>, Acks), KafkaLogError> {
        if self.producer.is_none() {
            let mut c = self.config.client();
            let max = self.config.max_checkpoint_record_bytes().to_string();
            c.set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "5")
                .set("message.max.bytes", &max)
                .set("message.timeout.ms", self.config.request_ms().to_string())
                .set("socket.timeout.ms", self.config.request_ms().to_string());
            self.config.apply_overrides(&mut c);
            let acks = Acks::default();
            let p = c
                .create_with_context(acks.clone())
                .map_err(|e| KafkaLogError::kafka("create checkpoint producer", e))?;
            self.producer = Some((p, acks));
        }
        Ok(self.producer.as_ref().expect("just set"))
    }

    /// Writes one checkpoint; returns its number of chunks.
    fn write(&mut self, job: &Job) -> Result<usize, KafkaLogError> {
        let chunks = split(
            &job.body,
            new_id(),
            self.slot,
            self.config.checkpoint_chunk_bytes,
        );
        let timeout = self.config.request_timeout;
        let topic = self.topic.clone();
        let (p, acks) = self.producer()?;
        *acks.0.lock().expect("acks lock") = (0, None);
        let deadline = Instant::now() + timeout;
        for c in &chunks {
            let (key, value) = (c.key(), c.encode());
            loop {
                let record = BaseRecord::to(&topic)
                    .partition(0)
                    .key(key.as_bytes())
                    .payload(value.as_slice());
                match p.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if Instant::now() < deadline =>
                    {
                        p.poll(Duration::from_millis(5));
                    }
                    Err((e, _)) => return Err(KafkaLogError::kafka("produce checkpoint", e)),
                }
            }
        }
        loop {
            {
                let a = acks.0.lock().expect("acks lock");
                if let Some(e) = &a.1 {
                    return Err(KafkaLogError::kafka("deliver checkpoint", e.clone()));
                }
                if a.0 == chunks.len() as u64 {
                    return Ok(chunks.len());
                }
            }
            if Instant::now() >= deadline {
                return Err(KafkaLogError::Timeout {
                    what: format!("delivery of a checkpoint to {topic}"),
                    after_ms: self.config.request_ms(),
                });
            }
            p.poll(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smartmsg_engine::{AppendResult, IdempotencyKey, StreamId};

    fn sample(events: u64) -> Checkpoint {
        let mut index = LogIndex::new();
        let mut locations = Vec::new();
        for i in 0..events {
            let s = StreamId::new(format!("s-{}", i % 7)).unwrap();
            let v = index.version(&s) + 1;
            let r = AppendResult {
                first_position: i,
                next_position: i + 1,
                versions: vec![(s.clone(), v)],
            };
            let key = IdempotencyKey::new(format!("k{i}"));
            index.apply(&r, (i % 3 == 0).then_some((&key, i * 31)), [&s]);
            locations.push(pack((i % 3) as i32, (i * 2 + i % 5) as i64).unwrap());
        }
        let mut next_offsets = vec![0i64; 3];
        for &l in &locations {
            let (p, o) = unpack(l);
            next_offsets[p as usize] = next_offsets[p as usize].max(o + 1);
        }
        Checkpoint {
            header: Header {
                log_name: "log".into(),
                topic: "smartmsg.log.events".into(),
                partitions: 3,
                tip: 9,
                next_seq: 12,
                committed_batches: 9,
                ignored_batches: 2,
                next_offsets,
            },
            locations,
            index,
        }
    }

    /// A little deterministic generator for garbage.
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn body_round_trips() {
        for n in [1, 2, 100, 5_000] {
            let c = sample(n);
            assert_eq!(decode(&c.encode()).unwrap(), c);
        }
    }

    #[test]
    fn chunks_round_trip_and_reassemble_in_any_order() {
        let body = sample(5_000).encode();
        let mut chunks = split(&body, 77, 1, 1024);
        assert_eq!(chunks.len(), body.len().div_ceil(1024));
        assert!(chunks.iter().all(|c| c.data.len() <= 1024));
        let decoded: Vec<Chunk> = chunks
            .iter()
            .map(|c| Chunk::decode(&c.encode()).unwrap())
            .collect();
        assert_eq!(decoded, chunks);
        chunks.reverse();
        assert_eq!(assemble(&chunks).unwrap(), body);
        assert_eq!(split(&[], 1, 0, 1024).len(), 1);
        assert_eq!(assemble(&split(&[], 1, 0, 1024)).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn torn_or_damaged_checkpoints_are_refused() {
        let body = sample(3_000).encode();
        let chunks = split(&body, 5, 0, 1024);
        // A chunk missing.
        assert!(assemble(&chunks[1..]).is_err());
        assert!(assemble(&chunks[..chunks.len() - 1]).is_err());
        // A chunk of another checkpoint.
        let mut mixed = chunks.clone();
        mixed[1] = split(&body, 6, 0, 1024)[1].clone();
        assert!(assemble(&mixed).is_err());
        // Data changed consistently with the chunk CRC but not the body's.
        let mut bad = chunks.clone();
        bad[0].data[10] ^= 1;
        let reencoded = Chunk::decode(&bad[0].encode()).unwrap();
        assert_eq!(
            assemble(&[vec![reencoded], bad[1..].to_vec()].concat()).unwrap_err(),
            "checkpoint CRC mismatch"
        );
        // A flipped bit in a record: the chunk CRC.
        let mut rec = chunks[0].encode();
        rec[40] ^= 4;
        assert_eq!(Chunk::decode(&rec).unwrap_err(), "chunk CRC mismatch");
        // Truncated bodies.
        for cut in [0, 3, 5, 40, body.len() / 2, body.len() - 1] {
            assert!(decode(&body[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn inconsistent_bodies_are_refused() {
        let c = sample(50);
        let mut beyond = c.clone();
        beyond.header.next_offsets[0] = 0;
        assert!(decode(&beyond.encode()).unwrap_err().contains("covered"));
        let mut tip = c.clone();
        tip.header.tip = tip.header.next_seq;
        assert!(decode(&tip.encode()).is_err());
        let mut fewer = c;
        fewer.locations.pop();
        assert!(decode(&fewer.encode()).unwrap_err().contains("locations"));
    }

    #[test]
    fn garbage_never_panics() {
        let valid = sample(200).encode();
        let chunk = split(&valid, 1, 0, 4096)[0].encode();
        for seed in 0..3_000u64 {
            let n = (seed as usize * 7) % 300;
            let g = bytes(seed, n);
            let _ = decode(&g);
            let _ = Chunk::decode(&g);
            let mut prefixed = BODY_MAGIC.to_vec();
            prefixed.push(BODY_VERSION);
            prefixed.extend_from_slice(&g);
            let _ = decode(&prefixed);
            // Damaged valid encodings.
            for base in [&valid, &chunk] {
                let mut d = base.to_vec();
                let flips = bytes(seed ^ 0xabc, 6);
                for f in flips.chunks(2) {
                    let at = (usize::from(f[0]) * 131 + seed as usize) % d.len();
                    d[at] ^= f[1] | 1;
                }
                let _ = decode(&d);
                let _ = Chunk::decode(&d);
                let cut = seed as usize % (d.len() + 1);
                let _ = decode(&d[..cut]);
                let _ = Chunk::decode(&d[..cut]);
            }
        }
    }
}
