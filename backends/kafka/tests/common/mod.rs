//! Shared helpers of the Kafka tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use smartmsg_kafka::KafkaConfig;

/// The broker's bootstrap address, or `None` after printing why the test
/// is skipped.
pub fn bootstrap() -> Option<String> {
    match std::env::var("SMARTMSG_KAFKA_BOOTSTRAP") {
        Ok(b) if !b.trim().is_empty() => Some(b),
        _ => {
            eprintln!(
                "skipping: SMARTMSG_KAFKA_BOOTSTRAP not set (start a broker with \
                 `scripts/services.sh start && source .services/env`)"
            );
            None
        }
    }
}

/// A log name no other test (or run) uses.
pub fn unique_log(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "t-{test}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A configuration for a fresh log.
pub fn config(bootstrap: &str, test: &str, partitions: u32) -> KafkaConfig {
    KafkaConfig::new(bootstrap, unique_log(test)).with_partitions(partitions)
}

/// Whether the broker hides records of aborted transactions from
/// `read_committed` consumers (Apache Kafka does; tansu 0.6 does not).
/// Probed by aborting a transaction on a scratch topic.
pub fn broker_hides_aborted(bootstrap: &str) -> bool {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{Offset, TopicPartitionList};
    use std::time::Duration;

    let topic = format!("smartmsg.{}.probe", unique_log("abortprobe"));
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", &topic)
        .create()
        .expect("probe producer");
    p.init_transactions(Duration::from_secs(30))
        .expect("probe init");
    p.begin_transaction().expect("probe begin");
    p.send(
        BaseRecord::<(), str>::to(&topic)
            .payload("aborted")
            .partition(0),
    )
    .map_err(|(e, _)| e)
    .expect("probe send");
    p.flush(Duration::from_secs(10)).expect("probe flush");
    p.abort_transaction(Duration::from_secs(10))
        .expect("probe abort");
    p.begin_transaction().expect("probe begin");
    p.send(
        BaseRecord::<(), str>::to(&topic)
            .payload("committed")
            .partition(0),
    )
    .map_err(|(e, _)| e)
    .expect("probe send");
    p.commit_transaction(Duration::from_secs(10))
        .expect("probe commit");
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &topic)
        .set("isolation.level", "read_committed")
        .create()
        .expect("probe consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            use rdkafka::message::Message;
            return m.payload() == Some(b"committed".as_slice());
        }
    }
    panic!("the abort probe read nothing back from {topic}");
}

/// A record read back from a topic: raw key, value, timestamp (−1 when
/// the record has none) and headers (a null value as `None`).
#[derive(Debug, Clone)]
pub struct Committed {
    /// The partition it was read from.
    pub partition: i32,
    /// The key (empty when none).
    pub key: Vec<u8>,
    /// The value (empty when none).
    pub value: Vec<u8>,
    /// The record's timestamp in milliseconds, −1 when it has none.
    pub timestamp_ms: i64,
    /// The headers in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Every committed record of partition 0 of `topic` (`read_committed`),
/// waiting for `want` of them and then 2 s more for any extra, for at most
/// `within` in all.
pub fn read_committed(
    bootstrap: &str,
    topic: &str,
    want: usize,
    within: std::time::Duration,
) -> Vec<Committed> {
    read_committed_from(bootstrap, topic, &[0], want, within)
}

/// Every committed record of `partitions` of `topic`, as
/// [`read_committed`] reads partition 0.
pub fn read_committed_from(
    bootstrap: &str,
    topic: &str,
    partitions: &[i32],
    want: usize,
    within: std::time::Duration,
) -> Vec<Committed> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers as _, Message};
    use rdkafka::{Offset, TopicPartitionList};
    use std::time::{Duration, Instant};

    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}.reader.{partitions:?}"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let start = Instant::now();
    // Read what is there, then keep going a little to catch any extra.
    let mut quiet_since: Option<Instant> = None;
    while start.elapsed() < within {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet_since = None;
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Committed {
                    partition: m.partition(),
                    key: m.key().unwrap_or(&[]).to_vec(),
                    value: m.payload().unwrap_or(&[]).to_vec(),
                    timestamp_ms: m.timestamp().to_millis().unwrap_or(-1),
                    headers,
                });
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {
                if out.len() >= want {
                    let q = *quiet_since.get_or_insert_with(Instant::now);
                    if q.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
            }
        }
    }
    out
}
