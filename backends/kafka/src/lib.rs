//! # smartmsg-kafka
//!
//! The engine's [`EventLog`](smartmsg_engine::EventLog) on Kafka:
//! [`KafkaEventLog`].
//!
//! # Design
//!
//! - **Topic and partitions.** One log is one topic,
//!   `smartmsg.<log_name>.events`, with a fixed number of partitions `P`.
//!   Each event is one record whose key is its stream id; the stream's
//!   partition is [`partition_for`] (FNV-1a 64 of the id, modulo `P`), so a
//!   stream's events stay in order in one partition. The value is a
//!   versioned binary envelope (`envelope.rs`): position, stream version,
//!   kind, schema, timestamp, correlation and causation ids, payload, and
//!   the framing that tells whole transactions from parts.
//! - **One writer, fenced.** [`KafkaEventLog::open`] creates a
//!   transactional producer with `transactional.id =
//!   smartmsg.<log_name>.writer` and calls `init_transactions`, which fences
//!   every earlier writer of the log: their next produce or commit fails and
//!   their appends return [`AppendError::Fenced`](smartmsg_engine::AppendError::Fenced),
//!   never a silent write. The writer is one OS thread; appends reach it
//!   over a bounded channel.
//! - **Appends.** The writer checks each `AppendTx` against the engine's
//!   [`LogIndex`](smartmsg_engine::index::LogIndex) (expected versions,
//!   idempotency keys, limits) exactly as the embedded log does, and commits
//!   the appends that queued up meanwhile as **one Kafka transaction**
//!   (group commit; an `AppendTx` is never split). An append returns after
//!   `commit_transaction` succeeded (`acks=all`, idempotent producer). If the
//!   transaction aborts, every append of the group gets a backend error and
//!   the index forgets them; if the outcome is unknown the log is poisoned
//!   until reopened.
//! - **Positions.** Kafka offsets are per partition, so positions are the
//!   writer's own sequence: the `n`-th committed event of the log has
//!   position `n` (0-based, gap-free, written in its envelope), in commit
//!   order; within a transaction in the order of its streams and events.
//!   `read_all` is this total order. The writer's index maps each position
//!   to (partition, offset), and each stream to its positions, so
//!   `read_stream` and `read_all` fetch exactly those records with assigned
//!   consumers (no scan of the topic; neighbouring wanted offsets are read
//!   as one run, wider gaps start a new fetch position).
//! - **Rebuild.** On open, after fencing, the topic is read to its end
//!   (`read_committed`) and the index rebuilt from the committed chain
//!   (`chain.rs`): each Kafka transaction names its predecessor, so records
//!   of aborted or cut-short transactions are ignored even on brokers that
//!   show them to `read_committed` consumers (tansu).
//! - **Checkpoints.** Every
//!   [`checkpoint_every_events`](KafkaConfig::checkpoint_every_events)
//!   committed events (100,000 by default) the writer encodes its index,
//!   the position → (partition, offset) map, the chain's tip and the
//!   offsets of the events topic they cover, and a thread of its own writes
//!   it in CRC-checked chunks to `smartmsg.<log_name>.checkpoints`
//!   (`checkpoint.rs`). `open` loads the newest complete checkpoint that
//!   fits the topic and reads only the records after it, continuing the
//!   chain from its tip, which gives exactly the full rebuild's index; with
//!   no usable checkpoint it reads the whole topic (and logs why).
//!   [`KafkaEventLog::checkpoint`] writes one on request.
//! - **Head.** `head` is one past the last committed position;
//!   `watch_head` is a tokio watch the writer updates after each commit.
//!
//! Stream processing on raw topics (consumer groups, exactly-once steps
//! with `send_offsets_to_transaction`, state restored from a changelog
//! topic) is in [`stream`].
//!
//! Multi-writer scaling is by several logs (for example one per tenant),
//! each with its own topic and writer; one log has exactly one writer.
#![forbid(unsafe_code)]

pub mod campaign;
#[cfg(feature = "internals")]
pub mod chain;
#[cfg(not(feature = "internals"))]
mod chain;
#[cfg(feature = "internals")]
pub mod checkpoint;
#[cfg(not(feature = "internals"))]
mod checkpoint;
pub mod config;
#[cfg(feature = "internals")]
pub mod envelope;
#[cfg(not(feature = "internals"))]
mod envelope;
pub mod error;
pub mod headers;
pub mod log;
pub mod ownership;
mod reader;
pub mod shards;
pub mod stream;
mod writer;

pub use campaign::{KafkaReactionSink, KafkaReactionSource, KafkaSender};
pub use config::{BeforeCommitHook, KafkaConfig};
pub use envelope::partition_for;
pub use error::KafkaLogError;
pub use log::{IndexState, KafkaEventLog, KafkaLogStats, RebuildStats};
pub use ownership::{KafkaShardOwnership, OwnershipConfig, OwnershipError};
pub use shards::{KafkaShards, QueueOpener, ShardsConfig};
pub use stream::{
    KafkaStreamError, KafkaStreamProcessor, KafkaTopicSink, KafkaTopicSource, ProcessorConfig,
};
