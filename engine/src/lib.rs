//! # smartmsg-engine
//!
//! The sans-I/O core of smartmsg: the event model, the ports every backend
//! implements ([`EventLog`], [`SnapshotStore`], [`Clock`]), pure aggregates
//! driven by a [`Repository`], and projections with atomic checkpoints.
//!
//! Nothing here reads the wall clock (except [`SystemClock`]), the
//! environment or a global random generator, and nothing touches a file or a
//! socket: storage is reached only through the traits, so the same code runs
//! under a simulator's virtual clock and in production.
//!
//! The [`memory`] module holds an in-memory backend for tests and
//! simulations; durable backends live in their own crates
//! (`smartmsg-embedded`, …). With the `testkit` feature, `testkit` offers a
//! model-based conformance suite any backend can run with one call.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod append;
pub mod bytes_in;
pub mod clock;
pub mod delay;
pub mod delay_memory;
pub mod error;
pub mod event;
pub mod fnv;
pub mod index;
pub mod limits;
pub mod log;
pub mod memory;
pub mod projection;
pub mod repository;
pub mod scheduler;
pub mod snapshot;
pub mod stream;
pub mod stream_id;
pub mod upcast;
pub mod wheel;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use aggregate::{Aggregate, DecideCtx, DecodeError, EventCodec};
pub use append::{AppendResult, AppendTx, ExpectedVersion, IdempotencyKey, StreamAppend};
pub use clock::{Clock, ManualClock, SystemClock};
pub use delay::{
    DeadLetter, DelayQueue, Job, JobId, Lease, LeaseToken, QueueError, QueueLimits, Scheduled,
};
pub use delay_memory::InMemoryDelayQueue;
pub use error::{AppendError, BackendError, LimitError, ReadError, SnapshotError};
pub use event::{Metadata, NewEvent, RecordedEvent};
pub use limits::Limits;
pub use log::{EventLog, HeadWatch, LogCounters};
pub use projection::{
    CaughtUp, Checkpoint, InMemoryProjection, InMemoryReadModel, Projection, ProjectionError,
    ProjectionRunner,
};
pub use repository::{
    Appended, AppendedAll, CommandOptions, ConfigError, Executed, Known, Loaded, Repository,
    RepositoryConfig, RepositoryError,
};
pub use scheduler::{
    job_idempotency_key, RunReport, Scheduler, SchedulerConfig, SchedulerConfigError,
};
pub use snapshot::{Snapshot, SnapshotStore};
pub use stream_id::{StreamId, StreamIdError};
pub use upcast::{DuplicateUpcaster, UpcastError, Upcaster, Upcasters};
pub use wheel::{Expired, TimerKey, TimerWheel};
