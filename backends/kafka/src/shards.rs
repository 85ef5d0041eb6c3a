//! [`KafkaShards`]: a cluster shard's ports on Kafka, for
//! [`smartmsg_service::cluster::Node`].
//!
//! Everything a shard needs lives in shared services, so any instance can
//! open it:
//!
//! | what | where |
//! |---|---|
//! | its event log | [`KafkaEventLog`] `<cluster>.shard-<s>` (topic `smartmsg.<cluster>.shard-<s>.events`), whose writer (`transactional.id` per shard) fences the previous owner's |
//! | its reaction pipelines' state | a [`LogStore`] on the stream `pipeline-state` of that log: every pipeline commit is a transaction of the shard's log, so it moves with the shard and a fenced owner cannot commit |
//! | its delay queue | whatever the given [`QueueOpener`] opens for the shard (a RabbitMQ queue prefix per shard) |
//! | its reactions | partition `s` of the reactions topic (one partition per shard; producers key reactions by campaign id with Kafka's default partitioner, see [`ShardMap::shard_of`]) |
//! | its sender | the one given (for example a [`crate::KafkaSender`]) |
//!
//! Nothing of a shard is kept on the instance's disk.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use smartmsg_engine::stream::LogStore;
use smartmsg_engine::{Clock, DelayQueue, EventLog, StreamId};
use smartmsg_service::cluster::{OpenError, ShardMap, ShardOpener, ShardParts};
use smartmsg_service::{Ports, RuntimeOptions, Sender};

use crate::stream::ensure_topics;
use crate::{KafkaConfig, KafkaEventLog, KafkaReactionSource};

/// The stream of a shard's log that holds its pipelines' state.
pub const STATE_STREAM: &str = "pipeline-state";

/// Opens the delay queue of a shard.
pub type QueueOpener = Arc<
    dyn Fn(u32) -> Pin<Box<dyn Future<Output = Result<Arc<dyn DelayQueue>, OpenError>> + Send>>
        + Send
        + Sync,
>;

/// Where a cluster's shards live on Kafka.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ShardsConfig {
    /// Bootstrap servers.
    pub bootstrap: String,
    /// The cluster's name: shard `s`'s log is `<cluster>.shard-<s>`.
    pub cluster: String,
    /// The cluster's shards.
    pub map: ShardMap,
    /// Partitions of each shard's log topic (default 1: a shard's log has
    /// one writer anyway).
    pub log_partitions: u32,
    /// Replication factor of each shard's log topics when they are created
    /// (default 1: a single broker; use 3 on a real cluster).
    pub replication_factor: i32,
    /// The reactions topic (one partition per shard), if reactions come
    /// from Kafka.
    pub reactions_topic: Option<String>,
}

impl ShardsConfig {
    /// A configuration with the defaults and no reactions topic.
    pub fn new(bootstrap: impl Into<String>, cluster: impl Into<String>, map: ShardMap) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            cluster: cluster.into(),
            map,
            log_partitions: 1,
            replication_factor: 1,
            reactions_topic: None,
        }
    }

    /// The event log configuration of `shard`.
    pub fn log_config(&self, shard: u32) -> KafkaConfig {
        let mut c = KafkaConfig::new(&self.bootstrap, format!("{}.shard-{shard}", self.cluster))
            .with_partitions(self.log_partitions);
        c.replication_factor = self.replication_factor;
        c
    }
}

/// Opens shards on Kafka (see the [module](self) docs).
pub struct KafkaShards {
    config: ShardsConfig,
    queue: QueueOpener,
    clock: Arc<dyn Clock>,
    sender: Arc<dyn Sender>,
    options: RuntimeOptions,
}

impl std::fmt::Debug for KafkaShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaShards")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KafkaShards {
    /// Shards of `config`, with their queues from `queue`, on `clock`,
    /// sending through `sender`, each runtime with `options`. Creates the
    /// reactions topic with one partition per shard if it does not exist,
    /// and refuses one with another partition count.
    pub async fn new(
        config: ShardsConfig,
        queue: QueueOpener,
        clock: Arc<dyn Clock>,
        sender: Arc<dyn Sender>,
        options: RuntimeOptions,
    ) -> Result<Self, OpenError> {
        if let Some(topic) = &config.reactions_topic {
            let shards = config.map.shards();
            ensure_topics(&config.bootstrap, &[(topic, shards as i32)]).await?;
            let bootstrap = config.bootstrap.clone();
            let t = topic.clone();
            let found = tokio::task::spawn_blocking(move || -> Result<usize, OpenError> {
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .create()?;
                let md = c.fetch_metadata(Some(&t), std::time::Duration::from_secs(10))?;
                Ok(md
                    .topics()
                    .iter()
                    .find(|x| x.name() == t)
                    .map_or(0, |x| x.partitions().len()))
            })
            .await??;
            if found != shards as usize {
                return Err(format!(
                    "the reactions topic {topic} has {found} partitions; the cluster has {shards} shards"
                )
                .into());
            }
        }
        Ok(Self {
            config,
            queue,
            clock,
            sender,
            options,
        })
    }
}

#[async_trait]
impl ShardOpener for KafkaShards {
    async fn open(&self, shard: u32) -> Result<ShardParts, OpenError> {
        // Opening the log fences whoever wrote it before.
        let log: Arc<dyn EventLog> =
            Arc::new(KafkaEventLog::open(self.config.log_config(shard)).await?);
        let state = LogStore::open(Arc::clone(&log), StreamId::new(STATE_STREAM)?).await?;
        let queue = (self.queue)(shard).await?;
        let ports = Ports {
            log,
            snapshots: None,
            queue,
            state: Arc::new(state),
            clock: Arc::clone(&self.clock),
            sender: Arc::clone(&self.sender),
        };
        let mut parts = ShardParts::new(ports, self.options.clone());
        if let Some(topic) = &self.config.reactions_topic {
            parts = parts.with_source(Box::new(
                KafkaReactionSource::new(
                    &format!("reactions-shard-{shard}"),
                    &self.config.bootstrap,
                    topic,
                )?
                .with_partitions([shard as i32]),
            ));
        }
        Ok(parts)
    }
}
