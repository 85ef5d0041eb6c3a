//! Child process of the cluster kill test: one node of a cluster on Kafka
//! and RabbitMQ on the wall clock, creating the test's campaigns in the
//! shards it runs, reporting its shards and views to a status file, until
//! killed (SIGKILL), paused (SIGSTOP) or stopped (SIGTERM).
//!
//! Usage: `cluster_node ARGS_JSON` (see `smartmsg_tests::cluster::NodeArgs`).

use std::sync::Arc;
use std::time::Duration;

use smartmsg_engine::{DelayQueue, SystemClock};
use smartmsg_kafka::{
    KafkaSender, KafkaShardOwnership, KafkaShards, OwnershipConfig, QueueOpener, ShardsConfig,
};
use smartmsg_rabbitmq::{RabbitConfig, RabbitDelayQueue};
use smartmsg_service::cluster::{Node, NodeOptions, ShardMap};
use smartmsg_service::{shutdown_signal, RuntimeOptions};
use smartmsg_tests::cluster::{setup, NodeArgs, NodeStatus};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    smartmsg_tests::init_tracing();
    let shutdown = shutdown_signal();
    let arg = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: cluster_node ARGS_JSON"))?;
    let args: NodeArgs = serde_json::from_str(&arg)?;
    let map = ShardMap::new(args.shards).ok_or_else(|| anyhow::anyhow!("bad shard count"))?;
    let queue: QueueOpener = {
        let amqp = args.amqp.clone();
        let prefix = args.queue_prefix.clone();
        Arc::new(move |shard| {
            let config = RabbitConfig::new(&amqp, format!("{prefix}.s{shard}"));
            Box::pin(async move {
                let q: Arc<dyn DelayQueue> = Arc::new(RabbitDelayQueue::open(config).await?);
                Ok(q)
            })
        })
    };
    let mut sc = ShardsConfig::new(&args.bootstrap, &args.cluster, map);
    sc.reactions_topic = Some(args.reactions_topic.clone());
    let options = {
        let mut o = RuntimeOptions::default();
        o.poll_interval_ms = 50;
        o.send_retry_ms = 50;
        o
    };
    let opener = KafkaShards::new(
        sc,
        queue,
        Arc::new(SystemClock),
        Arc::new(KafkaSender::new(&args.bootstrap, &args.sent_topic)?),
        options,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut oc = OwnershipConfig::new(&args.bootstrap, &args.cluster, map);
    oc.member = args.member.clone();
    let ownership = Arc::new(KafkaShardOwnership::join(oc).await?);
    let mut no = NodeOptions::default();
    no.retry = Duration::from_millis(200);
    let node = Node::new(map, ownership, Arc::new(opener), no);
    let handle = node.handle();
    let running = tokio::spawn(node.run(shutdown));
    while !running.is_finished() {
        for id in &args.campaigns {
            let Ok(rt) = handle.runtime_for(id) else {
                continue;
            };
            if rt.published(id).is_none() {
                // Idempotent: the same setup again is accepted.
                let s = setup(id, args.start_ms, args.interval_ms);
                if let Err(e) = rt.create_campaign(s).await {
                    tracing::warn!(campaign = %id, error = %e, "create");
                    continue;
                }
                if let Err(e) = rt.start(id).await {
                    tracing::warn!(campaign = %id, error = %e, "start");
                }
            }
        }
        let status = NodeStatus {
            member: args.member.clone(),
            running: handle.running().into_iter().collect(),
            views: handle.views().into_values().collect(),
        };
        let tmp = args.status.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&status)?)?;
        std::fs::rename(&tmp, &args.status)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.await?;
    Ok(())
}
