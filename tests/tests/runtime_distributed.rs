//! The campaign runtime end to end on the distributed backends, on the
//! wall clock: the event log on Kafka, the delay queue on RabbitMQ, planned
//! messages sent to a Kafka topic, reactions read from another Kafka topic
//! (written by this test, standing in for the channel). A batch every
//! second; the runtime is dropped and opened again half-way (a restart on
//! the same Kafka log and RabbitMQ queues). The campaign completes, every
//! message arrives with its stable id, every reaction is counted once.
//!
//! Needs `SMARTMSG_KAFKA_BOOTSTRAP` and `SMARTMSG_RABBITMQ_URL` (the test
//! script starts tansu and RabbitMQ); skips with a printed reason
//! otherwise.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use smartmsg_domain::reactions::ReactionKind;
use smartmsg_domain::{BatchSchedule, BatchSizing, CampaignSpec, Candidates, PolicySpec, Status};
use smartmsg_engine::stream::KeyValueStore;
use smartmsg_engine::{Clock, SystemClock};
use smartmsg_kafka::{KafkaConfig, KafkaEventLog, KafkaReactionSource, KafkaSender};
use smartmsg_rabbitmq::{RabbitConfig, RabbitDelayQueue};
use smartmsg_service::sender::MessageRecord;
use smartmsg_service::{CampaignSetup, PipelineSettings, Ports, Runtime, RuntimeOptions};

use smartmsg_tests::services::{env, topic_reader, unique_suffix};

fn now_ms() -> u64 {
    SystemClock.now_ms()
}

fn setup(start_ms: u64) -> CampaignSetup {
    let mut audience = Candidates::new(2).unwrap();
    for u in 0..500u32 {
        let x = [((u % 7) as f32 - 3.0) / 3.0, ((u % 5) as f32 - 2.0) / 2.0];
        audience.push(u, &x).unwrap();
    }
    let spec = CampaignSpec {
        channel: "kafka".into(),
        audience: "dist".into(),
        creatives: vec!["a".into(), "b".into()],
        budget: 200,
        schedule: BatchSchedule {
            start_ms,
            interval_ms: 1_000,
            sizing: BatchSizing::Count(4),
        },
    };
    let mut s = CampaignSetup::new(
        "dist",
        spec,
        audience,
        PolicySpec::CreativeThompson {
            propensity_draws: 100,
        },
    );
    s.pipeline = {
        let mut v = PipelineSettings::default();
        v.window_ms = 200;
        v.grace_ms = 100;
        v
    };
    s.reaction_horizon_ms = 1_000;
    s
}

#[test]
fn a_campaign_runs_on_kafka_and_rabbitmq_and_survives_a_restart() {
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
    let sent_topic = format!("smtest.sent.{uniq}");
    let rx_topic = format!("smtest.reactions.{uniq}");
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        smartmsg_kafka::stream::ensure_topics(&bootstrap, &[(&sent_topic, 2), (&rx_topic, 2)])
            .await
            .unwrap();
        let state: Arc<dyn KeyValueStore> =
            Arc::new(smartmsg_embedded::RedbStore::open(dir.path().join("state.redb")).unwrap());
        let open = || async {
            let log =
                KafkaEventLog::open(KafkaConfig::new(&bootstrap, format!("smtest-rt-{uniq}")))
                    .await
                    .unwrap();
            let queue =
                RabbitDelayQueue::open(RabbitConfig::new(&amqp, format!("smtest.rt.{uniq}")))
                    .await
                    .unwrap();
            let ports = Ports {
                log: Arc::new(log),
                snapshots: None,
                queue: Arc::new(queue),
                state: state.clone(),
                clock: Arc::new(SystemClock),
                sender: Arc::new(KafkaSender::new(&bootstrap, &sent_topic).unwrap()),
            };
            let mut r = Runtime::open(ports, RuntimeOptions::default())
                .await
                .unwrap();
            r.add_source(Box::new(
                KafkaReactionSource::new("reactions", &bootstrap, &rx_topic).unwrap(),
            ));
            r
        };
        let start_ms = now_ms() + 1_000;
        let mut runtime = open().await;
        runtime.create_campaign(setup(start_ms)).await.unwrap();
        runtime.start("dist").await.unwrap();

        // The channel: reads what was sent, reacts for every third user.
        let consumer = topic_reader(
            &bootstrap,
            &sent_topic,
            2,
            &format!("smtest-channel-{uniq}"),
        );
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        let mut received: HashMap<String, MessageRecord> = HashMap::new();
        let mut reacted: HashSet<u32> = HashSet::new();
        let mut restarted = false;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            runtime.step(now_ms()).await.unwrap();
            while let Some(m) = consumer.poll(Duration::from_millis(10)) {
                let m = m.unwrap();
                let r: MessageRecord = serde_json::from_slice(m.payload().unwrap()).unwrap();
                let id = std::str::from_utf8(
                    m.headers()
                        .and_then(|h| {
                            use rdkafka::message::Headers;
                            h.iter()
                                .find(|h| h.key == "message-id")
                                .and_then(|h| h.value)
                        })
                        .unwrap(),
                )
                .unwrap()
                .to_owned();
                assert_eq!(id, r.id);
                assert_eq!(m.key(), Some(r.user.to_string().as_bytes()));
                if let Some(prev) = received.get(&id) {
                    assert_eq!(prev, &r, "a repeat with other content");
                    continue;
                }
                if r.user.is_multiple_of(3) {
                    reacted.insert(r.user);
                    let body = r.reaction(ReactionKind::Replied, now_ms());
                    producer
                        .send(
                            FutureRecord::<(), _>::to(&rx_topic).payload(&body[..]),
                            Duration::from_secs(5),
                        )
                        .await
                        .unwrap();
                }
                received.insert(id, r);
            }
            let v = runtime.view("dist").unwrap();
            if !restarted && v.batches.iter().filter(|b| b.sent_ms.is_some()).count() >= 2 {
                // A restart on the same log, queue and store.
                drop(runtime);
                runtime = open().await;
                restarted = true;
                continue;
            }
            if v.status == Some(Status::Completed) && v.reactions == reacted.len() as u64 {
                break;
            }
            assert!(Instant::now() < deadline, "not done in 90 s: {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(restarted);
        let v = runtime.view("dist").unwrap();
        assert_eq!(v.sent, 200);
        assert_eq!(received.len(), 200, "every message, by id");
        let users: HashSet<u32> = received.values().map(|r| r.user).collect();
        assert_eq!(users.len(), 200, "users once");
        assert!(v.fed >= 3, "{v:?}");
        eprintln!(
            "kafka + rabbitmq: {} messages, {} reactions counted",
            received.len(),
            v.reactions
        );
    });
}
