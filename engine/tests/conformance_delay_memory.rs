//! The delay-queue conformance suite on [`InMemoryDelayQueue`], and
//! self-tests showing that the suite catches broken queues.
//!
//! `SMARTMSG_TESTKIT_SEED` (a number, or `random`) and
//! `SMARTMSG_TESTKIT_CASES` override the configuration of the main test.
#![cfg(feature = "testkit")]

use std::panic::{catch_unwind, AssertUnwindSafe};

use async_trait::async_trait;
use smartmsg_engine::testkit::{delay_queue_conformance, QueueHarness, SuiteConfig};
use smartmsg_engine::{
    DeadLetter, DelayQueue, InMemoryDelayQueue, Job, JobId, Lease, LeaseToken, QueueError,
    QueueLimits, Scheduled,
};

fn config_from_env() -> SuiteConfig {
    let mut config = {
        let mut built = SuiteConfig::default();
        built.cases = 256;
        built
    };
    if let Ok(seed) = std::env::var("SMARTMSG_TESTKIT_SEED") {
        config.seed = match seed.as_str() {
            "random" => None,
            s => Some(match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).expect("hex seed"),
                None => s
                    .parse()
                    .expect("SMARTMSG_TESTKIT_SEED: a number or `random`"),
            }),
        };
    }
    if let Ok(cases) = std::env::var("SMARTMSG_TESTKIT_CASES") {
        config.cases = cases.parse().expect("SMARTMSG_TESTKIT_CASES: a number");
    }
    config
}

struct Memory;

#[async_trait]
impl QueueHarness for Memory {
    type Queue = InMemoryDelayQueue;
    async fn create(&mut self, limits: QueueLimits) -> InMemoryDelayQueue {
        InMemoryDelayQueue::with_limits(limits)
    }
}

#[test]
fn in_memory_delay_queue_conforms() {
    delay_queue_conformance(Memory, config_from_env());
}

/// A queue with one deliberate bug, to show the suite notices it.
#[derive(Clone, Copy, Debug)]
enum Bug {
    /// Redelivers with the same attempt number (ignores attempts).
    SameAttempt,
    /// `schedule` of a duplicate id with other content says AlreadyPending.
    LaxDuplicates,
    /// Acks of stale tokens succeed.
    AckAnything,
    /// Polls return jobs in id order only (ignores due order).
    IdOrder,
}

struct Buggy {
    inner: InMemoryDelayQueue,
    bug: Bug,
}

#[async_trait]
impl DelayQueue for Buggy {
    async fn schedule(&self, job: Job) -> Result<Scheduled, QueueError> {
        match (self.bug, self.inner.schedule(job).await) {
            (Bug::LaxDuplicates, Err(QueueError::JobIdReused { .. })) => {
                Ok(Scheduled::AlreadyPending)
            }
            (_, r) => r,
        }
    }
    async fn cancel(&self, id: &JobId) -> Result<bool, QueueError> {
        self.inner.cancel(id).await
    }
    async fn poll_due(&self, now_ms: u64, max: usize) -> Result<Vec<Lease>, QueueError> {
        let mut leases = self.inner.poll_due(now_ms, max).await?;
        match self.bug {
            Bug::SameAttempt => leases.iter_mut().for_each(|l| l.attempt = 1),
            Bug::IdOrder => leases.sort_by(|a, b| a.job.id.cmp(&b.job.id)),
            _ => {}
        }
        Ok(leases)
    }
    async fn ack(&self, token: &LeaseToken) -> Result<(), QueueError> {
        match (self.bug, self.inner.ack(token).await) {
            (Bug::AckAnything, Err(_)) => Ok(()),
            (_, r) => r,
        }
    }
    async fn nack(&self, token: &LeaseToken, retry_at_ms: Option<u64>) -> Result<(), QueueError> {
        self.inner.nack(token, retry_at_ms).await
    }
    async fn len(&self) -> Result<u64, QueueError> {
        self.inner.len().await
    }
    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.inner.dead_letters(max).await
    }
    async fn next_due(&self) -> Result<Option<u64>, QueueError> {
        self.inner.next_due().await
    }
    fn limits(&self) -> QueueLimits {
        self.inner.limits()
    }
}

struct BuggyHarness(Bug);

#[async_trait]
impl QueueHarness for BuggyHarness {
    type Queue = Buggy;
    async fn create(&mut self, limits: QueueLimits) -> Buggy {
        Buggy {
            inner: InMemoryDelayQueue::with_limits(limits),
            bug: self.0,
        }
    }
}

#[test]
fn the_suite_catches_broken_queues() {
    for bug in [
        Bug::SameAttempt,
        Bug::LaxDuplicates,
        Bug::AckAnything,
        Bug::IdOrder,
    ] {
        let config = {
            let mut built = SuiteConfig::default();
            built.cases = 64;
            built.max_shrink_iters = 64;
            built
        };
        let r = catch_unwind(AssertUnwindSafe(|| {
            delay_queue_conformance(BuggyHarness(bug), config)
        }));
        assert!(r.is_err(), "the suite passed a queue with bug {bug:?}");
    }
}
