//! The scheduler runtime: due jobs of a [`DelayQueue`] become commands on an
//! aggregate through a [`Repository`].
//!
//! For each lease a [`Scheduler`] polls, it asks its *mapper* for the
//! aggregate stream and command the job stands for, executes the command
//! with an idempotency key derived from the job ([`job_idempotency_key`]),
//! and acks the lease only after [`Repository::execute`] returned, that is
//! once the command's events are durable. So:
//!
//! - a crash between the execute and the ack leaves the lease un-acked: the
//!   queue delivers the job again, and the second execute finds the key
//!   already committed ([`RepositoryError::IdempotencyKeyReused`], or the
//!   identical transaction's original result) and appends nothing: the job's
//!   effect happens once;
//! - two schedulers on one queue lease disjoint jobs; when a lease expires
//!   under a slow scheduler and another one gets the job, the same key makes
//!   the second execute a no-op.
//!
//! What happens to each lease:
//!
//! | outcome of mapping / execute | action | counted in |
//! |---|---|---|
//! | events appended (or none needed) | ack | [`RunReport::executed`] |
//! | `IdempotencyKeyReused` | ack (the effect is already there) | [`RunReport::already_done`] |
//! | the mapper refuses the job (unreadable payload) | ack, `tracing::warn!` | [`RunReport::refused`] |
//! | the aggregate refuses the command ([`RepositoryError::Domain`]) | ack, `tracing::warn!` | [`RunReport::refused`] |
//! | any other error (conflicts after retries, log or read failures) | nack with exponential backoff; the queue dead-letters the job after [`QueueLimits::max_attempts`](crate::QueueLimits::max_attempts) deliveries | [`RunReport::retried`] |
//!
//! Refused jobs are acked rather than retried because retrying cannot change
//! a pure `decide`'s answer; they are logged and listed in
//! [`RunReport::refusals`] with the reason, never dropped silently.
//!
//! [`Scheduler::run_once`] does one poll at a given `now_ms` and processes
//! the leases one by one, in the queue's order: deterministic, for
//! simulators. [`Scheduler::run`] loops on the
//! scheduler's [`Clock`], sleeping until the queue's next due time or the
//! poll interval, whichever is sooner.

use std::fmt;
use std::sync::Arc;

use crate::aggregate::Aggregate;
use crate::clock::Clock;
use crate::delay::{DelayQueue, Job, JobId, Lease, QueueError};
use crate::repository::{CommandOptions, Repository, RepositoryError};
use crate::stream_id::StreamId;

/// Turns a job into the stream and command it stands for, or says why it
/// cannot.
pub type JobMapper<A> =
    dyn Fn(&Job) -> Result<(StreamId, <A as Aggregate>::Command), String> + Send + Sync;

/// How a [`Scheduler`] polls and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerConfig {
    /// Most leases per poll (at most the queue's `max_poll`). Default 64.
    pub batch: usize,
    /// Longest sleep of [`Scheduler::run`] between polls, so that jobs
    /// scheduled meanwhile are seen. Default 100 ms.
    pub poll_interval_ms: u64,
    /// First retry delay after a transient failure; doubles with each
    /// attempt. Default 100 ms.
    pub retry_base_ms: u64,
    /// Longest retry delay. Default 60 s.
    pub retry_max_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            batch: 64,
            poll_interval_ms: 100,
            retry_base_ms: 100,
            retry_max_ms: 60_000,
        }
    }
}

impl SchedulerConfig {
    /// The retry delay after delivery `attempt` (1-based) failed.
    pub fn backoff_ms(&self, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(63);
        self.retry_base_ms
            .saturating_mul(1u64 << shift)
            .min(self.retry_max_ms)
    }
}

/// What one [`Scheduler::run_once`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Leases polled.
    pub leased: usize,
    /// Commands executed (events appended, or none needed), then acked.
    pub executed: usize,
    /// Jobs whose idempotency key was already committed, acked.
    pub already_done: usize,
    /// Jobs refused by the mapper or the aggregate, acked.
    pub refused: usize,
    /// Jobs nacked for a retry after a transient failure.
    pub retried: usize,
    /// Acks or nacks refused because the lease had expired meanwhile (the
    /// job is with another scheduler or due again; its effect, if any, is
    /// protected by its idempotency key).
    pub stale: usize,
    /// The refused jobs and why.
    pub refusals: Vec<(JobId, String)>,
}

impl RunReport {
    fn merge(&mut self, o: RunReport) {
        self.leased += o.leased;
        self.executed += o.executed;
        self.already_done += o.already_done;
        self.refused += o.refused;
        self.retried += o.retried;
        self.stale += o.stale;
        self.refusals.extend(o.refusals);
    }
}

/// The idempotency key a job's command is executed with: `job:` + the id +
/// a hash of the job's content (due time and payload), or a hash of all
/// three when that would exceed `max_len` (the log's
/// [`Limits::max_id_len`](crate::Limits::max_id_len)).
///
/// Redeliveries of one job share the key, so its effect happens once; a job
/// id reused later (after an ack) with other content gets another key, so
/// its effect is not mistaken for the earlier one. (Reusing an id with
/// *identical* content for a second effect is indistinguishable from a
/// redelivery: give such jobs distinct ids.)
pub fn job_idempotency_key(job: &Job, max_len: usize) -> String {
    let content = {
        let mut h = Fnv::new(0);
        h.write(&job.due_ms.to_be_bytes());
        h.write(&job.payload);
        h.finish()
    };
    let readable = format!("job:{}#{content:016x}", job.id);
    if readable.len() <= max_len {
        return readable;
    }
    let mut a = Fnv::new(1);
    let mut b = Fnv::new(2);
    for h in [&mut a, &mut b] {
        h.write(job.id.as_str().as_bytes());
        h.write(&[0]);
        h.write(&content.to_be_bytes());
    }
    format!("job#{:016x}{:016x}", a.finish(), b.finish())
}

/// FNV-1a, 64-bit ([`crate::fnv`]), with a seed folded into the offset
/// basis and one avalanche round at the end (stable across processes and
/// versions, unlike `std`'s hasher).
struct Fnv(crate::fnv::Fnv1a);

impl Fnv {
    fn new(seed: u64) -> Self {
        Self(crate::fnv::Fnv1a::with_basis(
            crate::fnv::OFFSET_BASIS ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ))
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }
    fn finish(&self) -> u64 {
        // One avalanche round so that nearby inputs differ in every digit.
        let mut z = self.0.finish();
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Polls a [`DelayQueue`] and executes each due job as a command (see the
/// [module docs](self)). Cheap to clone; several schedulers may serve one
/// queue.
pub struct Scheduler<A: Aggregate> {
    queue: Arc<dyn DelayQueue>,
    repo: Repository<A>,
    clock: Arc<dyn Clock>,
    mapper: Arc<JobMapper<A>>,
    config: SchedulerConfig,
}

impl<A: Aggregate> Clone for Scheduler<A> {
    fn clone(&self) -> Self {
        Self {
            queue: Arc::clone(&self.queue),
            repo: self.repo.clone(),
            clock: Arc::clone(&self.clock),
            mapper: Arc::clone(&self.mapper),
            config: self.config,
        }
    }
}

impl<A: Aggregate> fmt::Debug for Scheduler<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("repo", &self.repo)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A [`SchedulerConfig`] the queue cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerConfigError {
    /// `batch` is 0 or above the queue's `max_poll`.
    #[error("batch is {batch}; it must be 1 to the queue's max_poll {max}")]
    Batch {
        /// The configured value.
        batch: usize,
        /// The queue's limit.
        max: usize,
    },
}

impl<A: Aggregate> Scheduler<A> {
    /// A scheduler of `queue`'s jobs onto `repo`, reading time from `clock`
    /// (used by [`run`](Self::run) only; [`run_once`](Self::run_once) takes
    /// `now_ms`), mapping each job with `mapper`.
    pub fn new(
        queue: Arc<dyn DelayQueue>,
        repo: Repository<A>,
        clock: Arc<dyn Clock>,
        mapper: impl Fn(&Job) -> Result<(StreamId, A::Command), String> + Send + Sync + 'static,
    ) -> Self {
        let max_poll = queue.limits().max_poll;
        Self {
            queue,
            repo,
            clock,
            mapper: Arc::new(mapper),
            config: SchedulerConfig {
                batch: SchedulerConfig::default().batch.min(max_poll.max(1)),
                ..SchedulerConfig::default()
            },
        }
    }

    /// Uses `config`, after checking it against the queue's limits.
    pub fn with_config(mut self, config: SchedulerConfig) -> Result<Self, SchedulerConfigError> {
        let max = self.queue.limits().max_poll;
        if config.batch == 0 || config.batch > max {
            return Err(SchedulerConfigError::Batch {
                batch: config.batch,
                max,
            });
        }
        self.config = config;
        Ok(self)
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Polls once at `now_ms` and processes every lease it got, one after
    /// the other. Fails only when the poll itself fails; failures of single
    /// jobs are in the [`RunReport`].
    pub async fn run_once(&self, now_ms: u64) -> Result<RunReport, QueueError> {
        let leases = self.queue.poll_due(now_ms, self.config.batch).await?;
        let mut report = RunReport {
            leased: leases.len(),
            ..RunReport::default()
        };
        for lease in leases {
            let one = self.process(lease, now_ms).await;
            report.merge(one);
        }
        Ok(report)
    }

    /// Executes one leased job and settles its lease (see the module docs).
    pub async fn process(&self, lease: Lease, now_ms: u64) -> RunReport {
        let mapped = (self.mapper)(&lease.job);
        self.process_mapped(lease, mapped, now_ms).await
    }

    /// Like [`process`](Self::process), with the job already mapped by the
    /// caller (a runtime that needs `now_ms` or its own state to map a
    /// job): `Err(reason)` refuses the job (acked and logged), `Ok` executes
    /// the command with the job's idempotency key and settles the lease as
    /// the module docs say.
    pub async fn process_mapped(
        &self,
        lease: Lease,
        mapped: Result<(StreamId, A::Command), String>,
        now_ms: u64,
    ) -> RunReport {
        self.process_known(lease, mapped, None, now_ms).await
    }

    /// Like [`process_mapped`](Self::process_mapped), deciding on `known`
    /// (the aggregate's state the caller holds) instead of loading it: see
    /// [`Repository::execute_from`].
    pub async fn process_known(
        &self,
        lease: Lease,
        mapped: Result<(StreamId, A::Command), String>,
        known: Option<crate::repository::Known<'_, A>>,
        now_ms: u64,
    ) -> RunReport {
        let mut report = RunReport::default();
        let id = lease.job.id.clone();
        enum Then {
            Ack,
            Nack(u64),
        }
        let then = match mapped {
            Err(reason) => {
                tracing::warn!(job = %id, %reason, "job refused: it does not map to a command");
                report.refused += 1;
                report.refusals.push((id.clone(), reason));
                Then::Ack
            }
            Ok((stream, command)) => {
                let key = job_idempotency_key(&lease.job, self.repo.log().limits().max_id_len);
                let options = CommandOptions::default().with_idempotency_key(key);
                let executed = match known {
                    Some(k) => self.repo.execute_from(&stream, k, &command, options).await,
                    None => self
                        .repo
                        .execute(&stream, &command, options)
                        .await
                        .map(Into::into),
                };
                match executed {
                    Ok(_) => {
                        report.executed += 1;
                        Then::Ack
                    }
                    Err(RepositoryError::IdempotencyKeyReused { .. }) => {
                        report.already_done += 1;
                        Then::Ack
                    }
                    Err(RepositoryError::Domain(e)) => {
                        let reason = e.to_string();
                        tracing::warn!(job = %id, %stream, %reason, "job refused by the aggregate");
                        report.refused += 1;
                        report.refusals.push((id.clone(), reason));
                        Then::Ack
                    }
                    Err(e) => {
                        let delay = self.config.backoff_ms(lease.attempt);
                        tracing::warn!(
                            job = %id, %stream, attempt = lease.attempt, retry_in_ms = delay,
                            error = %e, "job failed; retrying"
                        );
                        report.retried += 1;
                        Then::Nack(now_ms.saturating_add(delay))
                    }
                }
            }
        };
        let settled = match then {
            Then::Ack => self.queue.ack(&lease.token).await,
            Then::Nack(at) => self.queue.nack(&lease.token, Some(at)).await,
        };
        match settled {
            Ok(()) => {}
            Err(QueueError::StaleLease { .. }) => report.stale += 1,
            Err(e) => {
                // The lease expires and the job comes back: at-least-once.
                tracing::warn!(job = %id, error = %e, "could not settle a lease");
                report.stale += 1;
            }
        }
        report
    }

    /// Runs until `stop` completes: polls at the clock's now, and when the
    /// batch was not full sleeps until the queue's next due time or
    /// [`SchedulerConfig::poll_interval_ms`], whichever is sooner. A failing
    /// poll is logged and retried after the poll interval. Returns the sum
    /// of every poll's report (without the refusal list, which is logged).
    pub async fn run(&self, stop: impl std::future::Future<Output = ()> + Send) -> RunReport {
        let mut total = RunReport::default();
        tokio::pin!(stop);
        loop {
            let now = self.clock.now_ms();
            let sleep_ms = match self.run_once(now).await {
                Ok(mut r) => {
                    let full = r.leased >= self.config.batch;
                    r.refusals.clear();
                    total.merge(r);
                    if full {
                        0
                    } else {
                        match self.queue.next_due().await {
                            Ok(Some(t)) => t
                                .saturating_sub(self.clock.now_ms())
                                .min(self.config.poll_interval_ms),
                            Ok(None) => self.config.poll_interval_ms,
                            Err(e) => {
                                tracing::warn!(error = %e, "next_due failed");
                                self.config.poll_interval_ms
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "poll failed; retrying after the poll interval");
                    self.config.poll_interval_ms
                }
            };
            let sleep = tokio::time::sleep(std::time::Duration::from_millis(sleep_ms));
            tokio::select! {
                biased;
                () = &mut stop => return total,
                () = sleep => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::aggregate::{DecideCtx, DecodeError, EventCodec};
    use crate::append::{AppendResult, AppendTx};
    use crate::clock::ManualClock;
    use crate::delay::{QueueLimits, Scheduled};
    use crate::delay_memory::InMemoryDelayQueue;
    use crate::error::{AppendError, BackendError, ReadError};
    use crate::event::RecordedEvent;
    use crate::limits::Limits;
    use crate::log::{EventLog, HeadWatch};
    use crate::memory::InMemoryLog;

    /// Records one `Fired` per command, deliberately *not* idempotent by
    /// itself: only the idempotency key stops a second effect.
    #[derive(Debug, Default)]
    struct Effects {
        fired: BTreeMap<String, u32>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("refused: {0}")]
    struct Refused(String);

    struct Fired(String);

    impl EventCodec for Fired {
        fn kind(&self) -> &'static str {
            "Fired"
        }
        fn schema(&self) -> u16 {
            1
        }
        fn encode(&self) -> Bytes {
            Bytes::from(self.0.clone())
        }
        fn decode(kind: &str, _schema: u16, payload: &[u8]) -> Result<Self, DecodeError> {
            match kind {
                "Fired" => Ok(Fired(String::from_utf8_lossy(payload).into_owned())),
                k => Err(DecodeError::UnknownKind { kind: k.into() }),
            }
        }
    }

    impl Aggregate for Effects {
        type Command = String;
        type Event = Fired;
        type Error = Refused;
        fn decide(&self, c: &String, _: &DecideCtx) -> Result<Vec<Fired>, Refused> {
            if c.starts_with("bad") {
                return Err(Refused(c.clone()));
            }
            Ok(vec![Fired(c.clone())])
        }
        fn evolve(&mut self, e: &Fired) {
            *self.fired.entry(e.0.clone()).or_default() += 1;
        }
    }

    fn mapper(job: &Job) -> Result<(StreamId, String), String> {
        let p = std::str::from_utf8(&job.payload).map_err(|e| e.to_string())?;
        if p == "garbage" {
            return Err("unreadable payload".into());
        }
        Ok((StreamId::new("effects").expect("valid"), job.id.to_string()))
    }

    fn job(id: &str, due: u64, payload: &str) -> Job {
        Job {
            id: JobId::new(id).unwrap(),
            due_ms: due,
            payload: Bytes::from(payload.to_owned()),
        }
    }

    async fn effects(log: &Arc<dyn EventLog>, clock: &ManualClock) -> BTreeMap<String, u32> {
        Repository::<Effects>::new(log.clone(), Arc::new(clock.clone()))
            .load(&StreamId::new("effects").unwrap())
            .await
            .unwrap()
            .state
            .fired
    }

    fn setup(
        limits: QueueLimits,
        log: Arc<dyn EventLog>,
    ) -> (Arc<InMemoryDelayQueue>, Scheduler<Effects>, ManualClock) {
        let clock = ManualClock::new(1_000);
        let queue = Arc::new(InMemoryDelayQueue::with_limits(limits));
        let repo = Repository::<Effects>::new(log, Arc::new(clock.clone()));
        let s = Scheduler::new(queue.clone(), repo, Arc::new(clock.clone()), mapper);
        (queue, s, clock)
    }

    #[tokio::test]
    async fn executes_due_jobs_and_acks_them() {
        let log: Arc<dyn EventLog> = Arc::new(InMemoryLog::new());
        let (q, s, clock) = setup(QueueLimits::default(), log.clone());
        q.schedule(job("a", 1_000, "x")).await.unwrap();
        q.schedule(job("b", 2_000, "x")).await.unwrap();
        q.schedule(job("bad-1", 1_000, "x")).await.unwrap();
        q.schedule(job("g", 1_000, "garbage")).await.unwrap();
        let r = s.run_once(1_500).await.unwrap();
        assert_eq!((r.leased, r.executed, r.refused), (3, 1, 2));
        let refused: BTreeSet<&str> = r.refusals.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(refused, BTreeSet::from(["bad-1", "g"]));
        assert_eq!(q.len().await.unwrap(), 1);
        let r = s.run_once(2_000).await.unwrap();
        assert_eq!(r.executed, 1);
        assert_eq!(q.len().await.unwrap(), 0);
        let fx = effects(&log, &clock).await;
        assert_eq!(fx, BTreeMap::from([("a".into(), 1), ("b".into(), 1)]));
    }

    #[tokio::test]
    async fn a_crash_between_execute_and_ack_redelivers_without_a_second_effect() {
        let log: Arc<dyn EventLog> = Arc::new(InMemoryLog::new());
        let limits = QueueLimits {
            lease_ms: 100,
            ..QueueLimits::default()
        };
        let (q, s, clock) = setup(limits, log.clone());
        q.schedule(job("a", 1_000, "x")).await.unwrap();
        // The "crashed" worker: executes, then dies before acking.
        let lease = q.poll_due(1_000, 1).await.unwrap().pop().unwrap();
        let key = job_idempotency_key(&lease.job, log.limits().max_id_len);
        s.repo
            .execute(
                &StreamId::new("effects").unwrap(),
                &"a".to_string(),
                CommandOptions::default().with_idempotency_key(key),
            )
            .await
            .unwrap();
        drop(lease);
        clock.advance(50);
        assert_eq!(s.run_once(1_050).await.unwrap().leased, 0, "still leased");
        let r = s.run_once(1_100).await.unwrap();
        assert_eq!((r.leased, r.already_done, r.executed), (1, 1, 0));
        assert_eq!(q.len().await.unwrap(), 0);
        assert_eq!(effects(&log, &clock).await["a"], 1);
    }

    /// A log whose appends fail while `failing > 0`.
    struct Flaky {
        inner: InMemoryLog,
        failing: AtomicU32,
    }

    #[async_trait]
    impl EventLog for Flaky {
        async fn append(&self, tx: AppendTx) -> Result<AppendResult, AppendError> {
            if self
                .failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(AppendError::Backend(BackendError::new(
                    std::io::Error::other("disk on fire"),
                )));
            }
            self.inner.append(tx).await
        }
        async fn read_stream(
            &self,
            s: &StreamId,
            from: u64,
            max: usize,
        ) -> Result<Vec<RecordedEvent>, ReadError> {
            self.inner.read_stream(s, from, max).await
        }
        async fn read_all(&self, from: u64, max: usize) -> Result<Vec<RecordedEvent>, ReadError> {
            self.inner.read_all(from, max).await
        }
        async fn stream_version(&self, s: &StreamId) -> Result<u64, ReadError> {
            self.inner.stream_version(s).await
        }
        async fn head(&self) -> Result<u64, ReadError> {
            self.inner.head().await
        }
        fn watch_head(&self) -> HeadWatch {
            self.inner.watch_head()
        }
        fn limits(&self) -> Limits {
            self.inner.limits()
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_with_backoff_then_dead_lettered() {
        let flaky = Arc::new(Flaky {
            inner: InMemoryLog::new(),
            failing: AtomicU32::new(2),
        });
        let log: Arc<dyn EventLog> = flaky.clone();
        let limits = QueueLimits {
            max_attempts: 3,
            ..QueueLimits::default()
        };
        let (q, s, clock) = setup(limits, log.clone());
        let s = s
            .with_config(SchedulerConfig {
                retry_base_ms: 10,
                ..SchedulerConfig::default()
            })
            .unwrap();
        q.schedule(job("a", 1_000, "x")).await.unwrap();
        assert_eq!(s.run_once(1_000).await.unwrap().retried, 1);
        assert_eq!(q.next_due().await.unwrap(), Some(1_010));
        assert_eq!(s.run_once(1_009).await.unwrap().leased, 0);
        assert_eq!(s.run_once(1_010).await.unwrap().retried, 1);
        assert_eq!(q.next_due().await.unwrap(), Some(1_030), "backoff doubles");
        assert_eq!(s.run_once(1_030).await.unwrap().executed, 1);
        assert_eq!(effects(&log, &clock).await["a"], 1);

        // Always failing: dead-lettered after max_attempts.
        flaky.failing.store(u32::MAX, Ordering::SeqCst);
        q.schedule(job("b", 2_000, "x")).await.unwrap();
        for t in [2_000, 2_010, 2_030] {
            assert_eq!(s.run_once(t).await.unwrap().retried, 1);
        }
        assert_eq!(q.len().await.unwrap(), 0);
        let dead = q.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].attempts, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_schedulers_on_one_queue_never_apply_an_effect_twice() {
        let log: Arc<dyn EventLog> = Arc::new(InMemoryLog::new());
        // Leases shorter than the clock steps, so that jobs are redelivered
        // to the other scheduler while the first is still executing them.
        let limits = QueueLimits {
            lease_ms: 2,
            max_attempts: 1_000,
            ..QueueLimits::default()
        };
        let (q, s1, clock) = setup(limits, log.clone());
        let s2 = s1.clone();
        let jobs = 200;
        for i in 0..jobs {
            let r = q
                .schedule(job(&format!("j{i}"), 1_000 + i % 50, "x"))
                .await
                .unwrap();
            assert_eq!(r, Scheduled::New);
        }
        let mut tasks = Vec::new();
        for s in [s1, s2] {
            let (q, clock) = (q.clone(), clock.clone());
            tasks.push(tokio::spawn(async move {
                let mut total = RunReport::default();
                while q.len().await.unwrap() > 0 {
                    clock.advance(1);
                    let r = s.run_once(clock.now_ms()).await.unwrap();
                    total.merge(r);
                    tokio::task::yield_now().await;
                }
                total
            }));
        }
        let mut total = RunReport::default();
        for t in tasks {
            total.merge(t.await.unwrap());
        }
        let fx = effects(&log, &clock).await;
        assert_eq!(fx.len(), jobs as usize, "every job had its effect");
        assert!(fx.values().all(|n| *n == 1), "an effect happened twice");
        assert_eq!(total.refused, 0);
        eprintln!("two schedulers: {total:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_loops_until_stopped() {
        let log: Arc<dyn EventLog> = Arc::new(InMemoryLog::new());
        let (q, s, clock) = setup(QueueLimits::default(), log.clone());
        let s = s
            .with_config(SchedulerConfig {
                poll_interval_ms: 5,
                ..SchedulerConfig::default()
            })
            .unwrap();
        q.schedule(job("now", 1_000, "x")).await.unwrap();
        q.schedule(job("later", 1_500, "x")).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runner = tokio::spawn(async move {
            s.run(async {
                let _ = stopped.await;
            })
            .await
        });
        while q.len().await.unwrap() > 1 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        clock.set(1_500);
        while q.len().await.unwrap() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        stop.send(()).unwrap();
        let total = runner.await.unwrap();
        assert_eq!(total.executed, 2);
        assert_eq!(effects(&log, &clock).await.len(), 2);
    }

    #[test]
    fn keys_fit_and_differ() {
        let a = job("a", 1, "x");
        let k = job_idempotency_key(&a, 64);
        assert!(k.starts_with("job:a#") && k.len() <= 64, "{k}");
        // Keys are stored in logs: pinned (computed independently).
        assert_eq!(k, "job:a#629d005307ed25a9");
        assert_eq!(
            job_idempotency_key(&job(&"l".repeat(128), 1, "x"), 64),
            "job#c191851da852bd609faccaedb63830cd"
        );
        assert_eq!(k, job_idempotency_key(&a, 64), "stable");
        assert_ne!(k, job_idempotency_key(&job("a", 2, "x"), 64));
        assert_ne!(k, job_idempotency_key(&job("a", 1, "y"), 64));
        let long = job(&"l".repeat(128), 1, "x");
        let k = job_idempotency_key(&long, 64);
        assert!(k.starts_with("job#") && k.len() == 36, "{k}");
        assert_ne!(k, job_idempotency_key(&job(&"l".repeat(127), 1, "x"), 64));
        let c = SchedulerConfig::default();
        assert_eq!(c.backoff_ms(1), 100);
        assert_eq!(c.backoff_ms(3), 400);
        assert_eq!(c.backoff_ms(200), 60_000);
    }
}
