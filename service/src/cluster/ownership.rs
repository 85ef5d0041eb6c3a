//! Which shards this instance owns: the [`ShardOwnership`] port.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

/// The shards an instance owns, as of one decision of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// Increases with every decision.
    pub generation: u64,
    /// The shards owned.
    pub shards: BTreeSet<u32>,
}

/// Tells a [`super::Node`] which shards it owns.
///
/// The cluster decides (Kafka's consumer-group protocol in
/// `smartmsg-kafka`, a fixed set, a test's hand); the node follows: it
/// stops the runtimes of shards it lost, then reports
/// [`ShardOwnership::released`] with the generation it followed, then
/// opens the shards it gained. An implementation may wait for that report
/// before it lets another instance take a shard (a clean hand-over); it
/// must not rely on it for safety: an instance that stopped answering
/// still holds its shards' runtimes, and only the shard's fenced log
/// writer keeps its late writes out.
pub trait ShardOwnership: Send + Sync + std::fmt::Debug {
    /// The current ownership and its changes.
    fn watch(&self) -> watch::Receiver<Ownership>;

    /// The node stopped every shard outside `generation`'s set.
    fn released(&self, generation: u64);
}

/// Owns a fixed set of shards (one instance owning every shard, or a
/// static split), forever.
#[derive(Debug)]
pub struct FixedOwnership {
    tx: watch::Sender<Ownership>,
}

impl FixedOwnership {
    /// Owns `shards`.
    pub fn new(shards: impl IntoIterator<Item = u32>) -> Self {
        let (tx, _) = watch::channel(Ownership {
            generation: 1,
            shards: shards.into_iter().collect(),
        });
        Self { tx }
    }
}

impl ShardOwnership for FixedOwnership {
    fn watch(&self) -> watch::Receiver<Ownership> {
        self.tx.subscribe()
    }

    fn released(&self, _generation: u64) {}
}

/// Ownership set by hand (tests, or an operator's tool): each
/// [`ManualOwnership::set`] is a new generation, and
/// [`ManualOwnership::wait_released`] waits for the node to follow it.
#[derive(Debug)]
pub struct ManualOwnership {
    tx: watch::Sender<Ownership>,
    released: watch::Sender<u64>,
    generation: Mutex<u64>,
}

impl Default for ManualOwnership {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualOwnership {
    /// Owns nothing yet (generation 0).
    pub fn new() -> Self {
        Self {
            tx: watch::channel(Ownership::default()).0,
            released: watch::channel(0).0,
            generation: Mutex::new(0),
        }
    }

    /// Owns exactly `shards` from now on; returns the new generation.
    pub fn set(&self, shards: impl IntoIterator<Item = u32>) -> u64 {
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *g += 1;
        self.tx.send_replace(Ownership {
            generation: *g,
            shards: shards.into_iter().collect(),
        });
        *g
    }

    /// Waits until the node has released the shards outside `generation`'s
    /// set (or a later generation's); false after `timeout`.
    pub async fn wait_released(&self, generation: u64, timeout: Duration) -> bool {
        let mut rx = self.released.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|&g| g >= generation))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl ShardOwnership for ManualOwnership {
    fn watch(&self) -> watch::Receiver<Ownership> {
        self.tx.subscribe()
    }

    fn released(&self, generation: u64) {
        self.released.send_if_modified(|g| {
            let newer = generation > *g;
            if newer {
                *g = generation;
            }
            newer
        });
    }
}
