//! [`KafkaShardOwnership`]: which shards of a cluster this instance owns,
//! decided by Kafka's consumer-group protocol.
//!
//! Every instance joins the consumer group `smartmsg.<cluster>.owners` on
//! the topic `smartmsg.<cluster>.shards`, which has one partition per
//! shard and never holds a record: the partitions assigned to an instance
//! are the shards it owns. The group coordinator does the rest: an
//! instance that joins takes shards over (`cooperative-sticky`: only the
//! shards that move are revoked, the others keep running), and one that
//! stops heartbeating (killed, partitioned away) loses its shards after
//! `session.timeout.ms`.
//!
//! A revoked shard is released before the callback returns: the node stops
//! its runtime (waiting at most [`OwnershipConfig::handover_timeout`]), so
//! on a clean hand-over the next owner opens a shard nobody runs. Safety
//! does not depend on that wait: the next owner's log writer fences the
//! old one (`transactional.id` per shard), so a zombie's late appends fail.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::TopicPartitionList;
use smartmsg_service::cluster::{Ownership, ShardMap, ShardOwnership};
use tokio::sync::watch;

use crate::stream::{ensure_topics, KafkaStreamError};

/// How an instance joins the cluster's ownership group.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OwnershipConfig {
    /// Bootstrap servers.
    pub bootstrap: String,
    /// The cluster's name (topic `smartmsg.<cluster>.shards`, group
    /// `smartmsg.<cluster>.owners`).
    pub cluster: String,
    /// The cluster's shards (the topic's partition count).
    pub map: ShardMap,
    /// `session.timeout.ms`: how long a silent instance keeps its shards
    /// (default 6 s; tansu needs 6000).
    pub session_timeout: Duration,
    /// `max.poll.interval.ms` (default 7 s; tansu needs 7000).
    pub max_poll_interval: Duration,
    /// Longest wait, when shards are revoked, for the node to stop them
    /// (default 5 s; below `max_poll_interval`, or the instance is
    /// expelled for not polling).
    pub handover_timeout: Duration,
    /// An id for this member (`client.id`; default `smartmsg-owner`).
    pub member: String,
    /// `partition.assignment.strategy` (default `cooperative-sticky`: a
    /// rebalance moves only the shards that must move).
    pub strategy: String,
}

impl OwnershipConfig {
    /// A configuration with the defaults.
    pub fn new(bootstrap: impl Into<String>, cluster: impl Into<String>, map: ShardMap) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            cluster: cluster.into(),
            map,
            session_timeout: Duration::from_millis(6_000),
            max_poll_interval: Duration::from_millis(7_000),
            handover_timeout: Duration::from_secs(5),
            member: "smartmsg-owner".into(),
            strategy: "cooperative-sticky".into(),
        }
    }

    /// The shards topic.
    pub fn topic(&self) -> String {
        format!("smartmsg.{}.shards", self.cluster)
    }

    /// The consumer group.
    pub fn group(&self) -> String {
        format!("smartmsg.{}.owners", self.cluster)
    }
}

/// Why joining the ownership group failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OwnershipError {
    /// Creating the shards topic failed.
    #[error("creating the shards topic: {0}")]
    Topic(#[from] KafkaStreamError),
    /// The client failed.
    #[error("the ownership group's consumer: {0}")]
    Client(#[from] KafkaError),
    /// The shards topic exists with another partition count: the cluster
    /// was created with another number of shards.
    #[error("topic {topic} has {found} partitions; this cluster has {expected} shards")]
    ShardCount {
        /// The topic.
        topic: String,
        /// Its partitions.
        found: usize,
        /// The shards configured.
        expected: u32,
    },
}

/// State shared by the handle and the consumer's callbacks.
#[derive(Debug)]
struct Shared {
    topic: String,
    owned: watch::Sender<Ownership>,
    released: Mutex<u64>,
    released_cv: Condvar,
    handover: Duration,
    /// Set when this member leaves: nothing waits for a release then.
    leaving: AtomicBool,
}

impl Shared {
    fn publish(&self, change: impl FnOnce(&mut BTreeSet<u32>)) -> u64 {
        let mut generation = 0;
        self.owned.send_modify(|o| {
            change(&mut o.shards);
            o.generation += 1;
            generation = o.generation;
        });
        generation
    }

    fn shards_in(&self, tpl: &TopicPartitionList) -> Vec<u32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .filter_map(|e| u32::try_from(e.partition()).ok())
            .collect()
    }
}

struct OwnerContext(Arc<Shared>);

impl ClientContext for OwnerContext {}

impl ConsumerContext for OwnerContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let lost = self.0.shards_in(tpl);
        if lost.is_empty() {
            return;
        }
        let generation = self.0.publish(|s| {
            for shard in &lost {
                s.remove(shard);
            }
        });
        tracing::info!(?lost, generation, "shards revoked; releasing them");
        if self.0.leaving.load(Ordering::Relaxed) {
            return;
        }
        // Hand over cleanly: wait (bounded) until the node has stopped them.
        let guard = self.0.released.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, timeout) = self
            .0
            .released_cv
            .wait_timeout_while(guard, self.0.handover, |r| *r < generation)
            .unwrap_or_else(|p| p.into_inner());
        drop(guard);
        if timeout.timed_out() {
            tracing::warn!(
                ?lost,
                "shards not released in time; handing them over anyway"
            );
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let gained = self.0.shards_in(tpl);
                if !gained.is_empty() {
                    let generation = self.0.publish(|s| s.extend(gained.iter().copied()));
                    tracing::info!(?gained, generation, "shards assigned");
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "ownership rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// This instance's membership of the cluster's ownership group (see the
/// [module](self) docs). Dropping it leaves the group, which hands its
/// shards to the other members at once.
pub struct KafkaShardOwnership {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for KafkaShardOwnership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaShardOwnership")
            .field("topic", &self.shared.topic)
            .field("owned", &*self.shared.owned.borrow())
            .finish_non_exhaustive()
    }
}

impl KafkaShardOwnership {
    /// Creates the shards topic if needed (checking its partition count),
    /// joins the group and starts the thread that polls it. Shards arrive
    /// through [`ShardOwnership::watch`] once the group assigns them.
    pub async fn join(config: OwnershipConfig) -> Result<Self, OwnershipError> {
        let topic = config.topic();
        let shards = config.map.shards();
        ensure_topics(&config.bootstrap, &[(&topic, shards as i32)]).await?;
        let shared = Arc::new(Shared {
            topic: topic.clone(),
            owned: watch::channel(Ownership::default()).0,
            released: Mutex::new(0),
            released_cv: Condvar::new(),
            handover: config.handover_timeout,
            leaving: AtomicBool::new(false),
        });
        let consumer: BaseConsumer<OwnerContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap)
            .set("group.id", config.group())
            .set("client.id", &config.member)
            .set("enable.auto.commit", "false")
            .set("partition.assignment.strategy", &config.strategy)
            .set(
                "session.timeout.ms",
                config.session_timeout.as_millis().to_string(),
            )
            // Heartbeats well inside the session timeout: a member that
            // stops is noticed after the timeout, not a multiple of it.
            .set("heartbeat.interval.ms", "1000")
            .set(
                "max.poll.interval.ms",
                config.max_poll_interval.as_millis().to_string(),
            )
            .create_with_context(OwnerContext(Arc::clone(&shared)))?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let found = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        if found != shards as usize {
            return Err(OwnershipError::ShardCount {
                topic,
                found,
                expected: shards,
            });
        }
        consumer.subscribe(&[&topic])?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("smartmsg-ownership".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        // The topic holds no records: polling only drives
                        // the group protocol (heartbeats, rebalances).
                        if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                            tracing::warn!(error = %e, "ownership group");
                        }
                    }
                    // Leave the group: the others get the shards now, not
                    // after the session timeout.
                    consumer.unsubscribe();
                    let _ = consumer.poll(Duration::from_millis(100));
                })
                .map_err(|e| KafkaError::ClientCreation(e.to_string()))?
        };
        Ok(Self {
            shared,
            stop,
            thread: Some(thread),
        })
    }
}

impl ShardOwnership for KafkaShardOwnership {
    fn watch(&self) -> watch::Receiver<Ownership> {
        self.shared.owned.subscribe()
    }

    fn released(&self, generation: u64) {
        let mut r = self
            .shared
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if generation > *r {
            *r = generation;
            self.shared.released_cv.notify_all();
        }
    }
}

impl Drop for KafkaShardOwnership {
    fn drop(&mut self) {
        self.shared.leaving.store(true, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
