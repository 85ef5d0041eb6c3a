//! # smartmsg-embedded
//!
//! The default backend: needs no server.
//!
//! - [`EmbeddedLog`]: the durable [`smartmsg_engine::EventLog`]. Append-only
//!   segment files, each transaction one frame with its length and a
//!   CRC32C; one writer thread that gathers concurrent appends into a batch
//!   made durable with one `fdatasync` (group commit); an in-memory
//!   per-stream index rebuilt on open; recovery that cuts a torn tail and
//!   refuses damage in durable data with a typed error naming file and
//!   offset (after a clean shutdown, a mark lets the open skip the unused
//!   end of the last segment); a lock file so one process owns the
//!   directory.
//! - [`RedbSnapshots`]: the [`smartmsg_engine::SnapshotStore`] in redb.
//! - [`EmbeddedDelayQueue`]: the durable [`smartmsg_engine::DelayQueue`], an
//!   on-disk timer wheel in redb that keeps only the near future in memory.
//! - [`RedbStore`]: the stream-processing
//!   [`smartmsg_engine::stream::KeyValueStore`] in redb, with its changelog;
//!   with the engine's `EventLogSource`/`EventLogSink` over an
//!   [`EmbeddedLog`] it gives exactly-once stream processing.
//!
//! Features: `fault-injection` makes `faults` and
//! `EmbeddedLog::open_with_faults` public (short writes, failed syncs and
//! power loss for tests).
#![forbid(unsafe_code)]

#[cfg(feature = "internals")]
pub mod clean;
#[cfg(not(feature = "internals"))]
mod clean;
pub mod delay;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
#[cfg(feature = "internals")]
pub mod frame;
#[cfg(not(feature = "internals"))]
mod frame;
pub mod lock;
pub mod log;
#[cfg(feature = "internals")]
pub mod recovery;
#[cfg(not(feature = "internals"))]
mod recovery;
#[cfg(feature = "internals")]
pub mod segment;
#[cfg(not(feature = "internals"))]
mod segment;
pub mod snapshots;
pub mod state;
mod storage;
mod writer;

pub use delay::{EmbeddedDelayQueue, EmbeddedQueueConfig, QueueStats};
pub use error::EmbeddedError;
pub use log::{EmbeddedConfig, EmbeddedLog, LogStats};
pub use snapshots::RedbSnapshots;
pub use state::{RedbStore, RedbStoreConfig};
