//! The single writer: one OS thread that owns the transactional producer,
//! checks appends against the index, and commits each group of them as one
//! Kafka transaction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use smartmsg_engine::index::{LogIndex, Verdict};
use smartmsg_engine::{AppendError, AppendResult, AppendTx, BackendError, Limits};
use tokio::sync::{mpsc, oneshot, watch};

use crate::chain::{pack, unpack};
use crate::checkpoint::{self, Header, Job};
use crate::config::KafkaConfig;
use crate::envelope::{self, EventFields, Framing};
use crate::error::{is_fenced, KafkaLogError};

/// What readers and the writer share.
pub(crate) struct Shared {
    pub topic: String,
    pub partitions: u32,
    pub limits: Limits,
    pub state: RwLock<State>,
    pub stats: Counters,
}

/// The index. `index` may run ahead of `committed` while a Kafka
/// transaction is in flight; readers only look below `committed`.
pub(crate) struct State {
    pub index: LogIndex,
    /// Packed (partition, offset) of every committed position.
    pub locs: Vec<u64>,
    /// One past the last committed position: the head.
    pub committed: u64,
    /// `batch_seq` of the committed chain's last transaction (0: none).
    pub tip: u64,
}

/// Running counters.
#[derive(Default)]
pub(crate) struct Counters {
    pub kafka_transactions: AtomicU64,
    pub appends_written: AtomicU64,
    pub events_written: AtomicU64,
    pub aborted_transactions: AtomicU64,
    pub checkpoints_started: AtomicU64,
    pub checkpoints_written: AtomicU64,
    pub checkpoint_failures: AtomicU64,
    pub checkpoints_in_flight: AtomicU64,
    /// Events covered by the last checkpoint written.
    pub checkpoint_events: AtomicU64,
    /// Nanoseconds the last checkpoint took to encode.
    pub checkpoint_encode_nanos: AtomicU64,
}

/// What the writer is asked to do.
pub(crate) enum Request {
    Append(Append),
    /// Write a checkpoint now; answered once it is written.
    Checkpoint(oneshot::Sender<Result<u64, KafkaLogError>>),
}

/// An append waiting for the writer.
pub(crate) struct Append {
    pub tx: AppendTx,
    pub reply: oneshot::Sender<Result<AppendResult, AppendError>>,
}

/// The writer's checkpoint schedule.
pub(crate) struct Checkpoints {
    /// `checkpoint_every_events`.
    pub every: u64,
    /// The head when the last checkpoint was started.
    pub last: u64,
    /// Per partition of the events topic: every record before this offset
    /// is accounted for (the end at open, and one past each committed
    /// record since).
    pub covered: Vec<i64>,
    /// Kafka transactions committed and ignored before this writer (from
    /// the rebuild), for the checkpoint's statistics.
    pub base_committed: u64,
    pub base_ignored: u64,
    pub jobs: Option<std::sync::mpsc::Sender<Job>>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

type Delivered = (usize, Result<(i32, i64), KafkaError>);

/// Collects delivery reports; the opaque is `batch_seq << 32 | index`, so a
/// late report of an aborted transaction is never taken for a current one.
#[derive(Clone, Default)]
pub(crate) struct DeliveryLog(Arc<Mutex<Vec<Delivered>>>);

impl ClientContext for DeliveryLog {}

impl ProducerContext for DeliveryLog {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let r = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        self.0.lock().expect("delivery log lock").push((opaque, r));
    }
}

pub(crate) type TxProducer = BaseProducer<DeliveryLog>;

/// Creates the transactional producer (not yet initialised).
pub(crate) fn producer(config: &KafkaConfig) -> Result<(TxProducer, DeliveryLog), KafkaLogError> {
    let mut c = config.client();
    c.set("transactional.id", config.transactional_id())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("message.max.bytes", config.max_record_bytes().to_string())
        .set(
            "transaction.timeout.ms",
            config.transaction_timeout.as_millis().to_string(),
        )
        .set("message.timeout.ms", config.request_ms().to_string())
        .set("socket.timeout.ms", config.request_ms().to_string());
    config.apply_overrides(&mut c);
    let log = DeliveryLog::default();
    let p = c
        .create_with_context(log.clone())
        .map_err(|e| KafkaLogError::kafka("create producer", e))?;
    Ok((p, log))
}

/// How a Kafka transaction failed.
enum Failure {
    /// Aborted cleanly: nothing of it is committed; the writer goes on.
    Aborted(KafkaLogError),
    /// Another writer owns the transactional id.
    Fenced,
    /// The outcome is unknown or the producer is unusable.
    Poisoned(KafkaLogError),
}

pub(crate) struct Writer {
    pub shared: Arc<Shared>,
    pub config: Arc<KafkaConfig>,
    pub producer: TxProducer,
    pub deliveries: DeliveryLog,
    pub rx: mpsc::Receiver<Request>,
    pub head: watch::Sender<u64>,
    /// `batch_seq` of the last committed Kafka transaction (0: none).
    pub tip: u64,
    pub next_seq: u64,
    pub poison: Option<AppendError>,
    pub carry: Option<Request>,
    pub checkpoints: Option<Checkpoints>,
}

fn backend(e: KafkaLogError) -> AppendError {
    AppendError::Backend(BackendError::new(e))
}

fn tx_bytes(tx: &AppendTx) -> usize {
    tx.streams
        .iter()
        .flat_map(|s| s.events.iter())
        .map(|e| e.size())
        .sum()
}

impl Writer {
    /// Runs until every sender is gone, then waits for a checkpoint being
    /// written.
    pub(crate) fn run(mut self) {
        loop {
            let first = match self.carry.take() {
                Some(r) => r,
                None => match self.rx.blocking_recv() {
                    Some(r) => r,
                    None => break,
                },
            };
            let first = match first {
                Request::Append(a) => a,
                Request::Checkpoint(reply) => {
                    self.checkpoint_now(reply);
                    continue;
                }
            };
            let mut events = first.tx.event_count();
            let mut bytes = tx_bytes(&first.tx);
            let mut batch = vec![first];
            while let Ok(r) = self.rx.try_recv() {
                let Request::Append(a) = r else {
                    self.carry = Some(r);
                    break;
                };
                let (n, b) = (a.tx.event_count(), tx_bytes(&a.tx));
                if events + n > self.config.max_batch_events
                    || bytes + b > self.config.max_batch_bytes
                {
                    self.carry = Some(Request::Append(a));
                    break;
                }
                events += n;
                bytes += b;
                batch.push(a);
            }
            self.process(batch);
        }
        if let Some(c) = &mut self.checkpoints {
            c.jobs = None;
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
        tracing::debug!(topic = %self.shared.topic, "kafka event log writer stopped");
    }

    /// Answers a request for a checkpoint now.
    fn checkpoint_now(&mut self, reply: oneshot::Sender<Result<u64, KafkaLogError>>) {
        if let Some(e) = &self.poison {
            let _ = reply.send(Err(KafkaLogError::Poisoned(format!(
                "no checkpoint of a failed writer: {e}"
            ))));
            return;
        }
        let head = self.shared.state.read().expect("state lock").committed;
        match &mut self.checkpoints {
            None => {
                let _ = reply.send(Err(KafkaLogError::Config(
                    "checkpoints are disabled (checkpoint_every_events is 0)".into(),
                )));
            }
            Some(_) if head == 0 => {
                let _ = reply.send(Ok(0));
            }
            Some(c) => {
                c.last = head;
                self.start_checkpoint(Some(reply));
            }
        }
    }

    /// After a commit: starts a checkpoint if `every` events were committed
    /// since the last one started and none is being written.
    fn maybe_checkpoint(&mut self, head: u64) {
        let Some(c) = &mut self.checkpoints else {
            return;
        };
        if head.saturating_sub(c.last) < c.every
            || self
                .shared
                .stats
                .checkpoints_in_flight
                .load(Ordering::Relaxed)
                > 0
        {
            return;
        }
        c.last = head;
        self.start_checkpoint(None);
    }

    /// Encodes the committed state (between Kafka transactions, so the
    /// index holds exactly the committed events) and hands it to the
    /// checkpoint thread.
    fn start_checkpoint(&mut self, reply: Option<oneshot::Sender<Result<u64, KafkaLogError>>>) {
        let Some(c) = &self.checkpoints else {
            return;
        };
        let started = Instant::now();
        let s = &self.shared.stats;
        let (body, events) = {
            let st = self.shared.state.read().expect("state lock");
            debug_assert_eq!(st.index.head(), st.committed);
            let header = Header {
                log_name: self.config.log_name.clone(),
                topic: self.shared.topic.clone(),
                partitions: self.shared.partitions,
                tip: st.tip,
                next_seq: self.next_seq,
                committed_batches: c.base_committed + s.kafka_transactions.load(Ordering::Relaxed),
                ignored_batches: c.base_ignored + s.aborted_transactions.load(Ordering::Relaxed),
                next_offsets: c.covered.clone(),
            };
            (
                checkpoint::encode(&header, &st.locs, &st.index),
                st.committed,
            )
        };
        let took = started.elapsed();
        s.checkpoint_encode_nanos
            .store(took.as_nanos() as u64, Ordering::Relaxed);
        tracing::debug!(
            topic = %self.shared.topic, events, bytes = body.len(), ?took,
            "checkpoint encoded"
        );
        s.checkpoints_started.fetch_add(1, Ordering::Relaxed);
        s.checkpoints_in_flight.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            body,
            events,
            reply,
        };
        if let Some(Err(std::sync::mpsc::SendError(job))) = c.jobs.as_ref().map(|j| j.send(job)) {
            s.checkpoints_in_flight.fetch_sub(1, Ordering::Relaxed);
            s.checkpoint_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %self.shared.topic, "checkpoint thread gone");
            if let Some(r) = job.reply {
                let _ = r.send(Err(KafkaLogError::Poisoned(
                    "checkpoint thread gone".into(),
                )));
            }
        }
    }

    fn process(&mut self, batch: Vec<Append>) {
        if let Some(err) = &self.poison {
            for r in batch {
                let _ = r.reply.send(Err(err.clone()));
            }
            return;
        }
        // Check every append against the index, applying each accepted one
        // at once, so later appends of the batch see it.
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut writes = Vec::new();
        let head0;
        {
            let mut st = self.shared.state.write().expect("state lock");
            head0 = st.index.head();
            for (i, r) in batch.iter().enumerate() {
                match st.index.check(&r.tx, &self.shared.limits) {
                    Ok(Verdict::Write(res)) => {
                        st.index.apply_tx(&r.tx, &res);
                        writes.push(i);
                        outcomes.push(Ok(res));
                    }
                    Ok(Verdict::Duplicate(res)) => outcomes.push(Ok(res)),
                    Err(e) => outcomes.push(Err(e)),
                }
            }
        }
        if writes.is_empty() {
            for (r, o) in batch.into_iter().zip(outcomes) {
                let _ = r.reply.send(o);
            }
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let records = self.encode(seq, &batch, &outcomes, &writes);
        match self.commit(seq, &records) {
            Ok(locations) => {
                if let Some(c) = &mut self.checkpoints {
                    for &l in &locations {
                        let (p, o) = unpack(l);
                        let covered = &mut c.covered[p as usize];
                        *covered = (*covered).max(o + 1);
                    }
                }
                let head = {
                    let mut st = self.shared.state.write().expect("state lock");
                    st.locs.extend(locations);
                    st.committed = st.index.head();
                    // Committed: keys out of the window can go for good.
                    st.index.forget_expired_keys();
                    st.tip = seq;
                    debug_assert_eq!(st.locs.len() as u64, st.committed);
                    st.committed
                };
                self.tip = seq;
                let s = &self.shared.stats;
                s.kafka_transactions.fetch_add(1, Ordering::Relaxed);
                s.appends_written
                    .fetch_add(writes.len() as u64, Ordering::Relaxed);
                s.events_written
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                self.head.send_replace(head);
                for (r, o) in batch.into_iter().zip(outcomes) {
                    let _ = r.reply.send(o);
                }
                self.maybe_checkpoint(head);
            }
            Err(failure) => {
                self.shared
                    .state
                    .write()
                    .expect("state lock")
                    .index
                    .truncate(head0);
                self.shared
                    .stats
                    .aborted_transactions
                    .fetch_add(1, Ordering::Relaxed);
                // Every answer of the batch may depend on what was just
                // undone, so every caller learns of the failure.
                let err = match failure {
                    Failure::Aborted(e) => {
                        tracing::warn!(topic = %self.shared.topic, error = %e, "kafka transaction aborted");
                        backend(e)
                    }
                    Failure::Fenced => {
                        tracing::warn!(topic = %self.shared.topic, "fenced by a newer writer");
                        self.poison = Some(AppendError::Fenced);
                        AppendError::Fenced
                    }
                    Failure::Poisoned(e) => {
                        tracing::error!(topic = %self.shared.topic, error = %e, "kafka writer poisoned");
                        self.poison = Some(backend(KafkaLogError::Poisoned(e.to_string())));
                        backend(e)
                    }
                };
                for r in batch {
                    let _ = r.reply.send(Err(err.clone()));
                }
            }
        }
    }

    /// The records of the batch's accepted appends: (partition, key, value).
    fn encode(
        &self,
        seq: u64,
        batch: &[Append],
        outcomes: &[Result<AppendResult, AppendError>],
        writes: &[usize],
    ) -> Vec<(i32, String, Vec<u8>)> {
        let count: usize = writes.iter().map(|&i| batch[i].tx.event_count()).sum();
        let mut out = Vec::with_capacity(count);
        for &i in writes {
            let tx = &batch[i].tx;
            let Ok(res) = &outcomes[i] else {
                unreachable!("a write has a result")
            };
            let tx_count = tx.event_count() as u32;
            let idempotency = tx.idempotency_key.as_ref().map(|k| (k, tx.fingerprint()));
            let mut tx_index = 0u32;
            for (k, s) in tx.streams.iter().enumerate() {
                let before = res.versions[k].1 - s.events.len() as u64;
                let partition = envelope::partition_for(&s.stream, self.shared.partitions);
                for (j, e) in s.events.iter().enumerate() {
                    let framing = Framing {
                        batch_seq: seq,
                        prev_seq: self.tip,
                        batch_index: out.len() as u32,
                        batch_count: count as u32,
                        tx_index,
                        tx_count,
                        position: res.first_position + u64::from(tx_index),
                        version: before + j as u64 + 1,
                    };
                    let fields = EventFields {
                        kind: &e.kind,
                        schema: e.schema,
                        timestamp_ms: e.timestamp_ms,
                        metadata: &e.metadata,
                        payload: &e.payload,
                    };
                    let value = envelope::encode(
                        &framing,
                        &fields,
                        if tx_index == 0 { idempotency } else { None },
                    );
                    out.push((partition, s.stream.as_str().to_owned(), value));
                    tx_index += 1;
                }
            }
        }
        out
    }

    /// Runs one Kafka transaction; returns the packed location of each
    /// record, in order.
    fn commit(&self, seq: u64, records: &[(i32, String, Vec<u8>)]) -> Result<Vec<u64>, Failure> {
        let timeout = self.config.request_timeout;
        let p = &self.producer;
        self.deliveries.0.lock().expect("delivery log lock").clear();
        p.begin_transaction().map_err(|e| {
            if is_fenced(&e) {
                Failure::Fenced
            } else {
                Failure::Poisoned(KafkaLogError::kafka("begin_transaction", e))
            }
        })?;
        let base = (seq as usize) << 32;
        for (i, (partition, key, value)) in records.iter().enumerate() {
            let deadline = Instant::now() + timeout;
            loop {
                let record = BaseRecord::with_opaque_to(&self.shared.topic, base | i)
                    .partition(*partition)
                    .key(key.as_bytes())
                    .payload(value.as_slice());
                match p.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if Instant::now() < deadline =>
                    {
                        p.poll(Duration::from_millis(1));
                    }
                    Err((e, _)) => return Err(self.abort(KafkaLogError::kafka("produce", e))),
                }
            }
        }
        // Wait for every delivery report (rust-rdkafka's own flush polls in
        // 100 ms steps; this loop answers within a millisecond).
        let deadline = Instant::now() + timeout;
        let mut locations = vec![0u64; records.len()];
        let mut got = 0usize;
        loop {
            {
                let reports: Vec<Delivered> = self
                    .deliveries
                    .0
                    .lock()
                    .expect("delivery log lock")
                    .drain(..)
                    .collect();
                for (opaque, r) in reports {
                    if opaque >> 32 != seq as usize {
                        continue;
                    }
                    let i = opaque & 0xffff_ffff;
                    match r {
                        Ok((part, offset)) => {
                            let Some(loc) = pack(part, offset) else {
                                return Err(self.abort(KafkaLogError::Corrupt {
                                    topic: self.shared.topic.clone(),
                                    partition: part,
                                    offset,
                                    reason: "partition or offset out of range".into(),
                                }));
                            };
                            locations[i] = loc;
                            got += 1;
                        }
                        Err(e) => {
                            return Err(self.abort(KafkaLogError::kafka("delivery", e)));
                        }
                    }
                }
            }
            if got == records.len() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(self.abort(KafkaLogError::Timeout {
                    what: format!("delivery of {} record(s)", records.len() - got),
                    after_ms: self.config.request_ms(),
                }));
            }
            p.poll(Duration::from_millis(1));
        }
        if let Some(hook) = &self.config.before_commit {
            if !hook(seq) {
                return Err(self.abort(KafkaLogError::Aborted(
                    "the before-commit test hook refused the commit".into(),
                )));
            }
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            match p.commit_transaction(timeout) {
                Ok(()) => return Ok(locations),
                Err(e) if is_fenced(&e) => {
                    let _ = p.abort_transaction(timeout);
                    return Err(Failure::Fenced);
                }
                Err(KafkaError::Transaction(t)) if t.is_retriable() && attempts < 2 => {
                    tracing::warn!(error = %t, "commit failed, retrying");
                }
                Err(KafkaError::Transaction(t)) if t.txn_requires_abort() => {
                    return Err(self.abort(KafkaLogError::kafka(
                        "commit_transaction",
                        KafkaError::Transaction(t),
                    )));
                }
                Err(e) => {
                    return Err(Failure::Poisoned(KafkaLogError::kafka(
                        "commit_transaction",
                        e,
                    )))
                }
            }
        }
    }

    /// Aborts the open transaction after `cause`.
    fn abort(&self, cause: KafkaLogError) -> Failure {
        if let KafkaLogError::Kafka { source, .. } = &cause {
            if is_fenced(source) {
                let _ = self.producer.abort_transaction(self.config.request_timeout);
                return Failure::Fenced;
            }
        }
        match self.producer.abort_transaction(self.config.request_timeout) {
            Ok(()) => Failure::Aborted(cause),
            Err(e) if is_fenced(&e) => Failure::Fenced,
            Err(e) => Failure::Poisoned(KafkaLogError::kafka("abort_transaction", e)),
        }
    }
}
