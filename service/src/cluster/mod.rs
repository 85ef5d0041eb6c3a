//! Several instances sharing the campaigns: shards, their ownership, and
//! the [`Node`] that runs a runtime per owned shard.
//!
//! - [`ShardMap`]: a fixed number of shards; a campaign's shard is Kafka's
//!   default partitioner applied to its id.
//! - [`ShardOwnership`]: which shards this instance owns, decided by the
//!   cluster (Kafka's consumer-group protocol in `smartmsg-kafka`;
//!   [`FixedOwnership`] and [`ManualOwnership`] here).
//! - [`ShardOpener`]: opens a shard's ports (its own log, queue, state
//!   store, sources).
//! - [`Node`]: follows the ownership, one [`crate::Runtime`] per owned
//!   shard; [`NodeHandle`] routes requests to the shard's runtime.
//! - [`ShardDirectory`] and [`ReactionSink`]: what the instances share so
//!   that any of them answers any request (`smartmsg serve` in cluster
//!   mode forwards a shard's requests to the instance that runs it).

mod directory;
mod node;
mod ownership;
mod shard;

pub use directory::{ReactionSink, RoutedReaction, ShardDirectory};
pub use node::{ClusterError, Node, NodeHandle, NodeOptions, OpenError, ShardOpener, ShardParts};
pub use ownership::{FixedOwnership, ManualOwnership, Ownership, ShardOwnership};
pub use shard::{murmur2, ShardMap, MAX_SHARDS};
