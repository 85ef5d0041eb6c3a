//! A cluster on Kafka and RabbitMQ, on the wall clock: nodes own shards
//! through the consumer-group protocol, each shard's log, queue, pipeline
//! state and reactions on the shared services. Campaigns run while one
//! node leaves (its shards move to the others) and another joins (it takes
//! some over). Every campaign completes, every message arrives with its
//! stable id and the same content, every reaction is counted once; the
//! campaigns' rows in PostgreSQL (projected by whichever node ran each
//! shard, the checkpoint moving with it) match.
//!
//! Needs `SMARTMSG_KAFKA_BOOTSTRAP` and `SMARTMSG_RABBITMQ_URL` (the test
//! script starts tansu and RabbitMQ); skips with a printed reason
//! otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use smartmsg_domain::reactions::ReactionKind;
use smartmsg_domain::Status;
use smartmsg_engine::{Clock, DelayQueue, SystemClock};
use smartmsg_kafka::{
    KafkaSender, KafkaShardOwnership, KafkaShards, OwnershipConfig, QueueOpener, ShardsConfig,
};
use smartmsg_postgres::{PgCampaignReader, PgReadModels};
use smartmsg_rabbitmq::{RabbitConfig, RabbitDelayQueue};
use smartmsg_service::cluster::{Node, NodeHandle, NodeOptions, ShardMap, ShardOpener};
use smartmsg_service::sender::MessageRecord;
use smartmsg_service::{CampaignView, RuntimeOptions};
use smartmsg_tests::cluster::{setup, BUDGET};

const CAMPAIGNS: usize = 6;

use smartmsg_tests::services::{env, topic_reader, unique_suffix};

fn now_ms() -> u64 {
    SystemClock.now_ms()
}

struct Running {
    handle: NodeHandle,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_node(
    bootstrap: &str,
    cluster: &str,
    map: ShardMap,
    member: &str,
    opener: Arc<dyn ShardOpener>,
) -> Running {
    let mut oc = OwnershipConfig::new(bootstrap, cluster, map);
    oc.member = member.into();
    let ownership = Arc::new(KafkaShardOwnership::join(oc).await.expect("join"));
    let mut options = NodeOptions::default();
    options.retry = Duration::from_millis(200);
    let node = Node::new(map, ownership, opener, options);
    let handle = node.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(node.run(async move {
        let _ = stopped.await;
    }));
    Running { handle, stop, task }
}

/// The view of `id` from whichever node runs its shard.
fn view(nodes: &[&NodeHandle], id: &str) -> Option<CampaignView> {
    nodes.iter().find_map(|n| n.published(id))
}

/// Waits until the nodes together run every shard, each exactly once, and
/// each node runs at least one.
async fn wait_covered(nodes: &[&NodeHandle], map: ShardMap, what: &str) {
    let began = Instant::now();
    let deadline = began + Duration::from_secs(60);
    loop {
        let sets: Vec<BTreeSet<u32>> = nodes.iter().map(|n| n.running()).collect();
        let union: BTreeSet<u32> = sets.iter().flatten().copied().collect();
        let total: usize = sets.iter().map(BTreeSet::len).sum();
        if union.len() == map.shards() as usize
            && total == union.len()
            && sets.iter().all(|s| !s.is_empty())
        {
            eprintln!("{what}: {sets:?} after {:?}", began.elapsed());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: shards not covered: {sets:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn campaigns_complete_while_nodes_leave_and_join() {
    let (Some(bootstrap), Some(amqp)) = (
        env("SMARTMSG_KAFKA_BOOTSTRAP"),
        env("SMARTMSG_RABBITMQ_URL"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let uniq = unique_suffix();
    let cluster = format!("smtest-cl-{uniq}");
    let sent_topic = format!("smtest.cl-sent.{uniq}");
    let rx_topic = format!("smtest.cl-reactions.{uniq}");
    let map = ShardMap::new(4).unwrap();
    rt.block_on(async {
        smartmsg_kafka::stream::ensure_topics(&bootstrap, &[(&sent_topic, 2)])
            .await
            .unwrap();
        let queue: QueueOpener = {
            let amqp = amqp.clone();
            let prefix = format!("smtest.cl.{uniq}");
            Arc::new(move |shard| {
                let config = RabbitConfig::new(&amqp, format!("{prefix}.s{shard}"));
                Box::pin(async move {
                    let q: Arc<dyn DelayQueue> = Arc::new(RabbitDelayQueue::open(config).await?);
                    Ok(q)
                })
            })
        };
        let mut sc = ShardsConfig::new(&bootstrap, &cluster, map);
        sc.reactions_topic = Some(rx_topic.clone());
        let shards = KafkaShards::new(
            sc,
            queue,
            Arc::new(SystemClock),
            Arc::new(KafkaSender::new(&bootstrap, &sent_topic).unwrap()),
            RuntimeOptions::default(),
        )
        .await
        .unwrap();
        // The campaigns' read model in PostgreSQL, fed by whichever node
        // runs each shard.
        let pg = std::env::var("SMARTMSG_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty());
        let schema = format!("cl_{}", uniq.replace('-', "_"));
        let opener: Arc<dyn ShardOpener> = match &pg {
            Some(url) => Arc::new(PgReadModels::new(shards, url, &schema, &cluster).unwrap()),
            None => {
                eprintln!(
                    "SMARTMSG_POSTGRES_URL not set: the PostgreSQL read model is not checked"
                );
                Arc::new(shards)
            }
        };

        let a = start_node(&bootstrap, &cluster, map, "a", opener.clone()).await;
        let b = start_node(&bootstrap, &cluster, map, "b", opener.clone()).await;
        wait_covered(&[&a.handle, &b.handle], map, "a and b").await;

        let ids: Vec<String> = (0..CAMPAIGNS).map(|i| format!("cl-{i}")).collect();
        let start_ms = now_ms() + 2_000;
        for id in &ids {
            let node = [&a.handle, &b.handle]
                .into_iter()
                .find(|n| n.runtime_for(id).is_ok())
                .expect("a node runs the campaign's shard");
            node.create_campaign(setup(id, start_ms, 1_500))
                .await
                .unwrap();
            node.start(id).await.unwrap();
        }
        let spread: BTreeSet<u32> = ids.iter().map(|id| map.shard_of(id)).collect();
        eprintln!("campaign shards: {spread:?}");

        // The channel: reads what was sent, reacts for every third user,
        // keyed by campaign with Kafka's default (murmur2) partitioner.
        let consumer = topic_reader(
            &bootstrap,
            &sent_topic,
            2,
            &format!("smtest-cl-channel-{uniq}"),
        );
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("partitioner", "murmur2_random")
            .create()
            .unwrap();

        let mut received: HashMap<String, MessageRecord> = HashMap::new();
        let mut reacted: BTreeMap<String, HashSet<u32>> = BTreeMap::new();
        let mut b = Some(b);
        let mut c: Option<Running> = None;
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            while let Some(m) = consumer.poll(Duration::from_millis(10)) {
                let m = m.unwrap();
                let r: MessageRecord = serde_json::from_slice(m.payload().unwrap()).unwrap();
                if let Some(prev) = received.get(&r.id) {
                    assert_eq!(prev, &r, "a repeat with other content");
                    continue;
                }
                if r.user.is_multiple_of(3) {
                    reacted
                        .entry(r.campaign.clone())
                        .or_default()
                        .insert(r.user);
                    let body = r.reaction(ReactionKind::Replied, now_ms());
                    producer
                        .send(
                            FutureRecord::to(&rx_topic)
                                .key(r.campaign.as_str())
                                .payload(&body[..]),
                            Duration::from_secs(5),
                        )
                        .await
                        .unwrap();
                }
                received.insert(r.id.clone(), r);
            }
            let mut nodes: Vec<&NodeHandle> = vec![&a.handle];
            nodes.extend(b.as_ref().map(|b| &b.handle));
            nodes.extend(c.as_ref().map(|c| &c.handle));
            let views: Vec<Option<CampaignView>> = ids.iter().map(|id| view(&nodes, id)).collect();
            let sent_batches = |v: &Option<CampaignView>| {
                v.as_ref().map_or(0, |v| {
                    v.batches.iter().filter(|b| b.sent_ms.is_some()).count()
                })
            };
            if let Some(leaving) = b.take_if(|_| views.iter().all(|v| sent_batches(v) >= 1)) {
                // b leaves mid-campaign: its shards go to a.
                let _ = leaving.stop.send(());
                leaving.task.await.unwrap();
                wait_covered(&[&a.handle], map, "after b left").await;
                continue;
            }
            if b.is_none() && c.is_none() && views.iter().all(|v| sent_batches(v) >= 2) {
                // c joins: it takes some shards over from a.
                let joined = start_node(&bootstrap, &cluster, map, "c", opener.clone()).await;
                wait_covered(&[&a.handle, &joined.handle], map, "after c joined").await;
                c = Some(joined);
                continue;
            }
            let done = views.iter().zip(&ids).all(|(v, id)| {
                v.as_ref().is_some_and(|v| {
                    v.status == Some(Status::Completed)
                        && v.reactions == reacted.get(id).map_or(0, |r| r.len() as u64)
                })
            });
            if done && c.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not done in 150 s: {:?}",
                views
                    .iter()
                    .map(|v| v.as_ref().map(|v| (&v.id, v.status, v.sent, v.reactions)))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let c = c.unwrap();
        if let Some(url) = &pg {
            // Any instance answers from the shared read model: here, the
            // test process itself.
            let reader = PgCampaignReader::connect(url, &schema).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let rows = reader.list().await.unwrap();
                let ok = rows.len() == ids.len()
                    && rows.iter().all(|r| {
                        r.status == Some(Status::Completed)
                            && r.sent == BUDGET
                            && r.reactions == reacted.get(&r.id).map_or(0, |x| x.len() as u64)
                    });
                if ok {
                    eprintln!("postgresql: {} campaign rows match", rows.len());
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the read model did not catch up: {:?}",
                    rows.iter()
                        .map(|r| (&r.id, r.status, r.sent, r.reactions))
                        .collect::<Vec<_>>()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for id in &ids {
            let v = view(&[&a.handle, &c.handle], id).unwrap();
            assert_eq!(v.sent, BUDGET, "{id}");
            let got: HashSet<u32> = received
                .values()
                .filter(|r| &r.campaign == id)
                .map(|r| r.user)
                .collect();
            assert_eq!(got.len() as u64, BUDGET, "{id}: every message once, by id");
            assert_eq!(
                v.reactions,
                reacted.get(id).map_or(0, |r| r.len() as u64),
                "{id}: every reaction counted once"
            );
        }
        eprintln!(
            "cluster: {} messages, {} reactions counted, across a leave and a join",
            received.len(),
            reacted.values().map(HashSet::len).sum::<usize>()
        );
        for n in [a, c] {
            let _ = n.stop.send(());
            n.task.await.unwrap();
        }
    });
}
