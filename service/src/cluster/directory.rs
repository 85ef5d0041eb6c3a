//! What the instances of a cluster share besides the shards themselves:
//! where each shard runs now ([`ShardDirectory`]) and the way in for
//! reactions from any instance ([`ReactionSink`]).

use async_trait::async_trait;
use bytes::Bytes;

use super::node::OpenError;

/// Where each shard runs, and the campaigns' read model, shared by every
/// instance (PostgreSQL in `smartmsg-postgres`).
///
/// An instance claims a shard once its runtime runs there; a request for a
/// shard that runs elsewhere is forwarded to the claimed address. A claim
/// is a hint, not a lease: the shard's log fences a stale owner, and an
/// instance that is given a request for a shard it does not run answers
/// 503 (try again), so a stale claim costs a retry, never a wrong answer.
#[async_trait]
pub trait ShardDirectory: Send + Sync {
    /// Records that `shard` runs at `address` (the instance `member`).
    async fn claim(&self, shard: u32, address: &str, member: &str) -> Result<(), OpenError>;

    /// The address `shard` was last claimed at, if any.
    async fn owner(&self, shard: u32) -> Result<Option<String>, OpenError>;

    /// Every campaign's row of the read model, as JSON, by id.
    async fn campaigns(&self) -> Result<Vec<serde_json::Value>, OpenError>;
}

/// A reaction on its way to its campaign's shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedReaction {
    /// The shard ([`super::ShardMap::shard_of`] of the campaign).
    pub shard: u32,
    /// The campaign it names (empty when it names none: the shard's
    /// runtime records it as an unrouted dead letter with the reason).
    pub campaign: String,
    /// The reaction message as it was received.
    pub payload: Bytes,
}

/// Takes reactions in on any instance and hands them to their shards'
/// runtimes durably (a Kafka topic with one partition per shard in
/// `smartmsg-kafka`, which each shard's runtime reads as a reaction
/// source).
#[async_trait]
pub trait ReactionSink: Send + Sync {
    /// Returns once every reaction is durable (or fails: then some may be,
    /// and sending them again is safe, since each shard's pipeline counts a
    /// user's reaction once).
    async fn publish(&self, reactions: Vec<RoutedReaction>) -> Result<(), OpenError>;
}
