//! `smartmsg serve` on Kafka and RabbitMQ (feature `distributed`): opens
//! what the configuration names, the Kafka event log and the RabbitMQ
//! delay queue (`backend.kind = "distributed"`), a Kafka sender, Kafka
//! reaction sources; everything else as the embedded build does. With
//! `backend.kind = "cluster"`, one instance of a cluster ([`serve_cluster`]).

use std::sync::Arc;

use anyhow::{Context, Result};
use smartmsg_engine::{DelayQueue, SystemClock};
use smartmsg_kafka::{
    KafkaConfig, KafkaEventLog, KafkaReactionSink, KafkaReactionSource, KafkaSender,
    KafkaShardOwnership, KafkaShards, OwnershipConfig, QueueOpener, ShardsConfig,
};
use smartmsg_postgres::{PgReadModels, PgShardDirectory};
use smartmsg_rabbitmq::{RabbitConfig, RabbitDelayQueue};
use smartmsg_service::cluster::{Node, NodeOptions, ShardMap, MAX_SHARDS};
use smartmsg_service::http::evaluation::Evaluator;
use smartmsg_service::http::{
    plain_sender, plain_source, BackendConfig, ClusterParts, SenderConfig, ServeConfig,
    SourceConfig,
};
use smartmsg_service::{Ports, ReactionSource, RuntimeOptions, Sender};

/// The sender `config` names.
fn sender(config: &ServeConfig) -> Result<Arc<dyn Sender>> {
    Ok(match &config.sender {
        SenderConfig::Kafka { bootstrap, topic } => Arc::new(
            KafkaSender::new(bootstrap, topic)
                .with_context(|| format!("the Kafka sender to {topic} at {bootstrap}"))?,
        ),
        other => plain_sender(other)?,
    })
}

/// The ports and reaction sources `config` names.
pub async fn backend(config: &ServeConfig) -> Result<(Ports, Vec<Box<dyn ReactionSource>>)> {
    let sender = sender(config)?;
    let mut sources: Vec<Box<dyn ReactionSource>> = Vec::new();
    for s in &config.sources {
        sources.push(match s {
            SourceConfig::Kafka {
                name,
                bootstrap,
                topic,
            } => Box::new(
                KafkaReactionSource::new(name, bootstrap, topic)
                    .with_context(|| format!("the Kafka source {name} ({topic} at {bootstrap})"))?,
            ),
            other => plain_source(other)?,
        });
    }
    let ports = match &config.backend {
        BackendConfig::Embedded => smartmsg_service::embedded_ports(
            &config.data_dir,
            smartmsg_embedded::EmbeddedConfig::default(),
            Arc::new(SystemClock),
            sender,
        )?,
        BackendConfig::Distributed(d) => {
            let mut kc = KafkaConfig::new(&d.kafka_bootstrap, &d.log_name);
            kc.partitions = d.partitions;
            kc.replication_factor = d.replication_factor;
            let log = KafkaEventLog::open(kc).await.with_context(|| {
                format!(
                    "the Kafka event log {} at {}",
                    d.log_name, d.kafka_bootstrap
                )
            })?;
            let queue = RabbitDelayQueue::open(RabbitConfig::new(&d.rabbitmq_url, &d.queue_prefix))
                .await
                .with_context(|| format!("the RabbitMQ delay queue {}", d.queue_prefix))?;
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("creating {}", config.data_dir.display()))?;
            let state = smartmsg_embedded::RedbStore::open(config.data_dir.join("state.redb"))
                .context("the pipelines' state store")?;
            Ports {
                log: Arc::new(log),
                snapshots: None,
                queue: Arc::new(queue),
                state: Arc::new(state),
                clock: Arc::new(SystemClock),
                sender,
            }
        }
        other => anyhow::bail!("this build does not know the backend {other:?}"),
    };
    Ok((ports, sources))
}

/// Runs `smartmsg serve` as an instance of the cluster `config` names
/// (`backend.kind = "cluster"`) until `shutdown`: joins the shards'
/// ownership group, runs the shards it is given (each on its Kafka log,
/// RabbitMQ queue and reactions partition, projected into PostgreSQL), and
/// answers the API for every shard (forwarding what runs elsewhere).
pub async fn serve_cluster(
    config: ServeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    evaluator: Option<Arc<dyn Evaluator>>,
) -> Result<()> {
    let BackendConfig::Cluster(cc) = config.backend.clone() else {
        anyhow::bail!("not a cluster configuration");
    };
    if !config.sources.is_empty() {
        anyhow::bail!(
            "[[sources]] are not read in cluster mode: reactions come in through POST /v1/reactions or straight into the topic {} (one partition per shard, keyed by campaign)",
            cc.reactions_topic()
        );
    }
    let map = ShardMap::new(cc.shards)
        .with_context(|| format!("backend.shards = {}: 1 to {MAX_SHARDS}", cc.shards))?;
    let advertise = match &cc.advertise {
        Some(a) => a.clone(),
        None => {
            let addr = listener.local_addr()?;
            if addr.ip().is_unspecified() {
                anyhow::bail!(
                    "listening on {addr}: set backend.advertise to the URL the other instances reach this one at"
                );
            }
            format!("http://{addr}")
        }
    };
    let member = cc.member.clone().unwrap_or_else(|| advertise.clone());
    let queue: QueueOpener = {
        let amqp = cc.rabbitmq_url.clone();
        let prefix = format!("smartmsg.{}", cc.name);
        Arc::new(move |shard| {
            let config = RabbitConfig::new(&amqp, format!("{prefix}.s{shard}"));
            Box::pin(async move {
                let q: Arc<dyn DelayQueue> = Arc::new(RabbitDelayQueue::open(config).await?);
                Ok(q)
            })
        })
    };
    let mut sc = ShardsConfig::new(&cc.kafka_bootstrap, &cc.name, map);
    sc.reactions_topic = Some(cc.reactions_topic());
    sc.replication_factor = cc.replication_factor;
    let mut options = RuntimeOptions::default();
    options.poll_interval_ms = config.poll_interval_ms.max(1);
    let shards = KafkaShards::new(sc, queue, Arc::new(SystemClock), sender(&config)?, options)
        .await
        .map_err(|e| anyhow::anyhow!("the shards on Kafka at {}: {e}", cc.kafka_bootstrap))?;
    let schema = cc.schema();
    let opener = PgReadModels::new(shards, &cc.postgres_url, &schema, &format!("{}.", cc.name))
        .context("the read models")?;
    let directory = PgShardDirectory::connect(&cc.postgres_url, &schema)
        .await
        .with_context(|| format!("PostgreSQL at {}", cc.postgres_url))?;
    let sink = KafkaReactionSink::new(&cc.kafka_bootstrap, &cc.reactions_topic())
        .context("the reactions producer")?;
    let mut oc = OwnershipConfig::new(&cc.kafka_bootstrap, &cc.name, map);
    oc.member = member.clone();
    let ownership = KafkaShardOwnership::join(oc)
        .await
        .context("joining the cluster's ownership group")?;
    let node = Node::new(
        map,
        Arc::new(ownership),
        Arc::new(opener),
        NodeOptions::default(),
    );
    let parts = ClusterParts::new(Arc::new(directory), Arc::new(sink), advertise, member);
    smartmsg_service::http::serve_cluster(config, listener, shutdown, node, parts, evaluator)
        .await?;
    Ok(())
}
