//! What `open` refuses, on a real Kafka-protocol broker
//! (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset).

mod common;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};
use smartmsg_kafka::{KafkaEventLog, KafkaLogError};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn another_partition_count_is_refused() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    runtime().block_on(async {
        let cfg = common::config(&bootstrap, "parts", 3);
        KafkaEventLog::open(cfg.clone())
            .await
            .unwrap()
            .close()
            .await;
        match KafkaEventLog::open(cfg.clone().with_partitions(4)).await {
            Err(KafkaLogError::PartitionCount {
                expected: 4,
                actual: 3,
                ..
            }) => {}
            other => panic!("opening with another partition count returned {other:?}"),
        }
    });
}

#[test]
fn a_foreign_record_on_the_topic_is_a_typed_error() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    runtime().block_on(async {
        let cfg = common::config(&bootstrap, "foreign", 2);
        let log = KafkaEventLog::open(cfg.clone()).await.unwrap();
        let s = StreamId::new("s").unwrap();
        log.append(AppendTx::single(
            s,
            ExpectedVersion::Any,
            vec![NewEvent::new("E", 1, 0, &b"ok"[..])],
        ))
        .await
        .unwrap();
        log.close().await;

        // Someone else writes a record that is not an envelope.
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        p.send(
            BaseRecord::to(&cfg.topic())
                .key("s")
                .payload("not an envelope")
                .partition(1),
        )
        .map_err(|(e, _)| e)
        .unwrap();
        p.flush(Duration::from_secs(10)).unwrap();

        match KafkaEventLog::open(cfg).await {
            Err(KafkaLogError::Corrupt {
                partition: 1,
                reason,
                ..
            }) => assert!(reason.contains("magic"), "{reason}"),
            other => panic!("opening a topic with a foreign record returned {other:?}"),
        }
    });
}

#[test]
fn bad_configuration_is_refused_before_any_connection() {
    let cfg = smartmsg_kafka::KafkaConfig::new("127.0.0.1:1", "bad name");
    assert!(matches!(cfg.validate(), Err(KafkaLogError::Config(_))));
    let cfg = smartmsg_kafka::KafkaConfig::new("127.0.0.1:1", "ok").with_partitions(0);
    assert!(matches!(cfg.validate(), Err(KafkaLogError::Config(_))));
    assert!(
        smartmsg_kafka::KafkaConfig::new("127.0.0.1:1", "ok.name-1_2")
            .validate()
            .is_ok()
    );
}
