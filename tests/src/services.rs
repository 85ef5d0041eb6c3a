//! Shared by the tests that talk to the test script's servers (Kafka,
//! RabbitMQ, PostgreSQL).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The variable `name`, or `None` after printing why the test skips.
pub fn env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!("skipping: {name} not set (scripts/test starts the servers)");
            None
        }
    }
}

/// `<pid>-<ms since the epoch>`: names (topics, queues, clusters) no other
/// run uses.
pub fn unique_suffix() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    format!("{}-{ms}", std::process::id())
}

/// A consumer assigned to partitions `0..partitions` of `topic` from the
/// beginning (the test's channel reading what was sent), in consumer group
/// `group` (tansu's group timeouts, see docs/services.md).
pub fn topic_reader(bootstrap: &str, topic: &str, partitions: i32, group: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "7000")
        .create()
        .expect("a consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("a partition");
    }
    consumer.assign(&tpl).expect("assign");
    consumer
}
