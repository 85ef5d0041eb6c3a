//! [`InMemoryDelayQueue`]: the [`DelayQueue`] in process memory, on a
//! [`TimerWheel`]. For tests, simulations and as the reference behaviour;
//! nothing survives the process.
//!
//! # Precise semantics
//!
//! These refine the trait's contract where it leaves a detail open; every
//! backend follows them (the `testkit` delay-queue suite checks them):
//!
//! - a job's **content** is its `due_ms` and `payload`: scheduling an id that
//!   is pending or leased with equal content is
//!   [`Scheduled::AlreadyPending`], with other content
//!   [`QueueError::JobIdReused`]; a dead-lettered, acked or cancelled id is
//!   free;
//! - every job has one **timeline time**: a pending job its due time
//!   (`due_ms`, or the `retry_at_ms` of a nack, or the deadline of the lease
//!   that expired), a leased job its lease's deadline;
//! - **`poll_due(now, max)`** first ends every lease whose deadline is
//!   `≤ now` (all of them, whatever `max`), in order of (deadline, id): the
//!   job is dead-lettered if it has had [`QueueLimits::max_attempts`]
//!   deliveries, else it is pending again, due at the deadline. Then it
//!   leases up to `max` pending jobs due `≤ now`, in order of (due, id), each
//!   until `now + lease_ms`. A lease whose deadline has passed but that no
//!   poll has ended yet can still be acked or nacked;
//! - **`nack(token, retry_at)`** ends the lease: the job is dead-lettered if
//!   it has had `max_attempts` deliveries, else pending again, due at
//!   `retry_at` or, for `None`, at the time of the poll that leased it (so at
//!   once, ahead of jobs that became due later);
//! - **`cancel`** removes a pending or a leased job at once (`true`), and a
//!   leased job's lease is then stale;
//! - **`next_due`** is the earliest timeline time: of pending jobs and of
//!   lease deadlines (the first time a poll may return or end something);
//! - **`len`** counts pending and leased jobs.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::delay::{
    check_job, DeadLetter, DelayQueue, Job, JobId, Lease, LeaseToken, QueueError, QueueLimits,
    Scheduled,
};
use crate::wheel::{Expired, TimerKey, TimerWheel};

/// Where a job's timeline entry is.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// A timer in the wheel.
    Wheel(TimerKey),
    /// In `ready`: due, waiting to be leased.
    Ready,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Pending,
    Leased {
        delivery: u64,
        /// The `now` of the poll that leased it.
        leased_at: u64,
    },
}

#[derive(Debug)]
struct Entry {
    job: Job,
    state: State,
    /// Timeline time: due time when pending, deadline when leased.
    at: u64,
    attempts: u32,
    slot: Slot,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<JobId, Entry>,
    wheel: TimerWheel<JobId>,
    /// Pending jobs found due, by (due, id).
    ready: BTreeSet<(u64, JobId)>,
    next_delivery: u64,
    dead: VecDeque<DeadLetter>,
    /// Dead letters kept (the oldest dropped beyond it).
    max_dead: usize,
    expired: Vec<Expired<JobId>>,
}

/// A [`DelayQueue`] in memory (see the [module docs](self) for the exact
/// semantics every backend follows).
///
/// Pending jobs wait in a [`TimerWheel`] until due, then in an ordered set
/// until leased; leases wait in the same wheel until their deadline. All
/// operations are O(1) or O(log n) in the number of due jobs.
#[derive(Debug)]
pub struct InMemoryDelayQueue {
    inner: Mutex<Inner>,
    limits: QueueLimits,
}

impl InMemoryDelayQueue {
    /// Dead letters kept by default; beyond it the oldest are dropped as new
    /// ones arrive, so a queue that keeps failing does not grow without
    /// bound.
    pub const DEFAULT_MAX_DEAD_LETTERS: usize = 100_000;

    /// Keeps at most `max` dead letters (the newest); 0 keeps none.
    pub fn with_max_dead_letters(self, max: usize) -> Self {
        self.lock().max_dead = max;
        self
    }
}

impl Default for InMemoryDelayQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryDelayQueue {
    /// An empty queue with default limits.
    pub fn new() -> Self {
        Self::with_limits(QueueLimits::default())
    }

    /// An empty queue with the given limits.
    pub fn with_limits(limits: QueueLimits) -> Self {
        Self {
            inner: Mutex::new(Inner {
                next_delivery: 1,
                max_dead: Self::DEFAULT_MAX_DEAD_LETTERS,
                ..Inner::default()
            }),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update completes its checks before mutating, so a poisoned
        // lock holds consistent data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// Removes a job's timeline entry.
    fn unslot(&mut self, id: &JobId, at: u64, slot: Slot) {
        match slot {
            Slot::Wheel(key) => {
                self.wheel.cancel(key);
            }
            Slot::Ready => {
                self.ready.remove(&(at, id.clone()));
            }
        }
    }

    /// Ends a lease without an ack: dead letter after `max_attempts`
    /// deliveries, else pending again at `retry_at`. The job's timeline
    /// entry must already be removed.
    fn end_lease(&mut self, id: &JobId, retry_at: u64, max_attempts: u32, why: &str, now: u64) {
        let Some(entry) = self.jobs.get_mut(id) else {
            return;
        };
        if entry.attempts >= max_attempts {
            let entry = self.jobs.remove(id).expect("present");
            self.dead.push_back(DeadLetter {
                id: Some(id.clone()),
                payload: entry.job.payload,
                attempts: entry.attempts,
                reason: format!(
                    "{why} on delivery {} of at most {max_attempts}",
                    entry.attempts
                ),
            });
            while self.dead.len() > self.max_dead {
                self.dead.pop_front();
            }
            return;
        }
        entry.state = State::Pending;
        entry.at = retry_at;
        if retry_at <= now {
            entry.slot = Slot::Ready;
            self.ready.insert((retry_at, id.clone()));
        } else {
            entry.slot = Slot::Wheel(self.wheel.insert(retry_at, id.clone()));
        }
    }
}

#[async_trait]
impl DelayQueue for InMemoryDelayQueue {
    async fn schedule(&self, job: Job) -> Result<Scheduled, QueueError> {
        check_job(&job, &self.limits)?;
        let mut inner = self.lock();
        if let Some(entry) = inner.jobs.get(&job.id) {
            return if entry.job == job {
                Ok(Scheduled::AlreadyPending)
            } else {
                Err(QueueError::JobIdReused { id: job.id })
            };
        }
        let key = inner.wheel.insert(job.due_ms, job.id.clone());
        inner.jobs.insert(
            job.id.clone(),
            Entry {
                at: job.due_ms,
                job,
                state: State::Pending,
                attempts: 0,
                slot: Slot::Wheel(key),
            },
        );
        Ok(Scheduled::New)
    }

    async fn cancel(&self, id: &JobId) -> Result<bool, QueueError> {
        let mut inner = self.lock();
        let Some(entry) = inner.jobs.remove(id) else {
            return Ok(false);
        };
        inner.unslot(id, entry.at, entry.slot);
        Ok(true)
    }

    async fn poll_due(&self, now_ms: u64, max: usize) -> Result<Vec<Lease>, QueueError> {
        if max > self.limits.max_poll {
            return Err(QueueError::PollTooLarge {
                requested: max,
                max: self.limits.max_poll,
            });
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut expired = std::mem::take(&mut inner.expired);
        expired.clear();
        inner.wheel.advance_into(now_ms, &mut expired);
        // Ties in (time, id) order: lease ends are observable in that order.
        expired.sort_unstable_by(|a, b| (a.due_ms, &a.item).cmp(&(b.due_ms, &b.item)));
        for Expired { due_ms, item: id } in expired.drain(..) {
            let Some(entry) = inner.jobs.get_mut(&id) else {
                continue;
            };
            match entry.state {
                State::Pending => {
                    entry.slot = Slot::Ready;
                    inner.ready.insert((due_ms, id));
                }
                State::Leased { .. } => {
                    inner.end_lease(
                        &id,
                        due_ms,
                        self.limits.max_attempts,
                        "lease expired",
                        now_ms,
                    );
                }
            }
        }
        inner.expired = expired;

        let mut leases = Vec::with_capacity(max.min(inner.ready.len()));
        let deadline = now_ms.saturating_add(self.limits.lease_ms);
        while leases.len() < max {
            // A poll with an earlier `now` than the last one leases only
            // what is due by its own `now`.
            match inner.ready.first() {
                Some((at, _)) if *at <= now_ms => {}
                _ => break,
            }
            let Some((_, id)) = inner.ready.pop_first() else {
                break;
            };
            let delivery = inner.next_delivery;
            inner.next_delivery += 1;
            let key = inner.wheel.insert(deadline, id.clone());
            let Some(entry) = inner.jobs.get_mut(&id) else {
                inner.wheel.cancel(key);
                continue;
            };
            entry.attempts += 1;
            entry.state = State::Leased {
                delivery,
                leased_at: now_ms,
            };
            entry.at = deadline;
            entry.slot = Slot::Wheel(key);
            leases.push(Lease {
                job: entry.job.clone(),
                token: LeaseToken { job: id, delivery },
                attempt: entry.attempts,
                deadline_ms: deadline,
            });
        }
        Ok(leases)
    }

    async fn ack(&self, token: &LeaseToken) -> Result<(), QueueError> {
        let mut inner = self.lock();
        match inner.jobs.get(&token.job) {
            Some(Entry {
                state: State::Leased { delivery, .. },
                ..
            }) if *delivery == token.delivery => {
                let entry = inner.jobs.remove(&token.job).expect("present");
                inner.unslot(&token.job, entry.at, entry.slot);
                Ok(())
            }
            _ => Err(QueueError::StaleLease {
                job: token.job.clone(),
                delivery: token.delivery,
            }),
        }
    }

    async fn nack(&self, token: &LeaseToken, retry_at_ms: Option<u64>) -> Result<(), QueueError> {
        let mut inner = self.lock();
        let (at, slot, leased_at) = match inner.jobs.get(&token.job) {
            Some(Entry {
                state:
                    State::Leased {
                        delivery,
                        leased_at,
                    },
                at,
                slot,
                ..
            }) if *delivery == token.delivery => (*at, *slot, *leased_at),
            _ => {
                return Err(QueueError::StaleLease {
                    job: token.job.clone(),
                    delivery: token.delivery,
                })
            }
        };
        inner.unslot(&token.job, at, slot);
        let retry_at = retry_at_ms.unwrap_or(leased_at);
        // Past retry times go to the wheel too: it fires them on the next
        // poll, in (due, id) order with the rest.
        let now = 0;
        inner.end_lease(
            &token.job,
            retry_at,
            self.limits.max_attempts,
            "nacked",
            now,
        );
        Ok(())
    }

    async fn len(&self) -> Result<u64, QueueError> {
        Ok(self.lock().jobs.len() as u64)
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(self.lock().dead.iter().take(max).cloned().collect())
    }

    async fn next_due(&self) -> Result<Option<u64>, QueueError> {
        let inner = self.lock();
        let ready = inner.ready.first().map(|(at, _)| *at);
        let wheel = inner.wheel.next_due();
        Ok(match (ready, wheel) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn limits(&self) -> QueueLimits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn job(id: &str, due: u64) -> Job {
        Job {
            id: JobId::new(id).unwrap(),
            due_ms: due,
            payload: Bytes::from(format!("payload of {id}")),
        }
    }

    fn q(lease_ms: u64, max_attempts: u32) -> InMemoryDelayQueue {
        InMemoryDelayQueue::with_limits(QueueLimits {
            lease_ms,
            max_attempts,
            ..QueueLimits::default()
        })
    }

    fn ids(leases: &[Lease]) -> Vec<&str> {
        leases.iter().map(|l| l.job.id.as_str()).collect()
    }

    #[tokio::test]
    async fn due_jobs_come_out_in_due_then_id_order() {
        let q = q(100, 3);
        for (id, due) in [("c", 20), ("b", 10), ("a", 20), ("z", 5), ("late", 1000)] {
            assert_eq!(q.schedule(job(id, due)).await.unwrap(), Scheduled::New);
        }
        assert_eq!(q.next_due().await.unwrap(), Some(5));
        assert!(q.poll_due(4, 10).await.unwrap().is_empty());
        let l = q.poll_due(20, 2).await.unwrap();
        assert_eq!(ids(&l), vec!["z", "b"]);
        assert_eq!(l[0].attempt, 1);
        assert_eq!(l[0].deadline_ms, 120);
        let l2 = q.poll_due(20, 10).await.unwrap();
        assert_eq!(ids(&l2), vec!["a", "c"]);
        assert_eq!(q.len().await.unwrap(), 5);
        for l in l.iter().chain(&l2) {
            q.ack(&l.token).await.unwrap();
        }
        assert_eq!(q.len().await.unwrap(), 1);
        assert_eq!(q.next_due().await.unwrap(), Some(1000));
    }

    #[tokio::test]
    async fn schedule_is_idempotent_by_id_and_content() {
        let q = q(100, 3);
        assert_eq!(q.schedule(job("a", 10)).await.unwrap(), Scheduled::New);
        assert_eq!(
            q.schedule(job("a", 10)).await.unwrap(),
            Scheduled::AlreadyPending
        );
        assert!(matches!(
            q.schedule(job("a", 11)).await,
            Err(QueueError::JobIdReused { .. })
        ));
        let l = q.poll_due(10, 1).await.unwrap();
        assert_eq!(
            q.schedule(job("a", 10)).await.unwrap(),
            Scheduled::AlreadyPending,
            "leased counts"
        );
        q.ack(&l[0].token).await.unwrap();
        assert_eq!(q.schedule(job("a", 11)).await.unwrap(), Scheduled::New);
    }

    #[tokio::test]
    async fn expired_leases_are_redelivered_then_dead_lettered() {
        let q = q(100, 2);
        q.schedule(job("a", 0)).await.unwrap();
        let l1 = q.poll_due(0, 1).await.unwrap();
        assert!(q.poll_due(99, 1).await.unwrap().is_empty());
        assert_eq!(q.next_due().await.unwrap(), Some(100));
        let l2 = q.poll_due(100, 1).await.unwrap();
        assert_eq!(l2[0].attempt, 2);
        assert!(matches!(
            q.ack(&l1[0].token).await,
            Err(QueueError::StaleLease { .. })
        ));
        assert!(q.poll_due(300, 1).await.unwrap().is_empty());
        assert_eq!(q.len().await.unwrap(), 0);
        let dead = q.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].attempts, 2);
        assert_eq!(dead[0].id.as_ref().unwrap().as_str(), "a");
        assert!(dead[0].reason.contains("expired"), "{}", dead[0].reason);
    }

    #[tokio::test]
    async fn dead_letters_keep_the_newest_up_to_the_limit() {
        let q = q(100, 1).with_max_dead_letters(2);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            q.schedule(job(id, i as u64)).await.unwrap();
            let l = q.poll_due(i as u64, 1).await.unwrap();
            q.nack(&l[0].token, None).await.unwrap();
        }
        let dead = q.dead_letters(10).await.unwrap();
        let ids: Vec<_> = dead
            .iter()
            .map(|d| d.id.as_ref().unwrap().as_str())
            .collect();
        assert_eq!(ids, ["b", "c"]);
    }

    #[tokio::test]
    async fn nack_and_cancel() {
        let q = q(100, 5);
        q.schedule(job("a", 0)).await.unwrap();
        q.schedule(job("b", 50)).await.unwrap();
        let l = q.poll_due(0, 1).await.unwrap();
        q.nack(&l[0].token, Some(60)).await.unwrap();
        assert!(matches!(
            q.nack(&l[0].token, None).await,
            Err(QueueError::StaleLease { .. })
        ));
        let l = q.poll_due(60, 10).await.unwrap();
        assert_eq!(ids(&l), vec!["b", "a"]);
        assert_eq!(l[1].attempt, 2);
        // Nack without a time: due at the poll that leased it, at once.
        q.nack(&l[1].token, None).await.unwrap();
        assert_eq!(q.next_due().await.unwrap(), Some(60));
        assert!(q.cancel(&l[0].job.id).await.unwrap(), "leased");
        assert!(matches!(
            q.ack(&l[0].token).await,
            Err(QueueError::StaleLease { .. })
        ));
        assert!(q.cancel(&JobId::new("a").unwrap()).await.unwrap());
        assert!(!q.cancel(&JobId::new("a").unwrap()).await.unwrap());
        assert_eq!(q.len().await.unwrap(), 0);
        assert_eq!(q.next_due().await.unwrap(), None);
    }

    #[tokio::test]
    async fn limits_are_typed_errors() {
        let q = InMemoryDelayQueue::with_limits(QueueLimits {
            max_id_len: 4,
            max_payload_bytes: 3,
            max_poll: 2,
            ..QueueLimits::default()
        });
        let big = Job {
            id: JobId::new("a").unwrap(),
            due_ms: 0,
            payload: Bytes::from_static(b"1234"),
        };
        assert!(matches!(
            q.schedule(big).await,
            Err(QueueError::PayloadTooLarge { size: 4, max: 3 })
        ));
        let long = Job {
            id: JobId::new("abcde").unwrap(),
            due_ms: 0,
            payload: Bytes::new(),
        };
        assert!(matches!(
            q.schedule(long).await,
            Err(QueueError::BadJobId { .. })
        ));
        assert!(matches!(
            q.poll_due(0, 3).await,
            Err(QueueError::PollTooLarge {
                requested: 3,
                max: 2
            })
        ));
        assert_eq!(q.len().await.unwrap(), 0);
    }
}
