//! `smartmsg serve` on Kafka and RabbitMQ (feature `distributed`): opens
//! what the configuration names, the Kafka event log and the RabbitMQ
//! delay queue (`backend.kind = "distributed"`), a Kafka sender, Kafka
//! reaction sources; everything else as the embedded build does.

use std::sync::Arc;

use anyhow::{Context, Result};
use smartmsg_engine::SystemClock;
use smartmsg_kafka::{KafkaConfig, KafkaEventLog, KafkaReactionSource, KafkaSender};
use smartmsg_rabbitmq::{RabbitConfig, RabbitDelayQueue};
use smartmsg_service::http::{
    plain_sender, plain_source, BackendConfig, SenderConfig, ServeConfig, SourceConfig,
};
use smartmsg_service::{Ports, ReactionSource, Sender};

/// The ports and reaction sources `config` names.
pub async fn backend(config: &ServeConfig) -> Result<(Ports, Vec<Box<dyn ReactionSource>>)> {
    let sender: Arc<dyn Sender> = match &config.sender {
        SenderConfig::Kafka { bootstrap, topic } => Arc::new(
            KafkaSender::new(bootstrap, topic)
                .with_context(|| format!("the Kafka sender to {topic} at {bootstrap}"))?,
        ),
        other => plain_sender(other)?,
    };
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
