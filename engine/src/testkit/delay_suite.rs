//! The [`DelayQueue`] conformance suite.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::{select, Index};

use super::{finish, run_check, run_random_cases, runtime, SuiteConfig};
use crate::delay::{
    DeadLetter, DelayQueue, Job, JobId, Lease, LeaseToken, QueueError, QueueLimits, Scheduled,
};

/// Makes the delay queues the suite checks.
///
/// An in-memory queue implements [`QueueHarness::create`] only; a durable
/// one also implements [`QueueHarness::reopen`] (closing the queue and
/// opening the same storage again), and the suite then checks that every
/// scheduled job, lease, attempt count and dead letter survives, at random
/// points of every case.
#[async_trait]
pub trait QueueHarness: Send {
    /// The queue under test.
    type Queue: DelayQueue + 'static;

    /// A fresh, empty queue enforcing `limits` (the suite reads the limits
    /// back with [`DelayQueue::limits`] and follows those).
    async fn create(&mut self, limits: QueueLimits) -> Self::Queue;

    /// Close `queue` (drop it) and open the same queue again. The default
    /// returns `queue` unchanged (in-memory).
    async fn reopen(&mut self, queue: Self::Queue) -> Self::Queue {
        queue
    }

    /// Whether a lease outstanding at [`reopen`](Self::reopen) is still held
    /// after it (`true`, the default), or ended by it as if nacked with no
    /// retry time (`false`: the job is due again at the time of the poll
    /// that leased it, or dead-lettered if it had its last attempt) — the
    /// choice of backends whose leases die with their connection or
    /// process.
    fn leases_survive_reopen(&self) -> bool {
        true
    }
}

/// Runs the [`DelayQueue`] conformance suite against the queues `harness`
/// makes, and panics with a report if any check fails.
///
/// The suite pins down the semantics documented on
/// [`InMemoryDelayQueue`](crate::delay_memory) (content = due time +
/// payload; one timeline time per job; a poll first ends every lease past
/// its deadline, in (deadline, id) order, then leases in (due, id) order;
/// `nack(None)` is due at the leasing poll's time; `cancel` also removes a
/// leased job; `next_due` includes lease deadlines). Checks, each on a fresh
/// queue:
///
/// - **random operation sequences** (`config.cases` of them, up to
///   `config.max_ops` long) against a plain reference model, with a virtual
///   clock that only moves forward (the queue gets it as `now_ms`): schedules
///   of ids from a small pool, due in the past, now or the future (and far
///   future), repeats of earlier jobs verbatim (→ `AlreadyPending` while
///   pending or leased, `New` once done) and with one detail changed (→
///   `JobIdReused`); cancels; polls with small `max` after the clock moved by
///   nothing, a little, about a lease or more (so leases expire, jobs are
///   redelivered with the next attempt number and dead-lettered after
///   `max_attempts`); acks and nacks (with and without a retry time) of live
///   and stale tokens; oversized payloads and ids and polls over `max_poll`;
///   and reopening. Every return value (leases with their job, attempt and
///   deadline; errors by variant), `len` and `next_due` after every
///   operation, and the dead letters (id, payload, attempts, a reason) must
///   be what the model says; delivery numbers never repeat for a job. Each
///   case ends by reopening and draining the queue far in the future;
/// - **limits**: payload and id exactly at and just over the limits, a poll
///   of exactly and one over `max_poll`: typed errors, nothing stored;
///   malformed ids refused by [`JobId::new`];
/// - **extreme due times**: 0 and `u64::MAX`;
/// - **concurrency** (`config.concurrency` tasks): concurrent polls of one
///   queue lease every due job exactly once; concurrent schedules of one id
///   give one `New`; concurrent acks of one token give one success.
///
/// # Panics
///
/// When a check fails (after every check has run), with a report naming the
/// failures, the seed and the minimal failing operation sequence. Also when
/// called from inside a tokio runtime: call it from a plain `#[test]`.
pub fn delay_queue_conformance<H: QueueHarness>(harness: H, config: SuiteConfig) {
    let rt = runtime("delay_queue_conformance");
    let seed = config.resolve_seed();
    let mut harness = harness;
    let limit = config.timeout;
    let mut failures = Vec::new();
    macro_rules! check {
        ($name:literal, $check:expr) => {
            failures.extend(run_check(&rt, $name, limit, $check).err())
        };
    }
    let (h, c) = (&mut harness, &config);
    check!("limits", check_limits(h));
    check!("extreme due times", check_extremes(h));
    check!("concurrent polls", check_concurrent_polls(h, c));
    check!("concurrent schedules", check_concurrent_schedules(h, c));
    check!("concurrent acks", check_concurrent_acks(h, c));
    if let Err(e) = run_random_cases(&rt, harness, &config, seed, op(), |h, ops| {
        Box::pin(run_case(h, ops))
    }) {
        failures.push(e);
    }
    finish("DelayQueue", seed, failures);
}

/// The limits the random cases ask for: short leases and few attempts, so
/// that expiry and dead letters happen within a case.
const CASE_LIMITS: QueueLimits = QueueLimits {
    max_id_len: 16,
    max_payload_bytes: 32,
    max_poll: 8,
    lease_ms: 100,
    max_attempts: 3,
};

/// Where the virtual clock starts (a realistic epoch time).
const T0: u64 = 1_700_000_000_000;

const IDS: &[&str] = &["j-0", "j-1", "j-2", "job:3/x@y.z", "j_4", "j-5"];
const PAYLOADS: &[&[u8]] = &[b"", b"p1", b"p2", b"\x00\xff binary \x00"];

// ---------------------------------------------------------------------------
// Reference model
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum MState {
    Pending,
    Leased { delivery: u64, leased_at: u64 },
}

#[derive(Debug, Clone)]
struct MJob {
    job: Job,
    state: MState,
    /// Due time when pending, deadline when leased.
    at: u64,
    attempts: u32,
}

/// The plain reference: jobs by id, dead letters in order.
#[derive(Debug, Clone)]
struct Model {
    limits: QueueLimits,
    jobs: BTreeMap<JobId, MJob>,
    dead: Vec<DeadLetter>,
}

impl Model {
    fn new(limits: QueueLimits) -> Self {
        Self {
            limits,
            jobs: BTreeMap::new(),
            dead: Vec::new(),
        }
    }

    fn schedule(&mut self, job: Job) -> Result<Scheduled, QueueError> {
        if job.id.as_str().len() > self.limits.max_id_len {
            return Err(QueueError::BadJobId {
                reason: String::new(),
            });
        }
        if job.payload.len() > self.limits.max_payload_bytes {
            return Err(QueueError::PayloadTooLarge {
                size: job.payload.len(),
                max: self.limits.max_payload_bytes,
            });
        }
        if let Some(j) = self.jobs.get(&job.id) {
            return if j.job == job {
                Ok(Scheduled::AlreadyPending)
            } else {
                Err(QueueError::JobIdReused { id: job.id })
            };
        }
        self.jobs.insert(
            job.id.clone(),
            MJob {
                at: job.due_ms,
                job,
                state: MState::Pending,
                attempts: 0,
            },
        );
        Ok(Scheduled::New)
    }

    /// Ends a lease without an ack.
    fn end_lease(&mut self, id: &JobId, retry_at: u64) {
        let j = self.jobs.get_mut(id).expect("leased job");
        if j.attempts >= self.limits.max_attempts {
            let j = self.jobs.remove(id).expect("present");
            self.dead.push(DeadLetter {
                id: Some(id.clone()),
                payload: j.job.payload,
                attempts: j.attempts,
                reason: String::new(),
            });
        } else {
            j.state = MState::Pending;
            j.at = retry_at;
        }
    }

    /// The jobs a poll returns: `(id, attempt, deadline)`, after ending
    /// expired leases. Deliveries are filled in by `record_leases`.
    fn poll(&mut self, now: u64, max: usize) -> Vec<(Job, u32, u64)> {
        let mut ended: Vec<(u64, JobId)> = self
            .jobs
            .iter()
            .filter(|(_, j)| matches!(j.state, MState::Leased { .. }) && j.at <= now)
            .map(|(id, j)| (j.at, id.clone()))
            .collect();
        ended.sort();
        for (at, id) in ended {
            self.end_lease(&id, at);
        }
        let mut due: Vec<(u64, JobId)> = self
            .jobs
            .iter()
            .filter(|(_, j)| matches!(j.state, MState::Pending) && j.at <= now)
            .map(|(id, j)| (j.at, id.clone()))
            .collect();
        due.sort();
        let deadline = now.saturating_add(self.limits.lease_ms);
        due.into_iter()
            .take(max)
            .map(|(_, id)| {
                let j = &self.jobs[&id];
                (j.job.clone(), j.attempts + 1, deadline)
            })
            .collect()
    }

    fn record_lease(&mut self, lease: &Lease, now: u64) {
        let j = self.jobs.get_mut(&lease.job.id).expect("leased job");
        j.attempts += 1;
        j.at = lease.deadline_ms;
        j.state = MState::Leased {
            delivery: lease.token.delivery,
            leased_at: now,
        };
    }

    fn holds(&self, token: &LeaseToken) -> Option<u64> {
        match self.jobs.get(&token.job)?.state {
            MState::Leased {
                delivery,
                leased_at,
            } if delivery == token.delivery => Some(leased_at),
            _ => None,
        }
    }

    fn ack(&mut self, token: &LeaseToken) -> bool {
        if self.holds(token).is_none() {
            return false;
        }
        self.jobs.remove(&token.job);
        true
    }

    fn nack(&mut self, token: &LeaseToken, retry_at: Option<u64>) -> bool {
        let Some(leased_at) = self.holds(token) else {
            return false;
        };
        self.end_lease(&token.job, retry_at.unwrap_or(leased_at));
        true
    }

    fn cancel(&mut self, id: &JobId) -> bool {
        self.jobs.remove(id).is_some()
    }

    /// Every lease ends as if nacked with no retry time, in (deadline, id)
    /// order.
    fn drop_leases(&mut self) {
        let mut leased: Vec<(u64, JobId, u64)> = self
            .jobs
            .iter()
            .filter_map(|(id, j)| match j.state {
                MState::Leased { leased_at, .. } => Some((j.at, id.clone(), leased_at)),
                MState::Pending => None,
            })
            .collect();
        leased.sort();
        for (_, id, leased_at) in leased {
            self.end_lease(&id, leased_at);
        }
    }

    fn next_due(&self) -> Option<u64> {
        self.jobs.values().map(|j| j.at).min()
    }
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// A due time, relative to the virtual clock.
#[derive(Debug, Clone, Copy)]
enum Due {
    Past(u64),
    Now,
    Future(u64),
    FarFuture(u64),
}

/// A change that makes a repeated job differ from the original.
#[derive(Debug, Clone, Copy)]
enum Change {
    Due,
    Payload,
}

#[derive(Debug, Clone)]
enum Op {
    Schedule {
        id: &'static str,
        due: Due,
        payload: &'static [u8],
    },
    /// Schedule an earlier job of this case again, verbatim or changed.
    Repeat(Index, Option<Change>),
    /// A payload one byte over the limit, or an id one byte too long.
    Oversized {
        payload: bool,
    },
    Cancel(&'static str),
    /// Move the clock forward by `advance`, then poll.
    Poll {
        advance: u64,
        max: usize,
    },
    PollTooLarge,
    /// Ack a token issued in this case (live or stale).
    Ack(Index),
    /// Nack a token issued in this case, with a retry time relative to the
    /// clock (may be in the past).
    Nack(Index, Option<i64>),
    DeadLetters(usize),
    Reopen,
}

fn due() -> impl Strategy<Value = Due> {
    prop_oneof![
        2 => (0u64..2_000).prop_map(Due::Past),
        2 => Just(Due::Now),
        6 => (1u64..400).prop_map(Due::Future),
        1 => (1u64..1_000_000_000_000).prop_map(Due::FarFuture),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (select(IDS), due(), select(PAYLOADS))
            .prop_map(|(id, due, payload)| Op::Schedule { id, due, payload }),
        6 => (any::<Index>(), prop_oneof![
            2 => Just(None),
            1 => Just(Some(Change::Due)),
            1 => Just(Some(Change::Payload)),
        ])
            .prop_map(|(i, c)| Op::Repeat(i, c)),
        1 => any::<bool>().prop_map(|payload| Op::Oversized { payload }),
        5 => select(IDS).prop_map(Op::Cancel),
        20 => (
            prop_oneof![3 => Just(0u64), 4 => 1u64..60, 3 => 60u64..250, 1 => 250u64..5_000],
            prop_oneof![1 => Just(0usize), 6 => 1usize..=3, 2 => 4usize..=8],
        )
            .prop_map(|(advance, max)| Op::Poll { advance, max }),
        1 => Just(Op::PollTooLarge),
        10 => any::<Index>().prop_map(Op::Ack),
        5 => (any::<Index>(), proptest::option::of(-300i64..300))
            .prop_map(|(i, r)| Op::Nack(i, r)),
        2 => (0usize..4).prop_map(Op::DeadLetters),
        2 => Just(Op::Reopen),
    ]
}

struct Case<'h, H: QueueHarness> {
    harness: &'h mut H,
    queue: Option<H::Queue>,
    model: Model,
    now: u64,
    /// Every job sent by a `Schedule` op, for `Repeat`.
    history: Vec<Job>,
    /// Every token issued, for `Ack` / `Nack`.
    tokens: Vec<LeaseToken>,
    issued: HashSet<LeaseToken>,
}

async fn run_case<H: QueueHarness>(harness: &mut H, ops: &[Op]) -> Result<(), String> {
    let queue = harness.create(CASE_LIMITS).await;
    let limits = queue.limits();
    let mut case = Case {
        harness,
        queue: Some(queue),
        model: Model::new(limits),
        now: T0,
        history: Vec::new(),
        tokens: Vec::new(),
        issued: HashSet::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        case.step(op)
            .await
            .map_err(|e| format!("at op #{i} {op:?} (virtual now {}):\n  {e}", case.now))?;
        case.verify_counts()
            .await
            .map_err(|e| format!("after op #{i} {op:?}: {e}"))?;
    }
    case.verify_dead_letters()
        .await
        .map_err(|e| format!("after the last op: {e}"))?;
    case.reopen()
        .await
        .map_err(|e| format!("at the final reopen: {e}"))?;
    case.verify_counts()
        .await
        .map_err(|e| format!("after the final reopen: {e}"))?;
    case.verify_dead_letters()
        .await
        .map_err(|e| format!("after the final reopen: {e}"))?;
    case.drain()
        .await
        .map_err(|e| format!("draining at the end: {e}"))
}

impl<H: QueueHarness> Case<'_, H> {
    fn queue(&self) -> &H::Queue {
        self.queue.as_ref().expect("queue present")
    }

    fn due_time(&self, due: Due) -> u64 {
        match due {
            Due::Past(k) => self.now.saturating_sub(k),
            Due::Now => self.now,
            Due::Future(k) | Due::FarFuture(k) => self.now.saturating_add(k),
        }
    }

    async fn step(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Schedule { id, due, payload } => {
                let job = Job {
                    id: JobId::new(id).map_err(|e| format!("pool id refused: {e}"))?,
                    due_ms: self.due_time(*due),
                    payload: Bytes::from_static(payload),
                };
                self.schedule(job).await
            }
            Op::Repeat(index, change) => {
                if self.history.is_empty() {
                    return Ok(());
                }
                let mut job = index.get(&self.history).clone();
                match change {
                    None => {}
                    Some(Change::Due) => job.due_ms = job.due_ms.wrapping_add(1),
                    Some(Change::Payload) => {
                        let mut p = job.payload.to_vec();
                        p.push(b'!');
                        job.payload = Bytes::from(p);
                    }
                }
                self.schedule(job).await
            }
            Op::Oversized { payload } => {
                let l = self.model.limits;
                let job = if *payload {
                    Job {
                        id: JobId::new("j-0").expect("valid"),
                        due_ms: self.now,
                        payload: Bytes::from(vec![7u8; l.max_payload_bytes + 1]),
                    }
                } else {
                    Job {
                        id: JobId::new("x".repeat(l.max_id_len + 1))
                            .map_err(|e| format!("long id refused by JobId::new: {e}"))?,
                        due_ms: self.now,
                        payload: Bytes::new(),
                    }
                };
                self.schedule(job).await
            }
            Op::Cancel(id) => {
                let id = JobId::new(id).expect("valid pool id");
                let got = self
                    .queue()
                    .cancel(&id)
                    .await
                    .map_err(|e| format!("cancel failed: {e:?}"))?;
                let expect = self.model.cancel(&id);
                ensure!(got == expect, "cancel returned {got}, expected {expect}");
                Ok(())
            }
            Op::Poll { advance, max } => {
                self.now = self.now.saturating_add(*advance);
                self.poll(*max).await
            }
            Op::PollTooLarge => {
                let max = self.model.limits.max_poll;
                match self.queue().poll_due(self.now, max + 1).await {
                    Err(QueueError::PollTooLarge { requested, max: m })
                        if requested == max + 1 && m == max =>
                    {
                        Ok(())
                    }
                    other => Err(format!(
                        "a poll of max_poll + 1 returned {other:?}, expected PollTooLarge"
                    )),
                }
            }
            Op::Ack(index) => {
                if self.tokens.is_empty() {
                    return Ok(());
                }
                let token = index.get(&self.tokens).clone();
                let got = self.queue().ack(&token).await;
                let expect = self.model.ack(&token);
                check_settle("ack", &token, got, expect)
            }
            Op::Nack(index, retry) => {
                if self.tokens.is_empty() {
                    return Ok(());
                }
                let token = index.get(&self.tokens).clone();
                let retry_at = retry.map(|r| self.now.saturating_add_signed(r));
                let got = self.queue().nack(&token, retry_at).await;
                let expect = self.model.nack(&token, retry_at);
                check_settle("nack", &token, got, expect)
            }
            Op::DeadLetters(max) => {
                let got = self
                    .queue()
                    .dead_letters(*max)
                    .await
                    .map_err(|e| format!("dead_letters failed: {e:?}"))?;
                let n = (*max).min(self.model.dead.len());
                compare_dead(&got, &self.model.dead[..n])
            }
            Op::Reopen => self.reopen().await,
        }
    }

    async fn schedule(&mut self, job: Job) -> Result<(), String> {
        self.history.push(job.clone());
        let got = self.queue().schedule(job.clone()).await;
        let expect = self.model.schedule(job.clone());
        match (&got, &expect) {
            (Ok(a), Ok(b)) if a == b => Ok(()),
            (Err(QueueError::BadJobId { .. }), Err(QueueError::BadJobId { .. })) => Ok(()),
            (
                Err(QueueError::PayloadTooLarge { size: a, max: b }),
                Err(QueueError::PayloadTooLarge { size: c, max: d }),
            ) if (a, b) == (c, d) => Ok(()),
            (Err(QueueError::JobIdReused { id: a }), Err(QueueError::JobIdReused { id: b }))
                if a == b =>
            {
                Ok(())
            }
            _ => Err(format!(
                "schedule({job:?}) returned {got:?}, expected {expect:?}"
            )),
        }
    }

    async fn poll(&mut self, max: usize) -> Result<(), String> {
        let got = self
            .queue()
            .poll_due(self.now, max)
            .await
            .map_err(|e| format!("poll_due({}, {max}) failed: {e:?}", self.now))?;
        let expect = self.model.poll(self.now, max);
        let summary = |v: Vec<(&str, u32, u64)>| format!("{v:?}");
        ensure!(
            got.len() == expect.len()
                && got
                    .iter()
                    .zip(&expect)
                    .all(|(l, (job, attempt, deadline))| {
                        l.job == *job
                            && l.attempt == *attempt
                            && l.deadline_ms == *deadline
                            && l.token.job == job.id
                    }),
            "poll_due({}, {max}) returned (id, attempt, deadline) {} (jobs {:?}), expected {} \
             (jobs {:?})",
            self.now,
            summary(
                got.iter()
                    .map(|l| (l.job.id.as_str(), l.attempt, l.deadline_ms))
                    .collect()
            ),
            got.iter().map(|l| &l.job).collect::<Vec<_>>(),
            summary(
                expect
                    .iter()
                    .map(|(j, a, d)| (j.id.as_str(), *a, *d))
                    .collect()
            ),
            expect.iter().map(|(j, _, _)| j).collect::<Vec<_>>(),
        );
        for lease in &got {
            ensure!(
                self.issued.insert(lease.token.clone()),
                "delivery {} of job {} was issued twice",
                lease.token.delivery,
                lease.token.job
            );
            self.tokens.push(lease.token.clone());
            self.model.record_lease(lease, self.now);
        }
        Ok(())
    }

    async fn reopen(&mut self) -> Result<(), String> {
        let queue = self.queue.take().expect("queue present");
        let queue = self.harness.reopen(queue).await;
        self.queue = Some(queue);
        if !self.harness.leases_survive_reopen() {
            self.model.drop_leases();
        }
        Ok(())
    }

    async fn verify_counts(&self) -> Result<(), String> {
        let len = self
            .queue()
            .len()
            .await
            .map_err(|e| format!("len failed: {e:?}"))?;
        ensure!(
            len == self.model.jobs.len() as u64,
            "len is {len}, expected {}",
            self.model.jobs.len()
        );
        let next = self
            .queue()
            .next_due()
            .await
            .map_err(|e| format!("next_due failed: {e:?}"))?;
        let expect = self.model.next_due();
        ensure!(next == expect, "next_due is {next:?}, expected {expect:?}");
        Ok(())
    }

    async fn verify_dead_letters(&self) -> Result<(), String> {
        let got = self
            .queue()
            .dead_letters(usize::MAX)
            .await
            .map_err(|e| format!("dead_letters failed: {e:?}"))?;
        compare_dead(&got, &self.model.dead)
    }

    /// Polls far in the future until nothing is left, acking everything.
    async fn drain(&mut self) -> Result<(), String> {
        for _ in 0..10_000 {
            let Some(next) = self.model.next_due() else {
                return self.verify_counts().await;
            };
            self.now = self.now.max(next);
            let max = self.model.limits.max_poll;
            let before = self.tokens.len();
            self.poll(max).await?;
            let fresh: Vec<LeaseToken> = self.tokens[before..].to_vec();
            for token in fresh {
                let got = self.queue().ack(&token).await;
                let expect = self.model.ack(&token);
                check_settle("ack", &token, got, expect)?;
            }
            self.verify_counts().await?;
        }
        Err("the queue did not drain".into())
    }
}

fn check_settle(
    what: &str,
    token: &LeaseToken,
    got: Result<(), QueueError>,
    expect: bool,
) -> Result<(), String> {
    match (&got, expect) {
        (Ok(()), true) => Ok(()),
        (Err(QueueError::StaleLease { job, delivery }), false)
            if *job == token.job && *delivery == token.delivery =>
        {
            Ok(())
        }
        _ => Err(format!(
            "{what}({token:?}) returned {got:?}, expected {}",
            if expect { "Ok" } else { "StaleLease" }
        )),
    }
}

fn compare_dead(got: &[DeadLetter], expect: &[DeadLetter]) -> Result<(), String> {
    let key = |d: &DeadLetter| (d.id.clone(), d.payload.clone(), d.attempts);
    ensure!(
        got.len() == expect.len() && got.iter().zip(expect).all(|(a, b)| key(a) == key(b)),
        "dead letters (id, payload, attempts) are {:?}, expected {:?}",
        got.iter().map(key).collect::<Vec<_>>(),
        expect.iter().map(key).collect::<Vec<_>>()
    );
    ensure!(
        got.iter().all(|d| !d.reason.is_empty()),
        "a dead letter has no reason: {got:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Targeted checks
// ---------------------------------------------------------------------------

fn jid(s: &str) -> JobId {
    JobId::new(s).expect("valid test id")
}

fn job(id: &str, due_ms: u64, payload: &'static [u8]) -> Job {
    Job {
        id: jid(id),
        due_ms,
        payload: Bytes::from_static(payload),
    }
}

async fn check_limits<H: QueueHarness>(harness: &mut H) -> Result<(), String> {
    let q = harness.create(CASE_LIMITS).await;
    let l = q.limits();
    for bad in ["", "a b", "é", "a\0", "x#y"] {
        ensure!(
            matches!(JobId::new(bad), Err(QueueError::BadJobId { .. })),
            "JobId::new({bad:?}) was accepted"
        );
    }
    let at_limit = Job {
        id: JobId::new("i".repeat(l.max_id_len)).map_err(|e| format!("{e}"))?,
        due_ms: T0,
        payload: Bytes::from(vec![1u8; l.max_payload_bytes]),
    };
    let r = q.schedule(at_limit.clone()).await;
    ensure!(
        matches!(r, Ok(Scheduled::New)),
        "a job exactly at the id and payload limits returned {r:?}"
    );
    let mut over = at_limit.clone();
    over.id = jid("over");
    over.payload = Bytes::from(vec![1u8; l.max_payload_bytes + 1]);
    let r = q.schedule(over).await;
    ensure!(
        matches!(r, Err(QueueError::PayloadTooLarge { size, max })
            if size == l.max_payload_bytes + 1 && max == l.max_payload_bytes),
        "an oversized payload returned {r:?}"
    );
    let long = Job {
        id: JobId::new("i".repeat(l.max_id_len + 1)).map_err(|e| format!("{e}"))?,
        due_ms: T0,
        payload: Bytes::new(),
    };
    let r = q.schedule(long).await;
    ensure!(
        matches!(r, Err(QueueError::BadJobId { .. })),
        "an id over max_id_len returned {r:?}"
    );
    let r = q.poll_due(T0, l.max_poll + 1).await;
    ensure!(
        matches!(r, Err(QueueError::PollTooLarge { requested, max })
            if requested == l.max_poll + 1 && max == l.max_poll),
        "a poll over max_poll returned {r:?}"
    );
    let len = q.len().await.map_err(|e| format!("{e:?}"))?;
    ensure!(len == 1, "refused jobs were stored: len {len}");
    let r = q
        .poll_due(T0, l.max_poll)
        .await
        .map_err(|e| format!("a poll of exactly max_poll failed: {e:?}"))?;
    ensure!(
        r.len() == 1 && r[0].job == at_limit,
        "the job at the limits came back as {r:?}"
    );
    Ok(())
}

async fn check_extremes<H: QueueHarness>(harness: &mut H) -> Result<(), String> {
    let q = harness.create(CASE_LIMITS).await;
    let e = |e: QueueError| format!("{e:?}");
    q.schedule(job("zero", 0, b"z")).await.map_err(e)?;
    q.schedule(job("max", u64::MAX, b"m")).await.map_err(e)?;
    ensure!(
        q.next_due().await.map_err(e)? == Some(0),
        "next_due should be 0"
    );
    let l = q.poll_due(T0, 8).await.map_err(e)?;
    ensure!(
        l.len() == 1 && l[0].job.id.as_str() == "zero",
        "a job due at 0 should be due at once: {l:?}"
    );
    q.ack(&l[0].token).await.map_err(e)?;
    ensure!(
        q.next_due().await.map_err(e)? == Some(u64::MAX),
        "next_due should be u64::MAX"
    );
    let l = q.poll_due(u64::MAX - 1, 8).await.map_err(e)?;
    ensure!(l.is_empty(), "a job due at u64::MAX came early: {l:?}");
    let l = q.poll_due(u64::MAX, 8).await.map_err(e)?;
    ensure!(
        l.len() == 1 && l[0].deadline_ms == u64::MAX,
        "a job due at u64::MAX should come at u64::MAX with a saturated deadline: {l:?}"
    );
    q.ack(&l[0].token).await.map_err(e)?;
    ensure!(q.len().await.map_err(e)? == 0, "queue should be empty");
    Ok(())
}

async fn check_concurrent_polls<H: QueueHarness>(
    harness: &mut H,
    config: &SuiteConfig,
) -> Result<(), String> {
    let limits = QueueLimits {
        lease_ms: 1_000_000,
        ..CASE_LIMITS
    };
    let q = Arc::new(harness.create(limits).await);
    let tasks = config.concurrency.max(2);
    let jobs = tasks * 12;
    for i in 0..jobs {
        q.schedule(job(&format!("c-{i}"), T0 + (i as u64 % 7), b"c"))
            .await
            .map_err(|e| format!("schedule: {e:?}"))?;
    }
    let start = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (q, start) = (q.clone(), start.clone());
        handles.push(tokio::spawn(async move {
            start.wait().await;
            let mut got = Vec::new();
            loop {
                let l = q
                    .poll_due(T0 + 10, 3)
                    .await
                    .map_err(|e| format!("task {t}: poll: {e:?}"))?;
                if l.is_empty() {
                    return Ok::<_, String>(got);
                }
                for lease in l {
                    q.ack(&lease.token)
                        .await
                        .map_err(|e| format!("task {t}: ack: {e:?}"))?;
                    got.push(lease.job.id);
                }
            }
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.map_err(|e| format!("task panicked: {e}"))??);
    }
    let distinct: HashSet<&JobId> = all.iter().collect();
    ensure!(
        all.len() == jobs && distinct.len() == jobs,
        "{} leases over {} distinct jobs; expected each of {jobs} jobs exactly once",
        all.len(),
        distinct.len()
    );
    Ok(())
}

async fn check_concurrent_schedules<H: QueueHarness>(
    harness: &mut H,
    config: &SuiteConfig,
) -> Result<(), String> {
    let q = Arc::new(harness.create(CASE_LIMITS).await);
    let tasks = config.concurrency.max(2);
    let start = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (q, start) = (q.clone(), start.clone());
        handles.push(tokio::spawn(async move {
            start.wait().await;
            q.schedule(job("same", T0, b"s")).await
        }));
    }
    let mut new = 0;
    for h in handles {
        match h.await.map_err(|e| format!("task panicked: {e}"))? {
            Ok(Scheduled::New) => new += 1,
            Ok(Scheduled::AlreadyPending) => {}
            Err(e) => return Err(format!("schedule failed: {e:?}")),
        }
    }
    ensure!(
        new == 1,
        "{new} concurrent schedules of one job returned New"
    );
    let len = q.len().await.map_err(|e| format!("{e:?}"))?;
    ensure!(len == 1, "len {len} after concurrent schedules of one job");
    Ok(())
}

async fn check_concurrent_acks<H: QueueHarness>(
    harness: &mut H,
    config: &SuiteConfig,
) -> Result<(), String> {
    let q = Arc::new(harness.create(CASE_LIMITS).await);
    q.schedule(job("a", T0, b"a"))
        .await
        .map_err(|e| format!("{e:?}"))?;
    let lease = q
        .poll_due(T0, 1)
        .await
        .map_err(|e| format!("{e:?}"))?
        .pop()
        .ok_or("the job was not leased")?;
    let tasks = config.concurrency.max(2);
    let start = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (q, start, token) = (q.clone(), start.clone(), lease.token.clone());
        handles.push(tokio::spawn(async move {
            start.wait().await;
            q.ack(&token).await
        }));
    }
    let mut ok = 0;
    for h in handles {
        match h.await.map_err(|e| format!("task panicked: {e}"))? {
            Ok(()) => ok += 1,
            Err(QueueError::StaleLease { .. }) => {}
            Err(e) => return Err(format!("ack failed: {e:?}")),
        }
    }
    ensure!(ok == 1, "{ok} concurrent acks of one lease succeeded");
    let len = q.len().await.map_err(|e| format!("{e:?}"))?;
    ensure!(len == 0, "len {len} after the ack");
    Ok(())
}
