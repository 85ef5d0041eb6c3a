//! [`RabbitDelayQueue`]: the [`DelayQueue`] port on RabbitMQ.

use std::collections::{HashMap, HashSet};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use smartmsg_engine::delay::check_job;
use smartmsg_engine::{
    DeadLetter, DelayQueue, Job, JobId, Lease, LeaseToken, QueueError, QueueLimits, Scheduled,
};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::codec::{
    content_hash, decode_dead, decode_job, decode_journal, encode_dead, encode_job, encode_journal,
    truncate_utf8, DeadRecord, JobMessage, JournalRecord,
};
use crate::config::RabbitConfig;
use crate::error::RabbitError;
use crate::registry::{PendingEntry, Registry};

const CT_JOB: &str = "application/vnd.smartmsg.delay-job.v1";
const CT_DEAD: &str = "application/vnd.smartmsg.dead-letter.v1";
const CT_JOURNAL: &str = "application/vnd.smartmsg.delay-journal.v1";
/// Header carrying a dead letter's reason (also inside the body), for
/// operators looking at the queue in the management UI.
const REASON_HEADER: &str = "x-smartmsg-reason";
/// Prefetch (credit) of the journal follower.
const JOURNAL_PREFETCH: u16 = 2000;
/// The journal follower acks this many deliveries at once.
const JOURNAL_ACK_EVERY: u16 = 500;

/// The names of the queues one prefix uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// `{prefix}.level.{k:02}`: level `k`, TTL `base_ms << k`, dead-letters
    /// into the hop queue.
    pub levels: Vec<String>,
    /// `{prefix}.hop`: messages that expired out of a level.
    pub hop: String,
    /// `{prefix}.due`: messages that are due; `poll_due` takes from here.
    pub due: String,
    /// `{prefix}.dead`: dead-letter records.
    pub dead: String,
    /// `{prefix}.journal`: a stream of pending/retired records.
    pub journal: String,
}

impl QueueNames {
    /// The names for `prefix` with `levels` levels.
    pub fn new(prefix: &str, levels: u8) -> Self {
        Self {
            levels: (0..levels)
                .map(|k| format!("{prefix}.level.{k:02}"))
                .collect(),
            hop: format!("{prefix}.hop"),
            due: format!("{prefix}.due"),
            dead: format!("{prefix}.dead"),
            journal: format!("{prefix}.journal"),
        }
    }

    /// Every queue, levels first.
    pub fn all(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.levels.iter().map(String::as_str).collect();
        v.extend([
            self.hop.as_str(),
            self.due.as_str(),
            self.dead.as_str(),
            self.journal.as_str(),
        ]);
        v
    }
}

/// Milliseconds since the Unix epoch, by the wall clock.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A signal that a session has died.
#[derive(Default)]
struct Died {
    flag: AtomicBool,
    notify: Notify,
}

impl Died {
    fn kill(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
    fn is_dead(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    async fn wait(&self) {
        loop {
            let mut n = pin!(self.notify.notified());
            n.as_mut().enable();
            if self.is_dead() {
                return;
            }
            n.await;
        }
    }
}

/// One connection to the broker and the channels and tasks using it.
struct Session {
    conn: Connection,
    /// Publisher-confirm channel for every publish.
    publ: Channel,
    /// `basic_get` on the due queue, and the acks of those deliveries.
    get: Channel,
    /// Peeks at the dead-letter queue.
    dlq: Channel,
    died: Arc<Died>,
    _tasks: Tasks,
}

/// Background tasks aborted when dropped.
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A message fetched from the due queue and not yet finished.
struct Held {
    msg: JobMessage,
    /// The attempt number a lease of this copy has.
    attempt: u32,
    acker: Acker,
}

struct LeaseEntry {
    held: Held,
    token: LeaseToken,
    deadline_ms: u64,
    /// The `now_ms` of the poll that leased it.
    leased_at: u64,
    /// Cancelled while leased: finished when the lease ends.
    cancelled: bool,
}

/// A `schedule` call in progress, or one that failed after its message may
/// have reached the broker (a retry with the same content reuses its `seq`,
/// so the two copies are one incarnation).
struct Inflight {
    seq: u64,
    hash: u64,
    in_progress: bool,
    message_sent: bool,
    keep_until_ms: u64,
}

#[derive(Default)]
struct State {
    registry: Registry,
    inflight: HashMap<JobId, Inflight>,
    held: Vec<Held>,
    leases: HashMap<u64, LeaseEntry>,
    /// Incarnations with a usable copy held or leased here (a second copy
    /// of one of them is a duplicate).
    local: HashSet<(JobId, u64)>,
    barriers: HashMap<u64, oneshot::Sender<()>>,
}

impl State {
    fn forget(&mut self, m: &JobMessage) {
        self.local.remove(&(m.id.clone(), m.seq));
    }
}

struct Inner {
    cfg: RabbitConfig,
    names: QueueNames,
    state: Mutex<State>,
    session: Mutex<Option<Arc<Session>>>,
    closed: AtomicBool,
    seq: AtomicU64,
    sched_done: Notify,
    poll_lock: tokio::sync::Mutex<()>,
    dlq_lock: tokio::sync::Mutex<()>,
}

/// A [`DelayQueue`] on RabbitMQ: one durable fixed-TTL queue per delay
/// level, a hop consumer that moves expired messages down the levels, a due
/// queue `poll_due` takes from, a dead-letter queue, and a journal stream of
/// pending and retired job ids. See the [crate docs](crate) for the design,
/// the guarantees and their limits.
///
/// Background tasks run on the tokio runtime that opened the queue; they
/// stop when the queue is dropped or [closed](Self::close).
pub struct RabbitDelayQueue {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RabbitDelayQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitDelayQueue")
            .field("prefix", &self.inner.cfg.prefix)
            .finish_non_exhaustive()
    }
}

impl RabbitDelayQueue {
    /// Connects, declares the queues (idempotent), reads the journal to its
    /// end and starts the background tasks (hop consumer, journal follower,
    /// lease expiry, reconnection). Must be called inside a tokio runtime.
    pub async fn open(cfg: RabbitConfig) -> Result<Self, RabbitError> {
        cfg.validate()?;
        let names = QueueNames::new(&cfg.prefix, cfg.levels);
        let inner = Arc::new(Inner {
            cfg,
            names,
            state: Mutex::new(State::default()),
            session: Mutex::new(None),
            closed: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            sched_done: Notify::new(),
            poll_lock: tokio::sync::Mutex::new(()),
            dlq_lock: tokio::sync::Mutex::new(()),
        });
        let session = inner.connect().await?;
        *inner.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
        let supervisor = tokio::spawn(Arc::clone(&inner).supervise());
        let sweeper = tokio::spawn(Arc::clone(&inner).sweep());
        Ok(Self {
            inner,
            tasks: vec![supervisor, sweeper],
        })
    }

    /// The queues this delay queue uses.
    pub fn names(&self) -> &QueueNames {
        &self.inner.names
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &RabbitConfig {
        &self.inner.cfg
    }

    /// Whether a connection to the broker is up right now.
    pub fn is_connected(&self) -> bool {
        self.inner.session().is_ok()
    }

    /// Closes the queue gracefully: every outstanding lease ends as if
    /// nacked with no retry time (in (deadline, id) order: due again at the
    /// time of the poll that leased it, or dead-lettered after its last
    /// attempt), fetched jobs not yet leased go back to the due queue
    /// unchanged, then the background tasks stop and the connection closes.
    ///
    /// Dropping the queue instead is like a crash: the broker puts unacked
    /// deliveries back itself, flagged redelivered, which counts as a
    /// delivery (see the crate docs).
    pub async fn close(mut self) -> Result<(), RabbitError> {
        let r = self.inner.hand_back().await;
        if let Some(s) = self.stop() {
            let _ = s.conn.close(200, "closed".into()).await;
        }
        r
    }

    /// Closes the queue like [`close`](Self::close) and deletes every queue
    /// of its prefix with whatever they hold (for tests and teardown).
    pub async fn destroy(mut self) -> Result<(), RabbitError> {
        if let Some(s) = self.stop() {
            let _ = s.conn.close(200, "closed".into()).await;
        }
        delete_queues(&self.inner.cfg.url, &self.inner.names).await
    }

    fn stop(&mut self) -> Option<Arc<Session>> {
        self.inner.closed.store(true, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let mut st = self.inner.lock_state();
        st.held.clear();
        st.leases.clear();
        st.local.clear();
        drop(st);
        self.inner
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Deletes the queues named by `names` (those that exist), with their
/// messages, on a connection of its own.
pub async fn delete_queues(url: &str, names: &QueueNames) -> Result<(), RabbitError> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    for q in names.all() {
        ch.queue_delete(q.into(), QueueDeleteOptions::default())
            .await?;
    }
    let _ = conn.close(200, "deleted".into()).await;
    Ok(())
}

impl Drop for RabbitDelayQueue {
    fn drop(&mut self) {
        drop(self.stop());
    }
}

/// Publishes one persistent message through the default exchange to
/// `queue` and waits for the broker's confirm.
async fn publish(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), RabbitError> {
    let confirm = ch
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            props.with_delivery_mode(2),
        )
        .await?;
    match confirm.await? {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(RabbitError::Unroutable {
            queue: queue.to_owned(),
        }),
        Confirmation::Nack(_) => Err(RabbitError::PublishNacked {
            queue: queue.to_owned(),
        }),
    }
}

fn job_props(id: &JobId) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CT_JOB.into())
        .with_message_id(id.as_str().into())
}

fn classic_args() -> FieldTable {
    let mut a = FieldTable::default();
    a.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    a
}

fn map_declare_err(queue: &str, e: lapin::Error) -> RabbitError {
    let text = e.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent arg") {
        RabbitError::TopologyMismatch {
            queue: queue.to_owned(),
            detail: text,
        }
    } else {
        RabbitError::Amqp(e)
    }
}

impl Inner {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn limits(&self) -> &QueueLimits {
        &self.cfg.limits
    }

    fn session(&self) -> Result<Arc<Session>, QueueError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(QueueError::Closed);
        }
        match &*self.session.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(s) if !s.died.is_dead() => Ok(Arc::clone(s)),
            _ => Err(RabbitError::Disconnected.into()),
        }
    }

    /// Marks the session dead (so the supervisor reconnects) when one of
    /// its channels was closed under it, e.g. by the broker's
    /// `consumer_timeout` or a channel error, while the connection stays up.
    fn check_channels(&self) {
        let s = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(s) = s {
            if !(s.publ.status().connected()
                && s.get.status().connected()
                && s.dlq.status().connected())
            {
                tracing::warn!("a RabbitMQ channel was closed; reconnecting");
                s.died.kill();
            }
        }
    }

    /// A new number from a strictly increasing clock: wall-clock
    /// nanoseconds, bumped by one when two calls see the same instant. Names
    /// incarnations, revisions, deliveries and barriers.
    fn next_seq(&self) -> u64 {
        let now = wall_ns();
        let mut prev = self.seq.load(Ordering::SeqCst);
        loop {
            let next = now.max(prev + 1);
            match self
                .seq
                .compare_exchange(prev, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    fn keep_until(&self, due_ms: u64) -> u64 {
        due_ms
            .max(wall_ms())
            .saturating_add(self.cfg.tombstone_grace_ms)
    }

    /// The queue a message due at `at_ms` goes to now.
    fn target(&self, at_ms: u64) -> &str {
        if self.cfg.virtual_time {
            return &self.names.due;
        }
        match self.cfg.level_for(at_ms.saturating_sub(wall_ms())) {
            Some(k) => &self.names.levels[usize::from(k)],
            None => &self.names.due,
        }
    }

    async fn publish_job(&self, ch: &Channel, m: &JobMessage) -> Result<(), RabbitError> {
        publish(ch, self.target(m.at_ms), &encode_job(m), job_props(&m.id)).await
    }

    async fn journal(&self, ch: &Channel, rec: &JournalRecord) -> Result<(), RabbitError> {
        publish(
            ch,
            &self.names.journal,
            &encode_journal(rec),
            BasicProperties::default().with_content_type(CT_JOURNAL.into()),
        )
        .await?;
        self.lock_state().registry.apply(rec);
        Ok(())
    }

    async fn dead_letter(&self, ch: &Channel, d: &DeadRecord) -> Result<(), RabbitError> {
        let mut headers = FieldTable::default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(truncate_utf8(&d.reason, 1024).into()),
        );
        let mut props = BasicProperties::default()
            .with_content_type(CT_DEAD.into())
            .with_headers(headers);
        if let Some(id) = &d.id {
            props = props.with_message_id(id.as_str().into());
        }
        tracing::warn!(id = ?d.id, reason = %d.reason, "dead-lettering");
        publish(ch, &self.names.dead, &encode_dead(d), props).await
    }

    /// Dead-letters a job for good: the record, then its tombstone.
    async fn dead_letter_job(
        &self,
        ch: &Channel,
        m: &JobMessage,
        attempts: u32,
        reason: String,
    ) -> Result<(), RabbitError> {
        self.dead_letter(
            ch,
            &DeadRecord {
                id: Some(m.id.clone()),
                attempts,
                reason,
                payload: m.payload.clone(),
            },
        )
        .await?;
        self.retire(ch, &m.id, m.seq, m.due_ms.max(m.at_ms)).await
    }

    /// Writes a tombstone covering incarnation `seq` and every earlier one.
    async fn retire(
        &self,
        ch: &Channel,
        id: &JobId,
        seq: u64,
        due_ms: u64,
    ) -> Result<(), RabbitError> {
        let before = self.next_seq().max(seq.saturating_add(1));
        self.journal(
            ch,
            &JournalRecord::Retired {
                id: id.clone(),
                before,
                keep_until_ms: self.keep_until(due_ms),
            },
        )
        .await
    }

    // ------------------------------------------------------------ sessions

    async fn connect(self: &Arc<Self>) -> Result<Arc<Session>, RabbitError> {
        let limit = self.cfg.open_timeout;
        match tokio::time::timeout(limit, self.connect_inner()).await {
            Ok(r) => r,
            Err(_) => Err(RabbitError::Timeout {
                what: "connecting, declaring the queues and reading the journal",
                limit,
            }),
        }
    }

    async fn connect_inner(self: &Arc<Self>) -> Result<Arc<Session>, RabbitError> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("smartmsg-delay:{}", self.cfg.prefix).into());
        let conn = Connection::connect(&self.cfg.url, props).await?;
        let died = Arc::new(Died::default());
        let mut tasks = Tasks::default();
        {
            let died = Arc::clone(&died);
            let mut events = conn.events_listener();
            tasks.0.push(tokio::spawn(async move {
                while let Some(ev) = events.next().await {
                    if let lapin::Event::Error(e) = ev {
                        tracing::warn!(error = %e, "RabbitMQ connection error");
                        break;
                    }
                }
                died.kill();
            }));
        }
        declare(&conn, &self.cfg, &self.names).await?;
        let publ = conn.create_channel().await?;
        publ.confirm_select(ConfirmSelectOptions::default()).await?;
        let get = conn.create_channel().await?;
        let dlq = conn.create_channel().await?;

        // The journal follower, from the start, after a reconnect too: a
        // broker that crashed may have lost the stream's unsynced tail (a
        // single node's stream is not fsynced per record), so an offset
        // remembered from before may lie past the new end, and the barrier
        // that ends the open would then never be seen. Replaying records
        // already applied is harmless (the registry converges).
        let jch = conn.create_channel().await?;
        jch.basic_qos(JOURNAL_PREFETCH, BasicQosOptions::default())
            .await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("first".into()),
        );
        let consumer = jch
            .basic_consume(
                self.names.journal.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await?;
        tasks.0.push(tokio::spawn(
            Arc::clone(self).follow_journal(consumer, Arc::clone(&died)),
        ));

        // The hop consumer.
        let hch = conn.create_channel().await?;
        hch.basic_qos(self.cfg.hop_prefetch, BasicQosOptions::default())
            .await?;
        let consumer = hch
            .basic_consume(
                self.names.hop.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tasks.0.push(tokio::spawn(Arc::clone(self).hop(
            consumer,
            publ.clone(),
            Arc::clone(&died),
        )));

        // Read the journal up to a barrier of our own.
        let nonce = self.next_seq();
        let (tx, rx) = oneshot::channel();
        self.lock_state().barriers.insert(nonce, tx);
        let barrier = self.journal(&publ, &JournalRecord::Barrier { nonce }).await;
        if let Err(e) = barrier {
            self.lock_state().barriers.remove(&nonce);
            return Err(e);
        }
        if rx.await.is_err() {
            return Err(RabbitError::Disconnected);
        }
        Ok(Arc::new(Session {
            conn,
            publ,
            get,
            dlq,
            died,
            _tasks: tasks,
        }))
    }

    /// Keeps a session up: waits for the current one to die, then
    /// reconnects with backoff.
    async fn supervise(self: Arc<Self>) {
        loop {
            let current = self
                .session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(s) = current {
                // Also poll the connection state, in case no event comes.
                let watch = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if !s.conn.status().connected() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    _ = s.died.wait() => {}
                    _ = watch => {}
                }
                s.died.kill();
            }
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            tracing::warn!(prefix = %self.cfg.prefix, "RabbitMQ session lost; reconnecting");
            let old = self
                .session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            drop(old);
            {
                // Fetched deliveries die with their channel: the broker
                // requeues them. Leases stay so that their acks still write
                // a tombstone; a lost lease is not re-published.
                let mut st = self.lock_state();
                st.held.clear();
                st.local.clear();
                st.barriers.clear();
            }
            let (first, max) = self.cfg.reconnect_backoff;
            let mut wait = first;
            loop {
                if self.closed.load(Ordering::SeqCst) {
                    return;
                }
                match self.connect().await {
                    Ok(s) => {
                        tracing::info!(prefix = %self.cfg.prefix, "RabbitMQ session restored");
                        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "reconnect failed");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(max);
                    }
                }
            }
        }
    }

    /// Background: lease expiry by the wall clock, tombstone pruning.
    async fn sweep(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.cfg.sweep_interval).await;
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let now = wall_ms();
            if self.cfg.background_lease_expiry && !self.cfg.virtual_time {
                if let Ok(session) = self.session() {
                    let _g = self.poll_lock.lock().await;
                    self.expire_leases(&session, now).await;
                }
            }
            let mut st = self.lock_state();
            st.registry.prune(now);
            st.inflight
                .retain(|_, f| f.in_progress || f.keep_until_ms >= now);
        }
    }

    async fn follow_journal(self: Arc<Self>, mut consumer: lapin::Consumer, died: Arc<Died>) {
        let mut unacked = 0u16;
        while let Some(d) = consumer.next().await {
            let d = match d {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "journal consumer failed");
                    break;
                }
            };
            let offset = d.properties.headers().as_ref().and_then(|h| {
                h.inner().get("x-stream-offset").and_then(|v| match v {
                    AMQPValue::LongLongInt(o) => Some(*o),
                    AMQPValue::LongInt(o) => Some(i64::from(*o)),
                    AMQPValue::LongUInt(o) => Some(i64::from(*o)),
                    _ => None,
                })
            });
            {
                let mut st = self.lock_state();
                match decode_journal(&d.data) {
                    Ok(JournalRecord::Barrier { nonce }) => {
                        if let Some(tx) = st.barriers.remove(&nonce) {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rec) => st.registry.apply(&rec),
                    Err(e) => {
                        // Not dead-lettered: every process re-reads the
                        // journal, so each would file the same record again.
                        tracing::warn!(offset = ?offset, error = %e, "skipping an unreadable journal record");
                    }
                }
            }
            // Stream acks are credit: one ack of many every
            // JOURNAL_ACK_EVERY deliveries keeps it flowing.
            unacked += 1;
            if unacked >= JOURNAL_ACK_EVERY {
                unacked = 0;
                let multiple = lapin::options::BasicAckOptions { multiple: true };
                if d.acker.ack(multiple).await.is_err() {
                    break;
                }
            }
        }
        died.kill();
    }

    async fn hop(self: Arc<Self>, mut consumer: lapin::Consumer, publ: Channel, died: Arc<Died>) {
        while let Some(d) = consumer.next().await {
            let d = match d {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "hop consumer failed");
                    break;
                }
            };
            let this = Arc::clone(&self);
            let publ = publ.clone();
            tokio::spawn(async move { this.hop_one(d, &publ).await });
        }
        died.kill();
    }

    /// Moves one expired message down a level (or to the due queue).
    async fn hop_one(&self, d: Delivery, publ: &Channel) {
        let r = match decode_job(&d.data) {
            Err(e) => {
                self.dead_letter(
                    publ,
                    &DeadRecord {
                        id: None,
                        attempts: 0,
                        reason: format!("malformed message on the hop queue: {e}"),
                        payload: Bytes::from(d.data.clone()),
                    },
                )
                .await
            }
            Ok(m) => {
                if self.lock_state().registry.is_retired(&m.id, m.seq) {
                    tracing::debug!(id = %m.id, "dropping a cancelled or finished job");
                    Ok(())
                } else {
                    self.publish_job(publ, &m).await
                }
            }
        };
        match r {
            Ok(()) => {
                let _ = d.acker.ack(Default::default()).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "hop failed; the message goes back to the hop queue");
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
            }
        }
    }

    // ------------------------------------------------------------ leases

    /// Takes every lease whose deadline is at or before `now_ms` out of the
    /// table, in (deadline, id) order.
    fn take_expired(&self, now_ms: u64) -> Vec<LeaseEntry> {
        let mut st = self.lock_state();
        let keys: Vec<u64> = st
            .leases
            .iter()
            .filter(|(_, l)| l.deadline_ms <= now_ms)
            .map(|(k, _)| *k)
            .collect();
        let mut out: Vec<LeaseEntry> = keys
            .into_iter()
            .filter_map(|k| st.leases.remove(&k))
            .collect();
        for l in &out {
            st.forget(&l.held.msg);
        }
        out.sort_by(|a, b| (a.deadline_ms, &a.held.msg.id).cmp(&(b.deadline_ms, &b.held.msg.id)));
        out
    }

    /// Ends every lease whose deadline is at or before `now_ms` (call with
    /// the poll lock held).
    async fn expire_leases(&self, session: &Session, now_ms: u64) {
        for l in self.take_expired(now_ms) {
            let deadline = l.deadline_ms;
            if let Err(e) = self.end_lease(session, l, deadline, "lease expired").await {
                tracing::warn!(error = %e, "could not end an expired lease; the broker will redeliver it");
            }
        }
    }

    /// Ends a lease without an ack (it is already out of the table): a
    /// cancelled job is simply acked away; a job that has had its last
    /// attempt is dead-lettered; any other is re-published, due at
    /// `retry_at`, carrying its attempt count, and the original acked.
    async fn end_lease(
        &self,
        session: &Session,
        l: LeaseEntry,
        retry_at: u64,
        why: &str,
    ) -> Result<(), RabbitError> {
        let acker = l.held.acker.clone();
        if l.cancelled {
            acker.ack(Default::default()).await?;
            return Ok(());
        }
        if !acker.usable() {
            // Its channel is gone: the broker has requeued the message.
            return Ok(());
        }
        let m = &l.held.msg;
        let max = self.limits().max_attempts;
        let r = if l.held.attempt >= max {
            self.dead_letter_job(
                &session.publ,
                m,
                l.held.attempt,
                format!("{why} on delivery {} of at most {max}", l.held.attempt),
            )
            .await
        } else {
            let copy = JobMessage {
                at_ms: retry_at,
                attempts: l.held.attempt,
                ..m.clone()
            };
            match self.publish_job(&session.publ, &copy).await {
                Ok(()) => {
                    let rec = JournalRecord::Pending {
                        id: m.id.clone(),
                        seq: m.seq,
                        rev: self.next_seq(),
                        at_ms: retry_at,
                        hash: content_hash(m.due_ms, &m.payload),
                    };
                    if let Err(e) = self.journal(&session.publ, &rec).await {
                        // Only `next_due` elsewhere is less precise.
                        tracing::warn!(error = %e, "could not journal a job's new due time");
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        match r {
            Ok(()) => {
                acker.ack(Default::default()).await?;
                Ok(())
            }
            Err(e) => {
                // Let the broker deliver it again (flagged redelivered).
                let _ = acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await;
                Err(e)
            }
        }
    }

    /// Takes the lease named by `token` out of the table.
    fn take_lease(&self, token: &LeaseToken) -> Result<LeaseEntry, QueueError> {
        let stale = || QueueError::StaleLease {
            job: token.job.clone(),
            delivery: token.delivery,
        };
        let mut st = self.lock_state();
        match st.leases.get(&token.delivery) {
            Some(l) if l.token == *token => {}
            _ => return Err(stale()),
        }
        let l = st.leases.remove(&token.delivery).ok_or_else(stale)?;
        st.forget(&l.held.msg);
        Ok(l)
    }

    fn put_back(&self, l: LeaseEntry) {
        let mut st = self.lock_state();
        st.local.insert((l.held.msg.id.clone(), l.held.msg.seq));
        st.leases.insert(l.token.delivery, l);
    }

    /// On a graceful close: ends every lease as if nacked with no retry
    /// time and returns every held message to the due queue.
    async fn hand_back(&self) -> Result<(), RabbitError> {
        let Ok(session) = self.session() else {
            return Err(RabbitError::Disconnected);
        };
        let _g = self.poll_lock.lock().await;
        let mut first_err = None;
        for l in self.take_expired(u64::MAX) {
            let at = l.leased_at;
            if let Err(e) = self.end_lease(&session, l, at, "released at close").await {
                first_err.get_or_insert(e);
            }
        }
        let held: Vec<Held> = {
            let mut st = self.lock_state();
            st.local.clear();
            st.held.drain(..).collect()
        };
        for h in held {
            if !h.acker.usable() {
                continue;
            }
            // Re-published with the deliveries it has had (a redelivered
            // flag on the original has been counted in `attempt`).
            let copy = JobMessage {
                attempts: h.attempt - 1,
                ..h.msg.clone()
            };
            match self.publish_job(&session.publ, &copy).await {
                Ok(()) => {
                    let _ = h.acker.ack(Default::default()).await;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    // ------------------------------------------------------------ polling

    /// Files one message fetched from the due queue: held for leasing, or
    /// dropped, or dead-lettered.
    async fn accept(&self, session: &Session, d: Delivery) -> Result<(), RabbitError> {
        let m = match decode_job(&d.data) {
            Ok(m) => m,
            Err(e) => {
                self.dead_letter(
                    &session.publ,
                    &DeadRecord {
                        id: None,
                        attempts: 0,
                        reason: format!("malformed message on the due queue: {e}"),
                        payload: Bytes::from(d.data.clone()),
                    },
                )
                .await?;
                d.acker.ack(Default::default()).await?;
                return Ok(());
            }
        };
        let drop_it = {
            let st = self.lock_state();
            st.registry.is_retired(&m.id, m.seq) || st.local.contains(&(m.id.clone(), m.seq))
        };
        if drop_it {
            tracing::debug!(id = %m.id, "dropping a finished job or a duplicate copy");
            d.acker.ack(Default::default()).await?;
            return Ok(());
        }
        // A redelivered copy went to a worker (or a poller) that lost it:
        // that counts as a delivery.
        let attempt = m
            .attempts
            .saturating_add(1)
            .saturating_add(u32::from(d.redelivered));
        let max = self.limits().max_attempts;
        if attempt > max {
            self.dead_letter_job(
                &session.publ,
                &m,
                attempt - 1,
                format!(
                    "lost with its connection on delivery {} of at most {max}",
                    attempt - 1
                ),
            )
            .await?;
            d.acker.ack(Default::default()).await?;
            return Ok(());
        }
        let mut st = self.lock_state();
        st.local.insert((m.id.clone(), m.seq));
        st.held.push(Held {
            msg: m,
            attempt,
            acker: d.acker,
        });
        Ok(())
    }

    async fn poll(&self, now_ms: u64, max: usize) -> Result<Vec<Lease>, QueueError> {
        let limits = *self.limits();
        if max > limits.max_poll {
            return Err(QueueError::PollTooLarge {
                requested: max,
                max: limits.max_poll,
            });
        }
        let session = self.session()?;
        let _g = self.poll_lock.lock().await;
        self.expire_leases(&session, now_ms).await;
        if max == 0 {
            return Ok(Vec::new());
        }
        // Fetch everything that has reached the due queue (up to max_held),
        // so that the earliest due come first whatever order they arrived
        // in.
        loop {
            if self.lock_state().held.len() >= self.cfg.max_held {
                break;
            }
            let got = session
                .get
                .basic_get(
                    self.names.due.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(RabbitError::from)?;
            let Some(got) = got else { break };
            let last = got.message_count == 0;
            self.accept(&session, got.delivery).await?;
            if last {
                break;
            }
        }
        let mut st = self.lock_state();
        let mut ready: Vec<Held> = Vec::new();
        let mut keep: Vec<Held> = Vec::new();
        for h in st.held.drain(..) {
            if h.msg.at_ms <= now_ms {
                ready.push(h);
            } else {
                keep.push(h);
            }
        }
        ready.sort_by(|a, b| (a.msg.at_ms, &a.msg.id).cmp(&(b.msg.at_ms, &b.msg.id)));
        if ready.len() > max {
            keep.extend(ready.drain(max..));
        }
        st.held = keep;
        let deadline_ms = now_ms.saturating_add(limits.lease_ms);
        let mut out = Vec::with_capacity(ready.len());
        for h in ready {
            let delivery = self.next_seq();
            let token = LeaseToken {
                job: h.msg.id.clone(),
                delivery,
            };
            out.push(Lease {
                job: Job {
                    id: h.msg.id.clone(),
                    due_ms: h.msg.due_ms,
                    payload: h.msg.payload.clone(),
                },
                token: token.clone(),
                attempt: h.attempt,
                deadline_ms,
            });
            // While leased, the job is next due at its deadline (here).
            let entry = PendingEntry {
                seq: h.msg.seq,
                rev: self.next_seq(),
                at_ms: deadline_ms,
                hash: content_hash(h.msg.due_ms, &h.msg.payload),
            };
            st.registry.pending(&h.msg.id, entry);
            st.leases.insert(
                delivery,
                LeaseEntry {
                    held: h,
                    token,
                    deadline_ms,
                    leased_at: now_ms,
                    cancelled: false,
                },
            );
        }
        Ok(out)
    }

    // ------------------------------------------------------------ schedule

    async fn schedule(&self, job: Job) -> Result<Scheduled, QueueError> {
        check_job(&job, self.limits())?;
        let session = self.session()?;
        let hash = content_hash(job.due_ms, &job.payload);
        // Claim the id (or wait for a concurrent schedule of it to finish).
        let (seq, retire_first, message_sent) = loop {
            let notified = self.sched_done.notified();
            let mut notified = pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock_state();
                if let Some(p) = st.registry.get(&job.id) {
                    return if p.hash == hash {
                        Ok(Scheduled::AlreadyPending)
                    } else {
                        Err(QueueError::JobIdReused { id: job.id })
                    };
                }
                let keep_until_ms = self.keep_until(job.due_ms);
                match st.inflight.get_mut(&job.id) {
                    Some(f) if f.in_progress => {}
                    Some(f) if f.hash == hash => {
                        f.in_progress = true;
                        break (f.seq, false, f.message_sent);
                    }
                    Some(f) => {
                        // An earlier, failed schedule of other content: its
                        // message may exist; a tombstone covers it.
                        let seq = self.next_seq();
                        *f = Inflight {
                            seq,
                            hash,
                            in_progress: true,
                            message_sent: false,
                            keep_until_ms,
                        };
                        break (seq, true, false);
                    }
                    None => {
                        let seq = self.next_seq();
                        st.inflight.insert(
                            job.id.clone(),
                            Inflight {
                                seq,
                                hash,
                                in_progress: true,
                                message_sent: false,
                                keep_until_ms,
                            },
                        );
                        break (seq, false, false);
                    }
                }
            }
            notified.await;
        };
        let m = JobMessage {
            id: job.id.clone(),
            due_ms: job.due_ms,
            at_ms: job.due_ms,
            seq,
            attempts: 0,
            payload: job.payload.clone(),
        };
        let r = async {
            if retire_first {
                self.journal(
                    &session.publ,
                    &JournalRecord::Retired {
                        id: job.id.clone(),
                        before: seq,
                        keep_until_ms: self.keep_until(job.due_ms),
                    },
                )
                .await?;
            }
            if !message_sent {
                self.publish_job(&session.publ, &m).await?;
                if let Some(f) = self.lock_state().inflight.get_mut(&job.id) {
                    f.message_sent = true;
                }
            }
            self.journal(
                &session.publ,
                &JournalRecord::Pending {
                    id: job.id.clone(),
                    seq,
                    rev: seq,
                    at_ms: job.due_ms,
                    hash,
                },
            )
            .await
        }
        .await;
        let out = {
            let mut st = self.lock_state();
            match r {
                Ok(()) => {
                    st.inflight.remove(&job.id);
                    Ok(Scheduled::New)
                }
                Err(e) => {
                    if let Some(f) = st.inflight.get_mut(&job.id) {
                        f.in_progress = false;
                    }
                    Err(e.into())
                }
            }
        };
        self.sched_done.notify_waiters();
        out
    }

    async fn cancel(&self, id: &JobId) -> Result<bool, QueueError> {
        let session = self.session()?;
        let (was, due) = {
            let st = self.lock_state();
            let reg = st.registry.get(id);
            let local = st
                .held
                .iter()
                .map(|h| &h.msg)
                .chain(
                    st.leases
                        .values()
                        .filter(|l| !l.cancelled)
                        .map(|l| &l.held.msg),
                )
                .find(|m| m.id == *id)
                .map(|m| m.due_ms.max(m.at_ms));
            (
                reg.is_some() || local.is_some(),
                reg.map(|p| p.at_ms).max(local).unwrap_or(0),
            )
        };
        self.retire(&session.publ, id, 0, due).await?;
        let dropped: Vec<Held> = {
            let mut st = self.lock_state();
            for l in st.leases.values_mut() {
                if l.held.msg.id == *id {
                    l.cancelled = true;
                }
            }
            let (gone, keep): (Vec<Held>, Vec<Held>) =
                st.held.drain(..).partition(|h| h.msg.id == *id);
            st.held = keep;
            for h in &gone {
                st.forget(&h.msg);
            }
            gone
        };
        for h in dropped {
            let _ = h.acker.ack(Default::default()).await;
        }
        Ok(was)
    }

    async fn ack(&self, token: &LeaseToken) -> Result<(), QueueError> {
        let l = self.take_lease(token)?;
        if l.cancelled {
            let _ = l.held.acker.ack(Default::default()).await;
            return Err(QueueError::StaleLease {
                job: token.job.clone(),
                delivery: token.delivery,
            });
        }
        let session = match self.session() {
            Ok(s) => s,
            Err(e) => {
                self.put_back(l);
                return Err(e);
            }
        };
        let m = &l.held.msg;
        if let Err(e) = self
            .retire(&session.publ, &m.id, m.seq, m.due_ms.max(m.at_ms))
            .await
        {
            self.put_back(l);
            return Err(e.into());
        }
        // With the tombstone written, a failed ack only means that a copy
        // comes back and is dropped on sight.
        let _ = l.held.acker.ack(Default::default()).await;
        Ok(())
    }

    async fn nack(&self, token: &LeaseToken, retry_at_ms: Option<u64>) -> Result<(), QueueError> {
        let l = self.take_lease(token)?;
        if l.cancelled {
            let _ = l.held.acker.ack(Default::default()).await;
            return Err(QueueError::StaleLease {
                job: token.job.clone(),
                delivery: token.delivery,
            });
        }
        let session = match self.session() {
            Ok(s) => s,
            Err(e) => {
                self.put_back(l);
                return Err(e);
            }
        };
        let retry_at = retry_at_ms.unwrap_or(l.leased_at);
        // A failure leaves the delivery to the broker (nacked with requeue
        // or lost with its channel): the job is delivered again either way.
        self.end_lease(&session, l, retry_at, "nacked")
            .await
            .map_err(QueueError::from)
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let session = self.session()?;
        let _g = self.dlq_lock.lock().await;
        let mut out = Vec::new();
        let mut last_tag = None;
        let r: Result<(), RabbitError> = async {
            while out.len() < max {
                let Some(got) = session
                    .dlq
                    .basic_get(
                        self.names.dead.as_str().into(),
                        BasicGetOptions { no_ack: false },
                    )
                    .await?
                else {
                    break;
                };
                let d = got.delivery;
                last_tag = Some(d.delivery_tag);
                out.push(match decode_dead(&d.data) {
                    Ok(r) => DeadLetter {
                        id: r.id,
                        payload: r.payload,
                        attempts: r.attempts,
                        reason: r.reason,
                    },
                    Err(e) => DeadLetter {
                        id: None,
                        payload: Bytes::from(d.data),
                        attempts: 0,
                        reason: format!("unreadable record on the dead-letter queue: {e}"),
                    },
                });
                if got.message_count == 0 {
                    break;
                }
            }
            Ok(())
        }
        .await;
        // Put everything back, in order: reading is not consuming.
        if let Some(tag) = last_tag {
            session
                .dlq
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(RabbitError::from)?;
        }
        r?;
        Ok(out)
    }
}

/// Declares every queue of `names` (idempotent; a queue that exists with
/// other arguments is a [`RabbitError::TopologyMismatch`]).
async fn declare(
    conn: &Connection,
    cfg: &RabbitConfig,
    names: &QueueNames,
) -> Result<(), RabbitError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    // A failed declare closes its channel: one channel per queue keeps the
    // error precise.
    let declare_one = |name: String, args: FieldTable| async move {
        let ch = conn.create_channel().await?;
        let r = ch
            .queue_declare(name.as_str().into(), durable, args)
            .await
            .map_err(|e| map_declare_err(&name, e));
        if r.is_ok() {
            let _ = ch.close(200, "declared".into()).await;
        }
        r.map(|_| ())
    };
    for (k, name) in names.levels.iter().enumerate() {
        // Quorum queues with at-least-once dead-lettering: the broker moves
        // an expired job to the hop queue and removes it from its level only
        // once the hop queue has it, so a broker crash at that instant leaves
        // a duplicate (which the journal and the job id absorb), never a
        // loss. (A classic queue's dead-lettering is at-most-once.)
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(cfg.level_ttl_ms(k as u8) as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(names.hop.as_str().into()),
        );
        declare_one(name.clone(), args).await?;
    }
    for name in [&names.hop, &names.due] {
        declare_one(name.clone(), classic_args()).await?;
    }
    let mut dead = classic_args();
    dead.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(cfg.max_dead_letters)),
    );
    dead.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    declare_one(names.dead.clone(), dead).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    args.insert(
        "x-max-age".into(),
        AMQPValue::LongString(cfg.journal_max_age.as_str().into()),
    );
    // Retention drops whole segments: smaller ones than the 500 MB default
    // make `x-max-age` take effect sooner.
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(64 << 20),
    );
    declare_one(names.journal.clone(), args).await
}

/// Runs one operation; a backend failure triggers a channel check.
async fn op<T>(
    inner: &Inner,
    fut: impl std::future::Future<Output = Result<T, QueueError>>,
) -> Result<T, QueueError> {
    let r = fut.await;
    if let Err(QueueError::Backend(_)) = &r {
        inner.check_channels();
    }
    r
}

#[async_trait]
impl DelayQueue for RabbitDelayQueue {
    async fn schedule(&self, job: Job) -> Result<Scheduled, QueueError> {
        op(&self.inner, self.inner.schedule(job)).await
    }

    async fn cancel(&self, id: &JobId) -> Result<bool, QueueError> {
        op(&self.inner, self.inner.cancel(id)).await
    }

    async fn poll_due(&self, now_ms: u64, max: usize) -> Result<Vec<Lease>, QueueError> {
        op(&self.inner, self.inner.poll(now_ms, max)).await
    }

    async fn ack(&self, token: &LeaseToken) -> Result<(), QueueError> {
        op(&self.inner, self.inner.ack(token)).await
    }

    async fn nack(&self, token: &LeaseToken, retry_at_ms: Option<u64>) -> Result<(), QueueError> {
        op(&self.inner, self.inner.nack(token, retry_at_ms)).await
    }

    async fn len(&self) -> Result<u64, QueueError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(QueueError::Closed);
        }
        Ok(self.inner.lock_state().registry.len() as u64)
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        op(&self.inner, self.inner.dead_letters(max)).await
    }

    async fn next_due(&self) -> Result<Option<u64>, QueueError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(QueueError::Closed);
        }
        Ok(self.inner.lock_state().registry.next_due())
    }

    fn limits(&self) -> QueueLimits {
        self.inner.cfg.limits
    }
}
