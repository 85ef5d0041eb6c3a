//! The [`DelayQueue`] port: jobs that become due at a time, leased to
//! workers, acknowledged once their effect is durable.
//!
//! Delivery is at-least-once: a lease that is neither acked nor nacked
//! before its deadline is delivered again (to any worker) by a later
//! [`DelayQueue::poll_due`]. The job id makes the *effect* once: the worker
//! turns a job into a command whose idempotency key is derived from the id,
//! so a second delivery finds the effect already there.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BackendError;

/// A job's identity: 1 to [`QueueLimits::max_id_len`] bytes of ASCII
/// letters, digits and `-_.:/@` (the same alphabet as stream ids, so a job id
/// can name a stream or key a command).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Arc<str>);

impl JobId {
    /// Validates and wraps an id (length checked against the queue's limits
    /// on `schedule`).
    pub fn new(id: impl AsRef<str>) -> Result<Self, QueueError> {
        let id = id.as_ref();
        if id.is_empty() {
            return Err(QueueError::BadJobId {
                reason: "empty".into(),
            });
        }
        if let Some(c) = id.chars().find(|c| {
            !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@'))
        }) {
            return Err(QueueError::BadJobId {
                reason: format!("character {c:?} is not allowed"),
            });
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({:?})", &*self.0)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job to run at or after `due_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Its identity; scheduling is idempotent by it.
    pub id: JobId,
    /// When it becomes due (ms since the Unix epoch, in the caller's clock).
    pub due_ms: u64,
    /// What the worker needs to run it (at most
    /// [`QueueLimits::max_payload_bytes`]).
    pub payload: Bytes,
}

/// What [`DelayQueue::schedule`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduled {
    /// The job is new and now pending.
    New,
    /// A job with this id and the same content is already pending or leased:
    /// nothing changed.
    AlreadyPending,
}

/// A job handed to a worker until `deadline_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The job.
    pub job: Job,
    /// Names this delivery; pass it to `ack` / `nack`.
    pub token: LeaseToken,
    /// 1 for the first delivery, 2 for the first redelivery, …
    pub attempt: u32,
    /// If neither acked nor nacked by then, the job is delivered again.
    pub deadline_ms: u64,
}

/// Identifies one delivery of one job. A token from an expired lease is
/// stale: acking it is [`QueueError::StaleLease`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken {
    /// The job.
    pub job: JobId,
    /// Which delivery (unique per job within a queue).
    pub delivery: u64,
}

/// A job the queue gave up on, or a message it could not read, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The job's id, when the message was readable enough to have one.
    pub id: Option<JobId>,
    /// The job's payload, or the raw message that could not be read.
    pub payload: Bytes,
    /// Deliveries made before giving up (0 for an unreadable message).
    pub attempts: u32,
    /// Why it is here.
    pub reason: String,
}

/// The maxima a queue enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueLimits {
    /// Longest job id, in bytes.
    pub max_id_len: usize,
    /// Largest payload, in bytes.
    pub max_payload_bytes: usize,
    /// Most leases one `poll_due` may ask for.
    pub max_poll: usize,
    /// How long a lease lasts before redelivery.
    pub lease_ms: u64,
    /// Deliveries before a job is dead-lettered instead of delivered again.
    pub max_attempts: u32,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            max_id_len: 128,
            max_payload_bytes: 64 << 10,
            max_poll: 10_000,
            lease_ms: 30_000,
            max_attempts: 16,
        }
    }
}

/// Why a queue operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The job id is malformed or too long.
    #[error("bad job id: {reason}")]
    BadJobId {
        /// Why.
        reason: String,
    },
    /// The payload is larger than allowed.
    #[error("job payload is {size} bytes; the limit is {max}")]
    PayloadTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A poll asks for more leases than allowed.
    #[error("poll asks for {requested} jobs; the limit is {max}")]
    PollTooLarge {
        /// Asked for.
        requested: usize,
        /// The limit.
        max: usize,
    },
    /// A job with this id is pending with different content.
    #[error("job {id} is already scheduled with different content")]
    JobIdReused {
        /// The id.
        id: JobId,
    },
    /// The lease expired (the job may be with another worker) or was
    /// already acked or nacked.
    #[error("lease {delivery} of job {job} is no longer held")]
    StaleLease {
        /// The job.
        job: JobId,
        /// The delivery.
        delivery: u64,
    },
    /// The queue is closed.
    #[error("the delay queue is closed")]
    Closed,
    /// The backend failed.
    #[error("backend failure: {0}")]
    Backend(#[from] BackendError),
}

/// A durable queue of delayed jobs.
///
/// Guarantees every implementation gives (checked by the `testkit` delay
/// queue suite):
/// - `schedule` returns once the job is durable; scheduling an id that is
///   pending or leased with the same content is a no-op
///   ([`Scheduled::AlreadyPending`]), with different content
///   [`QueueError::JobIdReused`]; after an ack or cancel the id is free;
/// - `poll_due(now_ms, max)` leases up to `max` jobs with `due_ms ≤ now_ms`,
///   earliest due first (ties by id), each until `now_ms + lease_ms`; a due
///   time in the past is allowed and simply due at once;
/// - a lease not acked by its deadline is delivered again, attempt + 1;
///   after [`QueueLimits::max_attempts`] deliveries the job is moved to the
///   dead letters instead, with the reason;
/// - `nack(token, retry_at)` hands a job back at once (or at `retry_at`);
/// - `cancel` removes a pending or leased job at once and returns whether
///   one existed; the ack of a cancelled lease reports
///   [`QueueError::StaleLease`];
/// - a job's content is its `due_ms` and `payload`;
/// - a poll first ends every lease past its deadline (redelivered, or
///   dead-lettered after `max_attempts`), then leases in (due, id) order;
/// - a backend may end all leases when it is reopened (the embedded queue
///   does: work held by a crashed worker is redelivered at once);
/// - [`DelayQueue::next_due`] includes lease deadlines, so a scheduler that
///   sleeps until then never misses a redelivery.
///
/// The reference semantics are those of
/// [`InMemoryDelayQueue`](crate::InMemoryDelayQueue), enforced by
/// `testkit::delay_queue_conformance`.
#[async_trait]
pub trait DelayQueue: Send + Sync {
    /// Schedules a job; durable when it returns.
    async fn schedule(&self, job: Job) -> Result<Scheduled, QueueError>;
    /// Cancels a pending or leased job. Returns whether one existed.
    async fn cancel(&self, id: &JobId) -> Result<bool, QueueError>;
    /// Leases up to `max` jobs due at `now_ms`.
    async fn poll_due(&self, now_ms: u64, max: usize) -> Result<Vec<Lease>, QueueError>;
    /// Completes a delivery: the job is gone for good.
    async fn ack(&self, token: &LeaseToken) -> Result<(), QueueError>;
    /// Gives a delivery back: the job is due again at `retry_at_ms` (now if
    /// `None`).
    async fn nack(&self, token: &LeaseToken, retry_at_ms: Option<u64>) -> Result<(), QueueError>;
    /// Number of jobs pending or leased.
    async fn len(&self) -> Result<u64, QueueError>;
    /// Whether no job is pending or leased.
    async fn is_empty(&self) -> Result<bool, QueueError> {
        Ok(self.len().await? == 0)
    }
    /// Up to `max` dead letters, oldest first.
    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError>;
    /// The earliest due time among pending jobs and lease deadlines, if any
    /// (lets a scheduler sleep until then, or a simulator jump virtual time
    /// there).
    async fn next_due(&self) -> Result<Option<u64>, QueueError>;
    /// The limits this queue enforces.
    fn limits(&self) -> QueueLimits;
}

/// Checks a job against limits (shared by backends).
pub fn check_job(job: &Job, limits: &QueueLimits) -> Result<(), QueueError> {
    if job.id.as_str().len() > limits.max_id_len {
        return Err(QueueError::BadJobId {
            reason: format!(
                "{} bytes long; the limit is {}",
                job.id.as_str().len(),
                limits.max_id_len
            ),
        });
    }
    if job.payload.len() > limits.max_payload_bytes {
        return Err(QueueError::PayloadTooLarge {
            size: job.payload.len(),
            max: limits.max_payload_bytes,
        });
    }
    Ok(())
}
