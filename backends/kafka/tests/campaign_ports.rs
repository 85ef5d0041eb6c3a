//! The runtime's Kafka ports against the test broker: `KafkaSender` passes
//! the sender conformance check (reading the topic back), and
//! `KafkaReactionSource` gives every record once, resuming from its
//! cursor.

mod common;

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use smartmsg_kafka::{KafkaReactionSource, KafkaSender};
use smartmsg_service::ingest::ReactionSource;
use smartmsg_service::sender::{check_sender, MessageRecord};

fn read_topic(bootstrap: &str, topic: &str, partitions: i32) -> Vec<MessageRecord> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("t-read-{topic}"))
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "7000")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut idle = 0;
    while idle < 10 {
        match c.poll(Duration::from_millis(100)) {
            None => idle += 1,
            Some(m) => {
                let m = m.unwrap();
                let r: MessageRecord = serde_json::from_slice(m.payload().unwrap()).unwrap();
                assert_eq!(
                    m.key(),
                    Some(r.user.to_string().as_bytes()),
                    "keyed by user"
                );
                out.push(r);
                idle = 0;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_sender_passes_the_sender_conformance_check() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let topic = common::unique_log("sent");
    smartmsg_kafka::stream::ensure_topics(&bootstrap, &[(&topic, 3)])
        .await
        .unwrap();
    let sender = KafkaSender::new(&bootstrap, &topic).unwrap();
    let (b, t) = (bootstrap.clone(), topic.clone());
    check_sender(&sender, move || {
        let (b, t) = (b.clone(), t.clone());
        async move {
            tokio::task::spawn_blocking(move || read_topic(&b, &t, 3))
                .await
                .unwrap()
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_source_gives_every_record_once_from_its_cursor() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let topic = common::unique_log("rx");
    smartmsg_kafka::stream::ensure_topics(&bootstrap, &[(&topic, 2)])
        .await
        .unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for i in 0..50u32 {
        let body = format!("{{\"n\":{i}}}");
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(&i.to_string())
                    .payload(&body)
                    .partition((i % 2) as i32),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
    let mut source = KafkaReactionSource::new("t-rx", &bootstrap, &topic).unwrap();
    let mut cursor: Option<Vec<u8>> = None;
    let mut seen = Vec::new();
    // Small polls; a new source object halfway, resuming from the cursor.
    for round in 0..40 {
        if round == 5 {
            source = KafkaReactionSource::new("t-rx", &bootstrap, &topic).unwrap();
        }
        let p = source.poll(cursor.as_deref(), 7).await.unwrap();
        assert!(p.messages.len() <= 7);
        for m in &p.messages {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            seen.push(v["n"].as_u64().unwrap() as u32);
            assert!(m.arrival_ms.is_some());
        }
        cursor = Some(p.cursor);
        if seen.len() >= 50 {
            break;
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..50).collect::<Vec<_>>(), "each record once");
    let more = source.poll(cursor.as_deref(), 100).await.unwrap();
    assert!(more.messages.is_empty());
    assert!(source.poll(Some(b"garbage"), 10).await.is_err());
}
